"""Kernel throughput vs the machine's streaming read bandwidth, measured in the same run.

  python benchmarks/bench_kernels.py [--threads N] [--reps R] [--quick]

1. bandwidth: a parallel C++ sum over a 1 GiB float32 buffer (k2lite.backends.cpu.stream_read);
2. INT4 GEMV/GEMM at K2 expert shapes, cycling through enough experts (~1 GiB) that every call
   reads its weights from DRAM, not cache;
3. BF16 GEMV/GEMM at attention / dense / lm_head shapes (also cycled over > caches), row-major
   and in the 16-row tiles of the repack=True load mode;
4. FP8 (e4m3 + f32 128x128 block scales, K2 Base/Instruct) at expert and dense shapes;
5. MoE: 8 of 64 INT4 experts per token, D=7168, F=2048.
GB/s counts weight bytes (INT4: packed + scales; FP8: codes + scale_inv). The box is shared and
its bandwidth drifts by tens of percent within seconds, so the read bandwidth is sampled right
before and after each timed repeat, and "% of read" is the median over repeats of the kernel's
rate over the larger of its two samples. GB/s is the best and the median of --reps repeats;
GB/cpu-s divides by the median CPU time of the process (all threads), i.e. the rate per
core-second actually granted, which a loaded box hides in the wall-clock figures. --int4 skips the BF16 shapes; --exact adds the exact INT4 path.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from k2lite import ref
from k2lite.backends import cpu
from k2lite.info import ReadMeter
from k2lite.formats import Fp8Tensor, Int4Tensor, tile_bf16

GB = 1e9


CPU_SECONDS = []   # per timeit(): process CPU seconds per call (all threads), median
READ_AROUND = []   # per timeit(): per repeat, the larger read-bandwidth sample around it (B/s)
METER = None       # k2lite.info.ReadMeter, made in main()


def timeit(fn, reps: int, inner: int):
    """Best and median wall seconds per call over reps repeats of `inner` calls; the median
    CPU seconds per call (all threads) goes to CPU_SECONDS, the read bandwidth sampled around
    each repeat to READ_AROUND."""
    fn()
    times, cpu_times, reads = [], [], []
    for _ in range(reps):
        before = METER.sample()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
        cpu_times.append((time.process_time() - c0) / inner)
        reads.append(max(before, METER.sample()))
    CPU_SECONDS.append(float(np.median(cpu_times)))
    READ_AROUND.append(list(zip(times, reads)))
    return min(times), float(np.median(times))


def frac(nbytes: float) -> float:
    """Median over the last timeit()'s repeats of rate / read bandwidth around that repeat."""
    return float(np.median([nbytes / t / r for t, r in READ_AROUND[-1]]))


