"""k2-nano perplexity with each latent-cache type (f32 / bf16 / int8), through both attention
forms: decode (one token a step: the absorbed mla_decode kernel reads the cache) and prefill
(the chunked prefill form).

    python benchmarks/kv_quality.py [--corpus DIR] [--ctx 1024] [--max-tokens 8192] [--threads 2]

The text is k2-nano's held-out Austen (Pride and Prejudice ch. 59-61, never trained on, as in
nano_quality.py), scored in independent windows of --ctx tokens: every token but a window's
first, given the ones before it in the window.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models"))
sys.path.insert(0, ROOT)
import k2lite  # noqa: E402
from train_nano import HELDOUT_BOOK, HELDOUT_FROM, reflow  # noqa: E402


def nll_of(z, y):
    z = z.astype(np.float64)
    zmax = z.max(-1, keepdims=True)
    return float((zmax[:, 0] + np.log(np.exp(z - zmax).sum(-1)) - z[np.arange(len(y)), y]).sum())


def score(llm, ids, ctx, decode):
    total, n = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        w = ids[s:s + ctx]
        if len(w) < 2:
            break
        with llm.sequence() as seq:
            if decode:
                z = np.concatenate([seq.append(w[i:i + 1]) for i in range(len(w) - 1)])
            else:
                z = seq.append(w[:-1])
        total += nll_of(z, w[1:])
        n += len(w) - 1
    return n, total / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=os.path.join(ROOT, "..", "shared", "corpus"))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    d = os.path.join(a.corpus, "austen")
    with open(os.path.join(d, HELDOUT_BOOK + ".txt"), encoding="utf-8") as f:
        text = f.read()
    text = reflow(text[text.index("\n" + HELDOUT_FROM + "\n"):])
    base = None
    from k2lite import ops
    print(f"backend: {ops.describe('cpu' if ops.available('cpu') else 'ref')}")
    print("| cache | form | tokens | mean NLL | perplexity | vs bf16 | s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for form in ("decode", "prefill"):
        for kv in ("bf16", "int8", "f32"):
            llm = k2lite.load(threads=a.threads, kv_cache=kv, context=max(a.ctx, 4096))
            ids = np.asarray(llm.tokenizer.encode_ordinary(text)[:a.max_tokens], np.int64)
            t = time.perf_counter()
            n, nll = score(llm, ids, a.ctx, form == "decode")
            dt = time.perf_counter() - t
            if kv == "bf16":
                base = nll
            print(f"| {kv} | {form} | {n} | {nll:.4f} | {math.exp(nll):.3f} | "
                  f"{100 * (math.exp(nll - base) - 1):+.2f}% | {dt:.0f} |", flush=True)
            llm.close() if hasattr(llm, "close") else None


if __name__ == "__main__":
    main()
