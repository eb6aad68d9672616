"""`k2lite serve`: an OpenAI-compatible HTTP server with continuous batching.

    python -m k2lite.server --model DIR --host 127.0.0.1 --port 8000 --max-batch 8 --context 8192

Endpoints: POST /v1/chat/completions, POST /v1/completions (both JSON or SSE streams),
GET /v1/models, GET /health. Chat messages and deltas carry `reasoning_content` and `tool_calls`
parsed from K2's output by chat.StreamParser, as Moonshot's API and vLLM return them.

Two kinds of threads, talking only through queues:

    HTTP threads (one per connection)            scheduler thread (the only one that touches
      read + validate JSON -> Request                the model and the paged cache)
      submit(req) ------------------------------>  waiting: a bounded deque (full -> HTTP 429)
                                                   admit while the batch and cache have room
                                                   prefill one chunk of one new request
                                                   ONE batched decode step for every live seq
      write JSON / SSE  <-- req.events (Queue) --  sample per request, detokenize, parse, emit

Admission reserves the pages a request can ever need (prompt + max_tokens), so a decode step
never runs out of cache mid-answer: when the cache is full new requests wait, and when the
waiting queue is full too they get 429. A finished or cancelled request (the client hung up)
gives its pages back before the next step.

Why the standard library and not starlette/uvicorn: run-time dependencies stay numpy, tiktoken
and click; the model runs in one thread anyway (one batched step needs every sequence in one
place), so an event loop buys nothing, and an SSE stream is just chunked writes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .chat import ROLES, StreamParser
from .generate import _stop_hold
from .sampler import Sampler

log = logging.getLogger("k2lite.server")
MAX_BODY = 8 << 20          # bytes of JSON we accept in one request


class ApiError(Exception):
    """An error the client gets as an OpenAI error object."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- requests
@dataclass(eq=False)
class Request:
    """One generation: what the client asked for, and the scheduler's progress on it."""
    prompt: list                    # prompt token ids
    sampler: Sampler                # its own settings and seeded rng
    max_tokens: int                 # already clamped to the context and cache
    stop: list                      # stop strings (cut off, never shown)
    eos: set                        # ids that end the answer (never shown)
    parser: StreamParser | None     # chat: reasoning/content/tool-call deltas; None: raw text
    body: dict = field(default_factory=dict)   # the parsed JSON (read by the test hook)
    events: queue.Queue = field(default_factory=queue.Queue)   # ("delta", d) ... ("end", None)
    cancelled: bool = False         # set by the HTTP thread when the client goes away
    # scheduler-side state
    reserve: int = 0                # pages this request may need in all
    state: object = None            # SeqState once admitted
    fed: int = 0                    # prompt tokens prefilled so far
    next_token: int = -1            # the sampled token the next decode step feeds
    out: list = field(default_factory=list)    # generated ids (no eos)
    text: str = ""                  # decoded text of `out`, cut at a stop string
    sent: int = 0                   # chars of `text` already emitted
    decoder: object = None          # tokenizer StreamDecoder
    forced: list | None = None      # test hook: scripted ids instead of sampling
    tools: bool = True              # deliver tool calls (tool_choice "none": drop them)
    calls: int = 0                  # tool calls delivered
    finish_reason: str | None = None
    id: str = ""                    # "chatcmpl-..." / "cmpl-...", set by the HTTP side

    @property
    def usage(self) -> dict:
        n, m = len(self.prompt), len(self.out)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


