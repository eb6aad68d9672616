"""`k2lite serve` through the official openai client, on a loopback port, with a tiny random model.

Random weights emit random tokens, so tests that need reasoning or tool calls wrap the
scheduler's sampling (conftest.scripted_sampling) and let the server "generate" a scripted
answer; the model still runs every step, so batching and the cache are exercised for real.
"""
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest

pytest.importorskip("uvicorn", reason='the server needs its extra: pip install "k2lite[serve]"')

import k2lite
from k2lite.generate import TokenStream
from k2lite.serve.scheduler import Refused, Scheduler
from k2lite.serve import serve
from k2lite.serve.api import completion_request, refused
from conftest import last_message_text, make_text_model, scripted_sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIMI = os.path.join(REPO, "models", "kimi-k2-thinking")
N_RANKS = 512
TIMEOUT = 30


def make_chat_model(out_dir, n_ranks=N_RANKS):
    """Tiny random model + the first n_ranks Kimi BPE ranks (specials renumbered to n_ranks + i)
    and K2 Instruct's chat template (answers are content unless they open <think>; reasoning by
    template is tested in test_server_templates.py)."""
    return make_text_model(out_dir, n_ranks, chat_template="kimi-k2-instruct")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model(str(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def server(model_dir):
    llm = k2lite.load(model_dir, threads=1, context=1024)
    srv = serve(llm, port=0, max_batch=4, block=False, model_name=["m", "kimi-k2-thinking"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


class Held(list):
    """Scripted ids handed out one per 50 ms until `release` is set: keeps a request live."""

    def __init__(self, ids, release):
        super().__init__(ids)
        self.release = release

    def __getitem__(self, i):
        self.release.wait(0.05)
        return super().__getitem__(i)


@contextlib.contextmanager
def scripted(srv, answers, release=None):
    """Requests whose last message (or prompt) is a key of `answers` get that text as their output;
    with `release` (an Event), slowly until it is set."""
    tok = srv.llm.tokenizer

    def pick(req):
        key = last_message_text(tok, req.prompt)
        if key not in answers:
            return None
        ids = tok.encode(answers[key])
        return Held(ids, release) if release is not None else ids
    with scripted_sampling(srv.scheduler, pick):
        yield


def wait_idle(srv, timeout=10.0):
    """Wait until no request is live or waiting; return the scheduler stats."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = srv.scheduler.stats()
        if s["live"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"scheduler still busy: {srv.scheduler.stats()}")


def all_pages_back(stats, llm) -> bool:
    """No page leaked: each is free or holds a finished request's tokens (the prompt cache)."""
    return stats["pages_free"] + stats["pages_cached"] == llm.cache.max_pages


def post_raw(srv, path, data: bytes, headers=None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


USER = [{"role": "user", "content": "Hi"}]
TOOL_ANSWER = ('<think>Need the tool.</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>'
               'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
               '<|tool_calls_section_end|><|im_end|>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


# ---------------------------------------------------------------- basics
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["m"]
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    conn.close()
    assert server.server_address[0] == "127.0.0.1"


def test_chat_non_stream(server, client):
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=1.0, seed=7)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    n_prompt = len(server.llm.tokenizer.encode_chat(USER))
    assert r.usage.prompt_tokens == n_prompt and 0 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    again = client.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=1.0, seed=7)
    assert again.choices[0].message.content == c.message.content        # the seed fixes the tokens
    assert all_pages_back(wait_idle(server), server.llm)


def test_chat_stream_with_usage(server, client):
    s = client.chat.completions.create(model="m", messages=USER, max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}, temperature=0)
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="m", messages=USER, max_tokens=6, temperature=0)
    assert text == (whole.choices[0].message.content or "")               # greedy: stream == batch
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_reasoning_and_tool_call(server, client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    with scripted(server, {"Weather in Paris?": TOOL_ANSWER}):
        r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=100)
        s = list(client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=100, stream=True))
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert m.reasoning_content == "Need the tool." and m.content == "Checking."
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == \
        [("functions.get_weather:0", "get_weather", {"city": "Paris"})]
    deltas = [c.choices[0].delta for c in s]
    assert "".join(d.reasoning_content or "" for d in deltas if hasattr(d, "reasoning_content")) == "Need the tool."
    assert "".join(d.content or "" for d in deltas) == "Checking."
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert s[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_stop(server, client):
    msgs = [{"role": "user", "content": "no tools"}]
    with scripted(server, {"no tools": TOOL_ANSWER, "stop": "Hello world STOP more"}):
        r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=100)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "stop"}],
                                           stop=["STOP"], max_tokens=100)
        assert r.choices[0].message.content == "Hello world " and r.choices[0].finish_reason == "stop"
        r = client.completions.create(model="m", prompt="stop", max_tokens=3)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
        assert r.choices[0].text == server.llm.tokenizer.decode(server.llm.tokenizer.encode("Hello world STOP more")[:3])


