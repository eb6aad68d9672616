"""CPU backend: ref.py's ops over the native kernels (src/cpu/*.cpp).

setup.py compiles src/cpu once per SIMD level: k2lite.backends._cpu_avx512 (AVX-512 with VNNI,
BF16 and VBMI), _cpu_avx2 (AVX2 + FMA) and _cpu_scalar (any x86-64; the only build elsewhere);
this module loads the best one the running CPU supports (LEVEL) as `_cpu`.

Each wrapper checks shapes, dtypes and index ranges and raises a one-line ValueError, so no
bad input reaches native code. Activations are converted (contiguous float32) when needed;
weights are never copied: they must already be C-contiguous with the right dtype, and may be
read-only (mmap'd views). Ops not defined here fall back to ref (see ops.py).
"""
from __future__ import annotations

import importlib
import os

import numpy as np

# Idle OpenMP threads sleep instead of spinning, unless the user chose otherwise. On a shared
# or loaded machine spinning threads steal the cores the working threads need (measured:
# 2-thread INT4 GEMV 0.5 GB/s spinning vs 5 GB/s passive on a loaded 2-core box); the cost is
# a futex wake (~10 us) per parallel region. libgomp reads this when it is loaded, i.e. when
# _cpu is first imported, so it is set here, before that import (a runtime loaded earlier
# by another library keeps its own setting).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .. import ref  # noqa: E402
from .checks import activation as _act, bf16_args, cdiv as _cdiv, fp8_args, int4_args  # noqa: E402
from .checks import fp8_weight as _fp8_weight, group_scales as _group_scales, weight as _weight  # noqa: E402
from ..formats import Fp8Tensor, Int4Tensor, tiled_bf16_shape  # noqa: E402
from ..kvcache import kv8_row_bytes  # noqa: E402

NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16",
               "avx512vbmi"},
    "avx2": {"avx2", "fma", "f16c", "bmi2", "movbe"},
    "scalar": set(),
}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_levels() -> list:
    flags = cpu_flags()
    return [level for level, need in NEEDS.items() if need <= flags]


def _load_native():
    """(level, module): the fastest build this CPU runs (its feature flags first: a build must not
    even be imported on a CPU without its instructions); K2LITE_SIMD=avx512|avx2|scalar forces one."""
    forced = os.environ.get("K2LITE_SIMD")
    levels = [forced] if forced else supported_levels()
    for i, level in enumerate(levels):
        try:
            mod = importlib.import_module(f"k2lite.backends._cpu_{level}")
        except ImportError as e:
            if forced:
                raise
            failed = e
            continue
        if i:   # a faster build this CPU runs is broken or missing: say so, it costs several times
            import warnings
            warnings.warn(f"k2lite: the {levels[0]} kernels did not load ({failed}); using the slower "
                          f"{level} build (rebuild: pip install -e .)", RuntimeWarning, stacklevel=2)
        return level, mod
    raise ImportError("no k2lite CPU kernel build is installed (k2lite.backends._cpu_scalar missing)")


LEVEL, _cpu = _load_native()
stream_read = _cpu.stream_read        # the read-bandwidth probe (info.ReadMeter)

SIMD = _cpu.simd