class Scheduler:
    """Continuous batching over the paged latent cache; owns the model from its own thread."""

    def __init__(self, llm, max_batch: int = 8, max_queue: int | None = None):
        self.llm, self.model, self.cache = llm, llm.model, llm.cache
        self.max_batch = max(1, int(max_batch))
        self.max_queue = 4 * self.max_batch if max_queue is None else max(0, int(max_queue))
        self.waiting: deque = deque()    # submitted, not admitted (guarded by cond)
        self.live: list = []             # admitted: prefilling or decoding (scheduler thread only)
        self.cond = threading.Condition()
        self.steps = 0                   # batched decode steps run
        self.max_batch_seen = 0          # most sequences in one decode step
        self.cancelled = 0               # requests dropped because the client went away
        self.force = None                # test-only hook: force(req) -> list of ids or None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="k2lite-scheduler", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        with self.cond:
            self._stopping = True
            self.cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, req: Request):
        with self.cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", "server_error")
            if len(self.waiting) >= self.max_queue:
                raise ApiError(429, f"server busy: {len(self.live)} requests running and {len(self.waiting)} "
                                    "waiting for cache space; retry later", "rate_limit_exceeded")
            self.waiting.append(req)
            self.cond.notify()

    def cancel(self, req: Request):
        """Called from an HTTP thread; the scheduler frees the pages before its next step."""
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    def stats(self) -> dict:
        return {"live": len(self.live), "waiting": len(self.waiting), "steps": self.steps,
                "max_batch_seen": self.max_batch_seen, "pages_free": self.cache.pages_free}

    # ------------------------------------------------------------ the loop
    def _loop(self):
        while True:
            with self.cond:
                while not (self._stopping or self.live or self.waiting):
                    self.cond.wait()
                if self._stopping:
                    break
                for r in [r for r in self.waiting if r.cancelled]:
                    self.waiting.remove(r)
                    self._finish(r, "cancelled")
                self._admit()
            try:
                for r in [r for r in self.live if r.cancelled]:
                    self._finish(r, "cancelled")
                self._step()
            except Exception as e:   # a bug or a kernel error: fail these requests, keep serving
                log.error("generation step failed: %s: %s", type(e).__name__, e)
                for r in list(self.live):
                    self._finish(r, "error")
        with self.cond:
            for r in list(self.waiting) + list(self.live):
                self._finish(r, "shutdown")
            self.waiting.clear()

    def _admit(self):
        """Move waiting requests (FIFO) into the batch while the batch and the cache have room."""
        owed = sum(r.reserve - len(r.state.pages) for r in self.live)    # pages promised, not taken
        budget = self.cache.pages_free - owed
        while self.waiting and len(self.live) < self.max_batch and self.waiting[0].reserve <= budget:
            r = self.waiting.popleft()
            budget -= r.reserve
            r.state = self.cache.new_seq()
            tok = self.llm.tokenizer
            r.decoder = tok.stream_decoder() if tok is not None else None
            r.forced = self.force(r) if self.force else None
            self.live.append(r)

    def _step(self):
        """One prefill chunk of the oldest new request, then one decode step for all the others."""
        pre = next((r for r in self.live if r.fed < len(r.prompt)), None)
        if pre is not None:    # chunked, so a long prompt delays the running answers one chunk at most
            chunk = pre.prompt[pre.fed:pre.fed + self.llm.prefill_chunk]
            last = pre.fed + len(chunk) == len(pre.prompt)
            logits = self.model.forward(chunk, self.cache, [pre.state], decode=False, last_only=True,
                                        head=last)         # earlier chunks only fill the cache
            pre.fed += len(chunk)
            if pre.fed == len(pre.prompt):
                self._emit(pre, self._sample(pre, logits[-1]))
        batch = [r for r in self.live if r.fed == len(r.prompt)]
        if not batch:
            return
        # tokens [B], one per sequence: each weight is read once for the whole batch
        logits = self.model.forward([r.next_token for r in batch], self.cache, [r.state for r in batch],
                                    decode=True)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        for r, z in zip(batch, logits):
            self._emit(r, self._sample(r, z))

    def _sample(self, r: Request, logits) -> int:
        if r.forced is not None:
            i = len(r.out)
            return int(r.forced[i]) if i < len(r.forced) else min(r.eos, default=0)
        return int(r.sampler(logits))

    # ------------------------------------------------------------ output
    def _emit(self, r: Request, t: int):
        """Account one sampled token: stop at eos / a stop string / max_tokens, else send text."""
        if t in r.eos:
            return self._finish(r, "stop")
        r.out.append(t)
        r.next_token = t
        if r.decoder is not None:
            r.text += r.decoder.feed(t)
            cuts = [i for i in (r.text.find(s, max(r.sent - len(s), 0)) for s in r.stop) if i >= 0]
            if cuts:
                r.text = r.text[:min(cuts)]
                return self._finish(r, "stop", flush=False)
            end = len(r.text) - _stop_hold(r.text, r.stop)   # hold back what may start a stop string
            self._send(r, r.text[r.sent:end])
            r.sent = max(r.sent, end)
        if len(r.out) >= r.max_tokens:
            self._finish(r, "length")

    def _send(self, r: Request, s: str):
        if not s:
            return
        if r.parser is None:
            r.events.put(("delta", {"text": s}))
        else:
            self._deliver(r, r.parser.feed_text(s))

    def _deliver(self, r: Request, deltas):
        """Parser deltas to the client; a malformed or cut-off tool call is dropped, not half-sent."""
        for d in deltas:
            if "tool_call" in d:
                if "error" in d["tool_call"] or not r.tools:
                    if r.tools:
                        log.warning("dropped a malformed tool call: %s", d["tool_call"]["error"])
                    continue
                d = {"tool_call": d["tool_call"], "index": r.calls}
                r.calls += 1
            r.events.put(("delta", d))

    def _finish(self, r: Request, reason: str, flush: bool = True):
        """End a request: last text, parser tail, pages back to the pool, the "end" event."""
        if r.state is not None and not r.state.closed:
            self.cache.free(r.state)
        if r in self.live:
            self.live.remove(r)
        if reason in ("cancelled", "error", "shutdown"):
            self.cancelled += reason == "cancelled"
            r.finish_reason = reason
            r.events.put({"cancelled": ("end", None), "error": ("error", (500, "generation failed")),
                          "shutdown": ("error", (503, "the server is shutting down"))}[reason])
            return
        if flush and r.decoder is not None:
            r.text += r.decoder.flush()
        self._send(r, r.text[r.sent:])
        r.sent = len(r.text)
        if r.parser is not None:
            self._deliver(r, r.parser.finish())
            if r.calls and reason == "stop":
                reason = "tool_calls"
        r.finish_reason = reason
        r.events.put(("end", None))


