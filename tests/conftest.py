from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # tests/hf_oracle.py

from k2lite import ops
from k2lite.testing.random_model import preset, write_random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["ref"] + [b for b in ("cpu", "cuda") if ops.available(b)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random checkpoint in the release layout (INT4 experts), written once."""
    path = str(tmp_path_factory.mktemp("tiny"))
    write_random_model(path, preset("tiny"), seed=0)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(name, **config overrides) -> path of a random checkpoint (cached per name)."""
    made = {}

    def make(name, seed=0, int4_experts=True, peak=1.0, **overrides):
        if name not in made:
            path = str(tmp_path_factory.mktemp(name))
            write_random_model(path, preset("tiny", **overrides), seed=seed, int4_experts=int4_experts, peak=peak)
            made[name] = path
        return made[name]
    return make


# --- tiny models that read and write text (generation, chat, CLI and server tests) ------
# Tiny random models that can read and write text, for generation and CLI tests.
# 
# A tiny checkpoint has a few hundred ids, Kimi's tokenizer 163,840. `make_text_model` writes a
# tiny model whose vocabulary is the first `n_ranks` BPE ranks of the shipped Kimi tokenizer
# (ranks 0..255 are the single bytes, so every text encodes) plus the 256 special ids renumbered
# to n_ranks + i, exactly as scripts/train_nano.py builds k2-nano's tokenizer.
KIMI = os.path.join(REPO, "models", "kimi-k2-thinking")
KIMI_SPECIAL_BASE = 163584


def write_small_tokenizer(out_dir: str, n_ranks: int = 512, chat_template: str | None = None):
    """tiktoken.model with ranks < n_ranks + tokenizer_config.json with ids moved to n_ranks + i;
    chat_template: the name of a released template (template_oracle.TEMPLATES) to ship as
    chat_template.jinja, None for a base model."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(KIMI, "tiktoken.model"), "rb") as f, \
            open(os.path.join(out_dir, "tiktoken.model"), "wb") as g:
        for line in f:
            if line.strip() and int(line.split()[1]) < n_ranks:
                g.write(line)
    with open(os.path.join(KIMI, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["added_tokens_decoder"] = {str(int(k) - KIMI_SPECIAL_BASE + n_ranks): v
                                   for k, v in cfg["added_tokens_decoder"].items()}
    cfg.pop("auto_map", None)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False)
    if chat_template is not None:
        from template_oracle import TEMPLATES
        shutil.copy(TEMPLATES[chat_template], os.path.join(out_dir, "chat_template.jinja"))


def make_text_model(out_dir: str, n_ranks: int = 512, seed: int = 0, peak: float = 1.0,
                    generation_config: dict | None = None, chat_template: str | None = None,
                    **overrides) -> str:
    """A tiny random checkpoint + small Kimi tokenizer; eos = <|im_end|> as in K2 Thinking.
    chat_template: a released template's name (a chat model), None (a base model)."""
    im_end = n_ranks + 2
    cfg = preset("tiny", vocab_size=n_ranks + 256, bos_token_id=n_ranks, eos_token_id=im_end,
                 pad_token_id=n_ranks + 255, **overrides)
    write_random_model(out_dir, cfg, seed=seed, peak=peak)
    write_small_tokenizer(out_dir, n_ranks, chat_template)
    if generation_config is not None:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return out_dir


@pytest.fixture(scope="session")
def text_model(tmp_path_factory):
    """A tiny random model with a 768-id Kimi tokenizer, no chat template (a base model, like
    k2-nano) and no generation_config.json."""
    return make_text_model(str(tmp_path_factory.mktemp("text")))


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """text_model's weights and tokenizer with K2 Thinking's chat template: a chat model."""
    return make_text_model(str(tmp_path_factory.mktemp("chat")), chat_template="kimi-k2-thinking")


@pytest.fixture(scope="session")
def text_llm(text_model):
    """The text model loaded once; one kernel thread keeps tests light on a shared machine."""
    import k2lite
    return k2lite.load(text_model, threads=1)


@pytest.fixture(scope="session")
def chat_llm(chat_model):
    import k2lite
    return k2lite.load(chat_model, threads=1)


# --- scripted answers for scheduler and server tests (no hook in the scheduler itself) -------
def last_message_text(tok, prompt_ids) -> str:
    """The content of the last message of a rendered chat prompt (a tool result without its
    `## Return of` line), or a completion prompt's whole text."""
    text = tok.decode(list(prompt_ids))
    end = text.rfind("<|im_end|>")
    if end < 0:
        return text
    body = text[text.rfind("<|im_middle|>", 0, end) + len("<|im_middle|>"):end]
    return body.split("\n", 1)[1] if body.startswith("## Return of ") else body


@contextlib.contextmanager
def scripted_sampling(scheduler, pick):
    """Requests for which pick(req) returns ids sample exactly those, then their eos; the others
    sample as usual. pick may raise: that request then fails at its first token. It wraps this
    scheduler instance's _sample for the duration."""
    real, scripts = scheduler._sample, {}

    def sample(r, logits):
        if r not in scripts:
            scripts[r] = pick(r)
        ids = scripts[r]
        if ids is None:
            return real(r, logits)
        i = len(r.out)
        return int(ids[i]) if i < len(ids) else min(r.eos, default=0)
    scheduler._sample = sample
    try:
        yield scripts
    finally:
        del scheduler._sample          # the class's method again