def physical_cores(sysfs: str = "/sys/devices/system/cpu") -> int:
    """Cores this process may run on, SMT siblings counted once (Linux sysfs topology), else the
    CPUs it may use. Decode is memory-bound: a second hyperthread on a core adds no bandwidth,
    only contention, so this is the default thread count."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            with open(f"{sysfs}/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def set_threads(n: int) -> None:
    """OpenMP threads used by every kernel (omp_set_num_threads)."""
    most = max(64, 4 * (os.cpu_count() or 1))    # far more only makes libgomp fail to start them
    if not 1 <= int(n) <= most:
        raise ValueError(f"threads must be between 1 and {most}, not {n}")
    _cpu.set_threads(int(n))


def get_threads() -> int:
    return _cpu.get_threads()


if "OMP_NUM_THREADS" not in os.environ:     # the user's OpenMP setting wins
    set_threads(physical_cores())


# Quantized activations, where the CPU has the instructions (process-wide): INT4 ops with bf16
# scales run on int8 activations with AVX512-VNNI (NMSE ~1e-5, llama.cpp's q4_0 x q8_0 scheme),
# the BF16 matmuls on bf16 activations with AVX512-BF16 dot products (NMSE ~3e-6, as a GPU runs
# the model; prefill 1.3-1.6x), each sum in one order whatever the token count, so decode,
# prefill chunks and batches agree bit for bit (src/common.h). The latent cache then stores bf16
# (cache_dtype), so the prefill and absorbed-decode forms read the same latent, in half the bytes.
# Exact mode keeps fp32 everywhere (slower; reproduces ref to fp32 rounding).
INT4_VNNI = bool(getattr(_cpu, "int4_vnni", False))
BF16_DP = bool(getattr(_cpu, "bf16_dp", False))


def set_exact(on: bool) -> None:
    _cpu.set_exact(bool(on))


def get_exact() -> bool:
    return bool(_cpu.get_exact())


def cache_dtype():
    """bf16 (uint16 bits) where the BF16 matmuls take bf16 activations, else float32 (see above;
    decided when an LLM is loaded)."""
    return np.uint16 if BF16_DP and not get_exact() else np.float32


# ---------------------------------------------------------------- linear layers
def bf16_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y[T,N] = x[T,I] · w[N,I]ᵀ with w as bf16 bits."""
    x = bf16_args(x, w)
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    _cpu.bf16_matmul(out, x, w)
    return out


def bf16_tiled_matmul(x: np.ndarray, data: np.ndarray, n: int) -> np.ndarray:
    """bf16_matmul with w in TiledBF16's layout (data[N/16, I/32, 16, 32]); see formats."""
    x = _act(x, "x", 2)
    n = int(n)
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    _weight(data, "data", np.uint16, tiled_bf16_shape((n, x.shape[1])))
    out = np.empty((x.shape[0], n), np.float32)
    _cpu.bf16_tiled_matmul(out, x, data, n)
    return out


