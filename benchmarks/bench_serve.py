"""Batched decode as the server runs it: aggregate generated tokens/s with 1, 4, 8, 16 streams.

    python benchmarks/bench_serve.py [--model /tmp/k2slice] [--streams 1 4 8 16] [-n 24] [--prompt 8]
                                     [--threads 2] [--repeats 2] [--no-mmap] [--repack] [--mix 16 0]

Drives k2lite's Scheduler (the engine of `k2lite serve`, continuous batching over the paged
latent cache) directly, without HTTP: B requests of `--prompt` random token ids each are
submitted at once and each generates exactly `-n` tokens (greedy, no eos), as B concurrent
/v1/completions clients with token-id prompts would. Reported per B:

  aggregate tok/s   all generated tokens / wall time from submit to the last token (includes
                    the prefills, which the scheduler interleaves one chunk per step)
  step tok/s        B / median time of the decode steps that ran with all B sequences
  x single          aggregate over the B=1 aggregate of the same round
  tok/cpu-s         generated tokens per CPU-second the process was granted (on a loaded box
                    this tells a slow step from a starved one)

--mix compares the scheduler's policies in the same run: with mix_prompt 16 (the default) short
prompts are fed one token a step inside the batched decode step, so a burst of requests runs in
lockstep; with 0 every prompt gets a prefill step of its own first.

The rounds alternate B values (1, 4, 8, 16, 1, 4, ...) and policies, and the read bandwidth is sampled
before and after each run, as the other benchmarks do (the box's bandwidth drifts).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import k2lite  # noqa: E402
from k2lite.info import ReadMeter, model_info  # noqa: E402
from k2lite.sampler import Sampler  # noqa: E402
from k2lite.serve.scheduler import Request, Scheduler  # noqa: E402
import numpy as np  # noqa: E402


class StepClock:
    """Times Model.forward decode calls by batch size (instance attribute; model.py unchanged)."""

    def __init__(self, model):
        self.model, self.times = model, {}
        cls = type(model)

        def forward(tokens, cache, seqs, decode, *a, **kw):
            t = time.perf_counter()
            out = cls.forward(model, tokens, cache, seqs, decode, *a, **kw)
            if decode:
                self.times.setdefault(len(seqs), []).append(time.perf_counter() - t)
            return out
        model.forward = forward


def run(sched, llm, B, n_gen, n_prompt, rng):
    page = llm.cache.page_size
    reqs = []
    for _ in range(B):
        prompt = [int(t) for t in rng.integers(0, llm.config.vocab_size, n_prompt)]
        reqs.append(Request(prompt, Sampler(temperature=0.0), n_gen, [], set(), None,
                            reserve=-(-(n_prompt + n_gen) // page)))
    t, cpu = time.perf_counter(), time.process_time()
    sched.submit(reqs)
    done = 0
    for r in reqs:
        while True:
            ev = r.events.get()
            if ev[1] in ("end", "error"):
                break
        if ev[1] == "error" or r.finish_reason != "length":
            raise RuntimeError(f"request ended with {ev[1]} / {r.finish_reason}")
        done += len(r.out)
    return done, time.perf_counter() - t, time.process_time() - cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/k2slice")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("-n", type=int, default=24, help="tokens generated per stream")
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens per stream")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over --streams")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-mmap", action="store_true")
    ap.add_argument("--repack", action="store_true")
    ap.add_argument("--mix", type=int, nargs="+", default=[16],
                    help="Scheduler.mix_prompt values to compare in the same run (0: every prompt "
                         "prefilled in its own step)")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.model, "config.json")):
        subprocess.check_call([sys.executable, "-m", "k2lite.testing.random_model", a.model, "--preset", "k2-slice"])
    llm = k2lite.load(a.model, device=a.device, threads=a.threads, mmap=not a.no_mmap, repack=a.repack,
                      max_cache_tokens=max(a.streams) * (a.prompt + a.n + 64))
    per_token = model_info(a.model).decode_bytes_per_token
    clock = StepClock(llm.model)
    sched = Scheduler(llm, max_batch=max(a.streams)).start()
    meter = ReadMeter()
    rng = np.random.default_rng(0)
    run(sched, llm, 1, 2, a.prompt, rng)               # warm-up: first touch of the weight pages
    agg, steps, reads, per_cpu = {}, {}, {}, {}
    for _ in range(a.repeats):
        for B in a.streams:
            for mix in a.mix:
                sched.mix_prompt = mix
                clock.times.clear()
                before = meter.sample()
                n, dt, cpu = run(sched, llm, B, a.n, a.prompt, rng)
                per_cpu.setdefault((B, mix), []).append(n / cpu)
                reads.setdefault((B, mix), []).append(max(before, meter.sample()))
                agg.setdefault((B, mix), []).append(n / dt)
                full = clock.times.get(B, [])
                if full:
                    steps.setdefault((B, mix), []).append(B / statistics.median(full))
    sched.stop()
    from k2lite import ops
    print(f"backend: {ops.describe(llm.backend)}")
    print(f"model {a.model}, {per_token / 1e9:.2f} GB of weights per single-token step, "
          f"{a.prompt}-token prompts, {a.n} tokens per stream, threads {a.threads or 'default'}, "
          f"{'anonymous' if a.no_mmap else 'mmap'}{' + repack' if a.repack else ''}")
    print("| streams | mix_prompt | aggregate tok/s (runs) | x single | full-batch step tok/s | tok/cpu-s | read GB/s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for B in a.streams:
        for mix in a.mix:
            runs, base = agg[B, mix], statistics.median(agg[min(a.streams), mix])
            st = f"{statistics.median(steps[B, mix]):.1f}" if (B, mix) in steps else "-"
            print(f"| {B} | {mix} | {statistics.median(runs):.2f} ({', '.join(f'{r:.2f}' for r in runs)}) | "
                  f"{statistics.median(runs) / base:.1f}x | {st} | {statistics.median(per_cpu[B, mix]):.2f} | "
                  f"{statistics.median(reads[B, mix]) / 1e9:.1f} |")


if __name__ == "__main__":
    main()
