"""The HTTP side of `k2lite serve`: the OpenAI API on Starlette and uvicorn (`pip install "k2lite[serve]"`).

Two sides, talking only through the scheduler's queue and one event sink per HTTP request:

    event loop (uvicorn, one thread)               scheduler thread (scheduler.py: the only
      read the body (bounded, with deadlines)         one that touches the model and the cache)
      validate + tokenize in a worker thread
      submit(reqs) ----------------------------->  waiting (bounded: full -> HTTP 429)
                                                   admit fairly while batch and cache have room
                                                   prefill a chunk, ONE batched decode step
      write JSON / SSE  <-- events (LoopEvents) --  sample, detokenize, parse, emit

While a generation runs, its handler also waits on the connection: uvicorn reports a client that
hangs up at once (`http.disconnect`), and its requests are cancelled (pages freed) before the
next step. On shutdown (Ctrl-C, SIGTERM, Server.stop) the scheduler stops first, so requests in
flight end with a 503 their clients receive, then uvicorn closes the connections.

The transport is uvicorn's h11 protocol (strict HTTP/1.1 parsing: conflicting or malformed
Content-Length is refused with 400) plus a deadline for request headers (slow clients cannot
hold connections open a byte at a time) and a connection limit (`limit_concurrency`).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
import uuid
from importlib import resources

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from .metrics import Metrics
from .scheduler import Refused, Scheduler
from .api import FAILED, MAX_BODY, ApiError, _usage, chat_request, completion_request, refused

log = logging.getLogger("k2lite.server")
LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
OPEN_PATHS = ("/health", "/", "/favicon.ico")      # everything else may need the API key


def json_bytes(obj) -> bytes:
    # "replace": a lone surrogate can never make a write fail half way through a response
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace")


def error_response(e: ApiError, close: bool = False) -> Response:
    headers = {**e.headers, **({"Connection": "close"} if close else {})}
    return Response(json_bytes(e.body()), e.status, headers, media_type="application/json")


class ClientGone(Exception):
    """The client hung up while its request was read or answered."""


class LoopEvents:
    """The scheduler's event sink for one HTTP request: put() from the scheduler thread,
    get() on the event loop (a queue.Queue would block the loop)."""

    def __init__(self, loop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:     # the loop has closed: nobody is listening any more
            pass


# ---------------------------------------------------------------- transport
class DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, counted from the
    connection's start or the end of the previous response: a client sending a byte every few
    seconds gets a 408 and the connection closes (uvicorn's keep-alive timer stops at the first byte)."""
    header_timeout = 30.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm(None)

    def _arm(self, cycle):
        self._deadline_cycle = cycle
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def on_response_complete(self):
        self._arm(self.cycle)      # before a pipelined request may start the next cycle
        super().on_response_complete()

    def connection_lost(self, exc):
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _headers_late(self):
        if self.cycle is not self._deadline_cycle or self.transport.is_closing():
            return                 # a request arrived since: its handler owns the connection now
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:   # part of a request came
            body = json_bytes(ApiError(408, f"request headers not received within {self.header_timeout:g} s").body())
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    """Stops the scheduler before uvicorn waits for open connections: requests in flight then
    end with a 503 their clients get, instead of keeping the shutdown waiting."""

    def __init__(self, config, before_shutdown):
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets=None):
        await asyncio.get_running_loop().run_in_executor(None, self.before_shutdown)
        await super().shutdown(sockets)


