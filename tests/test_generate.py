"""generate / stream / chat / stream_chat on tiny random models and on a scripted fake model."""
import json
import os
import shutil
import types

import numpy as np
import pytest

import k2lite
from conftest import make_text_model
from k2lite.generate import ChatResult, Completion, GenerationMixin, generation_defaults
from k2lite.tokenizer import Tokenizer


def test_ids_in_ids_out_and_seed_determinism(tiny_model):
    llm = k2lite.load(tiny_model, threads=1)
    a = llm.generate([5, 6, 7], max_tokens=8, seed=3)
    b = llm.generate([5, 6, 7], max_tokens=8, seed=3)
    c = llm.generate([5, 6, 7], max_tokens=8, seed=4)
    assert isinstance(a, Completion) and a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert a.text == "" and llm.tokenizer is None
    assert a.usage.prompt_tokens == 3 and a.usage.completion_tokens == len(a.token_ids)


def test_greedy_equals_recomputing_the_whole_prefix(text_llm):
    ids = text_llm.tokenizer.encode("The cat")
    out = text_llm.generate(ids, max_tokens=5, temperature=0).token_ids
    ref = list(ids)
    for _ in range(len(out)):
        ref.append(int(np.argmax(text_llm.logits(ref)[-1])))
    assert out == ref[len(ids):]


def test_stream_deltas_add_up_and_usage(text_llm):
    s = text_llm.stream("Hello", max_tokens=12, seed=0)
    parts = list(s)
    c = s.completion
    assert "".join(parts) == c.text == text_llm.generate("Hello", max_tokens=12, seed=0).text
    assert c.finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens == len(text_llm.tokenizer.encode("Hello"))
    assert c.usage.completion_tokens == len(c.token_ids) <= 12
    assert c.usage.peak_memory > 0 and c.usage.prompt_tps > 0
    u = c.usage.to_dict()
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_stop_string_cuts_the_text(text_llm):
    full = text_llm.generate("Once", max_tokens=16, temperature=0)
    assert len(full.text) > 6, full.text
    stop = full.text[3:6]
    first = full.text.find(stop)
    s = text_llm.stream("Once", max_tokens=16, temperature=0, stop=["\x00never", stop])
    parts = list(s)
    assert s.completion.text == "".join(parts) == full.text[:first]
    assert s.completion.finish_reason == "stop"


@pytest.fixture(scope="module")
def eos_model(text_llm, text_model, tmp_path_factory):
    """A copy of the text model whose generation_config makes the 3rd greedy token an eos."""
    greedy = text_llm.generate("Once", max_tokens=6, temperature=0).token_ids
    path = str(tmp_path_factory.mktemp("eos") / "m")
    shutil.copytree(text_model, path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False, "eos_token_id": [greedy[2]], "max_new_tokens": 5}, f)
    return path, greedy


def test_eos_from_generation_config_stops_and_is_not_shown(eos_model):
    path, greedy = eos_model
    llm = k2lite.load(path, threads=1)
    assert llm.generation_defaults["temperature"] == 0.0 and llm.generation_defaults["max_tokens"] == 5
    c = llm.generate("Once")                      # greedy and 5 tokens, from generation_config
    assert c.token_ids == greedy[:2] and c.finish_reason == "stop"
    assert c.text == llm.tokenizer.decode(greedy[:2])
    assert greedy[2] in llm.eos_ids and llm.tokenizer.special_id("<|im_end|>") in llm.eos_ids


def test_length_finish(text_llm):
    c = text_llm.generate("Once", max_tokens=3, temperature=0)
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    assert text_llm.generate("Once", max_tokens=0).token_ids == []


def test_defaults_without_generation_config(text_model):
    d = generation_defaults(text_model)
    assert d["temperature"] == 1.0 and d["top_p"] == 1.0 and d["top_k"] == 0 and d["min_p"] == 0.0