def test_completions_stream(server, client):
    s = list(client.completions.create(model="m", prompt="Once upon", max_tokens=5, stream=True, temperature=0))
    whole = client.completions.create(model="m", prompt="Once upon", max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in s) == whole.choices[0].text
    assert s[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# ---------------------------------------------------------------- batching, disconnects, cache full
def test_concurrent_streams_are_batched(server, client):
    n = 4
    answers = {f"user {i}": "a" * (40 + 10 * i) + TOOL_ANSWER for i in range(n)}
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(TIMEOUT)
            s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"user {i}"}],
                                               tools=TOOLS, max_tokens=200, stream=True)
            results[i] = [c.choices[0] for c in s]
        except Exception as e:      # surfaced below
            errors.append(e)

    steps0 = server.scheduler.steps
    with scripted(server, answers):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    assert not errors, errors
    for choices in results:
        calls = [t for c in choices for t in (c.delta.tool_calls or [])]
        # one complete, non-empty delta per call, never a fragment
        assert len(calls) == 1 and calls[0].id == "functions.get_weather:0"
        assert calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
        assert choices[-1].finish_reason == "tool_calls"
    assert server.scheduler.max_batch_seen > 1
    assert server.scheduler.steps - steps0 < sum(len(server.llm.tokenizer.encode(a)) for a in answers.values())
    assert all_pages_back(wait_idle(server), server.llm)


def test_scheduler_batches_without_http(model_dir):
    llm = k2lite.load(model_dir, threads=1, context=256)
    sched = Scheduler(llm, max_batch=8)
    limits = (llm.context, llm.cache.capacity_tokens, llm.cache.page_size, 16)
    reqs = [completion_request(llm, {"prompt": [1, 2, 3 + i], "max_tokens": 10, "temperature": 0}, limits)[0]
            for i in range(3)]
    for r in reqs:
        sched.submit(r)
    sched.start()
    try:
        for r in reqs:
            while r.events.get(timeout=TIMEOUT)[1] != "end":
                pass
    finally:
        sched.stop()
    assert sched.max_batch_seen == 3
    assert [r.finish_reason for r in reqs] == ["length"] * 3 and all(len(r.out) == 10 for r in reqs)
    assert all_pages_back(sched.stats(), llm)
    alone = llm.generate([1, 2, 3], max_tokens=10, temperature=0)     # batched decode == one at a time
    assert reqs[0].out == alone.token_ids


def test_request_that_can_never_fit_fails_instead_of_spinning(model_dir):
    """Pages held outside the scheduler (another user of the LLM): a request that cannot fit even
    with nothing running must fail, not keep the scheduler spinning with it forever."""
    llm = k2lite.load(model_dir, threads=1, context=256, max_cache_tokens=256)
    hog = llm.cache.new_seq()
    llm.cache.reserve([hog], np.arange(64))
    sched = Scheduler(llm, max_batch=2).start()
    try:
        limits = (256, 256, llm.cache.page_size, 16)
        big, small = (completion_request(llm, {"prompt": [1, 2, 3], "max_tokens": m}, limits)[0] for m in (250, 10))
        sched.submit([big, small])
        assert big.events.get(timeout=TIMEOUT)[1:] == ("error", "error")
        while small.events.get(timeout=TIMEOUT)[1] != "end":
            pass
        assert small.finish_reason in ("stop", "length")
    finally:
        sched.stop()


def test_disconnect_frees_pages(server, client):
    cancelled0 = server.scheduler.cancelled
    with scripted(server, {"long": "word " * 400}, release=threading.Event()):
        s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "long"}],
                                           max_tokens=190, stream=True)
        it = iter(s)
        for _ in range(3):
            next(it)
        assert server.scheduler.stats()["live"] == 1
        s.close()                                   # hang up mid-answer
        stats = wait_idle(server)
    assert server.scheduler.cancelled == cancelled0 + 1
    assert all_pages_back(stats, server.llm)