# ---------------------------------------------------------------- the server
class Server:
    """The scheduler plus the ASGI app on uvicorn; `start()` runs both in background threads,
    `run()` serves from the calling thread (signals: Ctrl-C / SIGTERM drain and stop)."""
    request_timeout = 60.0     # seconds a client may go silent while sending a body
    header_timeout = 30.0      # seconds to send a request's headers (keep-alive idle: the same)

    def __init__(self, llm, host="127.0.0.1", port=8000, max_batch=8, max_queue=None, model_name=None,
                 template_kwargs=None, default_max_tokens=None, api_keys=None, max_connections=1024):
        self.llm = llm
        self.metrics = Metrics()
        self.scheduler = Scheduler(llm, max_batch, max_queue, metrics=self.metrics)
        names = [model_name] if isinstance(model_name, str) else list(model_name or [])
        base = os.path.basename(os.path.normpath(str(llm.path))) or "k2lite"
        self.names = list(dict.fromkeys(names + [base, str(llm.path)]))   # accepted in `model`
        self.model_name = self.names[0]
        self.created = int(time.time())
        self.template_kwargs = dict(template_kwargs or {})    # chat template variables of every request
        c = llm.cache
        default_max = default_max_tokens or llm.generation_defaults.get("max_tokens", 256)
        self.limits = (llm.context, c.capacity_tokens, c.page_size, int(default_max))
        self.api_keys = [k.encode() for k in api_keys or [] if k]
        self.max_connections = max_connections
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))      # bound now: port 0 has its number before start()
        self.socket.listen(2048)            # and listening: clients queue until uvicorn accepts
        self.server_address = self.socket.getsockname()[:2]
        self.app = build_app(self)
        self._uvicorn = None
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{'[%s]' % host if ':' in host else host}:{port}"

    def exposed(self) -> bool:
        """Bound to an address other machines may reach."""
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"

    def _make_uvicorn(self):
        protocol = type("H11", (DeadlineH11,), {"header_timeout": self.header_timeout})
        config = uvicorn.Config(self.app, http=protocol, lifespan="off", log_config=None, access_log=True,
                                timeout_keep_alive=int(max(1, self.header_timeout)),
                                limit_concurrency=self.max_connections, timeout_graceful_shutdown=10,
                                server_header=False)
        self._uvicorn = _Uvicorn(config, self.scheduler.stop)
        return self._uvicorn

    def run(self):
        """Serve in this thread until Ctrl-C / SIGTERM (uvicorn catches them and drains)."""
        self.scheduler.start()
        self._make_uvicorn().run(sockets=[self.socket])

    def start(self):
        self.scheduler.start()
        server = self._make_uvicorn()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.socket]},
                                        name="k2lite-http", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not server.started and self._thread.is_alive() and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        return self

    def stop(self, drain: float = 10.0):
        """Stop: requests in flight get a 503 error, then the connections close."""
        self.scheduler.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(drain)
        self.socket.close()


