"""The server follows each checkpoint's chat template: chat_template_kwargs per request,
reasoning where the template opens it, base models refused on chat, /v1/models says which."""
import json
import urllib.error
import urllib.request

import pytest

import k2lite
from conftest import make_text_model
from k2lite.serve import serve


def post(srv, path, body):
    req = urllib.request.Request(srv.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(srv, path):
    with urllib.request.urlopen(srv.url + path, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    out = {}
    for name in ("kimi-k2-thinking", "kimi-k2.6", "kimi-k2-instruct", None):
        path = make_text_model(str(tmp_path_factory.mktemp(name or "base")), chat_template=name)
        out[name] = serve(k2lite.load(path, threads=1, context=512), port=0, max_batch=2, block=False)
    yield out
    for srv in out.values():
        srv.stop()


def test_models_say_family_and_mode(servers):
    for name, mode in (("kimi-k2.6", "hybrid"), ("kimi-k2-instruct", "instruct"), (None, "base")):
        card = get(servers[name], "/v1/models")["data"][0]["k2lite"]
        assert card["mode"] == mode and card["chat_template"] == name
        assert card["chat_template_recognised"] is (None if name is None else True)


def test_chat_template_kwargs_per_request(servers):
    srv, msgs = servers["kimi-k2.6"], [{"role": "user", "content": "Hi"}]
    tok = srv.llm.tokenizer
    for kwargs in (None, {"thinking": False}, {"thinking": True, "preserve_thinking": True}):
        body = {"messages": msgs, "max_tokens": 1, "temperature": 0}
        if kwargs is not None:
            body["chat_template_kwargs"] = kwargs
        status, r = post(srv, "/v1/chat/completions", body)
        assert status == 200, r
        want = tok.encode_chat(msgs, **(kwargs or {}))
        assert r["usage"]["prompt_tokens"] == len(want)
    status, r = post(srv, "/v1/chat/completions", {"messages": msgs, "chat_template_kwargs": ["thinking"]})
    assert status == 400 and r["error"]["param"] == "chat_template_kwargs"


@pytest.mark.parametrize("name,kwargs,reasoning", [
    ("kimi-k2-instruct", None, False), ("kimi-k2-thinking", None, True),
    ("kimi-k2.6", None, True), ("kimi-k2.6", {"thinking": False}, False)])
def test_answers_open_where_the_template_says(servers, name, kwargs, reasoning):
    """The same random weights answer: Instruct and K2.6 without thinking in content, K2 Thinking
    and K2.6 in reasoning (no </think> comes from random weights)."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    status, r = post(servers[name], "/v1/chat/completions", body)
    assert status == 200
    m = r["choices"][0]["message"]
    said = (m.get("reasoning_content") or "", m.get("content") or "")
    assert said[int(reasoning)] == "" and said[1 - int(reasoning)] != ""


def test_base_model_chat_is_refused_completions_work(servers):
    srv = servers[None]
    status, r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400 and "no chat template" in r["error"]["message"]
    status, r = post(srv, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert status == 200 and r["usage"]["prompt_tokens"] == len(srv.llm.tokenizer.encode("Hello"))