def test_cache_full_waits_then_429(model_dir):
    # 256 tokens of cache: one request (prompt ~55 + 190 new) takes all of it; one may wait.
    llm = k2lite.load(model_dir, threads=1, context=256, max_cache_tokens=256)
    srv = serve(llm, port=0, max_batch=4, max_queue=1, block=False, model_name="m")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        release = threading.Event()
        with scripted(srv, {"A": "x " * 200, "B": "done"}, release):
            a = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "A"}],
                                               max_tokens=190, stream=True)
            ia = iter(a)
            while not next(ia).choices[0].delta.content:     # the role chunk comes before admission
                pass
            b = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "B"}],
                                               max_tokens=190, stream=True)
            assert srv.scheduler.stats()["waiting"] == 1
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "C"}], max_tokens=190)
            assert e.value.status_code == 429 and "busy" in e.value.message
            b.close()                                # a waiting client hangs up: it leaves the queue
            t0 = time.time()
            while srv.scheduler.stats()["waiting"] and time.time() - t0 < TIMEOUT:
                time.sleep(0.02)
            assert srv.scheduler.stats()["waiting"] == 0 and srv.scheduler.stats()["live"] == 1
            b = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "B"}],
                                               max_tokens=190, stream=True)
            release.set()
            a.close()                                # A hangs up: B gets the cache
            chunks = list(b)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "done"
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert all_pages_back(wait_idle(srv), llm)
    finally:
        srv.stop()


# ---------------------------------------------------------------- bad input
CHAT = "/v1/chat/completions"
BAD = [
    (CHAT, b"{not json", "malformed JSON"),
    (CHAT, b"\xff\xfe", "not UTF-8"),
    (CHAT, b"[1, 2]", "body not an object"),
    (CHAT, b"{}", "no messages"),
    (CHAT, json.dumps({"messages": []}).encode(), "empty messages"),
    (CHAT, json.dumps({"messages": "hi"}).encode(), "messages a string"),
    (CHAT, json.dumps({"messages": ["hi"]}).encode(), "message not an object"),
    (CHAT, json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "unknown role"),
    (CHAT, json.dumps({"messages": [{"role": "user"}]}).encode(), "no content"),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "content a number"),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}]}).encode(), "bad part"),
    (CHAT, json.dumps({"messages": USER, "temperature": "hot"}).encode(), "temperature a string"),
    (CHAT, json.dumps({"messages": USER, "temperature": 9}).encode(), "temperature too high"),
    (CHAT, json.dumps({"messages": USER, "top_p": 0}).encode(), "top_p zero"),
    (CHAT, json.dumps({"messages": USER, "max_tokens": -1}).encode(), "max_tokens negative"),
    (CHAT, json.dumps({"messages": USER, "max_tokens": "10"}).encode(), "max_tokens a string"),
    (CHAT, json.dumps({"messages": USER, "max_tokens": True}).encode(), "max_tokens a bool"),
    (CHAT, json.dumps({"messages": USER, "seed": 1.5}).encode(), "seed a float"),
    (CHAT, json.dumps({"messages": USER, "stream": "yes"}).encode(), "stream a string"),
    (CHAT, json.dumps({"messages": USER, "stop": 5}).encode(), "stop a number"),
    (CHAT, json.dumps({"messages": USER, "n": 0}).encode(), "n=0"),
    (CHAT, json.dumps({"messages": USER, "n": 500}).encode(), "n too big"),
    (CHAT, json.dumps({"messages": USER, "tools": "x"}).encode(), "tools a string"),
    (CHAT, json.dumps({"messages": USER, "tool_choice": "required"}).encode(), "tool_choice required"),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(), "over the context"),
    ("/v1/completions", json.dumps({"prompt": {"a": 1}}).encode(), "prompt an object"),
    ("/v1/completions", json.dumps({"prompt": [1, 10 ** 9]}).encode(), "token id out of range"),
    ("/v1/completions", json.dumps({"prompt": ""}).encode(), "empty prompt"),
    ("/v1/completions", json.dumps({"prompt": []}).encode(), "empty prompt list"),
    ("/v1/completions", json.dumps({"prompt": ["a", 5]}).encode(), "prompt list of mixed items"),
    ("/v1/completions", json.dumps({"prompt": "x" * 5000}).encode(), "completion over the context"),
    ("/v1/completions", json.dumps({"prompt": "x", "suffix": "y"}).encode(), "suffix"),
    ("/v1/completions", json.dumps({"prompt": "x", "best_of": 3}).encode(), "best_of"),
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 2}).encode(), "completion logprobs"),
    ("/v1/completions", json.dumps({"prompt": "x", "echo": "yes"}).encode(), "echo a string"),
    (CHAT, b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (CHAT, json.dumps({"messages": USER, "logprobs": True}).encode(), "logprobs"),
    (CHAT, json.dumps({"messages": USER, "top_logprobs": 2}).encode(), "top_logprobs"),
    (CHAT, json.dumps({"messages": USER, "response_format": {"type": "json_object"}}).encode(), "json mode"),
    (CHAT, json.dumps({"messages": USER, "model": 5}).encode(), "model a number"),
    (CHAT, json.dumps({"messages": USER, "frequency_penalty": "x"}).encode(), "penalty a string"),
    (CHAT, json.dumps({"messages": USER, "presence_penalty": 3}).encode(), "penalty too big"),
    (CHAT, json.dumps({"messages": USER, "logit_bias": {"x": 1}}).encode(), "logit_bias key"),
    (CHAT, json.dumps({"messages": USER, "logit_bias": {"1": 500}}).encode(), "logit_bias value"),
    (CHAT, json.dumps({"messages": USER, "stop": ["x" * 5000]}).encode(), "stop too long"),
    (CHAT, json.dumps({"messages": USER, "stream_options": {"include_usage": "yes"}}).encode(), "stream_options"),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}).encode(), "image part"),
]