# ---------------------------------------------------------------- the app
def build_app(srv: Server) -> Gate:
    api = API(srv)
    app = Starlette(routes=[
        Route("/", api.page, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ], exception_handlers={HTTPException: api.http_error, ApiError: api.api_error})
    return Gate(app, srv)


class Gate:
    """ASGI middleware in front of the routes: tidies the path, answers CORS preflights, checks
    the API key, adds CORS to every answer and counts answers by route and status."""

    def __init__(self, app, srv: Server):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if "://" in path:                          # absolute-form target (through a proxy)
            path = urllib.parse.urlsplit(path).path
        path = "/" + "/".join(p for p in path.split("/") if p)      # "//v1/models/" is /v1/models
        scope = {**scope, "path": path}
        status = 0

        async def send_cors(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"access-control-allow-origin", b"*")]}
            await send(message)
        try:
            names = {k for k, _ in scope["headers"]}
            if b"transfer-encoding" in names and b"content-length" in names:
                # h11 reads such a body as chunked and would take what follows as a new request,
                # where a proxy reading Content-Length sees one request: smuggling (RFC 9112 6.3)
                e = ApiError(400, "a request must not have both Content-Length and Transfer-Encoding")
                await error_response(e, close=True)(scope, receive, send_cors)
            elif scope["method"] == "OPTIONS":
                await preflight(scope, send_cors)
            elif self.srv.api_keys and path not in OPEN_PATHS and not self._authorized(scope):
                e = ApiError(401, "Incorrect API key provided: send it as 'Authorization: Bearer KEY'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error_response(e)(scope, receive, send_cors)
            else:
                await self.app(scope, receive, send_cors)
        finally:
            route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.srv.metrics.count_request(route, status or 499)

    def _authorized(self, scope) -> bool:
        got = b""
        for k, v in scope["headers"]:
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                got = v[7:].strip()
        ok = False
        for key in self.srv.api_keys:              # every key compared, in constant time each
            ok |= hmac.compare_digest(got, key)
        return ok


ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


async def preflight(scope, send):
    """CORS preflight: any origin may call the API (as with vLLM and llama.cpp)."""
    asked = dict(scope["headers"]).get(b"access-control-request-headers") or b"Authorization, Content-Type"
    await Response(status_code=204, headers={
        "Allow": "GET, HEAD, POST, OPTIONS", "Access-Control-Allow-Methods": "GET, HEAD, POST, OPTIONS",
        "Access-Control-Allow-Headers": asked.decode("latin-1"), "Access-Control-Max-Age": "86400"})(
        scope, None, send)


class API:
    """The endpoints."""

    def __init__(self, srv: Server):
        self.srv = srv

    # ------------------------------------------------------------ errors
    async def http_error(self, request, exc: HTTPException):
        """Starlette's 404 / 405 as OpenAI error objects."""
        path = request.url.path
        if exc.status_code == 405:
            allowed = [m for m in (exc.headers or {}).get("Allow", "").split(", ") if m and m != "HEAD"]
            e = ApiError(405, f"{request.method} {path} is not allowed; use {' or '.join(allowed)}",
                         headers={"Allow": ", ".join(allowed)})
        elif exc.status_code == 404:
            e = ApiError(404, f"Invalid URL ({request.method} {path})", code="unknown_url")
        else:
            e = ApiError(exc.status_code, str(exc.detail))
        return error_response(e)

    async def api_error(self, request, exc: ApiError):
        return error_response(exc, close=exc.status in (408, 413))

    # ------------------------------------------------------------ simple routes
    async def page(self, request):
        html = resources.files("k2lite.serve").joinpath("static/chat.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                 "style-src 'unsafe-inline'; img-src 'self' data:"})

    async def health(self, request):
        return JSONResponse({"status": "ok", **self.srv.scheduler.stats()})

    async def metrics(self, request):
        text = self.srv.metrics.render(self.srv.scheduler)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _card(self, name):
        return {"id": name, "object": "model", "created": self.srv.created, "owned_by": "k2lite",
                "max_model_len": self.srv.limits[0], "k2lite": self.srv.llm.describe()}

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self._card(self.srv.model_name)]})

    async def model(self, request):
        name = request.path_params["name"]
        if name not in self.srv.names:
            raise self._unknown(name)
        return JSONResponse(self._card(name))

    def _unknown(self, name):
        return ApiError(404, f"the model {name!r} does not exist; this server has {self.srv.model_name!r}",
                        param="model", code="model_not_found")

    # ------------------------------------------------------------ generation
    async def chat(self, request):
        srv = self.srv
        return await self._generate(request, lambda b: chat_request(srv.llm, b, srv.limits, srv.template_kwargs))

    async def completions(self, request):
        srv = self.srv
        return await self._generate(request, lambda b: completion_request(srv.llm, b, srv.limits))

    async def _body(self, request) -> dict:
        """The JSON body: at most MAX_BODY bytes, no gap longer than request_timeout."""
        cl = request.headers.get("content-length")
        if cl is not None and int(cl) > MAX_BODY:      # h11 has checked it is digits
            raise ApiError(413, f"the body has {cl} bytes; at most {MAX_BODY} are accepted")
        parts, n = [], 0
        while True:
            try:
                message = await asyncio.wait_for(request.receive(), self.srv.request_timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"timed out reading the request body (no data for "
                                    f"{self.srv.request_timeout:g} s)") from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            parts.append(message.get("body", b""))
            n += len(parts[-1])
            if n > MAX_BODY:
                raise ApiError(413, f"the body must be at most {MAX_BODY} bytes")
            if not message.get("more_body"):
                break
        data = b"".join(parts)
        if not data:
            raise ApiError(400, "a JSON body is required")
        return await run_in_threadpool(parse_body, data)

    async def _generate(self, request, build):
        try:
            body = await self._body(request)
            name = body.get("model")
            if isinstance(name, str) and name not in self.srv.names:
                raise self._unknown(name)
            reqs = await run_in_threadpool(build, body)     # validation and tokenizing: off the loop
        except ClientGone:
            return Response(status_code=499)
        except ApiError:
            raise
        except Exception as e:       # a bug: one log line, a generic 500, the server stays up
            log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
            raise ApiError(500, "internal server error", "server_error") from None
        gen = Generation(self.srv, body, reqs, asyncio.get_running_loop())
        try:
            self.srv.scheduler.submit(reqs)   # refused (429 / 503) here, before any byte is sent
        except Refused as e:
            raise refused(e) from None
        return gen


