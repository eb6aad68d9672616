"""`k2lite serve` as deployed: hostile input, slow and many connections, fair admission, API keys,
/metrics, models by Hugging Face id, and the CLI without the [serve] extra."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn", reason='the server needs its extra: pip install "k2lite[serve]"')

import openai  # noqa: E402

import k2lite  # noqa: E402
from k2lite.sampler import filter_probs, sample  # noqa: E402
from k2lite.serve.transport import Server  # noqa: E402
from k2lite.serve import serve  # noqa: E402
from test_server import REPO, TIMEOUT, USER, make_chat_model, post_raw, raw, scripted, wait_idle  # noqa: E402

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model(str(tmp_path_factory.mktemp("deploy")))


@pytest.fixture(scope="module")
def server(model_dir):
    llm = k2lite.load(model_dir, threads=1, context=1024)
    srv = serve(llm, port=0, max_batch=4, block=False, model_name=["served", "alias"])
    yield srv
    srv.stop()


def error_of(status_text):
    status, text = status_text
    return status, json.loads(text)["error"]


# ---------------------------------------------------------------- hostile input
def test_echo_of_a_lone_surrogate_is_one_400(server):
    body = b'{"prompt": "a\\ud800b", "echo": true, "max_tokens": 2%s}'
    for stream in (b"", b', "stream": true'):
        out = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body % stream), body % stream))
        assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"HTTP/1.1 ") == 1, out
        assert b"surrogate" in out
    status, text = post_raw(server, COMPLETIONS, b'{"prompt": "a\\ud83d\\ude00b", "echo": true, "max_tokens": 1}')
    assert status == 200 and json.loads(text)["choices"][0]["text"].startswith("a\U0001F600b")   # a pair is fine


def test_huge_logit_bias_key_is_400(server):
    status, err = error_of(post_raw(server, CHAT, json.dumps({"messages": USER, "logit_bias": {"9" * 5000: 1}}).encode()))
    assert status == 400 and err["param"] == "logit_bias"


def test_tiny_temperature_is_greedy(server):
    x = np.array([0.5, 3.0, 2.9, -1.0], np.float32)
    for t in (1e-320, 5e-324, 1e-9):
        assert sample(x, temperature=t) == 1 and np.isfinite(filter_probs(x, t)).all()
    greedy = [json.loads(post_raw(server, COMPLETIONS, json.dumps(
        {"prompt": "Once upon", "max_tokens": 8, "temperature": t}).encode())[1])["choices"][0]["text"]
        for t in (0, 1e-320)]
    assert greedy[0] == greedy[1]


def test_prompt_bytes_are_bounded_before_tokenizing(server, monkeypatch):
    tok = server.llm.tokenizer
    calls = []
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or [])
    monkeypatch.setattr(tok, "encode_chat", lambda *a, **k: calls.append(1) or [])
    big = "x" * (1024 * 256 + 10)            # context 1024, tokens of at most 256 bytes: cannot fit
    for path, body in ((COMPLETIONS, {"prompt": big}), (CHAT, {"messages": [{"role": "user", "content": big}]})):
        status, err = error_of(post_raw(server, path, json.dumps(body).encode()))
        assert status == 400 and err["code"] == "context_length_exceeded" and "more than" in err["message"]
    assert calls == []


def test_long_prompts_are_encoded_exactly_and_refused_early(server):
    from k2lite.serve.api import encode_prompt
    from k2lite.tokenizer import MAX_CHUNK_CHARS
    tok = server.llm.tokenizer
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefgh  \n"), 2 * MAX_CHUNK_CHARS + 12345))
    assert encode_prompt(tok, text, 10 ** 9, "prompt") == tok.encode(text)      # pieces == whole
    seen = []

    class Counting:            # a Tokenizer that records how much text it was given
        __class__ = type(tok)

        def encode(self, t):
            seen.append(len(t))
            return tok.encode(t)
    with pytest.raises(k2lite.serve.api.ApiError) as e:
        encode_prompt(Counting(), text, 1000, "prompt")
    assert e.value.code == "context_length_exceeded" and sum(seen) == MAX_CHUNK_CHARS     # one piece, not all


def test_unknown_model_is_404_and_aliases_are_accepted(server, model_dir):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    for name in ("served", "alias", os.path.basename(model_dir)):
        r = client.completions.create(model=name, prompt="Hi", max_tokens=1)
        assert r.model == "served"
    assert post_raw(server, COMPLETIONS, b'{"prompt": "Hi", "max_tokens": 1}')[0] == 200     # no model: fine
    assert [m.id for m in client.models.list().data] == ["served"]
    assert client.models.retrieve("alias").id == "alias"


def test_no_request_hides_in_a_body(server):
    """Framing a proxy could read differently: refused, or the connection ends after one answer."""
    body = b'{"prompt": "Hi", "max_tokens": 1}'
    nxt = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (b"Content-Length: %d\r\nTransfer-Encoding: chunked" % (len(body) + 5 + len(nxt)),
                 b"Transfer-Encoding: xchunked\r\nContent-Length: %d" % len(body),
                 b"Content-Length: %d\r\nContent-Length: %d" % (len(body), len(body) + len(nxt))):
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if b"Transfer-Encoding: chunked" in head else body
        out = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n%s%s" % (head, chunked, nxt))
        assert out.count(b"HTTP/1.1 ") == 1, (head, out)


# ---------------------------------------------------------------- connections
def test_header_deadline_and_connection_limit(model_dir):
    llm = k2lite.load(model_dir, threads=1, context=256)
    srv = Server(llm, port=0, max_batch=2, max_connections=4)
    srv.header_timeout = 0.6
    srv.start()
    try:
        # a byte every 0.2 s never finishes the headers: 408 and closed at the deadline
        with socket.create_connection(srv.server_address, timeout=TIMEOUT) as s:
            t0, out = time.time(), b""
            for ch in b"GET /health HTTP/1.1\r\nHost: x\r\n":
                try:
                    s.sendall(bytes([ch]))
                except OSError:
                    break
                time.sleep(0.2)
                s.setblocking(False)
                try:
                    out += s.recv(4096)
                except BlockingIOError:
                    pass
                s.setblocking(True)
                if out:
                    break
            took = time.time() - t0
        assert out.startswith(b"HTTP/1.1 408 ") and b"headers" in out and took < 3, (out, took)
        # a connection that sends nothing is closed too
        with socket.create_connection(srv.server_address, timeout=TIMEOUT) as s:
            t0 = time.time()
            assert s.recv(100) == b"" and time.time() - t0 < 3
        # connections past the limit get 503 for their requests; the server recovers after
        idle = [socket.create_connection(srv.server_address, timeout=TIMEOUT) for _ in range(5)]
        time.sleep(0.1)
        out = raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 "), out
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    finally:
        srv.stop()


# ---------------------------------------------------------------- per-request limits, fair admission
def test_n_times_max_tokens_is_limited_by_the_cache(model_dir):
    llm = k2lite.load(model_dir, threads=1, context=256, max_cache_tokens=256)     # 4 pages of 64
    srv = serve(llm, port=0, max_batch=8, block=False)
    try:
        prompt = list(range(5, 25))
        status, text = post_raw(srv, COMPLETIONS, json.dumps({"prompt": prompt, "n": 4, "max_tokens": 10 ** 9,
                                                              "temperature": 1, "seed": 3}).encode())
        assert status == 200, text
        r = json.loads(text)       # each choice gets a page: 64 - 20 prompt tokens at most
        assert all(c["finish_reason"] in ("stop", "length") for c in r["choices"])
        assert r["usage"]["completion_tokens"] <= 4 * 44
        status, err = error_of(post_raw(srv, COMPLETIONS, json.dumps({"prompt": prompt, "n": 5}).encode()))
        assert status == 400 and err["param"] == "n" and "do not fit" in err["message"]
    finally:
        srv.stop()


def test_a_request_with_many_choices_takes_turns(model_dir):
    """n = 6 on a batch of 2 with a queue of 1: a second client is neither refused (the queue
    counts HTTP requests) nor kept waiting until all six choices end (admission is fair)."""
    llm = k2lite.load(model_dir, threads=1, context=512)
    srv = serve(llm, port=0, max_batch=2, max_queue=1, block=False)
    done = {}
    try:
        with scripted(srv, {"big": "word " * 6, "small": "ok"}, release=threading.Event()):
            def ask(key, n):
                status, text = post_raw(srv, CHAT, json.dumps({"messages": [{"role": "user", "content": key}],
                                                               "n": n, "max_tokens": 50}).encode())
                done[key] = (time.time(), status, text)
            big = threading.Thread(target=ask, args=("big", 6))
            big.start()
            t0 = time.time()
            while srv.scheduler.stats()["live"] < 2 and time.time() - t0 < TIMEOUT:
                time.sleep(0.01)
            ask("small", 1)
            big.join(TIMEOUT)
        assert done["small"][1] == 200, done["small"]
        assert json.loads(done["small"][2])["choices"][0]["message"]["content"] == "ok"
        assert done["big"][1] == 200 and len(json.loads(done["big"][2])["choices"]) == 6
        assert done["small"][0] < done["big"][0] - 0.5          # it did not wait for all six
    finally:
        srv.stop()


# ---------------------------------------------------------------- API keys
def test_api_keys(model_dir, tmp_path, caplog):
    llm = k2lite.load(model_dir, threads=1, context=256)
    srv = serve(llm, port=0, max_batch=2, block=False, api_keys=["key-one", "key-two"], model_name="m")
    try:
        for key in ("key-one", "key-two"):
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)
            assert c.completions.create(model="m", prompt="Hi", max_tokens=1).choices
        for key in ("wrong", "key-one-and-more", "key-on"):
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)
            with pytest.raises(openai.AuthenticationError) as e:
                c.models.list()
            assert e.value.status_code == 401
            assert e.value.body == {"message": e.value.body["message"], "type": "invalid_request_error",
                                    "param": None, "code": "invalid_api_key"}
        for path, want in (("/health", b"200"), ("/", b"200"), ("/metrics", b"401"), ("/v1/models", b"401")):
            out = raw(srv, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
            assert out.startswith(b"HTTP/1.1 " + want), (path, out[:80])
        out = raw(srv, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-two\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200")
    finally:
        srv.stop()


def test_api_key_options_and_the_warning(model_dir, tmp_path):
    from k2lite.cli import api_keys
    f = tmp_path / "keys"
    f.write_text("# team keys\nalpha\n\n  beta  \n")
    assert api_keys(("gamma delta",), str(f)) == ["gamma", "delta", "alpha", "beta"]
    env = {**os.environ, "K2LITE_API_KEY": "sekrit"}
    p = subprocess.Popen([sys.executable, "-m", "k2lite", "serve", "-m", model_dir, "--host", "0.0.0.0", "--port", "0",
                          "--threads", "1", "--context", "256"], stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    warned, url = _started(p)
    try:
        assert not warned                          # a key is set: no warning
        port = url.rsplit(":", 1)[1]
        out = raw(type("S", (), {"server_address": ("127.0.0.1", int(port))}),
                  b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 401")
    finally:
        p.terminate()
        p.wait(TIMEOUT)
    p = subprocess.Popen([sys.executable, "-m", "k2lite", "serve", "-m", model_dir, "--host", "0.0.0.0", "--port", "0",
                          "--threads", "1", "--context", "256"], stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env={k: v for k, v in os.environ.items() if k != "K2LITE_API_KEY"})
    try:
        warned, url = _started(p)
        assert warned
    finally:
        p.terminate()
        p.wait(TIMEOUT)


def _started(p):
    warned = False
    while True:
        line = p.stderr.readline()
        assert line, "server did not start"
        warned |= "without an API key" in line
        if " on http://" in line:
            return warned, line.split(" on ")[1].split()[0]


# ---------------------------------------------------------------- metrics
def test_metrics_parse_as_prometheus_text(server):
    parser = pytest.importorskip("prometheus_client.parser")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
    msgs = [{"role": "user", "content": "Tell me a story about metrics"}]
    for _ in range(2):                              # the second reuses the first's prompt
        client.chat.completions.create(model="served", messages=msgs, max_tokens=5, temperature=0)
    list(client.completions.create(model="served", prompt="Hi", max_tokens=4, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi", max_tokens=1)
    wait_idle(server)
    out = raw(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, text = out.split(b"\r\n\r\n", 1)
    assert b"text/plain; version=0.0.4" in head
    fams = {f.name: f for f in parser.text_string_to_metric_families(text.decode())}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert all(name.startswith("k2lite_") for name in fams)
    assert value["k2lite_requests_total", (("route", CHAT), ("status", "200"))] >= 2
    assert value["k2lite_requests_total", (("route", COMPLETIONS), ("status", "404"))] >= 1
    assert value["k2lite_generation_tokens_total", ()] >= 1
    assert value["k2lite_prompt_tokens_total", ()] > value["k2lite_prompt_cache_hit_tokens_total", ()] > 0
    assert value["k2lite_prompt_cache_hits_total", ()] >= 1
    assert fams["k2lite_time_to_first_token_seconds"].type == "histogram"
    assert value["k2lite_time_to_first_token_seconds_count", ()] >= 3
    assert value["k2lite_inter_token_latency_seconds_count", ()] >= 1
    assert value["k2lite_requests_running", ()] == 0 and value["k2lite_requests_waiting", ()] == 0
    pages = {st: value["k2lite_kv_pages", (("state", st),)] for st in ("used", "cached", "free")}
    assert pages["used"] == 0 and pages["cached"] > 0 and sum(pages.values()) == server.llm.cache.max_pages
    assert value["k2lite_decode_tokens_per_second", ()] > 0


# ---------------------------------------------------------------- models by Hugging Face id
def fake_hub(root, model_dir, repo="acme/tiny-k2", commits=("a" * 40, "b" * 40)):
    """A cache laid out as huggingface_hub writes it: blobs, snapshots of links, refs/main."""
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "blobs"))
    os.makedirs(os.path.join(base, "refs"))
    for i, commit in enumerate(commits):
        snap = os.path.join(base, "snapshots", commit)
        os.makedirs(snap)
        for name in os.listdir(model_dir):
            blob = os.path.join(base, "blobs", f"{i}-{name}")
            os.link(os.path.join(model_dir, name), blob)
            os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commits[-1])
    with open(os.path.join(base, "refs", "v1"), "w") as f:
        f.write(commits[0])
    return base


def test_models_by_hub_id(model_dir, tmp_path, monkeypatch):
    from k2lite.errors import ModelFormatError
    from k2lite.hub import hub_cache, resolve
    base = fake_hub(str(tmp_path / "hub"), model_dir)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub_cache() == str(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("acme/tiny-k2") == os.path.join(base, "snapshots", "b" * 40)
    assert resolve("acme/tiny-k2", "v1") == os.path.join(base, "snapshots", "a" * 40)
    assert resolve("acme/tiny-k2", "a" * 40) == os.path.join(base, "snapshots", "a" * 40)
    assert resolve(model_dir) == model_dir
    llm = k2lite.load("acme/tiny-k2", threads=1, context=64)
    assert llm.path.endswith("b" * 40) and llm.generate([1, 2], max_tokens=2).token_ids
    for name, rev, words in (("acme/other", None, "k2lite download acme/other"),
                             ("acme/tiny-k2", "v9", "revision 'v9'")):
        with pytest.raises(ModelFormatError) as e:
            resolve(name, rev)
        assert words in str(e.value) and "\n" not in str(e.value)
    # the CLI: -m org/name and --revision; an unknown id is one line
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "k2lite", "generate", "-m", "acme/tiny-k2", "--raw", "-n", "2",
                          "--temperature", "0", "Hi"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "k2lite", "generate", "-m", "acme/missing", "Hi"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "k2lite download acme/missing" in out.stderr
    p = subprocess.Popen([sys.executable, "-m", "k2lite", "serve", "-m", "acme/tiny-k2", "--revision", "v1",
                          "--port", "0", "--threads", "1", "--context", "128"], stderr=subprocess.PIPE, text=True,
                         cwd=REPO, env=env)
    try:
        _, url = _started(p)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        assert c.completions.create(model="acme/tiny-k2", prompt="Hi", max_tokens=1).choices
    finally:
        p.terminate()
        p.wait(TIMEOUT)


def test_download_without_huggingface_hub_is_one_line(tmp_path):
    code = ("import sys; sys.modules['huggingface_hub'] = None\n"
            "from k2lite.cli import main; main(['download', 'acme/tiny-k2'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "pip install huggingface_hub" in out.stderr


def test_serve_without_the_extra_is_one_line():
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "from k2lite.cli import main; main(['serve'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and out.stderr == 'error: the server needs its extra: pip install "k2lite[serve]"\n'


def test_download_passes_its_options_to_huggingface_hub(monkeypatch, tmp_path):
    hf = pytest.importorskip("huggingface_hub")
    from k2lite.hub import download
    calls = []
    monkeypatch.setattr(hf, "snapshot_download", lambda *a, **k: calls.append((a, k)) or str(tmp_path))
    assert download("acme/tiny-k2", "v1", ("*.json", "*.model")) == str(tmp_path)
    assert calls == [(("acme/tiny-k2",), {"revision": "v1", "allow_patterns": ["*.json", "*.model"]})]
    download("acme/tiny-k2", None, ())
    assert calls[-1][1] == {"revision": None, "allow_patterns": None}
    with pytest.raises(ValueError):
        download("../etc", None, ())
