"""k2-nano quality on held-out Austen: bits per byte, the trainer vs k2lite, and samples.

    python benchmarks/nano_quality.py --corpus DIR [--metrics /tmp/k2-nano-train/metrics.json]

Bits per byte = total next-token negative log-likelihood in bits ÷ UTF-8 bytes of the text, so
it does not depend on the tokenizer. The held-out text (Pride and Prejudice ch. 59-61, never
trained on) is cut and reflowed exactly as scripts/train_nano.py does, scored in the trainer's
non-overlapping 256-token windows, through `LLM.logits` on each backend. The trainer's own
figures (float and INT4 export) come from the metrics file its export writes.
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
from train_nano import HELDOUT_BOOK, HELDOUT_FROM, reflow  # noqa: E402


def heldout_text(corpus):
    d = os.path.join(corpus, "austen") if os.path.isdir(os.path.join(corpus, "austen")) else corpus
    with open(os.path.join(d, HELDOUT_BOOK + ".txt"), encoding="utf-8") as f:
        text = f.read()
    return reflow(text[text.index("\n" + HELDOUT_FROM + "\n"):])


def nll_nats(llm, ids, ctx=256):
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
    a = ap.parse_args()
    text = heldout_text(a.corpus)
    n_bytes = len(text.encode("utf-8"))
    rows = []
    if os.path.exists(a.metrics):
        m = json.load(open(a.metrics))
        preds = m["heldout_tokens"] - 1
        for key, label in (("heldout_loss_fp32", "trainer, float32"), ("heldout_loss_int4", "trainer, INT4 export")):
            rows.append((label, m[key] * preds / math.log(2) / n_bytes))
    for backend in ["ref"] + [b for b in ("cpu", "cuda") if ops.available(b)]:
        llm = k2lite.load(a.model, device=backend)
        ids = np.array(llm.tokenizer.encode_ordinary(text))
        nats, count = nll_nats(llm, ids)
        rows.append((f"k2lite device={backend}", nats / math.log(2) / n_bytes))
    print(f"held-out: {n_bytes} bytes, {len(ids)} tokens")
    print("| evaluated by | bits/byte |\n| --- | ---: |")
    for label, bpb in rows:
        print(f"| {label} | {bpb:.4f} |")
    llm = k2lite.load(a.model)
    for seed in (1, 2, 3):
        out = llm.generate("It is a truth universally acknowledged", max_tokens=60, temperature=0.8, seed=seed)
        print(f"\nsample (seed {seed}, temperature 0.8): It is a truth universally acknowledged{out.text}")


if __name__ == "__main__":
    main()
