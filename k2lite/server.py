"""`k2lite serve`: an OpenAI-compatible HTTP server with continuous batching.

    k2lite serve --model DIR --host 127.0.0.1 --port 8000 --max-batch 8 --context 8192   (= python -m k2lite.server ...)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both JSON or SSE streams),
GET /v1/models, GET /v1/models/{id}, GET /health; HEAD works on the GETs and OPTIONS answers
CORS preflights (any origin, as vLLM and llama.cpp allow). Chat messages and deltas carry
`reasoning_content` and `tool_calls` parsed from K2's output by chat.StreamParser, as Moonshot's
API and vLLM return them. `n` > 1 and a list of prompts (/v1/completions) become one scheduler
request per choice, batched like any others. Parameters the engine cannot honour (logprobs,
response_format other than text, a forced tool, suffix, best_of) get a 400 naming the field
instead of being ignored; every error is an OpenAI error object.

Two kinds of threads, talking only through queues (the scheduler is k2lite/scheduler.py):

    HTTP threads (one per connection)            scheduler thread (the only one that touches
      read + validate JSON -> Requests               the model and the paged cache)
      submit(reqs) ----------------------------->  waiting: a bounded deque (full -> HTTP 429)
                                                   admit while the batch and cache have room
                                                   prefill one chunk of one new request
                                                   ONE batched decode step for every live seq
      write JSON / SSE  <-- events (one Queue) --  sample per request, detokenize, parse, emit

Admission, cache reservations, the prompt cache and cancellation live in scheduler.py. A client
that hangs up is noticed within 0.25 s and cancelled. On shutdown (Ctrl-C, SIGTERM,
Server.stop) requests in flight end with a 503 error that reaches their clients.

Why the standard library and not starlette/uvicorn: run-time dependencies stay numpy, tiktoken
and click; the model runs in one thread anyway (one batched step needs every sequence in one
place), so an event loop buys nothing, and an SSE stream is just chunked writes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .chat import ROLES, StreamParser
from .scheduler import ApiError, Request, Scheduler

log = logging.getLogger("k2lite.server")
MAX_BODY = 8 << 20          # bytes of JSON we accept in one request
MAX_CHOICES = 128           # n x prompts in one request (OpenAI's limit for n)
MAX_STOP = 256              # characters per stop string (each token re-checks every prefix of each)
ROUTES = {("GET", "/health"): "_health", ("GET", "/v1/models"): "_models",
          ("POST", "/v1/chat/completions"): "_chat", ("POST", "/v1/completions"): "_completions"}


# ---------------------------------------------------------------- validation
def _bad(key, message):
    return ApiError(400, message, param=key)


def _number(body, key, lo, hi, integer=False):
    v = body.get(key)
    if v is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise _bad(key, f"'{key}' must be {kind}, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise _bad(key, f"'{key}' must be " + (f"at least {lo}" if hi >= 1 << 62 else f"between {lo} and {hi}")
                   + f", got {v}")
    return v


def _settings(llm, body) -> dict:
    """Everything but the prompt, validated: the same for both endpoints."""
    for key, kind in (("model", str), ("user", str), ("stream", bool), ("echo", bool), ("parallel_tool_calls", bool)):
        v = body.get(key)
        if v is not None and not isinstance(v, kind):
            raise _bad(key, f"'{key}' must be a {'boolean' if kind is bool else 'string'}, not {type(v).__name__}")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        raise _bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
    if body.get("logprobs") not in (None, False):
        raise _bad("logprobs", "'logprobs' is not supported by this server")
    if body.get("top_logprobs") not in (None, 0):
        raise _bad("top_logprobs", "'top_logprobs' is not supported by this server")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise _bad("response_format", "'response_format' must be {\"type\": \"text\"}: JSON modes are not supported")
    if body.get("suffix"):
        raise _bad("suffix", "'suffix' is not supported by this server")
    n = _number(body, "n", 1, MAX_CHOICES, integer=True) or 1
    if _number(body, "best_of", 1, MAX_CHOICES, integer=True) not in (None, n):
        raise _bad("best_of", "'best_of' is not supported (leave it out or equal to n)")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16
                             or not all(isinstance(s, str) and len(s) <= MAX_STOP for s in stop)):
        raise _bad("stop", f"'stop' must be a string or a list of at most 16 strings of at most {MAX_STOP} characters")
    stop = [s for s in stop or [] if s]
    if stop and llm.tokenizer is None:
        raise _bad("stop", "'stop' needs a tokenizer (this model has no tiktoken.model)")
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 63, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 63, integer=True)
    seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
    sampling = dict(temperature=_number(body, "temperature", 0, 2), top_p=_number(body, "top_p", 0, 1),
                    top_k=_number(body, "top_k", 0, 1 << 30, integer=True), min_p=_number(body, "min_p", 0, 1))
    try:
        llm.make_sampler(**sampling)
    except ValueError as e:
        raise _bad(next((k for k in sampling if k in str(e)), None), str(e)) from None
    bias = body.get("logit_bias")
    if bias is not None:
        V = llm.config.vocab_size
        if not isinstance(bias, dict) or not all(
                isinstance(k, str) and k.isascii() and k.isdigit() and int(k) < V and not isinstance(v, bool)
                and isinstance(v, (int, float)) and -100 <= v <= 100 for k, v in bias.items()):
            raise _bad("logit_bias", f"'logit_bias' must map token ids (strings, below {V}) to numbers in [-100, 100]")
        bias = (np.array([int(k) for k in bias], np.int64), np.array(list(bias.values()), np.float32)) if bias else None
    return dict(n=n, stop=stop, max_tokens=max_tokens, sampling=sampling,
                seed=None if seed in (None, -1) else seed % (1 << 64),      # -1: random, as in llama.cpp
                presence=_number(body, "presence_penalty", -2, 2) or 0.0,
                frequency=_number(body, "frequency_penalty", -2, 2) or 0.0, bias=bias)


def _requests(llm, body, prompts, parser, limits, param, echoes=None) -> list:
    """One Request per (prompt, choice), choice index = prompt * n + choice."""
    s = _settings(llm, body)
    n = s["n"]
    if len(prompts) * n > MAX_CHOICES:
        raise _bad("n", f"n x prompts must be at most {MAX_CHOICES}, got {len(prompts) * n}")
    context, capacity, page, default_max = limits
    room = min(context, capacity)
    reqs = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise _bad(param, "the prompt is empty")
        if len(prompt) >= room:
            raise ApiError(400, f"this model's maximum context length is {room} tokens, but the prompt has "
                                f"{len(prompt)} tokens", param=param, code="context_length_exceeded")
        # Too many max_tokens are clamped (finish_reason "length"), as if the context ended there.
        m = min(s["max_tokens"] or default_max, room - len(prompt))
        for j in range(n):
            seed = None if s["seed"] is None else (s["seed"] + j) % (1 << 64)
            reqs.append(Request(prompt, llm.make_sampler(**s["sampling"], seed=seed), m, s["stop"],
                                set(llm.eos_ids), parser() if parser else None, body, index=i * n + j,
                                presence=s["presence"], frequency=s["frequency"], bias=s["bias"],
                                echo=echoes[i] if echoes else "", reserve=-(-(len(prompt) + m) // page)))
    return reqs


def _check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of message objects")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad("messages", f"{where} must be an object")
        if m.get("role") not in ROLES:
            raise _bad("messages", f"{where}: unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        c = m.get("content")
        if c is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise _bad("messages", f"{where}: 'content' is required")
        if c is not None and not isinstance(c, (str, list)):
            raise _bad("messages", f"{where}: 'content' must be a string or a list of parts")
        for part in c if isinstance(c, list) else ():
            kind = part.get("type") or ("image_url" if "image_url" in part or "image" in part else "text") \
                if isinstance(part, dict) else "text"
            if kind != "text":
                raise _bad("messages", f"{where}: content parts of type {kind!r} are not supported "
                                       "(this server takes text only)")


def _check_tools(tools, tool_choice):
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise _bad("tools", "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}")
    if tool_choice not in (None, "auto", "none"):
        raise _bad("tool_choice", "'tool_choice' must be \"auto\" or \"none\" (forcing a tool is not supported)")


def chat_request(llm, body: dict, limits, template_kwargs: dict | None = None) -> list:
    """Validate a /v1/chat/completions body and tokenize it through the checkpoint's chat template
    (injection-safe where k2lite knows the template). `chat_template_kwargs` in the body (vLLM's
    and SGLang's name) go over the server's defaults, `template_kwargs`; whether the answer opens
    in reasoning follows the template and the rendered prompt, per request."""
    if llm.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer (tiktoken.model): use /v1/completions with token ids")
    if llm.chat_template is None:
        raise ApiError(400, "this model has no chat template (a base model): use /v1/completions, or start "
                            "the server with --chat-template FILE|NAME")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _bad("chat_template_kwargs", "'chat_template_kwargs' must be an object of template variables")
    messages, tools, choice = body.get("messages"), body.get("tools"), body.get("tool_choice")
    if isinstance(messages, list):   # OpenAI's "developer" role is the system prompt of newer models
        messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                    for m in messages]
    _check_messages(messages)
    _check_tools(tools, choice)
    try:
        prompt, opens = llm.chat_prompt(messages, tools=None if choice == "none" else tools or None,
                                        chat_template_kwargs={**(template_kwargs or {}), **(kwargs or {})})
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise _bad("messages", f"invalid messages: {e}") from None
    reqs = _requests(llm, body, [prompt], lambda: StreamParser(llm.tokenizer, thinking=opens), limits, "messages")
    for r in reqs:
        r.tools = choice != "none"
    return reqs


def _is_ids(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def completion_request(llm, body: dict, limits) -> list:
    """Validate a /v1/completions body: `prompt` is a string, token ids, or a list of either."""
    p = body.get("prompt")
    if p == []:
        raise _bad("prompt", "the prompt is empty")
    p = [p] if isinstance(p, str) or _is_ids(p) else p
    if not isinstance(p, list) or not p or not all(isinstance(x, str) or _is_ids(x) for x in p):
        raise _bad("prompt", "'prompt' must be a string, a list of token ids, or a non-empty list of either")
    tok, V = llm.tokenizer, llm.config.vocab_size
    prompts, echoes = [], []
    for x in p:
        if isinstance(x, str):
            if tok is None:
                raise _bad("prompt", "this model has no tokenizer: send 'prompt' as token ids")
            prompts.append(tok.encode(x))
        elif any(not 0 <= t < V for t in x):
            raise _bad("prompt", f"token ids in 'prompt' must be in [0, {V})")
        else:
            prompts.append(list(x))
        if body.get("echo"):
            if tok is None:
                raise _bad("echo", "'echo' needs a tokenizer (this model has no tiktoken.model)")
            try:
                echoes.append(x if isinstance(x, str) else tok.decode(x))
            except ValueError as e:
                raise _bad("prompt", f"cannot echo the prompt: {e}") from None
    return _requests(llm, body, prompts, None, limits, "prompt", echoes)


def _usage(reqs) -> dict:
    """Token counts of one HTTP request: each distinct prompt once, every choice's answer."""
    prompts = {}
    for r in reqs:      # the n choices of a prompt share its list object; the best reuse counts
        prompts[id(r.prompt)] = (r.prompt, max(r.cached, prompts.get(id(r.prompt), (0, 0))[1]))
    n = sum(len(p) for p, _ in prompts.values())
    m = sum(len(r.out) for r in reqs)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m,
            "prompt_tokens_details": {"cached_tokens": sum(c for _, c in prompts.values())}}