def int4_matmul(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """y[T,N] = x[T,I] · W[N,I]ᵀ, W = (codes - 8) * scale[n, i // group_size]."""
    x, n, group_size = int4_args(x, packed, scales, group_size)
    out = np.empty((x.shape[0], n), np.float32)
    _cpu.int4_matmul(out, x, packed, scales, group_size)
    return out


def fp8_matmul(x: np.ndarray, weight: np.ndarray, scale_inv: np.ndarray, block: tuple) -> np.ndarray:
    """y[T,N] = x[T,I] · W[N,I]ᵀ, W = e4m3(weight) * scale_inv[n // bo, i // bi], decoded
    inside the kernel (the dequantized matrix is never formed)."""
    x, n, bo, bi = fp8_args(x, weight, scale_inv, block)
    out = np.empty((x.shape[0], n), np.float32)
    _cpu.fp8_matmul(out, x, weight, scale_inv, bo, bi)
    return out


# ---------------------------------------------------------------- elementwise
def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x²) + eps) * w over the last axis (any leading shape)."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim < 1:
        raise ValueError("x: expected at least 1 dim")
    d = x.shape[-1]
    w = _act(w, "w", 1)
    if w.shape != (d,):
        raise ValueError(f"w: expected shape ({d},), got {w.shape}")
    x2 = x.reshape(-1, d)
    out = np.empty_like(x2)
    _cpu.rmsnorm(out, x2, w, float(eps))
    return out.reshape(x.shape)


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs (2i, 2i+1) of x[T,H,R] by positions[t]·inv_freq[i]."""
    x = _act(x, "x", 3)
    t, _, r = x.shape
    positions = _act(positions, "positions", 1, np.int64)
    inv_freq = _act(inv_freq, "inv_freq", 1)
    if r % 2 or positions.shape != (t,) or inv_freq.shape != (r // 2,):
        raise ValueError(f"rope: x {x.shape} needs positions ({t},) and inv_freq ({r // 2},), "
                         f"got {positions.shape} and {inv_freq.shape}")
    out = np.empty_like(x)
    _cpu.rope(out, x, positions, inv_freq)
    return out


# ---------------------------------------------------------------- mixture of experts
FMT_BF16, FMT_INT4, FMT_FP8 = 0, 1, 2   # src/common.h MoeFormat


def _fmt(w) -> int:
    if isinstance(w, Int4Tensor):
        return FMT_INT4
    if isinstance(w, Fp8Tensor):
        return FMT_FP8
    return FMT_BF16


def moe_supports(w) -> bool:
    """Expert formats the fused moe takes: INT4, FP8 (Fp8Tensor) and BF16 bits."""
    return isinstance(w, (Int4Tensor, Fp8Tensor)) or getattr(w, "dtype", None) == np.uint16


def _expert_mats(e, d: int, fmt: int, group: int | None):
    """(gate, up, down) -> what _cpu.moe takes: bf16 arrays, (packed, scales) pairs or
    (weight, scale_inv, bo, bi) tuples."""
    if not isinstance(e, (tuple, list)) or len(e) != 3:
        raise ValueError("each expert must be (gate_proj, up_proj, down_proj)")
    f = e[0].shape[0]
    shapes = ((f, d), (f, d), (d, f))
    mats = []
    for w, shape, name in zip(e, shapes, ("gate_proj", "up_proj", "down_proj")):
        if _fmt(w) != fmt or (fmt == FMT_INT4 and w.group_size != group):
            raise ValueError(f"{name}: all experts must share one format"
                             + (f" (Int4Tensor, group {group})" if fmt == FMT_INT4 else ""))
        if fmt != FMT_BF16 and tuple(w.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(w.shape)}")
        if fmt == FMT_INT4:
            _weight(w.packed, name + ".packed", np.int32, (shape[0], _cdiv(shape[1], 8)))
            _group_scales(w.scales, name + ".scales", (shape[0], _cdiv(shape[1], group)))
            mats.append((w.packed, w.scales))
        elif fmt == FMT_FP8:
            mats.append(_fp8_weight(w.weight, w.scale_inv, w.block, name, shape))
        else:
            mats.append(_weight(w, name, np.uint16, shape))
    return tuple(mats)


def moe(x: np.ndarray, experts: list, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Routed-expert sum Σ_k weights[t,k] · Expert_{idx[t,k]}(x[t]) for x[T,D]; only the
    chosen experts are touched, each read once for the whole batch."""
    x = _act(x, "x", 2)
    t, d = x.shape
    idx = np.asarray(idx)
    if idx.ndim != 2 or idx.shape[0] != t or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"idx: expected integer [{t}, K], got {idx.dtype} {idx.shape}")
    weights = _act(weights, "weights", 2)
    if weights.shape != idx.shape:
        raise ValueError(f"weights: expected shape {idx.shape}, got {weights.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= len(experts)):
        raise ValueError(f"idx: expert ids must lie in [0, {len(experts)}), got "
                         f"[{idx.min()}, {idx.max()}]")
    used, local = np.unique(idx, return_inverse=True)
    local = np.ascontiguousarray(local.reshape(idx.shape), np.int32)
    if used.size == 0:
        return np.zeros_like(x)
    first = experts[int(used[0])][0]
    fmt = _fmt(first)
    group = first.group_size if fmt == FMT_INT4 else 0
    mats = [_expert_mats(experts[int(e)], d, fmt, group) for e in used]
    f = mats[0][0][0].shape[0] if fmt != FMT_BF16 else mats[0][0].shape[0]
    for m in mats:
        if (m[0][0] if fmt != FMT_BF16 else m[0]).shape[0] != f:
            raise ValueError("experts: all experts must share one intermediate size")
    out = np.empty_like(x)
    _cpu.moe(out, x, mats, local, weights, fmt, int(group))
    return out


# ---------------------------------------------------------------- attention
def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, q_offset: int) -> np.ndarray:
    """Causal attention q[T,H,Dk], k[S,H,Dk], v[S,H,Dv] -> [T,H,Dv]; query t at q_offset+t."""
    q, k, v = _act(q, "q", 3), _act(k, "k", 3), _act(v, "v", 3)
    if k.shape[1:] != q.shape[1:] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention: shapes q {q.shape}, k {k.shape}, v {v.shape} do not agree")
    if int(q_offset) < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]), np.float32)
    _cpu.attention(out, q, k, v, float(scale), int(q_offset))
    return out