# ---------------------------------------------------------------- validation
def _number(body, key, lo, hi, integer=False):
    v = body.get(key)
    if v is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400, f"'{key}' must be {kind}, not {type(v).__name__}", param=key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {v}", param=key)
    return v


def _common(llm, body, prompt, parser, limits) -> Request:
    """Sampling, length and stop parameters shared by both endpoints -> a Request."""
    if _number(body, "n", 1, 1, integer=True) not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       param="stream_options")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16
                             or not all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", param="stop")
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 30, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 30, integer=True)
    seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
    try:
        sampler = llm.make_sampler(_number(body, "temperature", 0, 2), _number(body, "top_p", 0, 1),
                                   _number(body, "top_k", 0, 1 << 30, integer=True),
                                   _number(body, "min_p", 0, 1), None if seed is None else abs(seed))
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    context, capacity, page, default_max = limits
    room = min(context, capacity)
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(prompt) >= room:
        raise ApiError(400, f"this model's maximum context length is {room} tokens, but the prompt has "
                            f"{len(prompt)} tokens", param="messages", code="context_length_exceeded")
    # Too many max_tokens are clamped (finish_reason "length"), as if the context ended there.
    n = min(max_tokens or default_max, room - len(prompt))
    return Request(prompt, sampler, n, [s for s in stop or [] if s], set(llm.eos_ids), parser, body,
                   reserve=-(-(len(prompt) + n) // page))


def _check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of message objects", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", param="messages")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"{where}: unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}",
                           param="messages")
        c = m.get("content")
        if c is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise ApiError(400, f"{where}: 'content' is required", param="messages")
        if c is not None and not isinstance(c, (str, list)):
            raise ApiError(400, f"{where}: 'content' must be a string or a list of parts", param="messages")


def _check_tools(tools, tool_choice):
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise ApiError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}",
                           param="tools")
    if tool_choice not in (None, "auto", "none"):
        raise ApiError(400, "'tool_choice' must be \"auto\" or \"none\" (forcing a tool is not supported)",
                       param="tool_choice")


def chat_request(llm, body: dict, limits, thinking: bool) -> Request:
    """Validate a /v1/chat/completions body and tokenize it through the injection-safe chat path."""
    if llm.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer (tiktoken.model): use /v1/completions with token ids")
    messages, tools, choice = body.get("messages"), body.get("tools"), body.get("tool_choice")
    _check_messages(messages)
    _check_tools(tools, choice)
    try:
        prompt = llm.tokenizer.encode_chat(messages, tools=None if choice == "none" else tools or None)
    except (ValueError, TypeError, AttributeError) as e:
        raise ApiError(400, f"invalid messages: {e}", param="messages") from None
    req = _common(llm, body, prompt, StreamParser(thinking=thinking), limits)
    req.tools = choice != "none"
    return req


