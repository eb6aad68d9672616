"""Every released K2-family layout, made small: loads, runs, and is prompted as its authors intend.

Each checkpoint is a tiny random model written in that release's format (weights, config
shape, tokenizer files, chat template or none); the behaviour checked is the release's:
K2 Thinking answers in reasoning, K2 Instruct in content, K2 Base prompts raw, K2.5/K2.6 nest
the text model (`text_config`, `language_model.`) beside a vision tower and switch thinking per
request, DeepSeek-V3/R1 (FP8, an MTP layer, no pad id, a tokenizer.json) run on token ids.
"""
import json
import os

import numpy as np
import pytest

import k2lite
from conftest import write_small_tokenizer
from k2lite import ops
from k2lite.safetensors import SafetensorsFile, save_file
from k2lite.testing.random_model import preset, write_random_model

N_RANKS = 512
DEVICE = "cpu" if ops.available("cpu") else "ref"


def _kimi(path, template, fp8):
    cfg = preset("tiny", vocab_size=N_RANKS + 256, bos_token_id=N_RANKS, eos_token_id=N_RANKS + 2,
                 pad_token_id=N_RANKS + 255)
    write_random_model(path, cfg, seed=3, fp8=fp8)
    write_small_tokenizer(path, N_RANKS, template)
    return path


def _rewrite(path, edit_tensors, edit_config):
    """Rewrite the single shard and the index (renaming / adding tensors) and config.json."""
    shard = next(f for f in os.listdir(path) if f.endswith(".safetensors"))
    sf = SafetensorsFile(os.path.join(path, shard))
    tensors = {n: np.array(sf.get(n)) for n in sf.keys()}
    dtypes = {n: sf.dtype(n) for n in sf.keys()}
    del sf
    tensors, dtypes = edit_tensors(tensors, dtypes)
    save_file(tensors, os.path.join(path, shard), dtypes)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: shard for n in tensors}}, f)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(edit_config(cfg), f)


def make(kind, path):
    if kind == "kimi-k2-thinking":            # INT4 experts, its template
        return _kimi(path, "kimi-k2-thinking", fp8=False)
    if kind == "kimi-k2-instruct":            # FP8 everywhere, the Instruct template
        return _kimi(path, "kimi-k2-instruct", fp8=True)
    if kind == "kimi-k2-base":                # FP8, Kimi's tokenizer, no chat template
        return _kimi(path, None, fp8=True)
    if kind == "kimi-k2.6":                   # text model nested beside a vision tower
        _kimi(path, "kimi-k2.6", fp8=False)

        def nest(t, d):
            t = {"language_model." + n: v for n, v in t.items()}
            d = {"language_model." + n: v for n, v in d.items()}
            t["vision_tower.patch_embed.proj.weight"] = np.ones((4, 3), np.float32)
            d["vision_tower.patch_embed.proj.weight"] = "F32"
            return t, d
        _rewrite(path, nest, lambda c: {"architectures": ["KimiK25ForConditionalGeneration"],
                                        "model_type": "kimi_k25", "text_config": c,
                                        "quantization_config": c.pop("quantization_config")})
        return path
    if kind == "deepseek-v3":                 # FP8, an MTP layer, no pad id, a tokenizer.json
        write_random_model(path, preset("tiny", vocab_size=600), seed=4, fp8=True)

        def mtp(t, d):
            L = 3
            t[f"model.layers.{L}.input_layernorm.weight"] = t["model.norm.weight"]
            d[f"model.layers.{L}.input_layernorm.weight"] = d["model.norm.weight"]
            return t, d

        def cfg(c):
            c.pop("pad_token_id")
            c.update(model_type="deepseek_v3", num_nextn_predict_layers=1)
            return c
        _rewrite(path, mtp, cfg)
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump({"model": {"type": "BPE"}}, f)
        return path
    raise ValueError(kind)


KINDS = ["kimi-k2-thinking", "kimi-k2-instruct", "kimi-k2-base", "kimi-k2.6", "deepseek-v3"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    made = {}

    def get(kind):
        if kind not in made:
            path = make(kind, str(tmp_path_factory.mktemp(kind)))
            made[kind] = k2lite.load(path, device=DEVICE, threads=1)
        return made[kind]
    return get


@pytest.mark.parametrize("kind", KINDS)
def test_loads_and_matches_the_reference(family, kind):
    llm = family(kind)
    ids = [5, 17, 300, 2, 9]
    ref = k2lite.load(llm.path, device="ref").logits(ids)
    got = llm.logits(ids)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max()


@pytest.mark.parametrize("kind,mode,template", [
    ("kimi-k2-thinking", "thinking", "kimi-k2-thinking"), ("kimi-k2-instruct", "instruct", "kimi-k2-instruct"),
    ("kimi-k2-base", "base", None), ("kimi-k2.6", "hybrid", "kimi-k2.6"), ("deepseek-v3", "base", None)])
def test_mode_comes_from_the_checkpoint(family, kind, mode, template):
    d = family(kind).describe()
    assert (d["mode"], d["chat_template"]) == (mode, template)
    assert d["tokenizer"] == (None if kind == "deepseek-v3" else "tiktoken")


def test_k2_thinking_answers_in_reasoning(family):
    r = family("kimi-k2-thinking").chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert r.reasoning_content and not r.content


def test_k2_instruct_answers_in_content(family):
    r = family("kimi-k2-instruct").chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert r.content and not r.reasoning_content


def test_k2_base_prompts_raw(family):
    llm = family("kimi-k2-base")
    prompt = "The quick brown fox"
    r = llm.generate(prompt, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": prompt}])


def test_k26_thinking_switch(family):
    llm = family("kimi-k2.6")
    msgs = [{"role": "user", "content": "Hi"}]
    on = llm.chat(msgs, max_tokens=4, temperature=0)
    off = llm.chat(msgs, max_tokens=4, temperature=0, thinking=False)
    assert on.reasoning_content and not on.content
    assert off.content and not off.reasoning_content
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + 1          # the closing </think>


def test_deepseek_v3_runs_on_token_ids(family):
    llm = family("deepseek-v3")
    assert llm.tokenizer is None and llm.config.num_nextn_predict_layers == 1
    r = llm.generate([3, 4, 5], max_tokens=3, temperature=0)
    assert len(r.token_ids) == 3
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text")
