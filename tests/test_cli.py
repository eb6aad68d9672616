"""The `k2lite` command line on tiny models (click CliRunner), plus one real subprocess."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import k2lite
from conftest import REPO
from k2lite.cli import DEFAULT_PROMPT, main

KIMI_CONFIG = os.path.join(REPO, "models", "kimi-k2-thinking", "config.json")


def run(*args, input=None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    return r


def test_generate_raw_streams_the_same_text_as_the_library(text_model, text_llm):
    r = run("generate", "Hello", "-m", text_model, "-n", 8, "--seed", 0, "-t", 1)
    assert r.exit_code == 0, r.output
    assert r.stdout == text_llm.generate("Hello", max_tokens=8, seed=0).text + "\n"
    assert "Generation: " in r.stderr and "tokens-per-sec" in r.stderr and "Peak memory:" in r.stderr


@pytest.mark.parametrize("weights", ["load", "repack"])
def test_generate_weight_modes_give_the_same_text(text_model, weights):
    args = ("generate", "Hello", "-m", text_model, "-n", 8, "--temperature", 0, "-t", 1)
    base = run(*args)
    r = run(*args, "--weights", weights)
    assert r.exit_code == 0 and base.exit_code == 0, r.output
    assert r.stdout == base.stdout


def test_generate_json_is_openai_shaped(text_model, text_llm):
    r = run("generate", "-m", text_model, "-n", 4, "--temperature", 0, "-t", 1, "--json", input="")
    assert r.exit_code == 0, r.output
    o = json.loads(r.stdout)
    assert o["object"] == "text_completion" and o["choices"][0]["finish_reason"] in ("stop", "length")
    # no PROMPT and an empty stdin: the default prompt
    assert o["usage"]["prompt_tokens"] == len(text_llm.tokenizer.encode(DEFAULT_PROMPT))
    assert o["choices"][0]["text"] == text_llm.generate(DEFAULT_PROMPT, max_tokens=4, temperature=0).text


def test_generate_chat_json(chat_model):
    r = run("generate", "Hi", "-m", chat_model, "--chat", "--system", "Be brief.", "-n", 4, "--seed", 1,
            "-t", 1, "--json")
    assert r.exit_code == 0, r.output
    o = json.loads(r.stdout)
    assert o["object"] == "chat.completion" and o["choices"][0]["message"]["role"] == "assistant"
    assert o["usage"]["completion_tokens"] <= 4


def test_prompt_from_stdin(text_model, text_llm):
    r = run("generate", "-m", text_model, "-n", 3, "--temperature", 0, "-t", 1, input="Hello")
    assert r.exit_code == 0
    assert r.stdout == text_llm.generate("Hello", max_tokens=3, temperature=0).text + "\n"


@pytest.mark.parametrize("args", [["generate", "-m", "/nonexistent/model"],
                                  ["generate", "-m", "{tm}", "--temperature", "-1"],
                                  ["generate", "-m", "{tm}", "--raw", "--system", "x"],
                                  ["info", "/nonexistent"],
                                  ["generate", "--bogus-flag"]])
def test_errors_are_one_line_and_exit_1(args, text_model):
    r = run(*[a.format(tm=text_model) for a in args])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.output


def test_info_from_config_alone():
    r = run("info", KIMI_CONFIG, "--context", 131072)
    assert r.exit_code == 0, r.output
    assert "1.03 T total" in r.stdout and "61 (1 dense, 60 MoE)" in r.stdout
    assert "35.6x" in r.stdout and "at 131072 tokens" in r.stdout


def test_info_from_weights_matches_config(tiny_model, tmp_path):
    import shutil
    shutil.copy(os.path.join(tiny_model, "config.json"), tmp_path / "config.json")
    from k2lite.info import model_info
    a, b = model_info(tiny_model), model_info(str(tmp_path))
    assert a.source == "safetensors" and b.source == "config"
    assert (a.total_params, a.active_params, a.bytes_by_dtype) == (b.total_params, b.active_params, b.bytes_by_dtype)
    assert a.total_bytes == k2lite.loader.Checkpoint(tiny_model).total_bytes()
    r = run("info", tiny_model)
    assert r.exit_code == 0 and "from safetensors" in r.stdout


def test_bench(tiny_model):
    r = run("bench", tiny_model, "-p", 8, "-n", 4, "-r", 2, "-t", 1, "--bw-bytes", 1 << 20)
    assert r.exit_code == 0, r.output
    assert "| pp8 |" in r.stdout and "| tg4 |" in r.stdout
    assert "memory bandwidth" in r.stdout and "% of measured bandwidth" in r.stdout


def test_perplexity(text_model, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("It is a truth universally acknowledged, that a single man in possession " * 3)
    r = run("perplexity", text_model, "--file", f, "-c", 16, "-t", 1)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout and "mean NLL" in r.stdout


def test_interactive_chat_keeps_history_and_resets(chat_model):
    r = run("chat", "-m", chat_model, "-n", 3, "--seed", 0, "-t", 1, input="Hi\n/reset\nHello again\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "[history cleared]" in r.stderr and r.stdout.count(">> ") == 4 and r.stdout.count("\n") >= 2


def test_subprocess_python_m(text_model, text_llm):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "k2lite.cli", "generate", "Hello", "-m", text_model, "-n", "5",
                        "--seed", "2", "-t", "1"], capture_output=True, text=True, env=env, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout == text_llm.generate("Hello", max_tokens=5, seed=2).text + "\n"
    assert "Prompt: " in p.stderr


def test_ctrl_c_stops_the_answer_and_keeps_the_session(chat_model, monkeypatch):
    import k2lite.cli as cli
    real, calls = cli.show_chat, []

    def interrupted_once(stream, tty, reasoning):
        calls.append(1)
        if len(calls) == 1:
            next(iter(stream))
            raise KeyboardInterrupt
        return real(stream, tty, reasoning)
    monkeypatch.setattr(cli, "show_chat", interrupted_once)
    r = run("chat", "-m", chat_model, "-n", 3, "--seed", 0, "-t", 1, input="Hi\nAgain\n")
    assert r.exit_code == 0, r.output
    assert "[stopped]" in r.stderr and len(calls) == 2 and r.stderr.count(" in context, ") == 2
    # the second turn computes only what follows the first turn's cached tokens
    assert " 0 cached]" in r.stderr and re.search(r" [1-9]\d* cached\]", r.stderr)


def test_device_cuda_without_a_gpu_is_a_one_line_error(text_model):
    from k2lite import ops
    if ops.available("cuda"):
        pytest.skip("a CUDA build is present")
    r = run("generate", "Hi", "-m", text_model, "--device", "cuda", "-n", 1)
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_base_model_prompts_raw_and_refuses_chat(text_model, text_llm):
    r = run("generate", "Hello there", "-m", text_model, "-n", 2, "--temperature", 0, "-t", 1, "--json")
    assert r.exit_code == 0, r.output
    o = json.loads(r.stdout)
    assert o["object"] == "text_completion"
    assert o["usage"]["prompt_tokens"] == len(text_llm.tokenizer.encode("Hello there"))   # raw: no template
    for args in (("generate", "Hi", "--chat"), ("chat",)):
        r = run(*args, "-m", text_model, "-n", 2, "-t", 1, input="Hi\n")
        assert r.exit_code == 2 and "no chat template" in r.stderr and "--chat-template" in r.stderr
        assert r.stderr.count("\n") == 1


def test_chat_template_and_kwargs_options(text_model):
    import k2lite
    llm = k2lite.load(text_model, threads=1, chat_template="kimi-k2.6")
    for kwargs in ("{}", '{"thinking": false}'):
        r = run("generate", "Hi", "-m", text_model, "--chat", "--chat-template", "kimi-k2.6",
                "--chat-template-kwargs", kwargs, "-n", 2, "-t", 1, "--json")
        assert r.exit_code == 0, r.output
        o = json.loads(r.stdout)
        want = llm.chat_prompt([{"role": "user", "content": "Hi"}], chat_template_kwargs=json.loads(kwargs))[0]
        assert o["object"] == "chat.completion" and o["usage"]["prompt_tokens"] == len(want)
    for bad, match in (("[1]", "must be a JSON object"), ("{oops", "not JSON")):
        r = run("generate", "Hi", "-m", text_model, "--chat-template-kwargs", bad, "-n", 1)
        assert r.exit_code == 2 and match in r.stderr


def test_info_says_tokenizer_family_and_mode(text_model, chat_model, tmp_path):
    r = run("info", os.path.join(REPO, "models", "kimi-k2-thinking"))
    assert r.exit_code == 0 and "kimi-k2-thinking chat template (recognised), thinking mode" in r.stdout
    assert "base model: no chat template" in run("info", text_model).stdout
    shutil.copy(os.path.join(REPO, "models", "kimi-k2-thinking", "config.json"), tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    out = run("info", str(tmp_path)).stdout
    assert "no tiktoken.model (tokenizer.json is not a tiktoken vocabulary" in out and "token ids only" in out
