"""k2lite's test-backend-ops: every op of ref.py against every available backend.

A table of cases (op, params, tolerance) builds fresh random inputs per seed; each backend's
result is compared with ref by NMSE = mse(out, ref) / mse(0, ref) and, for elementwise ops, by
max abs diff. Params appear in the test id, e.g. test_op[cpu-int4_matmul-T3_I256_N37_g32-s1].
Backends that are not built (cuda on a CPU box) skip cleanly.
"""
from __future__ import annotations

import numpy as np
import pytest

from k2lite import ops, ref
from k2lite.formats import Fp8Tensor, f32_to_bf16, quantize_fp8, quantize_int4, tile_bf16, to_dense
from k2lite.kvcache import kv8_quantize

BACKENDS = [b for b in ("cpu", "cuda")]
SEEDS = (0, 1, 2)


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean((a - b) ** 2) / max(np.mean(b ** 2), 1e-30))


def backend(name: str):
    if not ops.available(name):
        pytest.skip(f"backend {name} is not built/available here")
    return ops.get(name)


# ---------------------------------------------------------------- input builders
def f32(rng, *shape, s=1.0):
    return (rng.standard_normal(shape) * s).astype(np.float32)


def mk_int4_matmul(rng, T, I, N, g):
    q = quantize_int4(f32(rng, N, I), g)
    return (f32(rng, T, I), q.packed, q.scales, g)


def mk_int4_matmul_f32scales(rng, T, I, N, g):
    q = quantize_int4(f32(rng, N, I), g)
    return (f32(rng, T, I), q.packed, q.scales.astype(np.uint32).__lshift__(16).view(np.float32), g)


def mk_bf16_matmul(rng, T, I, N):
    return (f32(rng, T, I), f32_to_bf16(f32(rng, N, I)))


def mk_fp8_matmul(rng, T, I, N, bo, bi):
    q = quantize_fp8(f32(rng, N, I), (bo, bi))
    return (f32(rng, T, I), q.weight, q.scale_inv, (bo, bi))