def attention_partial(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, q_offset: int,
                      prev=None) -> tuple:
    """attention() over one block of keys with each query's log-sum-exp, merged with prev =
    (out, lse) of other blocks; see ref.attention_partial."""
    q, k, v = _act(q, "q", 3), _act(k, "k", 3), _act(v, "v", 3)
    if k.shape[1:] != q.shape[1:] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention: shapes q {q.shape}, k {k.shape}, v {v.shape} do not agree")
    return _partial(lambda *a: _cpu.attention_lse(*a[:4], k, v, *a[5:]), q, v.shape[2], scale, q_offset, prev)


def mla_attention_partial(q: np.ndarray, kv: np.ndarray, k_pe: np.ndarray, scale: float, q_offset: int,
                          prev=None) -> tuple:
    """MLA's expanded form over one block of the history, keys and values read in place from kv
    (no per-head copy); see ref.mla_attention_partial."""
    q, kv, k_pe = _act(q, "q", 3), _act(kv, "kv", 3), _act(k_pe, "k_pe", 2)
    t, h, dk = q.shape
    n = dk - k_pe.shape[1]
    if kv.shape[1] != h or k_pe.shape[0] != kv.shape[0] or not 0 <= n <= kv.shape[2]:
        raise ValueError(f"mla_attention: shapes q {q.shape}, kv {kv.shape}, k_pe {k_pe.shape} do not agree")
    return _partial(lambda o, l, m, qq, _, sc, off: _cpu.mla_attention_lse(o, l, m, qq, kv, k_pe, n, sc, off),
                    q, kv.shape[2] - n, scale, q_offset, prev)


def _partial(run, q, dv, scale, q_offset, prev):
    """out, lse of run(out, lse, merge, q, None, scale, q_offset) over the queries that see a key
    (a block may lie past the first ones: q_offset < 0), merged with prev."""
    t, h = q.shape[:2]
    if prev is None:
        out, lse = np.empty((t, h, dv), np.float32), np.empty((t, h), np.float32)
    else:
        out, lse = np.array(prev[0], np.float32, order="C"), np.array(prev[1], np.float32, order="C")
        if out.shape != (t, h, dv) or lse.shape != (t, h):
            raise ValueError(f"prev: expected out {(t, h, dv)} and lse {(t, h)}, got {out.shape} {lse.shape}")
    # a block past the first queries: those see no key of it (lse -inf, merged as nothing)
    off = int(q_offset)
    skip = max(0, -off)
    if skip >= t:
        if prev is None:
            out[:], lse[:] = 0, -np.inf
        return out, lse
    if skip:
        if prev is None:
            out[:skip], lse[:skip] = 0, -np.inf
        o2, l2 = np.ascontiguousarray(out[skip:]), np.ascontiguousarray(lse[skip:])
        run(o2, l2, prev is not None, np.ascontiguousarray(q[skip:]), None, float(scale), 0)
        out[skip:], lse[skip:] = o2, l2
        return out, lse
    run(out, lse, prev is not None, q, None, float(scale), off)
    return out, lse


def _kv_b(q, kv_b):
    kv_b = np.asarray(kv_b)
    if kv_b.ndim != 2 or q.shape[1] == 0 or kv_b.shape[0] % q.shape[1]:
        raise ValueError(f"kv_b: expected [H*(N+V), C] with H = {q.shape[1]}, got {kv_b.shape}")
    return kv_b


