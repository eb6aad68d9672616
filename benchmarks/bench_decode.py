"""Decode and prefill speed on the real-width K2 slice, against the machine's bandwidth.

    python benchmarks/bench_decode.py [--model /tmp/k2slice] [-p 512] [-n 16] [--threads 1 2] [--no-mmap] [--repack]

Writes the k2-slice random checkpoint (real K2 widths: hidden 7168, 64 heads, 32 INT4 experts
top-8, 1 dense + 3 MoE layers, BF16 lm_head over 163840 tokens; ~8.9 GB) if the folder does not
exist. Per thread count it reports decode tokens/s, the weight bytes a decode step reads, that
rate as a fraction of the streaming bandwidth, prefill tokens/s, and the share of a decode step
spent in Python frames (cProfile: an upper bound, the profiler itself adds to it).

Bandwidth on a shared box drifts by tens of percent within seconds, so the read bandwidth is
sampled (1 GiB parallel sum) right before and after every timed decode step; each step's
fraction is its weight rate over the larger of the two samples, and the table gives the
median step. Prefill is timed after a short warm-up prefill (the first call into an mmap'd
checkpoint also pays for mapping its pages: reported separately as "cold").
"""
import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import k2lite  # noqa: E402
from k2lite import ops  # noqa: E402
from k2lite.info import ReadMeter, model_info  # noqa: E402
import numpy as np  # noqa: E402


def python_share(seq, steps=4):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        seq.append([11])
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())              # tottime of every frame
    in_c = sum(v[2] for k, v in st.stats.items() if k[0] == "~")   # builtins: kernels, numpy
    return 1 - in_c / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/k2slice")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-mmap", action="store_true", help="copy weights into anonymous memory first")
    ap.add_argument("--repack", action="store_true", help="BF16 linear weights into 16-row tiles (TiledBF16)")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.model, "config.json")):
        subprocess.check_call([sys.executable, "-m", "k2lite.testing.random_model", a.model, "--preset", "k2-slice"])
    per_token = model_info(a.model).decode_bytes_per_token
    meter = ReadMeter()
    print("| threads | weights | decode tok/s | weight GB/s | read GB/s | fraction | prefill tok/s (cold) "
          "| prefill/decode per token | Python share |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in a.threads:
        llm = k2lite.load(a.model, device=a.device, threads=t, mmap=not a.no_mmap, repack=a.repack)
        print(f"<!-- backend: {ops.describe(llm.backend)} -->")
        with llm.sequence() as seq:                 # cold: the first touch of every weight page
            t0 = time.perf_counter()
            seq.append(list(range(200, 264)), last_only=True)
            cold = 64 / (time.perf_counter() - t0)
        with llm.sequence() as seq:
            t0 = time.perf_counter()
            seq.append(list(range(100, 100 + a.p)), last_only=True)
            prefill = a.p / (time.perf_counter() - t0)
            for _ in range(2):                      # warm the caches
                seq.append([7])
            steps, rates, fracs, reads = [], [], [], []
            for _ in range(a.n):
                before = meter.sample()
                t0 = time.perf_counter()
                seq.append([7])
                dt = time.perf_counter() - t0
                after = meter.sample()
                steps.append(dt)
                rates.append(per_token / dt)
                reads.append(max(before, after))
                fracs.append(rates[-1] / reads[-1])
            share = python_share(seq)
        decode = 1 / float(np.median(steps))
        print(f"| {t} | {('anonymous' if a.no_mmap else 'mmap') + (' + repack' if a.repack else '')} | {decode:.2f} | {np.median(rates) / 1e9:.1f} | "
              f"{np.median(reads) / 1e9:.1f} | {np.median(fracs):.0%} (range {min(fracs):.0%}-{max(fracs):.0%}) | "
              f"{prefill:.1f} ({cold:.1f}) | {prefill / decode:.1f}x | {share:.1%} |")
        del llm, seq
    print(f"\ndecode reads {per_token / 1e9:.2f} GB of weights per token")


if __name__ == "__main__":
    main()
