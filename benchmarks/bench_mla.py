"""MLA attention at depth, K2's head shape: absorbed decode over float32 / bf16 / int8 latent
pools, and a prefill chunk appended at depth, old kernels against new, interleaved.

    python benchmarks/bench_mla.py [--threads 2] [--contexts 4096 32768] [--batch 1]
                                   [--prefill 512] [--reps 9] [--base OLD/_cpu_avx512....so]

One layer: H=64 heads, C=512 latent, R=64 rope dims, N=128, V=128, 64-token pages scattered in
the pool. Decode rows (the median time per call, the pool bytes read per second):
  bf16 before     --base's mla_decode on the bf16 pool (an older build, e.g. of the commit
                  before the dot-product kernels: git archive it, compile src/ with setup.py's
                  avx512 flags into one .so; it loads under its own name)
  f32             float32 pool, fp32 FMAs (the exact path)
  bf16 fp32       bf16 pool widened, fp32 FMAs (exact mode, k2lite.backends.cpu.set_exact(True))
  bf16 dp         bf16 pool, vdpbf16ps (query and probabilities rounded to bf16)
  int8 vnni       int8 pool (kv8 rows), vpdpbusd
With --prefill T (0: off) a chunk of T queries at each depth runs through Model's two prefill
attention forms (k2lite/model.py: mla_expanded in blocks of the history, mla_absorbed on the
decode kernel; `chosen` marks the one Model.prefill_form picks) on bf16 and int8 caches, and,
with --base, as before: the whole history expanded at once, --base's attention kernel.
Read bandwidth (k2lite.backends.cpu.stream_read over 1 GiB) is sampled before and after each context.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's k2lite
from k2lite import ops
from k2lite.backends import cpu as kcpu  # noqa: E402
from k2lite.formats import f32_to_bf16  # noqa: E402
from k2lite.kvcache import kv8_quantize  # noqa: E402


def read_bw(buf):
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        kcpu._cpu.stream_read(buf)
        best = min(best, time.perf_counter() - t)
    return buf.nbytes / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--prefill", type=int, default=0, help="also time a prefill chunk of this many tokens")
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--base", help="an older build of k2lite's CPU kernels (a _cpu_avx512*.so) to time "
                                   "as `before`, interleaved with this one")
    a = ap.parse_args()
    cpu = ops.get("cpu")
    cpu.set_threads(a.threads)
    base = None
    if a.base:
        import importlib.util
        spec = importlib.util.spec_from_file_location("k2lite_base." + os.path.basename(a.base).split(".")[0], a.base)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
        base.set_threads(a.threads)
    rng = np.random.default_rng(0)
    H, C, R, page, B = 64, 512, 64, 64, a.batch
    bwbuf = np.ones(1 << 28, np.float32)
    print(f"threads {a.threads}, SIMD {kcpu.SIMD}")
    print("| context | batch | pool | ms per layer | pool GB/s | read GB/s (before, after) |")
    print("| ---: | ---: | --- | ---: | ---: | --- |")
    for n in a.contexts:
        if n == 0:     # prefill rows only (a chunk at the start of a prompt)
            if a.prefill:
                prefill_rows(a, n, bwbuf, rng, base)
            continue
        per = -(-n // page)
        # latent rows of unit RMS (the cache holds the rms-normalised latent), rope keys ~0.5
        pool = rng.standard_normal((B * per, page, C + R)).astype(np.float32)
        pool[..., C:] *= 0.5
        table = rng.permutation(B * per).astype(np.int32).reshape(B, per)
        lengths = np.full(B, n, np.int32)
        q = rng.standard_normal((B, H, C)).astype(np.float32)
        q_pe = rng.standard_normal((B, H, R)).astype(np.float32)
        bf16 = f32_to_bf16(pool)
        pools = {"f32": (pool, False), "bf16 fp32": (bf16, True), "bf16 dp": (bf16, False),
                 "int8 vnni": (kv8_quantize(pool, C), False)}
        if base is not None:
            pools = {"bf16 before (base)": (bf16, None), **pools}
        del pool, bf16
        ts = {name: [] for name in pools}
        out = np.empty((B, H, C), np.float32)

        def run(p, exact):
            if exact is None:      # the older build
                t = time.perf_counter()
                base.mla_decode(out, q, q_pe, p, table, lengths, 0.05)
                return time.perf_counter() - t
            kcpu.set_exact(exact)
            try:
                t = time.perf_counter()
                cpu.mla_decode(q, q_pe, p, table, lengths, 0.05)
                return time.perf_counter() - t
            finally:
                kcpu.set_exact(False)
        bw0 = read_bw(bwbuf)
        for p, exact in pools.values():
            run(p, exact)
        for _ in range(a.reps):    # interleaved, so every pool sees the same state of the box
            for name, (p, exact) in pools.items():
                ts[name].append(run(p, exact))
        bw1 = read_bw(bwbuf)
        for name, (p, _) in pools.items():
            t = float(np.median(ts[name]))
            print(f"| {n} | {B} | {name} | {t * 1e3:.2f} | {p.nbytes / t / 1e9:.1f} | {bw0:.0f}, {bw1:.0f} |")
        del pools
        if a.prefill:
            prefill_rows(a, n, bwbuf, rng, base)


def prefill_rows(a, depth, bwbuf, rng, base):
    """A chunk of a.prefill queries appended at `depth` (K2's attention shapes, Model's two prefill
    forms on a bf16 and an int8 cache; `before`: the whole history expanded at once and the
    attention kernel of --base, as the prefill was)."""
    from k2lite.config import Config
    from k2lite.kvcache import PagedKVCache
    from k2lite.model import Attention, Model
    cfg = Config.from_json(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "models", "kimi-k2-thinking", "config.json"))
    model = Model(cfg, None, "cpu")
    ops = model.ops
    H, C, R, N, V, T = 64, 512, 64, 128, 128, a.prefill
    S = depth + T
    attn = Attention(*([None] * 6), kv_b_proj=f32_to_bf16(rng.standard_normal((H * (N + V), C)).astype(np.float32) * 0.05),
                     o_proj=None)
    rows = rng.standard_normal((S, C + R)).astype(np.float32)
    rows[:, C:] *= 0.5
    caches = {}
    for kv in ("bf16", "int8"):
        cache = PagedKVCache(1, C + R, 64, max_pages=-(-S // 64), initial_pages=-(-S // 64),
                             dtype=np.uint16 if kv == "bf16" else np.int8, latent=C)
        seq = cache.new_seq()
        cache.reserve([seq], np.arange(S))
        for t0 in range(0, S, 8192):
            cache.write(0, [seq], np.arange(t0, min(S, t0 + 8192)), rows[t0:t0 + 8192])
        caches[kv] = (cache, seq)
    del rows
    q_nope = rng.standard_normal((T, H, N)).astype(np.float32)
    q_pe = rng.standard_normal((T, H, R)).astype(np.float32)
    positions = np.arange(depth, S)

    def expanded(kv):
        cache, seq = caches[kv]
        return lambda: model.mla_expanded(attn, q_nope, q_pe, lambda x, y: cache.gather(0, seq, y, x), S, depth)

    def absorbed(kv):
        cache, seq = caches[kv]
        table, _ = cache.page_table([seq])
        return lambda: model.mla_absorbed(attn, q_nope, q_pe, cache.pool[0], np.repeat(table, T, axis=0),
                                          (positions + 1).astype(np.int32))

    def before():    # the whole history at once through kv_b, then --base's attention kernel
        cache, seq = caches["bf16"]
        kv_all = cache.gather(0, seq, S)
        kv = ops.linear(np.ascontiguousarray(kv_all[:, :C]), attn.kv_b_proj).reshape(S, H, N + V)
        k = np.ascontiguousarray(np.concatenate([kv[..., :N], np.broadcast_to(kv_all[:, None, C:], (S, H, R))], -1))
        v = np.ascontiguousarray(kv[..., N:])
        del kv
        out = np.empty((T, H, V), np.float32)
        base.attention(out, np.ascontiguousarray(np.concatenate([q_nope, q_pe], -1)), k, v, model.scale, depth)
        return out
    forms = {"bf16 expanded": expanded("bf16"), "bf16 absorbed": absorbed("bf16"),
             "int8 expanded": expanded("int8"), "int8 absorbed": absorbed("int8")}
    if base is not None:
        forms = {"bf16 before (base)": before, **forms}
    ts = {name: [] for name in forms}
    bw0 = read_bw(bwbuf)
    for _ in range(a.prefill_reps):
        for name, f in forms.items():
            t = time.perf_counter()
            f()
            ts[name].append(time.perf_counter() - t)
    bw1 = read_bw(bwbuf)
    for name in forms:
        t = float(np.median(ts[name]))
        chosen = model.prefill_form(T, S, np.uint16 if name.startswith("bf16") else np.int8)
        mark = " (chosen)" if name.endswith(chosen) and "before" not in name else ""
        print(f"| {depth} | prefill {T} | {name}{mark} | {t * 1e3:.0f} | | {bw0:.0f}, {bw1:.0f} |", flush=True)


if __name__ == "__main__":
    main()