def completion_request(llm, body: dict, limits) -> Request:
    """Validate a /v1/completions body: `prompt` is a string, [string] or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        if llm.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send 'prompt' as a list of token ids")
        prompt = llm.tokenizer.encode(p)
    elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if any(not 0 <= t < llm.config.vocab_size for t in p):
            raise ApiError(400, f"token ids must be in [0, {llm.config.vocab_size})", param="prompt")
        prompt = list(p)
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")
    return _common(llm, body, prompt, None, limits)


# ---------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive; streams use chunked transfer encoding
    server_version = "k2lite"
    server: "Server"

    def log_message(self, fmt, *args):
        log.info("%s %s", self.client_address[0], fmt % args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, ...) as JSON too."""
        self.close_connection = True
        self._json(code, ApiError(code, message or "bad request").body())

    def do_GET(self):
        self._dispatch({"/health": self._health, "/v1/models": self._models}, "GET")

    def do_POST(self):
        self._dispatch({"/v1/chat/completions": self._chat, "/v1/completions": self._completions}, "POST")

    def _dispatch(self, routes, method):
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path not in routes:
                self.close_connection = True     # the body (if any) stays unread
                known = {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions"}
                raise ApiError(405 if path in known else 404,
                               f"{method} {path} is not supported" if path in known else f"no route {path}")
            routes[path]()
        except ApiError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:   # a bug: one log line, a generic 500, the server stays up
            log.error("%s %s failed: %s: %s", method, path, type(e).__name__, e)
            self.close_connection = True
            self._json(500, ApiError(500, "internal server error", "server_error").body())

    def _json(self, status, obj):
        data = json.dumps(obj, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "a JSON body with a Content-Length header is required") from None
        if not 0 <= n <= MAX_BODY:
            self.close_connection = True
            raise ApiError(413 if n > 0 else 400, f"the body must be at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _health(self):
        self._json(200, {"status": "ok", **self.server.scheduler.stats()})

    def _models(self):
        s = self.server
        self._json(200, {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                                     "owned_by": "k2lite", "max_model_len": s.limits[0]}]})

    def _chat(self):
        body = self._body()
        self._run(body, chat_request(self.server.llm, body, self.server.limits, self.server.thinking))

    def _completions(self):
        body = self._body()
        self._run(body, completion_request(self.server.llm, body, self.server.limits))

    # ------------------------------------------------------------ one generation
    def _run(self, body, req: Request):
        sched = self.server.scheduler
        chat = req.parser is not None
        req.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        sched.submit(req)
        try:
            if body.get("stream"):
                self._stream(req, chat, bool((body.get("stream_options") or {}).get("include_usage")))
            else:
                self._whole(req, chat)
        finally:
            if req.finish_reason is None:     # client gone or an error here: free its pages now
                sched.cancel(req)

    def _events(self, req):
        """The scheduler's deltas for req; raises ConnectionResetError when the client hangs up."""
        while True:
            try:
                kind, data = req.events.get(timeout=0.25)
            except queue.Empty:
                if self._client_gone():
                    raise ConnectionResetError("client went away") from None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise ApiError(data[0], data[1], "server_error")
            yield data

    def _client_gone(self) -> bool:
        """True when the peer closed its side: the socket reads as EOF."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _whole(self, req, chat):
        parts = {"reasoning_content": [], "content": [], "text": []}
        calls = []
        for d in self._events(req):
            if "tool_call" in d:
                calls.append(d["tool_call"])
            else:
                for k, v in d.items():
                    parts[k].append(v)
        head = self._head(req, "chat.completion" if chat else "text_completion")
        if chat:
            content, reasoning = "".join(parts["content"]), "".join(parts["reasoning_content"])
            msg = {"role": "assistant", "content": content if content or not calls else None,
                   "reasoning_content": reasoning or None}
            if calls:
                msg["tool_calls"] = calls
            choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": req.finish_reason}
        else:
            choice = {"index": 0, "text": "".join(parts["text"]), "logprobs": None,
                      "finish_reason": req.finish_reason}
        self._json(200, {**head, "choices": [choice], "usage": req.usage})

    def _head(self, req, obj):
        return {"id": req.id, "object": obj, "created": int(time.time()), "model": self.server.model_name}

    def _stream(self, req, chat, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(delta, finish=None):
            c = {"index": 0, "delta": delta} if chat else {"index": 0, "text": delta.get("text", "")}
            self._sse({**self._head(req, obj), "choices": [{**c, "logprobs": None, "finish_reason": finish}], **extra})

        try:
            if chat:
                chunk({"role": "assistant", "content": ""})
            for d in self._events(req):
                if "tool_call" in d:   # a whole call in one delta, as vLLM's kimi_k2 parser sends it
                    d = {"tool_calls": [{"index": d["index"], **d["tool_call"]}]}
                chunk(d)
                if self._client_gone():
                    raise ConnectionResetError("client went away")
            chunk({}, req.finish_reason)
            if include_usage:
                self._sse({**self._head(req, obj), "choices": [], "usage": req.usage})
        except ApiError as e:   # headers are out: report the error inside the stream
            self._sse(e.body())
        self._write(b"data: [DONE]\n\n")
        self._write(b"")

    def _sse(self, obj):
        self._write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _write(self, data: bytes):
        """One HTTP chunk (an empty one ends the body)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """The HTTP server plus its scheduler; `start()` runs both in background threads."""
    daemon_threads = True

    def __init__(self, llm, host="127.0.0.1", port=8000, max_batch=8, max_queue=None, model_name=None,
                 thinking=None, default_max_tokens=None):
        self.llm = llm
        self.scheduler = Scheduler(llm, max_batch, max_queue)
        self.model_name = model_name or os.path.basename(os.path.normpath(str(llm.path))) or "k2lite"
        self.created = int(time.time())
        # K2 Thinking writes reasoning first; a base model (k2-nano) answers directly.
        self.thinking = getattr(llm, "is_chat_model", True) if thinking is None else bool(thinking)
        c = llm.cache
        default_max = default_max_tokens or llm.generation_defaults.get("max_tokens", 256)
        self.limits = (llm.context, c.capacity_tokens, c.page_size, int(default_max))
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        log.warning("connection from %s failed: %s: %s", client_address[0], type(e).__name__, e)

    def start(self):
        self.scheduler.start()
        threading.Thread(target=self.serve_forever, name="k2lite-http", daemon=True).start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()
        self.scheduler.stop()