@pytest.mark.parametrize("path,data,why", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_400(server, path, data, why, caplog):
    with caplog.at_level(logging.INFO, logger="k2lite.server"):
        status, text = post_raw(server, path, data)
    assert status == 400, (why, text)
    err = json.loads(text)["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and "\n" not in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in text
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records)


def test_bad_input_through_client_and_server_stays_up(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 400}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="x")
    status, _ = post_raw(server, CHAT, b"{", {"Content-Length": "1"})
    assert status == 400
    host, port = server.server_address[:2]
    for method in ("GET", "PUT"):
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request(method, CHAT)
        resp = conn.getresponse()
        assert resp.status in (405, 501) and "error" in json.loads(resp.read())
        conn.close()
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- HTTP details
def raw(srv, data: bytes, half_close=False) -> bytes:
    """Send bytes on a fresh socket, return everything until the server closes it."""
    host, port = srv.server_address[:2]
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                return out
            out += b


def split_responses(data: bytes, heads=()) -> list:
    """[(status, headers, body)] of back-to-back responses with Content-Length bodies (none for
    the answers to HEAD, at the indices in `heads`)."""
    out = []
    while data:
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        n = 0 if len(out) in heads else int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, data[:n]))
        data = data[n:]
    return out


def post_bytes(body: dict, path=CHAT, extra=b"") -> bytes:
    data = json.dumps(body).encode()
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (path.encode(), len(data), extra, data)