def mla_absorb_q(q_nope: np.ndarray, kv_b) -> np.ndarray:
    """q_latent = q_nope folded through W_UK; see ref.mla_absorb_q (bf16 kv_b native)."""
    q_nope = _act(q_nope, "q_nope", 3)
    kv_b = _kv_b(q_nope, kv_b)
    if kv_b.dtype != np.uint16:
        return ref.mla_absorb_q(q_nope, kv_b)
    b, h, n = q_nope.shape
    if kv_b.shape[0] // h <= n:
        raise ValueError(f"kv_b: {kv_b.shape[0]} rows leave no W_UV rows for {h} heads of N={n}")
    out = np.empty((b, h, kv_b.shape[1]), np.float32)
    _cpu.mla_absorb_q(out, q_nope, _weight(kv_b, "kv_b", np.uint16, kv_b.shape))
    return out


def mla_absorb_o(u: np.ndarray, kv_b, N: int) -> np.ndarray:
    """o = u through W_UV; see ref.mla_absorb_o (bf16 kv_b native)."""
    u = _act(u, "u", 3)
    kv_b = _kv_b(u, kv_b)
    if kv_b.dtype != np.uint16:
        return ref.mla_absorb_o(u, kv_b, N)
    b, h, c = u.shape
    if kv_b.shape[1] != c or not 0 <= N < kv_b.shape[0] // h:
        raise ValueError(f"kv_b: expected [{h}*(N+V), {c}] with N = {N} < N+V, got {kv_b.shape}")
    out = np.empty((b, h, kv_b.shape[0] // h - N), np.float32)
    _cpu.mla_absorb_o(out, u, _weight(kv_b, "kv_b", np.uint16, kv_b.shape), int(N))
    return out


def mla_decode(q_latent: np.ndarray, q_pe: np.ndarray, pool: np.ndarray, page_table: np.ndarray,
               lengths: np.ndarray, scale: float) -> np.ndarray:
    """Absorbed MLA decode over the paged latent cache; see ref.mla_decode."""
    q_latent, q_pe = _act(q_latent, "q_latent", 3), _act(q_pe, "q_pe", 3)
    b, h, c = q_latent.shape
    if q_pe.shape[:2] != (b, h):
        raise ValueError(f"q_pe: expected shape ({b}, {h}, R), got {q_pe.shape}")
    r = q_pe.shape[2]
    if pool.dtype not in (np.uint16, np.int8):   # float32 rows; bf16 bits and int8 rows read as they are
        pool = _act(pool, "pool", 3)   # the cache is float32 already; no copy then
    elif pool.ndim != 3 or not pool.flags.c_contiguous:
        raise ValueError(f"pool: expected a C-contiguous [pages, page, row] array, got {pool.shape}")
    row = kv8_row_bytes(c + r) if pool.dtype == np.int8 else c + r
    if pool.shape[2] != row:
        raise ValueError(f"pool: expected last dim {row} ({'kv8_row_bytes(C+R)' if pool.dtype == np.int8 else 'C+R'}),"
                         f" got {pool.shape}")
    page_table = _act(page_table, "page_table", 2, np.int32)
    lengths = _act(lengths, "lengths", 1, np.int32)
    if page_table.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"page_table/lengths: expected [{b}, maxpages]/[{b}], got "
                         f"{page_table.shape}/{lengths.shape}")
    page, npool = pool.shape[1], pool.shape[0]
    if lengths.size and (lengths.min() < 0 or lengths.max() > page_table.shape[1] * page):
        raise ValueError(f"lengths: must lie in [0, {page_table.shape[1] * page}], got {lengths}")
    for i in range(b):
        used = page_table[i, :_cdiv(int(lengths[i]), page)]
        if used.size and (used.min() < 0 or used.max() >= npool):
            raise ValueError(f"page_table: sequence {i} uses page ids outside [0, {npool})")
    out = np.empty((b, h, c), np.float32)
    _cpu.mla_decode(out, q_latent, q_pe, pool, page_table, lengths, float(scale))
    return out