def test_closing_a_stream_early_frees_the_cache(text_llm):
    free = text_llm.cache.pages_free
    s = text_llm.stream("Hello there", max_tokens=50, seed=0)
    next(iter(s))
    s.close()
    assert text_llm.cache.pages_free == free
    assert s.completion is not None and len(s.completion.token_ids) >= 1


def test_chat_runs_the_template_and_returns_a_chat_result(chat_llm):
    msgs = [{"role": "user", "content": "Hi"}]
    r = chat_llm.chat(msgs, max_tokens=6, seed=0)
    assert isinstance(r, ChatResult) and r.finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens == len(chat_llm.tokenizer.encode_chat(msgs))
    assert "<|im_end|>" not in r.content + r.reasoning_content
    s = chat_llm.stream_chat(msgs, max_tokens=6, seed=0)
    deltas = list(s)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == r.reasoning_content == s.result.reasoning_content
    assert "".join(d.get("content", "") for d in deltas) == r.content


def test_bad_inputs(text_llm, tiny_model):
    with pytest.raises(ValueError):
        text_llm.generate("", max_tokens=2)
    with pytest.raises(ValueError):
        text_llm.generate([10**6], max_tokens=2)
    with pytest.raises(ValueError):
        text_llm.generate("x", top_p=0)
    with pytest.raises(ValueError, match="tokenizer"):
        k2lite.load(tiny_model).generate("text")


# --- a scripted model: the chat layer end to end without random weights ------------------
class Scripted(GenerationMixin):
    """Greedy decoding of this fake always yields `script`, then repeats its last id."""

    def __init__(self, path, script):
        self.path, self.tokenizer, self.script = path, Tokenizer.from_dir(path), list(script)
        self.config = types.SimpleNamespace(eos_ids=(), vocab_size=self.tokenizer.vocab_size)
        self.context, self.appends = 10**6, 0

    def _check_ids(self, ids):
        return np.asarray(ids, np.int64)

    def sequence(self):
        llm = self

        class Seq:
            tokens = []

            def __len__(self):
                return 0

            def append(self, ids, last_only=False):
                i = min(llm.appends, len(llm.script) - 1)
                llm.appends += 1
                z = np.zeros((len(ids), llm.tokenizer.vocab_size), np.float32)
                z[-1, llm.script[i]] = 10.0
                return z

            def close(self):
                pass
        return Seq()


TOOL_ANSWER = ("<think>Need the tool.</think>Let me check.<|tool_calls_section_begin|><|tool_call_begin|>"
               'functions.get_weather:0<|tool_call_argument_begin|>{"city":"Paris"}<|tool_call_end|>'
               "<|tool_calls_section_end|><|im_end|>trailing junk")


def test_stream_chat_reasoning_content_and_tool_calls(chat_model):
    tok = Tokenizer.from_dir(chat_model)
    llm = Scripted(chat_model, tok.encode(TOOL_ANSWER))
    s = llm.stream_chat([{"role": "user", "content": "Weather in Paris?"}], temperature=0, max_tokens=200)
    deltas = list(s)
    r = s.result
    assert r.reasoning_content == "Need the tool." and r.content == "Let me check."
    assert r.finish_reason == "tool_calls"
    assert r.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert [d["index"] for d in deltas if "tool_call" in d] == [0]
    assert "junk" not in r.text and "<|im_end|>" not in r.text       # stopped at the eos id
    m = r.message()
    assert m["role"] == "assistant" and m["tool_calls"][0]["id"] == "functions.get_weather:0"
    o = r.to_openai()
    assert o["object"] == "chat.completion" and o["choices"][0]["finish_reason"] == "tool_calls"


def test_stop_string_held_back_across_tokens(text_model):
    tok = Tokenizer.from_dir(text_model)
    llm = Scripted(text_model, tok.encode("abc STOP def"))
    s = llm.stream("x", temperature=0, max_tokens=50, stop="STOP")
    parts = list(s)
    assert "".join(parts) == "abc " and all("S" not in p for p in parts)
    assert s.completion.finish_reason == "stop"


