"""OpenAI's API for the server: request bodies validated into scheduler Requests, usage, errors.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both JSON or SSE streams),
GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus text), GET / (the
chat page, static/chat.html); HEAD works on the GETs and OPTIONS answers CORS
preflights (any origin, as vLLM and llama.cpp allow). Chat messages and deltas carry
`reasoning_content` and `tool_calls` parsed from K2's output by chat.StreamParser, as Moonshot's
API and vLLM return them. `n` > 1 and a list of prompts (/v1/completions) become one scheduler
request per choice, batched like any others. Parameters the engine cannot honour (logprobs,
response_format other than text, a forced tool, suffix, best_of) get a 400 naming the field
instead of being ignored; every error is an OpenAI error object.

This module validates request bodies into scheduler Requests (no HTTP here, no dependency
beyond the engine's); the HTTP side is transport.py (Starlette on uvicorn, the optional
extra `pip install "k2lite[serve]"`), the batching scheduler.py.
Limits applied before any work: the body's bytes (MAX_BODY), a prompt's bytes against the
context (before tokenizing; completion prompts are then encoded piecewise up to one context),
the choices of one request against the cache (n x max_tokens share it), token ids, logit_bias
keys, stop strings.
"""
from __future__ import annotations

import functools

import numpy as np

from ..chat import ROLES, StreamParser
from ..backends.checks import cdiv
from .scheduler import Request

MAX_BODY = 8 << 20          # bytes of JSON we accept in one request
MAX_CHOICES = 128           # n x prompts in one request (OpenAI's limit for n)
MAX_STOP = 256              # characters per stop string (each token re-checks every prefix of each)


# ---------------------------------------------------------------- validation
class ApiError(Exception):
    """An error the client gets as an OpenAI error object, with its HTTP status."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# What the scheduler's refusals (Refused.reason) and failures ("error" events) are over HTTP.
REFUSED = {"busy": (429, "rate_limit_exceeded", {"Retry-After": "1"}), "stopping": (503, "server_error", {})}
FAILED = {"error": (500, "generation failed (see the server log)"), "shutdown": (503, "the server is shutting down")}


def refused(e) -> ApiError:
    status, kind, headers = REFUSED[e.reason]
    return ApiError(status, e.message, kind, headers=headers)


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
                isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 12 and int(k) < V
                and not isinstance(v, bool)
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
    # All the choices of one request must fit in the cache together (so n x max_tokens cannot
    # take more than the whole cache): each gets an equal share, in whole pages.
    share = min(room, capacity // page // (len(prompts) * n) * page)
    reqs = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise _bad(param, "the prompt is empty")
        if len(prompt) >= room:
            raise context_error(room, len(prompt), param)
        if len(prompt) >= share:
            raise _bad("n", f"{len(prompts) * n} choices (n x prompts) of a {len(prompt)}-token prompt do not fit "
                            f"in this server's cache of {capacity} tokens together; ask for fewer")
        # Too many max_tokens are clamped (finish_reason "length"), as if the context ended there.
        m = min(s["max_tokens"] or default_max, share - len(prompt))
        for j in range(n):
            seed = None if s["seed"] is None else (s["seed"] + j) % (1 << 64)
            reqs.append(Request(prompt, llm.make_sampler(**s["sampling"], seed=seed), m, s["stop"],
                                set(llm.eos_ids), parser() if parser else None, index=i * n + j,
                                presence=s["presence"], frequency=s["frequency"], bias=s["bias"],
                                echo=echoes[i] if echoes else "", reserve=cdiv(len(prompt) + m, page)))
    return reqs


def context_error(room, n, param, more=False):
    return ApiError(400, f"this model's maximum context length is {room} tokens, but the prompt has "
                         f"{'more than ' if more else ''}{n} tokens", param=param, code="context_length_exceeded")


@functools.lru_cache(maxsize=8)
def _longest_token(tok) -> int:
    """Bytes of the vocabulary's longest token: a text of b bytes is at least b / this tokens."""
    ranks = getattr(getattr(tok, "enc", None), "_mergeable_ranks", None)
    return max(map(len, ranks)) if ranks else 1 << 30


def check_text_size(tok, nbytes: int, room: int, param: str):
    """Refuse a prompt that cannot fit before tokenizing it (megabytes take seconds to tokenize):
    every token covers at most _longest_token bytes, so this never refuses a prompt that fits."""
    if nbytes > (room - 1) * _longest_token(tok):
        raise context_error(room, nbytes // _longest_token(tok), param, more=True)


def encode_prompt(tok, text: str, room: int, param: str) -> list:
    """tok.encode(text), stopping with a 400 once the prompt cannot fit: pieces of the
    tokenizer's own chunk size encode exactly as the whole text does, so a prompt of megabytes
    costs the tokens of one context, not of all its bytes."""
    check_text_size(tok, len(text.encode("utf-8", "replace")), room, param)
    from .. import tokenizer
    step = getattr(tokenizer, "MAX_CHUNK_CHARS", 0) if isinstance(tok, tokenizer.Tokenizer) else 0
    if not step:
        return tok.encode(text)
    ids = []
    for i in range(0, len(text), step):
        ids.extend(tok.encode(text[i:i + step]))
        if len(ids) >= room:
            raise context_error(room, len(ids), param, more=i + step < len(text))
    return ids


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
    text = sum(len(c.encode("utf-8", "replace")) if isinstance(c, str) else
               sum(len(str(p.get("text", "") if isinstance(p, dict) else p).encode("utf-8", "replace")) for p in c)
               for m in messages if m["role"] != "assistant" for c in [m.get("content") or ""])
    check_text_size(llm.tokenizer, text, min(limits[0], limits[1]), "messages")
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
            prompts.append(encode_prompt(tok, x, min(limits[0], limits[1]), "prompt"))
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
