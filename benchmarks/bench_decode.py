"""Decode and prefill speed on the real-width K2 slice, against the machine's bandwidth.

    python benchmarks/bench_decode.py [--model /tmp/k2slice] [-p 512] [-n 16] [--threads 1 2] [--no-mmap]

Writes the k2-slice random checkpoint (real K2 widths: hidden 7168, 64 heads, 32 INT4 experts
top-8, 1 dense + 3 MoE layers, BF16 lm_head over 163840 tokens; ~8.9 GB) if the folder does not
exist. Per thread count it reports decode tokens/s, the weight bytes a decode step reads, that
rate as a fraction of the streaming bandwidth measured in the same run, prefill tokens/s, and
the share of a decode step spent in Python frames (cProfile: an upper bound, the profiler
itself adds to it).
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
from k2lite.info import measure_bandwidth, model_info  # noqa: E402


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
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.model, "config.json")):
        subprocess.check_call([sys.executable, "-m", "k2lite.testing.random_model", a.model, "--preset", "k2-slice"])
    per_token = model_info(a.model).decode_bytes_per_token
    print("| threads | mmap | decode tok/s | weight GB/s | bandwidth GB/s | fraction | prefill tok/s "
          "| prefill/decode per token | Python share |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in a.threads:
        llm = k2lite.load(a.model, device=a.device, threads=t, mmap=not a.no_mmap)
        with llm.sequence() as seq:
            t0 = time.perf_counter()
            seq.append(list(range(100, 100 + a.p)), last_only=True)
            prefill = a.p / (time.perf_counter() - t0)
            for _ in range(2):                      # warm the pages and caches
                seq.append([7])
            t0 = time.perf_counter()
            for _ in range(a.n):
                seq.append([7])
            decode = a.n / (time.perf_counter() - t0)
            share = python_share(seq)
        bw = measure_bandwidth()
        rate = decode * per_token
        print(f"| {t} | {'no' if a.no_mmap else 'yes'} | {decode:.2f} | {rate / 1e9:.1f} | {bw / 1e9:.1f} | "
              f"{rate / bw:.0%} | {prefill:.1f} | {prefill / decode:.1f}x | {share:.1%} |")
    print(f"\ndecode reads {per_token / 1e9:.2f} GB of weights per token")


if __name__ == "__main__":
    main()
