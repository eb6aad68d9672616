"""k2-nano, the embedded default model: loads as the release format and writes English."""
import math
import os
import re

import numpy as np
import pytest

import k2lite
from conftest import BACKENDS, REPO
from k2lite.formats import Int4Tensor

# Northanger Abbey from chapter 3 (public domain), reflowed as the trainer does: the novel k2-nano
# never saw in training (tests/data/README.md)
HELDOUT = os.path.join(REPO, "tests", "data", "northangerabbey_ch3.txt")


@pytest.fixture(scope="module")
def nano():
    return k2lite.load()      # no path: the embedded default model


def test_default_model_is_k2_nano_in_release_format(nano):
    assert os.path.basename(nano.path) == "k2-nano"
    cfg = nano.config
    assert cfg.quantization.format == "pack-quantized" and cfg.quantization.group_size == 32
    assert isinstance(nano.weights.layers[1].mlp.experts[0][0], Int4Tensor)
    assert nano.weights.layers[1].mlp.shared_experts is not None and not cfg.is_moe_layer(0)
    assert nano.tokenizer.vocab_size == cfg.vocab_size and cfg.eos_ids[0] in nano.tokenizer.eos_ids


def test_greedy_continuation_is_english(nano):
    out = nano.generate("It is a truth universally acknowledged", max_tokens=40, temperature=0)
    words = re.findall(r"[A-Za-z]+", out.text)
    common = {"the", "and", "of", "to", "a", "i", "was", "her", "he", "she", "it", "that", "in", "be"}
    assert len(words) >= 15, out.text
    assert sum(w.lower() in common for w in words) >= 4, out.text
    assert sum(c.isascii() for c in out.text) / len(out.text) > 0.98


def test_unseen_novel_bits_per_byte_below_two_on_every_backend(nano):
    text = open(HELDOUT, encoding="utf-8").read().rstrip("\n")
    n = nano.config.rope_scaling["original_max_position_embeddings"]   # one training window
    ids = np.array(nano.tokenizer.encode_ordinary(text))[:n + 1]
    assert len(ids) == n + 1
    results = {}
    for b in BACKENDS:
        logits = k2lite.load(device=b).logits(ids[:-1]).astype(np.float64)
        m = logits.max(-1)
        nll = np.log(np.exp(logits - m[:, None]).sum(-1)) + m - logits[np.arange(n), ids[1:]]
        n_bytes = len(nano.tokenizer.decode(ids[1:].tolist()).encode())
        results[b] = nll.sum() / math.log(2) / n_bytes
    print("bits/byte:", results)
    assert results["ref"] < 2.0
    for b, bpb in results.items():
        assert abs(bpb - results["ref"]) / results["ref"] < 0.01, results
