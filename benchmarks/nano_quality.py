"""k2-nano quality on text it never trained on: bits per byte, the trainer vs k2lite, and samples.

    python benchmarks/nano_quality.py --corpus DIR [--metrics /tmp/k2-nano-train/metrics.json]
                                      [--also OTHER.txt ...]

Bits per byte = total next-token negative log-likelihood in bits ÷ UTF-8 bytes of the scored
text, so it does not depend on the tokenizer. Two held-out texts, cut and reflowed exactly as
scripts/train_nano.py does: Northanger Abbey, the whole novel (held out from training; the
headline figure), and Pride and Prejudice chapters 59-61 (kept out of training, but the rest of
that novel is trained on: the older, in-distribution figure). `--also` scores more plain-text
files (reflowed the same way), e.g. another novel. Each is scored in the trainer's
non-overlapping windows (the model's original context length) through `LLM.logits` on each
backend. The trainer's own figures (float32 weights and the INT4 export read back) come from the
metrics file its export writes.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)
import k2lite  # noqa: E402
from k2lite import ops  # noqa: E402
from train_nano import heldout_texts, reflow  # noqa: E402


def nll_nats(llm, ids, ctx):
    """Sum of -log p(next token) over non-overlapping ctx windows (the trainer's windows)."""
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        x, y = ids[s:s + ctx], ids[s + 1:s + ctx + 1]
        x = x[:len(y)]
        if len(y) < 2 and s:
            break
        logits = llm.logits(x).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((logz - logits[np.arange(len(y)), y]).sum())
        count += len(y)
    return total, count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "k2-nano"))
    ap.add_argument("--corpus", required=True, help="folder of the novels k2-nano was trained on")
    ap.add_argument("--metrics", default="/tmp/k2-nano-train/metrics.json")
    ap.add_argument("--also", nargs="*", default=[], help="more plain-text files to score")
    a = ap.parse_args()
    texts = heldout_texts(a.corpus)
    for path in a.also:
        with open(path, encoding="utf-8") as f:
            texts[os.path.basename(path)] = reflow(f.read())
    metrics = json.load(open(a.metrics)) if os.path.exists(a.metrics) else {}
    backends = ["ref"] + [b for b in ("cpu", "cuda") if ops.available(b)]
    llms = {b: k2lite.load(a.model, device=b) for b in backends}
    ctx = llms["ref"].config.rope_scaling["original_max_position_embeddings"]
    print("| text | tokens | bytes | evaluated by | bits/byte |\n| --- | ---: | ---: | --- | ---: |")
    for name, text in texts.items():
        ids = np.array(llms["ref"].tokenizer.encode_ordinary(text))
        n_bytes = len(llms["ref"].tokenizer.decode(ids[1:].tolist()).encode("utf-8"))
        rows = []
        m = metrics.get("heldout", {}).get(name)
        if m:
            rows += [("trainer, float32", m["bpb_fp32"]), ("trainer, INT4 export", m["bpb_int4"])]
        for b, llm in llms.items():
            nats, _ = nll_nats(llm, ids, ctx)
            rows.append((f"k2lite device={b}", nats / math.log(2) / n_bytes))
        for label, bpb in rows:
            print(f"| {name} | {len(ids)} | {n_bytes} | {label} | {bpb:.4f} |", flush=True)
    llm = llms[backends[-1]]
    for seed in (1, 2, 3):
        out = llm.generate("It is a truth universally acknowledged", max_tokens=60, temperature=0.8, seed=seed)
        print(f"\nsample (seed {seed}, temperature 0.8): It is a truth universally acknowledged{out.text}")


if __name__ == "__main__":
    main()