def parse_body(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(body).__name__}")
    if LONE_SURROGATE.search(data):     # \\ud800 without its pair: text no UTF-8 writer can send back
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the body contains a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                                "its pair): not valid Unicode text") from None
    return body


class Generation:
    """The response of one generation: JSON when it ends, or an SSE stream as it goes. An ASGI
    app of its own, so that it can watch the connection and cancel its requests on a hang-up."""

    def __init__(self, srv: Server, body: dict, reqs, loop):
        self.srv, self.body, self.reqs = srv, body, reqs
        self.chat = reqs[0].parser is not None
        self.events = LoopEvents(loop)
        rid = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        for r in reqs:
            r.id, r.events = rid, self.events
        self.head = {"id": rid, "object": "chat.completion" if self.chat else "text_completion",
                     "created": int(time.time()), "model": srv.model_name}

    async def __call__(self, scope, receive, send):
        self.scope = scope
        gone = asyncio.ensure_future(self._hangup(receive))
        try:
            if self.body.get("stream"):
                await self._stream(send, gone)
            else:
                await self._whole(send, gone)
        except (ClientGone, OSError):
            pass
        finally:
            gone.cancel()
            for r in self.reqs:
                if r.finish_reason is None:     # client gone or an error here: free its pages now
                    self.srv.scheduler.cancel(r)

    @staticmethod
    async def _hangup(receive):
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _events(self, gone):
        """(req, delta) as the scheduler emits them and (req, None) when a choice ends, until
        all have; raises ClientGone as soon as the client hangs up."""
        left, q = len(self.reqs), self.events.queue
        while left:
            if q.empty():
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ClientGone()
                r, kind, data = get.result()
            else:
                r, kind, data = q.get_nowait()
            if kind == "error":
                raise ApiError(*FAILED[data], "server_error")
            left -= kind == "end"
            yield r, data

    async def _whole(self, send, gone):
        acc = {r.index: {"content": [], "reasoning_content": [], "text": [r.echo], "calls": []} for r in self.reqs}
        try:
            async for r, d in self._events(gone):
                if d is not None:
                    a = acc[r.index]
                    if "tool_call" in d:
                        a["calls"].append(d["tool_call"])
                    else:
                        for k, v in d.items():
                            a[k].append(v)
        except ApiError as e:
            return await error_response(e)(self.scope, None, send)
        choices = []
        for r in self.reqs:
            a = acc[r.index]
            if self.chat:
                content, reasoning = "".join(a["content"]), "".join(a["reasoning_content"])
                msg = {"role": "assistant", "content": content if content or not a["calls"] else None,
                       "reasoning_content": reasoning or None}
                if a["calls"]:
                    msg["tool_calls"] = a["calls"]
                c = {"index": r.index, "message": msg}
            else:
                c = {"index": r.index, "text": "".join(a["text"])}
            choices.append({**c, "logprobs": None, "finish_reason": r.finish_reason})
        data = json_bytes({**self.head, "choices": choices, "usage": _usage(self.reqs)})
        await Response(data, 200, media_type="application/json")(self.scope, None, send)

    async def _stream(self, send, gone):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        chat = self.chat
        head = {**self.head, "object": "chat.completion.chunk" if chat else "text_completion"}
        include_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        async def sse(obj):
            await send({"type": "http.response.body", "body": b"data: " + json_bytes(obj) + b"\n\n",
                        "more_body": True})

        def chunk(r, delta, finish=None):
            c = {"index": r.index, "delta": delta} if chat else {"index": r.index, "text": delta.get("text", "")}
            return sse({**head, "choices": [{**c, "logprobs": None, "finish_reason": finish}], **extra})

        try:
            for r in self.reqs:
                if chat:
                    await chunk(r, {"role": "assistant", "content": ""})
                elif r.echo:
                    await chunk(r, {"text": r.echo})
            async for r, d in self._events(gone):
                if d is None:
                    await chunk(r, {}, r.finish_reason)
                elif "tool_call" in d:   # a whole call in one delta, as vLLM's kimi_k2 parser sends it
                    await chunk(r, {"tool_calls": [{"index": d["index"], **d["tool_call"]}]})
                else:
                    await chunk(r, d)
            if include_usage:
                await sse({**head, "choices": [], "usage": _usage(self.reqs)})
        except ApiError as e:   # headers are out: report the error inside the stream
            await sse(e.body())
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