@pytest.mark.parametrize("template,thinking,opens", [
    ("kimi-k2-thinking", None, True), ("kimi-k2-instruct", None, False),
    ("kimi-k2.6", None, True), ("kimi-k2.6", False, False), ("kimi-k2.6", True, True)])
def test_reasoning_follows_the_template(tmp_path, text_model, template, thinking, opens):
    """K2 Thinking opens its reasoning itself, K2.6's prompt opens it unless thinking=False,
    an Instruct answer (no <think>) is content."""
    path = make_text_model(str(tmp_path / template), chat_template=template)
    tok = Tokenizer.from_dir(path)
    r = Scripted(path, tok.encode("plain answer<|im_end|>")).chat(
        [{"role": "user", "content": "Hi"}], thinking=thinking, temperature=0, max_tokens=20)
    assert (r.reasoning_content, r.content) == (("plain answer", "") if opens else ("", "plain answer"))
    r = Scripted(path, tok.encode("<think>why</think>because<|im_end|>")).chat(
        [{"role": "user", "content": "Hi"}], thinking=thinking, temperature=0, max_tokens=20)
    assert (r.reasoning_content, r.content) == ("why", "because")
    assert Scripted(path, [0]).kind == {"kimi-k2-thinking": "thinking", "kimi-k2-instruct": "instruct",
                                        "kimi-k2.6": "hybrid"}[template]


def test_a_base_model_prompts_raw_and_refuses_chat(text_llm):
    assert text_llm.kind == "base" and not text_llm.is_chat_model
    with pytest.raises(ValueError, match="no chat template"):
        text_llm.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
    ids = text_llm.tokenizer.encode("Hello")
    assert text_llm.generate("Hello", max_tokens=2, temperature=0).usage.prompt_tokens == len(ids)


def test_chat_template_given_at_load_overrides_the_folder(text_model):
    llm = k2lite.load(text_model, threads=1, chat_template="kimi-k2-instruct")
    assert llm.kind == "instruct"
    ids, opens = llm.chat_prompt([{"role": "user", "content": "Hi"}])
    assert not opens and llm.tokenizer.decode(ids).startswith("<|im_system|>system")
    with pytest.raises(ValueError, match="not a built-in name"):
        k2lite.load(text_model, chat_template="no-such-template")


def test_chat_template_kwargs_reach_the_template(tmp_path):
    path = make_text_model(str(tmp_path / "k26"), chat_template="kimi-k2.6")
    llm = Scripted(path, [0])
    msgs = [{"role": "user", "content": "Hi"}]
    on, _ = llm.chat_prompt(msgs)
    off, opens = llm.chat_prompt(msgs, chat_template_kwargs={"thinking": False})
    assert llm.tokenizer.decode(on).endswith("<think>") and llm.tokenizer.decode(off).endswith("</think>")
    assert not opens and llm.chat_prompt(msgs, thinking=False)[0] == off
    with pytest.raises(ValueError, match="chat_template_kwargs must be a dict"):
        llm.chat_prompt(msgs, chat_template_kwargs=["thinking"])

def test_prompt_caching_reuses_the_shared_start_and_changes_nothing(text_llm):
    tok = text_llm.tokenizer
    first, second = "The cat sat on the mat.", "The cat sat on the mat. Then the dog came"
    p1, p2 = tok.encode(first), tok.encode(second)
    common = next((i for i, (x, y) in enumerate(zip(p1, p2)) if x != y), len(p1))
    free = text_llm.cache.pages_free
    with text_llm.sequence() as seq:
        a = text_llm.generate(first, max_tokens=6, temperature=0, sequence=seq)
        assert a.usage.cached_tokens == 0 and seq.tokens[:len(p1)] == p1
        b = text_llm.generate(second, max_tokens=6, temperature=0, sequence=seq)
        assert b.usage.cached_tokens == common > 0
        assert b.token_ids == text_llm.generate(second, max_tokens=6, temperature=0).token_ids
        c = text_llm.generate(second, max_tokens=6, temperature=0, sequence=seq)   # same prompt again
        assert c.usage.cached_tokens == len(p2) - 1 and c.token_ids == b.token_ids
        assert len(seq) == len(p2) + len(c.token_ids) - 1    # the last sampled id is not fed back
    assert text_llm.cache.pages_free == free