def mk_fp8_all_codes(rng, T, N, bo, bi):
    """A weight matrix holding every e4m3 code but the NaNs (0x7F, 0xFF) in every row, shuffled,
    with random block scales: subnormals, ±0, ±448 all pass the decoder."""
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    w = np.stack([rng.permutation(codes) for _ in range(N)])
    s = rng.uniform(0.5, 2.0, (-(-N // bo), -(-w.shape[1] // bi))).astype(np.float32)
    return (f32(rng, T, w.shape[1]), w, s, (bo, bi))


def mk_moe(rng, T, D, F, E, K, fmt):
    def mat(n, i):
        w = f32(rng, n, i, s=0.1)
        if fmt == "fp8":
            return quantize_fp8(w, ((128, 128), (64, 32), (32, 64))[rng.integers(3)])   # any mix
        return quantize_int4(w) if fmt == "int4" else f32_to_bf16(w)
    experts = [(mat(F, D), mat(F, D), mat(D, F)) for _ in range(E)]
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    return (f32(rng, T, D), experts, idx, rng.random((T, K)).astype(np.float32))


def mk_mla(rng, B, H, C, R, page, P, bf16=False, kv="f32", pages=6):
    lengths = rng.integers(1, pages * page + 1, B).astype(np.int32)
    lengths[0] = pages * page                      # one full table
    table = rng.permutation(P)[: B * pages].reshape(B, pages).astype(np.int32)
    pool = f32(rng, P, page, C + R)
    pool[..., C:] *= 0.5                           # rope keys on a scale of their own
    kv = "bf16" if bf16 else kv
    pool = f32_to_bf16(pool) if kv == "bf16" else kv8_quantize(pool, C) if kv == "int8" else pool
    return (f32(rng, B, H, C), f32(rng, B, H, R), pool, table, lengths, float(1 / np.sqrt(C + R)))


def mk_bf16_tiled_matmul(rng, T, I, N):
    return (f32(rng, T, I), tile_bf16(f32_to_bf16(f32(rng, N, I))).data, N)


def mk_mla_absorb_q(rng, B, H, N, V, C):
    return (f32(rng, B, H, N), f32_to_bf16(f32(rng, H * (N + V), C)))


def mk_mla_absorb_o(rng, B, H, N, V, C):
    return (f32(rng, B, H, C), f32_to_bf16(f32(rng, H * (N + V), C)), N)


def mk_attention(rng, T, S, H, Dk, Dv, off):
    return (f32(rng, T, H, Dk), f32(rng, S, H, Dk), f32(rng, S, H, Dv), float(1 / np.sqrt(Dk)), off)


def mk_rmsnorm(rng, T, D):
    return (f32(rng, T, D), f32(rng, D), 1e-6)


def mk_rope(rng, T, H, R):
    inv = (10000.0 ** (-np.arange(R // 2) / (R // 2))).astype(np.float32)
    return (f32(rng, T, H, R), rng.integers(0, 4096, T).astype(np.int64), inv)


# INT4 with bf16 scales may run with int8-quantized activations (the CPU VNNI path, llama.cpp's
# q4_0 x q8_0 idea; scales per 8 inputs): measured NMSE ~1-4e-5 for int4_matmul and ~6-8e-5
# for moe (SwiGLU outputs are heavier-tailed), against llama.cpp's 5e-4 budget. Float32 scales,
# odd groups and k2lite.backends.cpu.set_exact(True) stay exact (1e-10, test_exact_path).
INT4_TOL, MOE_INT4_TOL = 1e-4, 2e-4
# BF16 matmuls run on bf16-rounded activations with AVX512-BF16 dot products (as on a GPU;
# src/cpu/bf16_matmul.cpp): measured NMSE ~3e-6 (2^-9 relative); exact mode keeps fp32.
BF16_TOL = 2e-5
# mla_decode against ref on the same cache (ref widens bf16 / dequantizes int8 rows exactly).
# bf16 rows on AVX512-BF16: the query and the probabilities are rounded to bf16 (relative error
# <= 2^-9 per element, random signs: score and output errors ~2^-9 / sqrt(3) relative, NMSE
# ~4e-6 measured); int8 rows: the query is quantized per head (absmax / 127 steps) and P·s_c to
# uint8 per 128-token block, NMSE ~4-9e-5 measured. The f32 path and the other SIMD levels stay exact.
MLA_BF16_TOL, MLA_INT8_TOL = 2e-5, 3e-4
# The expanded prefill attention on AVX512-BF16: q·scale, k, v and P rounded to bf16 (NMSE ~1e-5).
ATTN_TOL = 4e-5

# (op, id, builder, kwargs, nmse tolerance, max-abs tolerance or None)
I_ODD = 7 * 32 + 32
CASES = []
for T in (1, 3, 16):
    CASES += [
        ("int4_matmul", mk_int4_matmul, dict(T=T, I=I_ODD, N=37, g=32), INT4_TOL, None),
        ("bf16_matmul", mk_bf16_matmul, dict(T=T, I=I_ODD, N=37), BF16_TOL, None),
        ("bf16_matmul", mk_bf16_matmul, dict(T=T, I=I_ODD + 5, N=19), BF16_TOL,
         None),   # SIMD tail
        ("moe", mk_moe, dict(T=T, D=I_ODD, F=96, E=12, K=4, fmt="int4"), MOE_INT4_TOL, None),
        ("moe", mk_moe, dict(T=T, D=I_ODD, F=96, E=12, K=4, fmt="fp8"), 1e-10, None),
    ]
# FP8: I = 3 blocks + 40 (partial column block), N crossing row blocks, square and odd blocks
for T in (1, 3, 16):
    for N in (37, 130):
        for bo, bi in ((128, 128), (64, 32)):
            CASES.append(("fp8_matmul", mk_fp8_matmul, dict(T=T, I=3 * 128 + 40, N=N, bo=bo, bi=bi), 1e-10, None))
CASES += [
    ("fp8_matmul", mk_fp8_matmul, dict(T=20, I=7168 // 4, N=70, bo=128, bi=128), 1e-10, None),  # T > 16
    ("fp8_matmul", mk_fp8_matmul, dict(T=2, I=7, N=3, bo=128, bi=128), 1e-10, None),           # I < 64
    ("fp8_matmul", mk_fp8_matmul, dict(T=4, I=200, N=9, bo=3, bi=48), 1e-10, None),            # odd blocks
    ("fp8_matmul", mk_fp8_all_codes, dict(T=3, N=37, bo=16, bi=128), 1e-10, None),
    ("fp8_matmul", mk_fp8_all_codes, dict(T=1, N=5, bo=128, bi=64), 1e-10, None),
    ("moe", mk_moe, dict(T=5, D=160, F=200, E=4, K=2, fmt="fp8"), 1e-10, None),      # partial blocks
]
CASES += [
    ("int4_matmul", mk_int4_matmul, dict(T=2, I=264, N=9, g=8), 1e-10, None),        # scalar path
    ("int4_matmul", mk_int4_matmul, dict(T=5, I=512, N=33, g=128), INT4_TOL, None),
    ("int4_matmul", mk_int4_matmul, dict(T=3, I=320, N=9, g=64), INT4_TOL, None),     # partial block
    ("int4_matmul", mk_int4_matmul, dict(T=2, I=512, N=6, g=256), INT4_TOL, None),
    ("int4_matmul", mk_int4_matmul, dict(T=2, I=288, N=5, g=96), INT4_TOL, None),     # exact path
    ("int4_matmul", mk_int4_matmul_f32scales, dict(T=3, I=256, N=17, g=32), 1e-10, None),
    ("int4_matmul", mk_int4_matmul, dict(T=20, I=256, N=70, g=32), INT4_TOL, None),  # T > 16
    ("int4_matmul", mk_int4_matmul, dict(T=37, I=160, N=130, g=32), INT4_TOL, None), # > 32 tokens
    ("bf16_matmul", mk_bf16_matmul, dict(T=6, I=3 * 8192 + 16 * 5 + 7, N=9), BF16_TOL, None),  # column chunks
    # the dp rows: 4-token tiles + a tail, 32-token blocks, 4-row groups + single rows,
    # 2048-column chunks + a partial one, odd I (a masked last step), I < 32, one column
    ("bf16_matmul", mk_bf16_matmul, dict(T=23, I=2 * 1024 + 37, N=130), BF16_TOL, None),
    ("bf16_matmul", mk_bf16_matmul, dict(T=17, I=7, N=65), BF16_TOL, None),
    ("bf16_matmul", mk_bf16_matmul, dict(T=40, I=1, N=3), BF16_TOL, None),
    ("bf16_matmul", mk_bf16_matmul, dict(T=16, I=1024, N=64), BF16_TOL, None),
    ("bf16_tiled_matmul", mk_bf16_tiled_matmul, dict(T=1, I=261, N=37), BF16_TOL, None),
    ("bf16_tiled_matmul", mk_bf16_tiled_matmul, dict(T=3, I=32, N=16), BF16_TOL, None),
    ("bf16_tiled_matmul", mk_bf16_tiled_matmul, dict(T=16, I=1000, N=100), BF16_TOL, None),
    ("bf16_tiled_matmul", mk_bf16_tiled_matmul, dict(T=7, I=7, N=1), BF16_TOL, None),
    ("bf16_tiled_matmul", mk_bf16_tiled_matmul, dict(T=5, I=2 * 8192 + 77, N=33), BF16_TOL, None),  # chunks
    ("moe", mk_moe, dict(T=3, D=I_ODD, F=64, E=6, K=2, fmt="bf16"), 1e-10, None),
    ("moe", mk_moe, dict(T=9, D=128, F=64, E=3, K=3, fmt="int4"), MOE_INT4_TOL, None),  # all experts busy
    ("moe", mk_moe, dict(T=2, D=160, F=160, E=4, K=2, fmt="int4"), MOE_INT4_TOL, None),  # partial blocks
    ("mla_decode", mk_mla, dict(B=1, H=4, C=64, R=16, page=16, P=8), 1e-10, 1e-5),
    ("mla_decode", mk_mla, dict(B=3, H=11, C=96, R=16, page=7, P=30), 1e-10, 1e-5),
    ("mla_decode", mk_mla, dict(B=1, H=16, C=512, R=64, page=100, P=40, pages=30), 1e-10, 1e-5),  # split-KV
    ("mla_decode", mk_mla, dict(B=2, H=11, C=40, R=9, page=90, P=14), 1e-10, 1e-5),    # tails
    ("mla_decode", mk_mla, dict(B=2, H=11, C=40, R=9, page=90, P=50, pages=25), 1e-10, 1e-5),  # tails, split
]
# bf16 and int8 caches (the cpu backend's default with AVX512-BF16, and kv_cache="int8"):
# odd widths (C, R not multiples of 16, 32 or 64), odd head counts, pages of odd sizes, split-KV
# (> 2048 tokens), K2's head shape
for kv, tol in (("bf16", MLA_BF16_TOL), ("int8", MLA_INT8_TOL)):
    CASES += [
        ("mla_decode", mk_mla, dict(B=1, H=4, C=64, R=16, page=16, P=8, kv=kv), tol, None),
        ("mla_decode", mk_mla, dict(B=3, H=11, C=96, R=16, page=7, P=30, kv=kv), tol, None),
        ("mla_decode", mk_mla, dict(B=1, H=16, C=512, R=64, page=100, P=40, kv=kv, pages=30), tol, None),
        ("mla_decode", mk_mla, dict(B=2, H=11, C=40, R=9, page=90, P=14, kv=kv), tol, None),
        ("mla_decode", mk_mla, dict(B=2, H=7, C=200, R=33, page=50, P=90, kv=kv, pages=45), tol, None),
        # C not a multiple of 4 (an int8 column quad across the latent and the rope key), more
        # heads than one score tile holds (64)
        ("mla_decode", mk_mla, dict(B=2, H=5, C=37, R=11, page=13, P=20, kv=kv, pages=9), tol, None),
        ("mla_decode", mk_mla, dict(B=1, H=70, C=24, R=8, page=16, P=8, kv=kv), tol, None),
    ]
CASES += [
    ("attention", mk_attention, dict(T=1, S=9, H=3, Dk=24, Dv=20, off=8), ATTN_TOL, None),
    ("attention", mk_attention, dict(T=13, S=13, H=4, Dk=40, Dv=24, off=0), ATTN_TOL, None),
    ("attention", mk_attention, dict(T=5, S=21, H=2, Dk=16, Dv=16, off=16), ATTN_TOL, None),
    ("attention", mk_attention, dict(T=9, S=70, H=2, Dk=33, Dv=67, off=61), ATTN_TOL, None),     # odd dims
    ("mla_absorb_q", mk_mla_absorb_q, dict(B=1, H=5, N=12, V=7, C=40), 1e-10, None),
    ("mla_absorb_q", mk_mla_absorb_q, dict(B=3, H=2, N=16, V=16, C=33), 1e-10, None),
    ("mla_absorb_q", mk_mla_absorb_q, dict(B=2, H=3, N=20, V=8, C=300), 1e-10, None),   # 128-col blocks + tail
    ("mla_absorb_q", mk_mla_absorb_q, dict(B=1, H=2, N=128, V=128, C=512), 1e-10, None), # K2 head shape
    ("mla_absorb_o", mk_mla_absorb_o, dict(B=1, H=5, N=12, V=7, C=40), 1e-10, None),
    ("mla_absorb_o", mk_mla_absorb_o, dict(B=3, H=4, N=16, V=19, C=37), 1e-10, None),
    ("attention", mk_attention, dict(T=37, S=40, H=3, Dk=33, Dv=19, off=3), ATTN_TOL, None),
    ("rmsnorm", mk_rmsnorm, dict(T=1, D=7168), 1e-12, 1e-5),
    ("rmsnorm", mk_rmsnorm, dict(T=7, D=513), 1e-12, 1e-5),
    ("rope", mk_rope, dict(T=1, H=5, R=64), 1e-12, 1e-5),
    ("rope", mk_rope, dict(T=9, H=3, R=16), 1e-12, 1e-5),
]


def fp8_tol(name):
    """FP8 NMSE bound: exact decoding on ref/cpu; the cuda backend dequantizes FP8 weights to
    bf16 on the device (k2lite/backends/cuda.py), 2^-9 relative per weight."""
    return 2e-5 if name == "cuda" else 1e-10


def case_id(c):
    return f"{c[0]}-" + "_".join(f"{k}{v}" for k, v in c[2].items())


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", BACKENDS)
def test_op(name, case, seed):
    op, build, params, tol, atol = case
    be = backend(name)
    if op == "fp8_matmul":
        tol, atol = max(tol, fp8_tol(name)), (atol if name != "cuda" else None)
    args = build(np.random.default_rng(seed), **params)
    want = getattr(ref, op)(*args)
    got = getattr(be, op)(*args)
    assert got.shape == want.shape and got.dtype == np.float32, (got.shape, got.dtype)
    err, mad = nmse(got, want), float(np.max(np.abs(got - want)))
    assert err <= tol, f"{op} {params}: NMSE {err:.3e} > {tol:.0e} (max abs diff {mad:.3e})"
    if atol is not None:
        assert mad <= atol * max(1.0, float(np.max(np.abs(want)))), f"{op} {params}: max abs diff {mad:.3e}"


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("int4_matmul", "moe", "bf16_matmul", "bf16_tiled_matmul")], ids=case_id)
def test_exact_path(case, seed):
    """With set_exact(True) the CPU INT4 and BF16 ops reproduce ref (fp32 activations, bf16-rounded
    weights) on every path; the fast path must stay well inside its tolerance."""
    from k2lite.backends import cpu
    op, build, params, tol, _ = case
    args = build(np.random.default_rng(seed), **params)
    want = getattr(ref, op)(*args)
    assert not cpu.get_exact()
    try:
        cpu.set_exact(True)
        assert nmse(getattr(cpu, op)(*args), want) <= 1e-10
    finally:
        cpu.set_exact(False)
    assert nmse(getattr(cpu, op)(*args), want) <= tol


def test_int4_batch_invariant():
    """On the CPU, a token's INT4 result does not depend on the other tokens of the call or on
    the thread count (each (row, token) sum is formed the same way in every tile): decode and
    prefill agree bit for bit."""
    from k2lite.backends import cpu
    rng = np.random.default_rng(4)
    x, packed, scales, g = mk_int4_matmul(rng, 37, 640, 45, 32)
    full = cpu.int4_matmul(x, packed, scales, g)
    for i in (0, 5, 36):
        assert np.array_equal(full[i:i + 1], cpu.int4_matmul(x[i:i + 1], packed, scales, g))
    x, experts, idx, wts = mk_moe(rng, 9, 256, 96, 12, 4, "int4")
    threads = cpu.get_threads()
    try:
        outs = []
        for th in (1, 2):
            cpu.set_threads(th)
            outs.append(cpu.moe(x, experts, idx, wts))
            for i in (0, 8):
                assert np.array_equal(outs[-1][i:i + 1], cpu.moe(x[i:i + 1], experts, idx[i:i + 1], wts[i:i + 1]))
        assert np.array_equal(outs[0], outs[1])
    finally:
        cpu.set_threads(threads)


def test_bf16_batch_invariant():
    """With vdpbf16ps (AVX512-BF16) every BF16 matmul forms a (row, token) sum in one order
    whatever the number of tokens or the layout (rows or TiledBF16), so decode, prefill chunks,
    batches and repacked weights agree bit for bit (a bf16-rounded activation downstream would
    turn the smallest difference into a 2^-9 jump)."""
    from k2lite.backends import cpu
    from k2lite.formats import tile_bf16
    if not getattr(cpu._cpu, "bf16_dp", False):
        pytest.skip("no AVX512-BF16 path in this build")
    rng = np.random.default_rng(6)
    for T, I, N in ((37, 2 * 2048 + 77, 45), (5, 31, 17), (20, 7168, 33), (16, 2048 + 5, 21), (32, 4100, 9)):
        x, w = mk_bf16_matmul(rng, T, I, N)
        full = cpu.bf16_matmul(x, w)
        assert np.array_equal(full, cpu.bf16_tiled_matmul(x, tile_bf16(w).data, N))
        for i in (0, T // 2, T - 1):
            assert np.array_equal(full[i:i + 1], cpu.bf16_matmul(x[i:i + 1], w))
            assert np.array_equal(full[i:i + 1], cpu.bf16_tiled_matmul(x[i:i + 1], tile_bf16(w).data, N))


@pytest.mark.parametrize("name", BACKENDS)
def test_linear_dispatch(name):
    be = backend(name)
    rng = np.random.default_rng(5)
    x, w = f32(rng, 2, 64), f32(rng, 8, 64)
    for wt, tol in ((quantize_int4(w), INT4_TOL), (f32_to_bf16(w), BF16_TOL), (w, 1e-10),
                    (quantize_fp8(w), fp8_tol(name))):
        assert nmse(be.linear(x, wt), x @ to_dense(wt).T) < tol


@pytest.mark.parametrize("name", BACKENDS)
def test_fp8_nan_codes(name):
    """NaN codes (0x7F, 0xFF) decode to NaN as in formats.E4M3: every output of a row holding
    one is NaN, as in ref (NaN·x = NaN); other rows stay finite and match ref."""
    be = backend(name)
    rng = np.random.default_rng(6)
    x, w, s, block = mk_fp8_all_codes(rng, 3, 40, 16, 64)
    w = np.ascontiguousarray(np.concatenate([w, w[:, :2]], axis=1))       # I = 256, all codes
    w[3, 17], w[3, 100], w[29, 255] = 0x7F, 0xFF, 0xFF
    w[30, 200] = 0x7F
    x = f32(rng, 3, 256)
    s = rng.uniform(0.5, 2.0, (3, 4)).astype(np.float32)
    got, want = be.fp8_matmul(x, w, s, block), ref.fp8_matmul(x, w, s, block)
    nan_rows = np.isnan(want).all(axis=0)
    assert sorted(np.flatnonzero(nan_rows)) == [3, 29, 30]
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert nmse(got[:, ~nan_rows], want[:, ~nan_rows]) < fp8_tol(name)


@pytest.mark.parametrize("name", BACKENDS)
def test_fp8_moe_dispatch(name):
    """FP8 experts take the backend's fused moe where it says it supports them."""
    be = backend(name)
    args = mk_moe(np.random.default_rng(8), 4, 128, 64, 5, 2, "fp8")
    assert nmse(be.moe(*args), ref.moe(*args)) < 1e-10
    if name == "cpu":
        from k2lite.backends import cpu
        assert cpu.moe_supports(args[1][0][0])


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("name", BACKENDS)
def test_attention_partial_blocks_merge_to_the_whole(name, seed):
    """attention_partial over blocks of the keys, merged in turn, gives attention() over all of
    them and the log-sum-exp of every query's scores; a block past the first queries (negative
    offset) leaves those as they were; alone, a query seeing no key gets zeros and -inf."""
    be = backend(name)
    rng = np.random.default_rng(seed)
    T, S, H, Dk, Dv = 21, 77, 3, 35, 19
    q, k, v, sc, _ = mk_attention(rng, T, S, H, Dk, Dv, 0)
    off = S - T + 2                                   # the last two keys: nobody's yet
    want = ref.attention(q, k, v, sc, off)
    scores = np.einsum("thd,shd->ths", q, k) * np.float32(sc)
    scores = np.where(np.arange(S)[None, None, :] > (off + np.arange(T))[:, None, None], -np.inf, scores)
    want_lse = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    for cuts in ((30, 60), (10, 56, 65), (57,)):
        acc = None
        for a, b in zip((0,) + cuts, cuts + (S,)):
            acc = be.attention_partial(q, k[a:b], v[a:b], sc, off - a, acc)
        assert nmse(acc[0], want) < ATTN_TOL, cuts
        assert np.abs(acc[1] - want_lse).max() < 1e-3 * max(1.0, float(np.abs(want_lse).max())), cuts
    o, lse = be.attention_partial(q, k[60:], v[60:], sc, off - 60)
    first = off + np.arange(T) < 60                   # these queries see none of keys 60..
    assert first.any() and not o[first].any() and np.isneginf(lse[first]).all()
    assert np.isfinite(lse[~first]).all()


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("name", BACKENDS)
def test_mla_attention_partial(name, seed):
    """MLA's expanded form reads keys (kv's N dims per head, then k_pe shared by the heads) and
    values (kv's V dims) in place: the same as attention_partial on the concatenated copies, in
    blocks merged in turn, a block past the first queries included."""
    be = backend(name)
    rng = np.random.default_rng(seed)
    T, S, H, N, R, V = 19, 90, 3, 24, 9, 17
    q, kv, k_pe = f32(rng, T, H, N + R), f32(rng, S, H, N + V), f32(rng, S, R)
    k = np.concatenate([kv[..., :N], np.broadcast_to(k_pe[:, None], (S, H, R))], -1)
    sc, off = 0.2, S - T
    want = ref.attention_partial(q, k, kv[..., N:], sc, off)
    acc = None
    for a, b in ((0, 40), (40, 80), (80, S)):
        acc = be.mla_attention_partial(q, kv[a:b], k_pe[a:b], sc, off - a, acc)
    assert nmse(acc[0], want[0]) < ATTN_TOL
    assert np.abs(acc[1] - want[1]).max() < 1e-3 * float(np.abs(want[1]).max())
    one = be.mla_attention_partial(q, kv, k_pe, sc, off)
    assert nmse(one[0], want[0]) < ATTN_TOL


MLA_TOL = {"f32": 1e-10, "bf16": MLA_BF16_TOL, "int8": MLA_INT8_TOL}


@pytest.mark.parametrize("kv", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("name", BACKENDS)
def test_mla_decode_empty_sequence(name, kv):
    """A sequence with nothing cached attends to nothing: zeros, next to normal ones (and a
    long one that the CPU kernel splits into token ranges)."""
    be = backend(name)
    ql, qp, pool, table, _, sc = mk_mla(np.random.default_rng(9), 3, 5, 40, 8, 100, 90, kv=kv, pages=30)
    lengths = np.array([0, 2900, 0], np.int32)
    got, want = be.mla_decode(ql, qp, pool, table, lengths, sc), ref.mla_decode(ql, qp, pool, table, lengths, sc)
    assert not got[[0, 2]].any() and not want[[0, 2]].any()
    assert nmse(got, want) < MLA_TOL[kv]


@pytest.mark.parametrize("kv", ["f32", "bf16", "int8"])
def test_mla_decode_invariant(kv):
    """On the CPU every sum of mla_decode is formed in one order whatever the thread count (token
    ranges of fixed positions, merged in order) and whatever else is in the batch: the same
    sequence gives bit-identical results alone, in a batch, with 1, 2 or 3 threads."""
    from k2lite.backends import cpu
    rng = np.random.default_rng(11)
    # 40 heads: with 3 threads the items also split the heads (chunks of 32 and 8)
    ql, qp, pool, table, lengths, sc = mk_mla(rng, 3, 40, 96, 24, 64, 120, kv=kv, pages=40)
    lengths[1] = 700
    threads = cpu.get_threads()
    try:
        outs = []
        for th in (1, 2, 3):
            cpu.set_threads(th)
            outs.append(cpu.mla_decode(ql, qp, pool, table, lengths, sc))
            for b in range(3):
                alone = cpu.mla_decode(ql[b:b + 1], qp[b:b + 1], pool, table[b:b + 1], lengths[b:b + 1], sc)
                assert np.array_equal(alone[0], outs[-1][b]), (kv, th, b)
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    finally:
        cpu.set_threads(threads)
    assert nmse(outs[0], ref.mla_decode(ql, qp, pool, table, lengths, sc)) < MLA_TOL[kv]


@pytest.mark.parametrize("name", BACKENDS)
def test_readonly_and_noncontiguous(name):
    """Weights may be read-only (mmap); activations may be strided or float64."""
    be = backend(name)
    x, packed, scales, g = mk_int4_matmul(np.random.default_rng(3), 4, 256, 16, 32)
    packed.flags.writeable = False
    scales.flags.writeable = False
    xs = np.asfortranarray(x.astype(np.float64))
    assert nmse(be.int4_matmul(xs, packed, scales, g), ref.int4_matmul(x, packed, scales, g)) < INT4_TOL
    x, w = mk_bf16_matmul(np.random.default_rng(3), 2, 64, 8)
    w.flags.writeable = False
    assert nmse(be.bf16_matmul(x[:, ::1], w), ref.bf16_matmul(x, w)) < BF16_TOL
    x, w, s, block = mk_fp8_matmul(np.random.default_rng(3), 3, 200, 20, 128, 128)
    w.flags.writeable = False
    s.flags.writeable = False
    xs = np.asfortranarray(x.astype(np.float64))
    assert nmse(be.fp8_matmul(xs, w, s, block), ref.fp8_matmul(x, w, s, block)) < fp8_tol(name)


# ---------------------------------------------------------------- bad inputs raise ValueError
def _bad_cases():
    rng = np.random.default_rng(7)
    x, packed, scales, g = mk_int4_matmul(rng, 2, 256, 8, 32)
    xb, wb = mk_bf16_matmul(rng, 2, 64, 8)
    mx, experts, idx, wts = mk_moe(rng, 2, 64, 32, 4, 2, "int4")
    ql, qp, pool, table, lengths, sc = mk_mla(rng, 2, 3, 32, 8, 4, 16)
    bad_table = table.copy()
    bad_table[1, 0] = 16
    q, k, v, s, _ = mk_attention(rng, 3, 5, 2, 8, 8, 2)
    xf, wf, sf, bf = mk_fp8_matmul(rng, 2, 200, 10, 128, 128)
    mfx, mfe, mfi, mfw = mk_moe(rng, 2, 64, 32, 4, 2, "fp8")
    mixed = list(mfe)
    mixed[1] = (mfe[1][0], mfe[1][1], f32_to_bf16(f32(rng, 64, 32)))
    bad_block = [(e[0], e[1], Fp8Tensor(e[2].weight, e[2].scale_inv, e[2].shape, (0, 128))) for e in mfe]
    return {
        "fp8_wrong_shape": ("fp8_matmul", (xf[:, :100], wf, sf, bf)),
        "fp8_wrong_dtype": ("fp8_matmul", (xf, wf.view(np.int8), sf, bf)),
        "fp8_scales_dtype": ("fp8_matmul", (xf, wf, sf.astype(np.float64), bf)),
        "fp8_scales_shape": ("fp8_matmul", (xf, wf, sf[:, :1], bf)),
        "fp8_block_zero": ("fp8_matmul", (xf, wf, sf, (0, 128))),
        "fp8_block_bad": ("fp8_matmul", (xf, wf, sf, (128,))),
        "fp8_noncontig_weight": ("fp8_matmul", (xf[:, :100], wf[:, ::2], sf[:, :1], bf)),
        "fp8_weight_1d": ("fp8_matmul", (xf, wf.reshape(-1), sf, bf)),
        "moe_fp8_mixed_formats": ("moe", (mfx, mixed, np.array([[0, 1], [1, 2]], np.int32), mfw)),
        "moe_fp8_block_zero": ("moe", (mfx, bad_block, mfi, mfw)),
        "int4_wrong_shape": ("int4_matmul", (x[:, :128], packed, scales, g)),
        "int4_wrong_dtype": ("int4_matmul", (x, packed.view(np.uint32), scales, g)),
        "int4_scales_shape": ("int4_matmul", (x, packed, scales[:, :4], g)),
        "int4_group_zero": ("int4_matmul", (x, packed, scales, 0)),
        "int4_noncontig_weight": ("int4_matmul", (x[:, :128], packed[:, ::2], scales[:, ::2], g)),
        "bf16_wrong_dtype": ("bf16_matmul", (xb, wb.astype(np.int16))),
        "bf16_wrong_shape": ("bf16_matmul", (xb[:, :32], wb)),
        "bf16_tiled_shape": ("bf16_tiled_matmul", (xb[:, :32], tile_bf16(wb).data, wb.shape[0])),
        "bf16_tiled_rows": ("bf16_tiled_matmul", (xb, tile_bf16(wb).data, wb.shape[0] + 16)),
        "moe_idx_high": ("moe", (mx, experts, idx + 4, wts)),
        "moe_idx_negative": ("moe", (mx, experts, idx - 4, wts)),
        "moe_weights_shape": ("moe", (mx, experts, idx, wts[:, :1])),
        "moe_wrong_dim": ("moe", (mx[:, :32], experts, idx, wts)),
        "mla_page_out_of_range": ("mla_decode", (ql, qp, pool, bad_table, np.full(2, 24, np.int32), sc)),
        "mla_length_too_long": ("mla_decode", (ql, qp, pool, table, np.full(2, 25, np.int32), sc)),
        "mla_pool_dim": ("mla_decode", (ql, qp, pool[:, :, :-1], table, lengths, sc)),
        "mla_int8_row": ("mla_decode", (ql, qp, np.ascontiguousarray(kv8_quantize(pool, 32)[:, :, :-4]), table,
                                        lengths, sc)),
        "mla_int8_noncontig": ("mla_decode", (ql, qp, kv8_quantize(pool, 32)[::2], table // 2, lengths, sc)),
        "absorb_q_rows": ("mla_absorb_q", (ql, f32_to_bf16(ql.reshape(-1, ql.shape[2])[:-1]))),
        "absorb_o_cols": ("mla_absorb_o", (ql, f32_to_bf16(np.ones((ql.shape[1] * 4, 7), np.float32)), 2)),
        "attention_shapes": ("attention", (q, k[:, :1], v, s, 0)),
        "attention_negative_offset": ("attention", (q, k, v, s, -1)),
        "rmsnorm_weight": ("rmsnorm", (xb, xb[0, :10].copy(), 1e-6)),
        "rope_inv_freq": ("rope", (q, np.arange(3), np.ones(3, np.float32))),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input_raises(name, case):
    be = backend(name)
    op, args = BAD[case]
    with pytest.raises(ValueError):
        getattr(be, op)(*args)


@pytest.mark.parametrize("name", BACKENDS)
def test_empty_sums_are_zero(name):
    """I = 0: every output is an empty sum, 0 (the column loops write nothing then)."""
    from k2lite.formats import tile_bf16
    be = backend(name)
    x, w = np.zeros((3, 0), np.float32), np.zeros((5, 0), np.uint16)
    assert np.array_equal(be.bf16_matmul(x, w), np.zeros((3, 5), np.float32))
    assert np.array_equal(be.bf16_tiled_matmul(x, tile_bf16(w).data, 5), np.zeros((3, 5), np.float32))