def serve(model, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, context: int | None = None,
          *, device: str = "cpu", threads: int | None = None, cache_tokens: int | None = None,
          max_queue: int | None = None, model_name: str | None = None, thinking: bool | None = None,
          default_max_tokens: int | None = None, block: bool = True, **load_kw) -> Server:
    """Serve `model` (a checkpoint folder or a loaded LLM). block=False returns the started Server
    (`.url`, `.scheduler`, `.stop()`); block=True serves until Ctrl-C. load_kw (mmap=, repack=)
    go to k2lite.load."""
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
    srv = Server(llm, host, port, max_batch, max_queue, model_name, thinking, default_max_tokens)
    if not block:
        return srv.start()
    if not logging.getLogger().handlers:     # called as a library (the click CLI): still log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    srv.scheduler.start()
    log.info("k2lite serving %s on %s (max batch %d, context %d)", srv.model_name, srv.url, max_batch, llm.context)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        srv.scheduler.stop()
    return srv


def main(argv=None):
    p = argparse.ArgumentParser(prog="k2lite serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", "-m", help="checkpoint folder (default: the bundled k2-nano)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together at most")
    p.add_argument("--context", type=int, help="max tokens per sequence (prompt + answer)")
    p.add_argument("--cache-tokens", type=int, help="KV cache capacity in tokens (default max-batch x context)")
    p.add_argument("--max-queue", type=int, help="requests waiting for cache space before 429 (default 4 x max-batch)")
    p.add_argument("--default-max-tokens", type=int, help="max_tokens when a request sets none "
                   "(default: generation_config.json, else 256)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "ref"])
    p.add_argument("--threads", "-t", type=int)
    a = p.parse_args(argv)
    try:
        if a.model is None:
            from .llm import default_model_dir
            a.model = default_model_dir()
        serve(a.model, a.host, a.port, a.max_batch, a.context, device=a.device, threads=a.threads,
              cache_tokens=a.cache_tokens, max_queue=a.max_queue, default_max_tokens=a.default_max_tokens)
    except (ValueError, OSError, RuntimeError) as e:     # bad folder, port in use: one line, exit 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
