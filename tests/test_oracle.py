"""The numpy reference model against transformers' DeepseekV3ForCausalLM (float32, CPU).

Each config writes a random checkpoint in the release layout (INT4 experts), the oracle
dequantizes it with compressed-tensors, and k2lite device="ref" must agree to 1e-4 relative
error: for a whole prefill, and token by token through the paged cache over >= 300 tokens
with several sequences interleaved (crossing many 16-token page boundaries).
"""
import numpy as np
import pytest

import k2lite

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from hf_oracle import hf_logits, hf_model  # noqa: E402

YARN32 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
          "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
CONFIGS = {
    # K2's own layout: no groups, several dense lead layers, YaRN (beta_fast 1), q_lora
    "k2_layout": dict(num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16,
                      num_experts_per_tok=8),
    # DeepSeek-V3-style grouped routing, YaRN with K2.5's beta_fast 32
    "grouped": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                    rope_scaling=YARN32),
    # v_head_dim != qk_nope_head_dim, no YaRN, no q_lora (DeepSeek-V2-Lite style), 2 shared experts
    "v_ne_nope": dict(v_head_dim=24, qk_nope_head_dim=16, rope_scaling=None, q_lora_rank=None,
                      n_shared_experts=2, rms_norm_eps=1e-6),
}
TOL = 1e-4


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, model_factory):
    path = model_factory(request.param, seed=len(request.param), **CONFIGS[request.param])
    return request.param, path, hf_model(path)


def test_prefill_logits_match_transformers(pair):
    name, path, hf = pair
    ids = np.random.default_rng(1).integers(0, 384, 70)
    want = hf_logits(hf, ids)
    got = k2lite.load(path, device="ref").logits(ids)
    assert got.shape == want.shape and got.dtype == np.float32
    err = rel(got, want)
    print(f"{name}: prefill rel err {err:.2e}")
    assert err < TOL, f"{name}: prefill logits rel err {err:.2e}"


def test_token_by_token_interleaved_matches_transformers(pair):
    """Three sequences advanced in turns (mixing multi-token appends and single-token decode
    steps) through 16-token pages; every step's logits must match the full-sequence oracle."""
    name, path, hf = pair
    rng = np.random.default_rng(2)
    llm = k2lite.load(path, device="ref", page_size=16)
    streams = [rng.integers(0, 384, n) for n in (310, 120, 77)]
    seqs = [llm.sequence() for _ in streams]
    got = [[] for _ in streams]
    pos = [0, 0, 0]
    while any(p < len(s) for p, s in zip(pos, streams)):
        for i, s in enumerate(streams):
            if pos[i] >= len(s):
                continue
            n = 5 if pos[i] % 50 == 0 else 1      # mostly decode, sometimes a chunk
            chunk = s[pos[i]:pos[i] + n]
            got[i].append(seqs[i].append(chunk))
            pos[i] += len(chunk)
    for i, s in enumerate(streams):
        want = hf_logits(hf, s)
        err = rel(np.concatenate(got[i]), want)
        print(f"{name}: seq {i} ({len(s)} tokens) incremental rel err {err:.2e}")
        assert err < TOL, f"{name}: seq {i} incremental logits rel err {err:.2e}"
    for s in seqs:
        s.close()
    assert llm.cache.pages_free == llm.cache.max_pages


def test_greedy_tokens_equal_across_backends(model_factory):
    """A peaked random model: greedy decoding gives the same tokens on every backend."""
    from conftest import BACKENDS
    path = model_factory("peaked", seed=5, peak=8.0)
    runs = {}
    for b in BACKENDS:
        llm = k2lite.load(path, device=b)
        with llm.sequence() as seq:
            logits = seq.append([5, 6, 7])[-1]
            toks = []
            for _ in range(24):
                t = int(np.argmax(logits))
                toks.append(t)
                logits = seq.append([t])[0]
        runs[b] = toks
    first = runs["ref"]
    for b, toks in runs.items():
        assert toks == first, f"{b} greedy tokens differ from ref: {toks} vs {first}"


def test_trace_names_every_intermediate(tiny_model):
    llm = k2lite.load(tiny_model, device="ref")
    seen = set()
    with llm.sequence() as seq:
        llm.model.forward(np.array([1, 2, 3]), llm.cache, [seq.state], decode=False,
                          trace=lambda name, layer, a: seen.add((name, layer)))
    cfg = llm.config
    for layer in range(cfg.num_hidden_layers):
        for name in ("q_nope", "q_pe", "kv_latent", "k_pe", "attn_heads", "hidden"):
            assert (name, layer) in seen
    assert ("router_idx", cfg.first_k_dense_replace) in seen
