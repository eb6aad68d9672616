"""End-to-end decode/prefill speed on a real-width K2 slice, as `k2lite bench` reports it.

    python benchmarks/bench_e2e.py [--model /tmp/k2slice] [-p 64] [-n 16] [--threads 1 2]

Writes the k2-slice random checkpoint (real K2 widths: hidden 7168, 64 heads, 32 INT4 experts
top-8, 1 dense + 3 MoE layers, BF16 lm_head over 163840 tokens; ~8.7 GB) if the folder does
not exist, then runs `k2lite bench` for each thread count. Decode reads every active weight
once per token, so the figure that matters is weight bytes per second as a fraction of the
streaming bandwidth measured in the same run.
"""
import argparse
import os
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="/tmp/k2slice")
ap.add_argument("-p", type=int, default=64)
ap.add_argument("-n", type=int, default=16)
ap.add_argument("-r", type=int, default=2)
ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
ap.add_argument("--device", default="cpu")
a = ap.parse_args()

if not os.path.exists(os.path.join(a.model, "config.json")):
    subprocess.check_call([sys.executable, "-m", "k2lite.testing.random_model", a.model, "--preset", "k2-slice"])
for t in a.threads:
    subprocess.check_call([sys.executable, "-m", "k2lite.cli", "bench", a.model, "-p", str(a.p), "-n", str(a.n),
                           "-r", str(a.r), "-t", str(t), "--device", a.device])