def test_chunked_body_keep_alive_and_routes(server):
    body = {"messages": USER, "max_tokens": 4, "temperature": 0}
    data = json.dumps(body).encode()
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 7]), data[i:i + 7]) for i in range(0, len(data), 7))
               + b"0\r\n\r\n")
    got = split_responses(raw(server, post_bytes(body) + chunked + b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                              + b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: http://a\r\n\r\n"
                              + b"GET /v1/models/" + os.path.basename(server.llm.path).encode() + b" HTTP/1.1\r\n"
                              b"Host: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                          heads=(2,))
    assert [g[0] for g in got] == [200, 200, 200, 204, 200, 200]           # one connection, six answers
    assert json.loads(got[0][2])["choices"] == json.loads(got[1][2])["choices"]   # chunked == Content-Length
    assert got[2][2] == b"" and int(got[2][1]["content-length"]) > 0        # HEAD: headers only
    assert got[3][1]["access-control-allow-origin"] == "*" and "POST" in got[3][1]["access-control-allow-methods"]
    assert json.loads(got[4][2])["id"] == os.path.basename(server.llm.path)
    for req, status, words in [(b"DELETE /v1/models HTTP/1.1\r\n", 405, "use GET"),
                               (b"GET /nope HTTP/1.1\r\n", 404, "GET /nope"),
                               (b"GET /v1/models/nope HTTP/1.1\r\n", 404, "'nope' does not exist")]:
        (st, headers, text), = split_responses(raw(server, req + b"Host: x\r\nConnection: close\r\n\r\n"))
        assert st == status and words in json.loads(text)["error"]["message"], (req, text)
    for path in (b"//v1//models/", b"http://x/v1/models?a=1"):                   # sloppy base URLs, proxies
        (st, _, text), = split_responses(raw(server, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert st == 200 and json.loads(text)["object"] == "list"
    # a refused request's body is still read by its framing: the next request is a real one
    (st, headers, _), (st2, _, text) = split_responses(raw(
        server, b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert st == 405 and headers["allow"] == "GET" and st2 == 200 and json.loads(text)["status"] == "ok"
    # malformed framing: h11 refuses it with 400 and closes the connection (no second request
    # can hide in the body: request smuggling behind a proxy)
    for bad in (b"GARBAGE\r\n\r\n",
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 6_0\r\n\r\n" + b"x" * 60,
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}"
                b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"):
        out = raw(server, bad)
        assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"HTTP/1.1") == 1, (bad, out)
    # a body cut short by the client's hang-up: nothing to answer, the server stays up
    assert raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nabc", half_close=True) == b""
    assert server.scheduler.stats()["live"] == 0


def test_stalled_body_times_out(server):
    server.request_timeout = 0.3
    try:
        t0 = time.time()
        (st, _, text), = split_responses(raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                                     b"Content-Length: 100\r\n\r\n{\"prompt\""))
    finally:
        del server.request_timeout
    assert st == 408 and "timed out" in json.loads(text)["error"]["message"] and time.time() - t0 < 5


def test_http10_stream_is_not_chunked(server):
    data = raw(server, post_bytes({"prompt": "Once", "max_tokens": 3, "stream": True}, "/v1/completions")
               .replace(b"HTTP/1.1", b"HTTP/1.0"))
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head.lower() and body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")


def test_lenient_inputs(server, client):
    """What vLLM and llama.cpp clients send and the server should take."""
    r = client.chat.completions.create(model="kimi-k2-thinking", messages=[{"role": "developer", "content": "Brief."}] + USER,
                                       max_tokens=10 ** 12, seed=-1, stop=[], response_format={"type": "text"},
                                       logprobs=False, n=1, user="me", parallel_tool_calls=True)
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == "m"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = client.chat.completions.create(model="m", messages=parts, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    (st, _, text), = split_responses(raw(server, post_bytes({"prompt": "Hi", "max_tokens": 2}, "/v1/completions",
                                                            b"Content-Type: text/plain\r\nConnection: close\r\n")))
    assert st == 200 and json.loads(text)["usage"]["completion_tokens"] <= 2       # `curl -d` without -H


def test_n_and_prompt_lists(server, client):
    r = client.chat.completions.create(model="m", messages=USER, n=3, max_tokens=6, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1                     # seed, seed+1, seed+2
    n_prompt = len(server.llm.tokenizer.encode_chat(USER))
    assert r.usage.prompt_tokens == n_prompt                                    # the prompt counts once
    assert 0 < r.usage.completion_tokens <= 18
    chunks = list(client.chat.completions.create(model="m", messages=USER, n=3, max_tokens=6, temperature=1.0, seed=11,
                                                 stream=True, stream_options={"include_usage": True}))
    text = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
            for i in range(3)}
    assert text == {c.index: c.message.content for c in r.choices}              # stream == whole, per choice
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens

    prompts = ["Once upon", [5, 6, 7], "Hello"]
    alone = [client.completions.create(model="m", prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in prompts]
    r = client.completions.create(model="m", prompt=prompts, n=2, max_tokens=5, temperature=0, echo=True)
    assert [c.index for c in r.choices] == list(range(6))
    echo = ["Once upon", server.llm.tokenizer.decode([5, 6, 7]), "Hello"]
    assert [c.text for c in r.choices] == [e + a for e, a in zip(echo, alone) for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(server.llm.tokenizer.encode(p)) if isinstance(p, str) else len(p)
                                        for p in prompts)
    s = list(client.completions.create(model="m", prompt=[[5, 6, 7], "Hello"], max_tokens=5, temperature=0,
                                       stream=True))
    assert ["".join(c.choices[0].text for c in s if c.choices[0].index == i) for i in (0, 1)] == alone[1:]
    assert all_pages_back(wait_idle(server), server.llm)


def test_logit_bias_and_penalties(server, client):
    tok = server.llm.tokenizer
    t, u = tok.encode(" the")[0], tok.encode(" and")[0]
    for bias, want in (({t: 100, u: 90}, t), ({t: -100, u: 90}, u)):
        r = client.completions.create(model="m", prompt="Hi", max_tokens=4, temperature=0,
                                      logit_bias={str(k): v for k, v in bias.items()})
        assert r.choices[0].text == tok.decode([want] * 4)
    # penalties act on the ids generated so far: 0.5 per occurrence plus 1 for presence
    sampler = server.llm.make_sampler(temperature=0)
    req = completion_request(server.llm, {"prompt": [1], "presence_penalty": 1, "frequency_penalty": 0.5},
                             server.limits)[0]
    req.sampler, req.stream = sampler, TokenStream(None)
    req.stream.ids += [5, 5, 7]
    logits = np.zeros(server.llm.config.vocab_size, np.float32)
    logits[5], logits[7], logits[9] = 1.9, 1.4, 0.1
    assert Scheduler._sample(None, req, logits) == 9        # 5: 1.9 - 2 < 0, 7: 1.4 - 1.5 < 0
    assert logits[5] == np.float32(1.9)                     # the model's logits are not modified


def test_concurrent_answers_equal_alone(server):
    """More requests than max_batch at once, prompts of every length (one over a prefill chunk):
    each answer must be exactly the one it gets alone (greedy, and seeded sampling)."""
    bodies = []
    for i in range(10):
        if i % 3 == 0:
            bodies.append(("/v1/completions", {"prompt": list(range(3, 4 + 7 * i + (300 if i == 3 else 0))),
                                               "max_tokens": 30 + i, "temperature": 0}))
        elif i % 3 == 1:
            bodies.append((CHAT, {"messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 30,
                                  "temperature": 1.0, "seed": i}))
        else:
            bodies.append(("/v1/completions", {"prompt": "Once upon a time " * i, "max_tokens": 10, "temperature": 0,
                                               "stop": ["\n\n"], "presence_penalty": 0.5}))

    def ask(i):
        status, text = post_raw(server, *[bodies[i][0], json.dumps(bodies[i][1]).encode()])
        assert status == 200, text
        r = json.loads(text)
        c = r["choices"][0]
        usage = {k: v for k, v in r["usage"].items() if k != "prompt_tokens_details"}   # cache hits vary
        return c.get("text", c.get("message", {}).get("content")), c["finish_reason"], usage

    alone = [ask(i) for i in range(len(bodies))]
    together, seen0 = [None] * len(bodies), server.scheduler.max_batch_seen
    server.scheduler.max_batch_seen = 0
    barrier = threading.Barrier(len(bodies))

    def run(i):
        barrier.wait(TIMEOUT)
        together[i] = ask(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert together == alone
    assert server.scheduler.max_batch_seen > 1                                  # they did share steps
    server.scheduler.max_batch_seen = max(seen0, server.scheduler.max_batch_seen)
    assert all_pages_back(wait_idle(server), server.llm)


def test_non_stream_disconnect_is_cancelled(server):
    cancelled0 = server.scheduler.cancelled
    host, port = server.server_address[:2]
    with scripted(server, {"slow": "word " * 400}, release=threading.Event()):
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(post_bytes({"messages": [{"role": "user", "content": "slow"}], "max_tokens": 300}))
            t0 = time.time()
            while server.scheduler.stats()["live"] == 0 and time.time() - t0 < TIMEOUT:
                time.sleep(0.01)
        stats = wait_idle(server, timeout=5)                 # not the 15 s the scripted answer takes
    assert server.scheduler.cancelled == cancelled0 + 1 and all_pages_back(stats, server.llm)


def test_failing_request_fails_alone(server, client):
    tok = server.llm.tokenizer

    def pick(req):
        key = last_message_text(tok, req.prompt)
        if key == "boom at admission":
            raise RuntimeError("test")
        return {"bad token": [tok.encode("x")[0], 10 ** 9], "fine": tok.encode("all good")}.get(key)
    with scripted_sampling(server.scheduler, pick):
        out = {}

        def ask(key):
            try:
                r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": key}],
                                                   max_tokens=20)
                out[key] = r.choices[0].message.content
            except openai.APIStatusError as e:
                out[key] = (e.status_code, e.body["message"] if isinstance(e.body, dict) else e.body)
        threads = [threading.Thread(target=ask, args=(k,)) for k in ("bad token", "boom at admission", "fine")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    assert out["fine"] == "all good"
    assert out["bad token"][0] == 500 and out["boom at admission"][0] == 500
    assert client.chat.completions.create(model="m", messages=USER, max_tokens=2).choices[0].finish_reason
    assert all_pages_back(wait_idle(server), server.llm)


def test_max_queue_zero_still_serves(server):
    sched = Scheduler(server.llm, max_batch=2, max_queue=0)     # never started: only submit() runs
    for _ in range(2):                                           # room in the batch: no 429
        sched.submit(completion_request(server.llm, {"prompt": [1, 2], "max_tokens": 2}, server.limits))
    assert len(sched.waiting) == 2
    with pytest.raises(Refused) as e:
        sched.submit(completion_request(server.llm, {"prompt": [1, 2], "max_tokens": 2}, server.limits))
    assert e.value.reason == "busy" and refused(e.value).status == 429 and refused(e.value).headers["Retry-After"]


# ---------------------------------------------------------------- the Moonshot example, and main()
def test_moonshot_style_tool_loop(server, client):
    """The K2 Thinking example's shape: read reasoning_content, append the message object itself,
    answer the tool call, ask again."""
    messages = [{"role": "system", "content": "You are Kimi."}, {"role": "user", "content": "Weather in Paris?"}]
    with scripted(server, {"Weather in Paris?": TOOL_ANSWER}):
        r = client.chat.completions.create(model="kimi-k2-thinking", messages=messages, tools=TOOLS,
                                           temperature=1.0, max_tokens=1024 * 32)
    choice = r.choices[0]
    assert choice.message.reasoning_content == "Need the tool." and choice.finish_reason == "tool_calls"
    messages.append(choice.message)                  # a pydantic object, sent back as the client dumps it
    for call in choice.message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name,
                         "content": json.dumps({"weather": "Sunny"})})
    with scripted(server, {json.dumps({"weather": "Sunny"}): "<think>Sunny.</think>It is sunny."}):
        r = client.chat.completions.create(model="kimi-k2-thinking", messages=messages, tools=TOOLS, max_tokens=100)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.reasoning_content == "Sunny."
    stream = client.chat.completions.create(model="kimi-k2-thinking", messages=messages, tools=TOOLS,
                                            max_tokens=5, stream=True)
    for chunk in stream:                             # the streaming example reads deltas this way
        if chunk.choices:
            delta = chunk.choices[0].delta
            if hasattr(delta, "reasoning_content"):
                assert isinstance(delta.reasoning_content, str) and delta.reasoning_content


def test_main_entry_point(model_dir):
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "k2lite", "serve", "--model", model_dir, "--port", "0",
                          "--threads", "1", "--context", "512", "--served-model-name", "m"],
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        url = None
        t0 = time.time()
        while url is None and time.time() - t0 < TIMEOUT:
            line = p.stderr.readline()
            if not line:
                break
            if " on http://" in line:
                url = line.split(" on ")[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:"), "server did not start"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=[{"role": "nobody", "content": "x"}])
        assert client.chat.completions.create(model="m", messages=USER, max_tokens=3).usage.completion_tokens <= 3
    finally:
        p.terminate()
        _, err = p.communicate(timeout=TIMEOUT)
    assert "Traceback" not in err


def test_sigterm_answers_requests_in_flight(model_dir):
    """SIGTERM (docker stop) with one answer streaming and one queued: both clients get a
    complete 503 error, not a cut connection, and the process exits cleanly."""
    p = subprocess.Popen([sys.executable, "-m", "k2lite", "serve", "--model", model_dir, "--port", "0", "--threads", "1",
                          "--context", "4096", "--max-batch", "1"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        url = None
        while url is None:      # readline ends at the process's exit too
            line = p.stderr.readline()
            assert line, "server did not start"
            url = line.split(" on ")[1].split()[0] if " on http://" in line else None
        host, port = url[len("http://"):].split(":")
        endless = {"prompt": [1, 2, 3], "max_tokens": 4000, "temperature": 0, "logit_bias": {"513": -100, "514": -100}}
        streaming = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        streaming.request("POST", "/v1/completions", json.dumps({**endless, "stream": True}))
        resp = streaming.getresponse()
        assert resp.readline().startswith(b"data: ")
        queued = {}
        t = threading.Thread(target=lambda: queued.update(zip(("status", "text"), post_raw(
            type("S", (), {"server_address": (host, int(port))}), "/v1/completions", json.dumps(endless).encode()))))
        t.start()
        health = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        t0 = time.time()
        while True:             # SIGTERM only once the second request waits (else it is refused)
            health.request("GET", "/health")
            if json.loads(health.getresponse().read())["waiting"] == 1:
                break
            assert time.time() - t0 < TIMEOUT, "the second request never queued"
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        rest = resp.read().decode()                  # http.client raises IncompleteRead on a cut stream
        t.join(TIMEOUT)
        assert 'shutting down' in rest and rest.endswith("data: [DONE]\n\n")
        assert queued["status"] == 503 and json.loads(queued["text"])["error"]["type"] == "server_error"
        assert p.wait(TIMEOUT) == 0
    finally:
        p.kill()
        err = p.stderr.read()
    assert "Traceback" not in err


def test_prompt_cache_reuses_a_conversation_and_gives_the_same_answers(model_dir):
    llm = k2lite.load(model_dir, threads=1, context=512)
    srv = serve(llm, port=0, max_batch=2, block=False)
    try:
        def chat(messages):
            status, text = post_raw(srv, CHAT, json.dumps({"messages": messages, "max_tokens": 12,
                                                           "temperature": 0}).encode())
            assert status == 200, text
            r = json.loads(text)
            return r["choices"][0]["message"], r["usage"]
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
        first, u1 = chat(msgs)
        again, u2 = chat(msgs)                       # the whole prompt is cached but its last token
        assert again == first and u2["prompt_tokens_details"]["cached_tokens"] == u2["prompt_tokens"] - 1
        msgs2 = msgs + [first, {"role": "user", "content": "And then?"}]
        third, u3 = chat(msgs2)                      # the history before the new turn is reused
        n_system = len(llm.tokenizer.encode_chat(msgs[:1], add_generation_prompt=False))
        assert n_system < u3["prompt_tokens_details"]["cached_tokens"] < u3["prompt_tokens"]
        stats = wait_idle(srv)
        assert stats["cached_sequences"] >= 1 and stats["cached_tokens"] > 0
    finally:
        srv.stop()
    # the same conversation through the library's prompt cache (one Sequence): the same answers.
    # (Recomputing the whole history instead prefills the earlier answer, which the cache holds
    # as decoded: the two attention forms agree to bf16 rounding, not bit for bit.)
    fresh = k2lite.load(model_dir, threads=1, context=512)
    with fresh.sequence() as seq:
        for m, answer in ((msgs, first), (msgs2, third)):
            r = fresh.chat(m, max_tokens=12, temperature=0, sequence=seq)
            assert (r.content, r.reasoning_content) == (answer["content"], answer.get("reasoning_content") or "")


def test_prompt_cache_gives_its_pages_to_new_requests(model_dir):
    # 4 pages of 64 tokens: each finished request stays cached; the next, with a prompt that
    # shares no first token and room for 250 new tokens, needs all 4: the cached one is evicted.
    llm = k2lite.load(model_dir, threads=1, context=256, max_cache_tokens=256)
    srv = serve(llm, port=0, max_batch=2, block=False)
    try:
        for prompt in ([5, 6, 7], [8, 9], [10]):
            status, text = post_raw(srv, "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 250,
                                                                        "temperature": 0}).encode())
            assert status == 200, text
            assert json.loads(text)["usage"]["completion_tokens"] >= 1
            stats = wait_idle(srv)
            assert stats["cached_sequences"] == 1 and all_pages_back(stats, llm)
    finally:
        srv.stop()


def test_prompt_cache_keeps_conversations_that_share_only_a_start(model_dir):
    """Two clients taking turns share a system prompt: each keeps its own cached conversation
    (the other gets a copy of the shared start), and stopping gives every page back."""
    llm = k2lite.load(model_dir, threads=1, context=512)
    sched = Scheduler(llm, max_batch=2).start()
    limits = (llm.context, llm.cache.capacity_tokens, llm.cache.page_size, 16)

    def run(prompt):
        r = completion_request(llm, {"prompt": prompt, "max_tokens": 4, "temperature": 0}, limits)[0]
        sched.submit(r)
        while r.events.get(timeout=TIMEOUT)[1] not in ("end", "error"):
            pass
        assert r.finish_reason in ("stop", "length")
        return r
    try:
        shared = list(range(10, 20))
        a, b = shared + list(range(100, 160)), shared + list(range(200, 260))
        for turn in range(3):
            ra, rb = run(a), run(b)
            if turn:     # everything but the new turn's two tokens (and the last answer token)
                assert ra.cached >= len(a) - 3 and rb.cached >= len(b) - 3, (turn, ra.cached, rb.cached)
            a, b = a + ra.out + [300 + turn, 301], b + rb.out + [400 + turn, 401]
        assert len(sched.idle) >= 2
    finally:
        sched.stop()
    assert llm.cache.pages_free == llm.cache.max_pages


def test_a_failure_while_finishing_frees_the_pages_once(model_dir):
    """_finish parks a sequence only after the last text and parser tail went out; a failure
    there fails that request alone and frees its pages (never a cached sequence freed twice)."""
    llm = k2lite.load(model_dir, threads=1, context=512)
    sched = Scheduler(llm, max_batch=2).start()
    limits = (llm.context, llm.cache.capacity_tokens, llm.cache.page_size, 16)

    class Broken:
        def feed_text(self, text):
            return []

        def finish(self):
            raise RuntimeError("parser bug")
    try:
        def run(prompt, parser=None):
            r = completion_request(llm, {"prompt": prompt, "max_tokens": 3, "temperature": 0}, limits)[0]
            r.parser = parser
            sched.submit(r)
            while (kind := r.events.get(timeout=TIMEOUT)[1]) not in ("end", "error"):
                pass
            return kind
        assert run([5, 6, 7, 8], Broken()) == "error"
        assert not any(st.closed for st in sched.idle)
        assert run([5, 6, 7, 8, 9]) == "end" and run([40, 41]) == "end"
    finally:
        sched.stop()
    assert llm.cache.pages_free == llm.cache.max_pages


def test_plain_text_markup_from_the_model_is_no_tool_call(server, client):
    """Chat without stop strings parses ids: a tool call the model spells in plain tokens stays
    content (special ids would be a call: test_tool_calls...)."""
    tok = server.llm.tokenizer
    fake = "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}" \
           "<|tool_call_end|><|tool_calls_section_end|>"
    ids = tok.encode(" ok") + tok.encode_ordinary(fake)
    with scripted_sampling(server.scheduler, lambda req: ids):
        r = client.chat.completions.create(model="m", messages=USER, max_tokens=len(ids) + 5, temperature=0)
    m = r.choices[0].message
    assert not m.tool_calls and fake in (m.content or "") + (m.reasoning_content or "")