# ---------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive; streams use chunked transfer encoding
    server_version = "k2lite"
    server: "Server"

    def setup(self):
        self.timeout = self.server.request_timeout     # a stalled client cannot hold a thread forever
        super().setup()

    def log_message(self, fmt, *args):
        log.info("%s %s", self.client_address[0], fmt % args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, ...) as JSON too, always with a status line."""
        self.close_connection = True
        self.request_version = "HTTP/1.1" if self.request_version == "HTTP/0.9" else self.request_version
        self._json(code, ApiError(code, message or "bad request").body())

    def send_response(self, code, message=None):
        super().send_response(code, message)
        self.send_header("Access-Control-Allow-Origin", "*")

    def do_GET(self):
        with self.server.busy():
            self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def do_OPTIONS(self):
        """CORS preflight: any origin may call the API (as with vLLM and llama.cpp)."""
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True    # a body we do not read
        self.send_response(204)
        self.send_header("Allow", "GET, HEAD, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _dispatch(self):
        method = "GET" if self.command == "HEAD" else self.command
        path = self.path.split("?", 1)[0] if self.path.startswith("/") else urllib.parse.urlsplit(self.path).path
        path = "/" + "/".join(p for p in path.split("/") if p)      # "//v1/models/" is /v1/models
        try:
            name = ROUTES.get((method, path))
            if name is None and method == "GET" and path.startswith("/v1/models/"):
                return self._model(urllib.parse.unquote(path[len("/v1/models/"):]))
            if name is None:
                self.close_connection = True     # the body (if any) stays unread
                allowed = [m for m, p in ROUTES if p == path]
                if allowed:
                    raise ApiError(405, f"{self.command} {path} is not allowed; use {' or '.join(allowed)}",
                                   headers={"Allow": ", ".join(allowed)})
                raise ApiError(404, f"Invalid URL ({self.command} {path})", code="unknown_url")
            getattr(self, name)()
        except ApiError as e:
            self._json(e.status, e.body(), e.headers)
        except OSError:                          # the client hung up, or stalled past the timeout
            self.close_connection = True
        except Exception as e:   # a bug: one log line, a generic 500, the server stays up
            log.error("%s %s failed: %s: %s", self.command, path, type(e).__name__, e)
            self.close_connection = True
            self._json(500, ApiError(500, "internal server error", "server_error").body())

    def _json(self, status, obj, headers=None):
        data = json.dumps(obj, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
            for k, v in headers.items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    # ------------------------------------------------------------ request bodies
    def _read(self, n: int = -1, line: bool = False) -> bytes:
        """n bytes (or one line) of the body; a stalled or vanished client is an error here."""
        try:
            data = self.rfile.readline(1 << 16) if line else self.rfile.read(n)
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, f"timed out reading the request body (no data for "
                                f"{self.server.request_timeout:g} s)") from None
        if not line and len(data) < n:
            self.close_connection = True
            raise ApiError(400, f"the body ended after {len(data)} of {n} bytes")
        return data

    def _read_chunked(self) -> bytes:
        """A Transfer-Encoding: chunked body (RFC 9112 7.1), at most MAX_BODY bytes."""
        parts, total = [], 0
        while True:
            try:
                size = int(self._read(line=True).split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size < 0:
                self.close_connection = True
                raise ApiError(400, "malformed chunked request body")
            total += size
            if total > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, f"the body must be at most {MAX_BODY} bytes")
            if size == 0:
                while self._read(line=True).strip():     # trailer fields, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._read(size))
            self._read(line=True)                        # the CRLF after the chunk

    def _body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = self.close_connection or "Content-Length" in self.headers   # ambiguous framing
            data = self._read_chunked()
        else:
            cl = self.headers.get("Content-Length")
            try:
                n = int(cl)
            except (TypeError, ValueError):
                n = -1
            if n < 0:
                self.close_connection = True
                raise ApiError(400, "a JSON body is required (with a Content-Length header or chunked)"
                               if cl is None else f"invalid Content-Length header {cl!r}")
            if n > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, f"the body has {n} bytes; at most {MAX_BODY} are accepted")
            data = self._read(n)
        try:
            body = json.loads(data)
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, not {type(body).__name__}")
        return body

    # ------------------------------------------------------------ routes
    def _health(self):
        self._json(200, {"status": "ok", **self.server.scheduler.stats()})

    def _model_card(self):
        s = self.server
        return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "k2lite",
                "max_model_len": s.limits[0], "k2lite": s.llm.describe()}

    def _models(self):
        self._json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self, name):
        if name != self.server.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {self.server.model_name!r}",
                           param="model", code="model_not_found")
        self._json(200, self._model_card())

    def _chat(self):
        body = self._body()
        self._run(body, chat_request(self.server.llm, body, self.server.limits, self.server.template_kwargs))

    def _completions(self):
        body = self._body()
        self._run(body, completion_request(self.server.llm, body, self.server.limits))

    # ------------------------------------------------------------ one generation
    def _run(self, body, reqs):
        sched, chat = self.server.scheduler, reqs[0].parser is not None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        events = queue.Queue()           # one queue for all the choices
        for r in reqs:
            r.id, r.events = rid, events
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.server.model_name}
        sched.submit(reqs)
        try:
            if body.get("stream"):
                self._stream(reqs, head, chat, bool((body.get("stream_options") or {}).get("include_usage")))
            else:
                self._whole(reqs, head, chat)
        finally:
            for r in reqs:
                if r.finish_reason is None:     # client gone or an error here: free its pages now
                    sched.cancel(r)

    def _events(self, reqs):
        """(req, delta) as the scheduler emits them and (req, None) when a choice ends, until all
        have; raises ConnectionResetError when the client hangs up (checked every 0.25 s)."""
        left, checked = len(reqs), time.monotonic()
        while left:
            try:
                r, kind, data = reqs[0].events.get(timeout=0.25)
            except queue.Empty:
                kind = None
            if kind is None or time.monotonic() - checked > 0.25:
                if self._client_gone():
                    raise ConnectionResetError("client went away")
                checked = time.monotonic()
            if kind == "error":
                raise ApiError(data[0], data[1], "server_error")
            if kind is not None:
                left -= kind == "end"
                yield r, data

    def _client_gone(self) -> bool:
        """True when the peer closed its side: the socket reads as EOF."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _whole(self, reqs, head, chat):
        acc = {r.index: {"content": [], "reasoning_content": [], "text": [r.echo], "calls": []} for r in reqs}
        for r, d in self._events(reqs):
            if d is not None:
                a = acc[r.index]
                if "tool_call" in d:
                    a["calls"].append(d["tool_call"])
                else:
                    for k, v in d.items():
                        a[k].append(v)
        choices = []
        for r in reqs:
            a = acc[r.index]
            if chat:
                content, reasoning = "".join(a["content"]), "".join(a["reasoning_content"])
                msg = {"role": "assistant", "content": content if content or not a["calls"] else None,
                       "reasoning_content": reasoning or None}
                if a["calls"]:
                    msg["tool_calls"] = a["calls"]
                c = {"index": r.index, "message": msg}
            else:
                c = {"index": r.index, "text": "".join(a["text"])}
            choices.append({**c, "logprobs": None, "finish_reason": r.finish_reason})
        self._json(200, {**head, "choices": choices, "usage": _usage(reqs)})

    def _stream(self, reqs, head, chat, include_usage):
        self._chunked = self.request_version != "HTTP/1.0"   # HTTP/1.0: plain body, then close
        self.close_connection = self.close_connection or not self._chunked
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(r, delta, finish=None):
            c = {"index": r.index, "delta": delta} if chat else {"index": r.index, "text": delta.get("text", "")}
            self._sse({**head, "choices": [{**c, "logprobs": None, "finish_reason": finish}], **extra})

        try:
            for r in reqs:
                if chat:
                    chunk(r, {"role": "assistant", "content": ""})
                elif r.echo:
                    chunk(r, {"text": r.echo})
            for r, d in self._events(reqs):
                if d is None:
                    chunk(r, {}, r.finish_reason)
                elif "tool_call" in d:   # a whole call in one delta, as vLLM's kimi_k2 parser sends it
                    chunk(r, {"tool_calls": [{"index": d["index"], **d["tool_call"]}]})
                else:
                    chunk(r, d)
            if include_usage:
                self._sse({**head, "choices": [], "usage": _usage(reqs)})
        except ApiError as e:   # headers are out: report the error inside the stream
            self._sse(e.body())
        self._write(b"data: [DONE]\n\n")
        self._write(b"")

    def _sse(self, obj):
        self._write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _write(self, data: bytes):
        """One HTTP chunk (an empty one ends the body); HTTP/1.0: the bytes as they are."""
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """The HTTP server plus its scheduler; `start()` runs both in background threads."""
    daemon_threads = True
    request_queue_size = 128   # listen backlog: a burst of clients connecting at once is not refused
    request_timeout = 60.0     # seconds a client may go silent while sending a request (or idle on keep-alive)

    def __init__(self, llm, host="127.0.0.1", port=8000, max_batch=8, max_queue=None, model_name=None,
                 template_kwargs=None, default_max_tokens=None):
        self.llm = llm
        self.scheduler = Scheduler(llm, max_batch, max_queue)
        self.model_name = model_name or os.path.basename(os.path.normpath(str(llm.path))) or "k2lite"
        self.created = int(time.time())
        self.template_kwargs = dict(template_kwargs or {})    # chat template variables of every request
        c = llm.cache
        default_max = default_max_tokens or llm.generation_defaults.get("max_tokens", 256)
        self.limits = (llm.context, c.capacity_tokens, c.page_size, int(default_max))
        self._busy, self._idle, self._serving = 0, threading.Condition(), False
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @contextlib.contextmanager
    def busy(self):
        """Counts requests being handled, so that stop() lets them write their last bytes."""
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        log.warning("connection from %s failed: %s: %s", client_address[0], type(e).__name__, e)

    def serve_forever(self, poll_interval=0.5):
        self._serving = True
        super().serve_forever(poll_interval)

    def start(self):
        self._serving = True
        self.scheduler.start()
        threading.Thread(target=self.serve_forever, name="k2lite-http", daemon=True).start()
        return self

    def stop(self, drain: float = 5.0):
        """Stop accepting, end the requests in flight (their clients get a 503 error), close."""
        if self._serving:
            self.shutdown()
        self.scheduler.stop()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, drain)
        self.server_close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(model, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, context: int | None = None,
          *, device: str = "cpu", threads: int | None = None, cache_tokens: int | None = None,
          max_queue: int | None = None, model_name: str | None = None, chat_template_kwargs: dict | None = None,
          default_max_tokens: int | None = None, block: bool = True, **load_kw) -> Server:
    """Serve `model` (a checkpoint folder or a loaded LLM). block=False returns the started Server
    (`.url`, `.scheduler`, `.stop()`); block=True serves until Ctrl-C or SIGTERM. load_kw (mmap=,
    repack=) go to k2lite.load."""
    if isinstance(model, str):
        from .config import Config
        from .llm import load
        ctx = int(context or min(Config.from_json(model).max_position_embeddings, 1 << 20))
        # Room for max_batch whole contexts at most; the pool grows only as pages are used.
        llm = load(model, device=device, threads=threads, context=ctx,
                   max_cache_tokens=cache_tokens or max_batch * ctx, **load_kw)
    else:
        llm = model
        if context:
            llm.context = int(context)
    srv = Server(llm, host, port, max_batch, max_queue, model_name, chat_template_kwargs, default_max_tokens)
    if not block:
        return srv.start()
    if not logging.getLogger().handlers:     # called as a library (the click CLI): still log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)     # `docker stop`, systemd: shut down like Ctrl-C
    srv.scheduler.start()
    log.info("k2lite serving %s on %s (max batch %d, context %d)", srv.model_name, srv.url, max_batch, llm.context)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        srv.stop()
    return srv


def main(argv=None):
    """`python -m k2lite.server ...` is `k2lite serve ...` (the options live in cli.py)."""
    from .cli import main as cli
    cli(["serve"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