def rand_int4(rng, n, i, g=32):
    packed = rng.integers(-2**31, 2**31, (n, i // 8), dtype=np.int64).astype(np.int32)
    scales = (rng.integers(0x3C00, 0x3C80, (n, i // g))).astype(np.uint16)   # ~2^-7 .. 2^-6
    return Int4Tensor(packed, scales, (n, i), g)


def rand_bf16(rng, n, i):
    base = rng.integers(0x3C00, 0x3C80, 1 << 20) | (rng.integers(0, 2, 1 << 20) << 15)
    return np.resize(base.astype(np.uint16), (n, i))   # repeats a random 2 MiB tile


def rand_fp8(rng, n, i, block=(128, 128)):
    base = rng.integers(0, 256, 1 << 20).astype(np.uint8) & 0xF7   # no NaN codes (0x7F/0xFF)
    w = np.resize(base, (n, i))                                     # repeats a random 1 MiB tile
    s = rng.uniform(1e-3, 1e-2, (-(-n // block[0]), -(-i // block[1]))).astype(np.float32)
    return Fp8Tensor(w, s, (n, i), block)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller weight sets (0.25 GiB)")
    ap.add_argument("--int4", action="store_true", help="stream, INT4 matmul and MoE only")
    ap.add_argument("--exact", action="store_true", help="also time the exact INT4 path (T=1)")
    ap.add_argument("--fp8", action="store_true", help="stream and FP8 matmul only")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    cpu.set_threads(args.threads)
    rng = np.random.default_rng(0)
    set_bytes = (0.25 if args.quick else 1.0) * 2**30
    rows = []
    global METER
    METER = ReadMeter()

    buf = np.ones(int(set_bytes) // 4, np.float32)
    best, med = timeit(lambda: cpu._cpu.stream_read(buf), args.reps, 2)
    bw = buf.nbytes / best / GB
    rows.append(("stream read (C++ sum)", "1x %.2f GiB" % (buf.nbytes / 2**30), 1, bw, buf.nbytes / med / GB,
                 buf.nbytes / CPU_SECONDS[-1] / GB, frac(buf.nbytes)))
    best, med = timeit(lambda: buf.sum(), max(2, args.reps // 2), 1)
    rows.append(("numpy buf.sum()", "", 1, buf.nbytes / best / GB, buf.nbytes / med / GB,
                 buf.nbytes / CPU_SECONDS[-1] / GB, frac(buf.nbytes)))
    del buf

    def bench(name, mats, fn, T, inner_calls=None):
        x = rng.standard_normal((T, mats[0].shape[1])).astype(np.float32)
        nb = mats[0].nbytes
        state = {"i": 0}

        def call():
            i = state["i"]
            state["i"] = (i + 1) % len(mats)
            fn(x, mats[i])
        inner = inner_calls or len(mats)
        best, med = timeit(call, args.reps, inner)
        shape = mats[0].shape
        rows.append((name, f"{shape[0]}x{shape[1]}", T, nb / best / GB, nb / med / GB, nb / CPU_SECONDS[-1] / GB,
                     frac(nb)))

    for n, i in ((2048, 7168), (7168, 2048), (7168, 18432)):
        one = n * i
        count = max(2, int(set_bytes // one)) if one < set_bytes else 2
        mats = [rand_fp8(rng, n, i) for _ in range(count)]
        for T in (1, 4):
            bench("fp8_matmul", mats, lambda x, w: cpu.fp8_matmul(x, w.weight, w.scale_inv, w.block), T,
                  inner_calls=max(len(mats), 2))
        del mats
    if args.fp8:
        report(args, load0, bw, rows)
        return

    for n, i in ((2048, 7168), (7168, 2048)):
        one = n * i // 2 + n * i // 32 * 2
        mats = [rand_int4(rng, n, i) for _ in range(max(2, int(set_bytes // one)))]
        for T in (1, 4, 16):
            bench("int4_matmul", mats, lambda x, w: cpu.int4_matmul(x, w.packed, w.scales, w.group_size), T)
        if args.exact:
            cpu.set_exact(True)
            bench("int4_matmul (exact path)", mats, lambda x, w: cpu.int4_matmul(x, w.packed, w.scales, w.group_size), 1)
            cpu.set_exact(False)
        del mats
    # the numpy reference, for scale (one small call)
    w = rand_int4(rng, 2048, 7168)
    x = rng.standard_normal((1, 7168)).astype(np.float32)
    best, med = timeit(lambda: ref.int4_matmul(x, w.packed, w.scales, 32), 1, 1)
    rows.append(("ref.int4_matmul (numpy)", "2048x7168", 1, w.nbytes / best / GB, w.nbytes / med / GB,
                 w.nbytes / CPU_SECONDS[-1] / GB, frac(w.nbytes)))

    for n, i in () if args.int4 else ((1536, 7168), (12288, 1536), (576, 7168), (7168, 8192), (18432, 7168),
                                      (163840, 7168)):
        one = n * i * 2
        count = max(2, int(set_bytes // one)) if one < set_bytes else 1
        if one > 2.5 * 2**30 and args.quick:
            continue
        mats = [rand_bf16(rng, n, i) for _ in range(count)]
        for T in ((1, 4, 16) if n < 100000 else (1,)):
            bench("bf16_matmul", mats, lambda x, w: cpu.bf16_matmul(x, w), T,
                  inner_calls=max(len(mats), 2))
        tiled = [tile_bf16(m) for m in mats]       # the repack=True layout
        del mats
        for T in ((1, 4) if n < 100000 else (1,)):
            bench("bf16_tiled_matmul", tiled, lambda x, w: cpu.bf16_tiled_matmul(x, w.data, w.shape[0]), T,
                  inner_calls=max(len(tiled), 2))
        del tiled

    # MoE: 64 experts of K2 shape, 8 chosen per token
    E, D, F = (16 if args.quick else 64), 7168, 2048
    experts = [(rand_int4(rng, F, D), rand_int4(rng, F, D), rand_int4(rng, D, F)) for _ in range(E)]
    per_expert = sum(m.nbytes for m in experts[0])
    for T in (1, 4, 16):
        x = rng.standard_normal((T, D)).astype(np.float32)
        wts = rng.random((T, 8)).astype(np.float32)
        state = {"i": 0}

        def call():
            # fresh routing each call, so each call reads new experts (cycled through the set)
            i = state["i"]
            state["i"] += 1
            idx = np.stack([rng.choice(E, 8, replace=False) for _ in range(T)]).astype(np.int32)
            if T == 1:
                idx[0] = (np.arange(8) + 8 * i) % E
            state["nexp"] = len(np.unique(idx))
            cpu.moe(x, experts, idx, wts)
        best, med = timeit(call, args.reps, max(4, E // 8))
        nb = per_expert * state["nexp"]
        rows.append(("moe (8 of %d, int4)" % E, f"D{D} F{F} x{state['nexp']}exp", T, nb / best / GB, nb / med / GB,
                     nb / CPU_SECONDS[-1] / GB, frac(nb)))

    report(args, load0, bw, rows)


def report(args, load0, bw, rows):
    from k2lite import ops
    print(f"backend: {ops.describe('cpu')}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"threads={args.threads}, simd={cpu.SIMD}, int4 vnni={cpu.INT4_VNNI}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'kernel':28s} {'shape':22s} {'T':>3s} {'GB/s best':>10s} {'median':>8s} {'% of read':>9s} {'GB/cpu-s':>9s}")
    for name, shape, T, b, m, c, f in rows:
        print(f"{name:28s} {shape:22s} {T:3d} {b:10.2f} {m:8.2f} {100 * f:8.0f}% {c:9.2f}")


if __name__ == "__main__":
    main()