def test_multi_turn_chat_with_one_sequence_equals_recomputing(chat_llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    with chat_llm.sequence() as seq:
        for turn in range(3):
            r = chat_llm.chat(msgs, max_tokens=5, temperature=0, sequence=seq)
            fresh = chat_llm.chat(msgs, max_tokens=5, temperature=0)
            assert r.token_ids == fresh.token_ids
            assert (r.usage.cached_tokens > 0) == (turn > 0)
            msgs += [r.message(), {"role": "user", "content": f"And {turn}?"}]


@pytest.mark.parametrize("text,match", [
    ("{oops", "cannot read"), ("[1, 2]", "must hold a JSON object"),
    ('{"eos_token_id": ["x"]}', "eos_token_id must be"), ('{"eos_token_id": -3}', "eos_token_id must be"),
])
def test_bad_generation_config_is_a_format_error(tmp_path, text, match):
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(k2lite.ModelFormatError, match=match):
        generation_defaults(str(tmp_path))


def test_image_parts_are_refused_not_dropped(chat_llm):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]: image and video inputs are not supported"):
        chat_llm.chat(msgs, max_tokens=2)


def test_plain_text_markup_from_the_model_stays_text(chat_model):
    """Without stop strings the chat parser reads ids: markup the model spells out in plain
    tokens (echoing a user, say) is content, not a tool call; the same markup as special ids is."""
    tok = Tokenizer.from_dir(chat_model)
    answer = "<think>r</think>See <|tool_calls_section_begin|><|tool_call_begin|>functions.f:0" \
             "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>"
    for ids, calls in ((tok.encode(answer), 1), (tok.encode(answer[:16]) + tok.encode_ordinary(answer[16:]), 0)):
        r = Scripted(chat_model, ids + [tok.special_id("<|im_end|>")]).chat(
            [{"role": "user", "content": "Hi"}], temperature=0, max_tokens=200)
        assert len(r.tool_calls) == calls and r.reasoning_content == "r"
        assert r.content == ("See " if calls else answer[16:])
    # with a stop string the parser reads text, where every control name is markup
    r = Scripted(chat_model, tok.encode(answer[:16]) + tok.encode_ordinary(answer[16:])).chat(
        [{"role": "user", "content": "Hi"}], temperature=0, max_tokens=200, stop=["NEVER"])
    assert len(r.tool_calls) == 1


def test_missing_native_module_is_a_one_line_error(text_model, monkeypatch):
    """device="cpu" never falls back to the numpy reference (~100x slower) without a word."""
    from k2lite import ops
    real = ops._module

    def no_cpu(name):
        if name == "cpu":
            raise ImportError("No module named 'k2lite.backends._cpu_scalar'")
        return real(name)
    monkeypatch.setattr(ops, "_module", no_cpu)
    with pytest.raises(RuntimeError, match=r"native kernels, which are not built here .*_cpu_scalar.*"
                                           r"pip install -e \.") as e:
        k2lite.load(text_model, device="cpu")
    assert "\n" not in str(e.value)
    assert k2lite.load(text_model, device="ref").backend == "ref"
    assert ops.describe("ref").startswith("ref")
    monkeypatch.undo()
    if ops.available("cpu"):
        assert ops.describe("cpu").startswith("cpu (") and "threads" in ops.describe("cpu")
