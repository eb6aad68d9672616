"""Absorbed MLA decode over the paged latent cache at K2's head shape, float32 vs bf16 pools.

    python benchmarks/bench_mla.py [--threads 2] [--contexts 4096 32768] [--batch 1]

One layer: H=64 heads, C=512 latent, R=64 rope dims, 64-token pages scattered in the pool.
Prints the median time per call and the pool bytes read per second.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's k2lite
from k2lite import ops  # noqa: E402
from k2lite.formats import f32_to_bf16  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args()
    cpu = ops.get("cpu")
    cpu.set_threads(a.threads)
    rng = np.random.default_rng(0)
    H, C, R, page, B = 64, 512, 64, 64, a.batch
    print("| context | batch | pool | ms per layer | pool GB/s |")
    print("| ---: | ---: | --- | ---: | ---: |")
    for n in a.contexts:
        per = n // page
        pool = (rng.standard_normal((B * per, page, C + R)) * 0.5).astype(np.float32)
        table = rng.permutation(B * per).astype(np.int32).reshape(B, per)
        lengths = np.full(B, n, np.int32)
        q = rng.standard_normal((B, H, C)).astype(np.float32)
        q_pe = rng.standard_normal((B, H, R)).astype(np.float32)
        pools = {"f32": pool, "bf16": f32_to_bf16(pool)}
        ts = {name: [] for name in pools}
        for p in pools.values():
            cpu.mla_decode(q, q_pe, p, table, lengths, 0.05)
        for _ in range(a.reps):    # interleaved, so both pools see the same state of the box
            for name, p in pools.items():
                t = time.perf_counter()
                cpu.mla_decode(q, q_pe, p, table, lengths, 0.05)
                ts[name].append(time.perf_counter() - t)
        for name, p in pools.items():
            t = float(np.median(ts[name]))
            print(f"| {n} | {B} | {name} | {t * 1e3:.2f} | {p.nbytes / t / 1e9:.1f} |")

if __name__ == "__main__":
    main()
