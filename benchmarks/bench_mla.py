"""MLA attention at depth, K2's head shape: absorbed decode over float32 / bf16 / int8 latent
pools, and a prefill chunk appended at depth, old kernels against new, interleaved.

    python benchmarks/bench_mla.py [--threads 2] [--contexts 4096 32768] [--batch 1]
                                   [--prefill 512] [--reps 9]

One layer: H=64 heads, C=512 latent, R=64 rope dims, N=128, V=128, 64-token pages scattered in
the pool. Decode rows (the median time per call, the pool bytes read per second):
  f32             float32 pool, fp32 FMAs (the exact path)
  bf16 fp32       bf16 pool widened, fp32 FMAs: the kernel before the dot-product paths
                  (k2lite.cpu.set_exact(True) keeps it)
  bf16 dp         bf16 pool, vdpbf16ps (query and probabilities rounded to bf16)
  int8 vnni       int8 pool (kv8 rows), vpdpbusd
With --prefill T (0: off) a chunk of T queries at each depth runs through Model.mla's prefill
attention (both forms, see k2lite/model.py) on a bf16 cache; `expanded` is the form used before.
Read bandwidth (k2lite._cpu.stream_read over 1 GiB) is sampled before and after each context.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's k2lite
from k2lite import cpu as kcpu, ops  # noqa: E402
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
    a = ap.parse_args()
    cpu = ops.get("cpu")
    cpu.set_threads(a.threads)
    rng = np.random.default_rng(0)
    H, C, R, page, B = 64, 512, 64, 64, a.batch
    bwbuf = np.ones(1 << 28, np.float32)
    print(f"threads {a.threads}, SIMD {kcpu.SIMD}")
    print("| context | batch | pool | ms per layer | pool GB/s | read GB/s (before, after) |")
    print("| ---: | ---: | --- | ---: | ---: | --- |")
    for n in a.contexts:
        per = -(-n // page)
        # latent rows of unit RMS (the cache holds the rms-normalised latent), rope keys ~0.5
        pool = rng.standard_normal((B * per, page, C + R)).astype(np.float32)
        pool[..., C:] *= 0.5
        table = rng.permutation(B * per).astype(np.int32).reshape(B, per)
        lengths = np.full(B, n, np.int32)
        q = rng.standard_normal((B, H, C)).astype(np.float32)
        q_pe = rng.standard_normal((B, H, R)).astype(np.float32)
        pools = {"f32": (pool, False), "bf16 fp32": (f32_to_bf16(pool), True),
                 "bf16 dp": (None, False), "int8 vnni": (kv8_quantize(pool, C), False)}
        pools["bf16 dp"] = (pools["bf16 fp32"][0], False)
        del pool
        ts = {name: [] for name in pools}

        def run(p, exact):
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
            prefill_rows(a, n, bwbuf, rng)


def prefill_rows(a, depth, bwbuf, rng):
    """A chunk of a.prefill tokens appended at `depth` through Model.mla's prefill attention."""
    from k2lite.model import prefill_attention_forms
    forms = prefill_attention_forms()
    H, C, R, N, V, T = 64, 512, 64, 128, 128, a.prefill
    S = depth + T
    kv_all = rng.standard_normal((S, C + R)).astype(np.float32)
    kv_all[:, C:] *= 0.5
    kv_all = np.ascontiguousarray(kcpu.ref.dense(f32_to_bf16(kv_all)))   # a bf16 cache's values
    kv_b = f32_to_bf16(rng.standard_normal((H * (N + V), C)).astype(np.float32) * 0.05)
    q_nope = rng.standard_normal((T, H, N)).astype(np.float32)
    q_pe = rng.standard_normal((T, H, R)).astype(np.float32)
    ts = {name: [] for name in forms}
    bw0 = read_bw(bwbuf)
    for _ in range(max(1, a.reps // 3)):
        for name, f in forms.items():
            t = time.perf_counter()
            f(kv_all, q_nope, q_pe, kv_b, N, 0.05, depth)
            ts[name].append(time.perf_counter() - t)
    bw1 = read_bw(bwbuf)
    for name in forms:
        t = float(np.median(ts[name]))
        print(f"| {depth} | prefill {T} | {name} | {t * 1e3:.0f} | | {bw0:.0f}, {bw1:.0f} |")


if __name__ == "__main__":
    main()
