"""Generation on top of `Sequence.append`: token ids, then text, then chat messages.

Three layers, each built on the one below (mlx-lm's generate_step / stream_generate split):

  generate_step(llm, ids, sampler)  prefill the prompt, then decode one token at a time; yields
                                    token ids forever (the caller stops it). The engine only ever
                                    sees ids.
  TextStream                        ids -> text deltas: stops at the eos ids (never shown) and at
                                    stop strings (cut off, held back until they cannot match).
  LLM.stream_chat                   text deltas -> reasoning / content / tool-call deltas through
                                    chat.StreamParser.

Defaults come from the checkpoint's generation_config.json (temperature, top_p, top_k, min_p,
max_new_tokens, do_sample=false -> greedy), else K2 Thinking's advice: temperature 1.0, top_p 1.0.
"""
from __future__ import annotations

import json
import os
import resource
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ModelFormatError
from .sampler import Sampler

K2_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 256}


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def generation_defaults(path: str) -> dict:
    """Sampling defaults: generation_config.json where it says, K2 Thinking's advice elsewhere."""
    d = dict(K2_DEFAULTS)
    gc_path = os.path.join(path, "generation_config.json") if os.path.isdir(path) else ""
    if gc_path and os.path.exists(gc_path):
        try:
            with open(gc_path, encoding="utf-8") as f:
                gc = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelFormatError(f"{gc_path}: cannot read ({type(e).__name__}: {e})") from None
        if not isinstance(gc, dict):
            raise ModelFormatError(f"{gc_path}: must hold a JSON object")
        for k in ("temperature", "top_p", "top_k", "min_p"):
            if isinstance(gc.get(k), (int, float)) and not isinstance(gc.get(k), bool):
                d[k] = gc[k]
        if isinstance(gc.get("max_new_tokens"), int):
            d["max_tokens"] = gc["max_new_tokens"]
        if gc.get("do_sample") is False:
            d["temperature"] = 0.0
        eos = gc.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
            raise ModelFormatError(f"{gc_path}: eos_token_id must be a token id or a list of them")
        d["eos_ids"] = tuple(eos)
    return d


def generate_step(llm, prompt_ids, sampler, seq=None):
    """Prefill `prompt_ids`, then yield sampled ids one at a time, each fed back before the next.

    Yields (token_id, logits) forever; the caller decides when to stop. `seq` (a Sequence) is
    used and left open when given, else a fresh one is closed when the generator ends.
    """
    own = seq is None
    seq = llm.sequence() if own else seq
    try:
        logits = seq.append(np.asarray(prompt_ids, np.int64), last_only=True)[-1]
        while True:
            t = sampler(logits)
            yield t, logits
            logits = seq.append([t])[-1]
    finally:
        if own:
            seq.close()


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0           # of the prompt, reused from the sequence's cache (not computed)
    completion_tokens: int = 0
    prompt_seconds: float = 0.0      # prefill, up to the first sampled token
    generation_seconds: float = 0.0  # every decode step after it
    decode_steps: int = 0            # forward passes of one token (an eos costs one too)
    peak_memory: int = 0             # bytes, ru_maxrss

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens computed per second (cached ones cost nothing)."""
        done = self.prompt_tokens - self.cached_tokens
        return done / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        """Decode steps per second (the first token comes from the prefill)."""
        return self.decode_steps / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_tokens=self.total_tokens, prompt_tps=round(self.prompt_tps, 3),
                 generation_tps=round(self.generation_tps, 3))
        return d


@dataclass
class Completion:
    text: str
    token_ids: list                  # generated ids, without the eos that ended them
    finish_reason: str               # "stop" (eos or stop string) or "length"
    usage: Usage = field(default_factory=Usage)
    model: str = ""

    def to_openai(self) -> dict:
        return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "text": self.text, "logprobs": None,
                             "finish_reason": self.finish_reason}],
                "usage": self.usage.to_dict()}


@dataclass
class ChatResult:
    content: str
    reasoning_content: str
    tool_calls: list                 # OpenAI-shaped calls (see chat.py)
    finish_reason: str               # "stop", "length" or "tool_calls"
    usage: Usage = field(default_factory=Usage)
    text: str = ""                   # the raw assistant text the parser saw
    token_ids: list = field(default_factory=list)
    model: str = ""

    def message(self) -> dict:
        """The assistant message, ready to append to the history."""
        m = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            m["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            m["tool_calls"] = [{k: v for k, v in c.items() if k != "error"} for c in self.tool_calls]
        return m

    def to_openai(self) -> dict:
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
                "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "message": self.message(), "logprobs": None,
                             "finish_reason": self.finish_reason}],
                "usage": self.usage.to_dict()}


def find_stop(text: str, sent: int, stops) -> tuple:
    """Stop strings over streamed text, of which text[:sent] was already shown: (cut, end).
    cut: where the first stop string starts (-1: none yet; the text ends there, unshown).
    end: how far text may be shown now, holding back the longest tail that is a proper
    prefix of some stop string (it may grow into one)."""
    cut = min((i for i in (text.find(s, max(sent - len(s), 0)) for s in stops) if i >= 0), default=-1)
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return cut, max(sent, len(text) - hold)


class TokenStream:
    """One generation's output, token by token: the state machine the library's TextStream /
    ChatStream and the server's scheduler both hold, so end-of-sequence, stop strings, parsing
    and finish reasons are decided in one place.

        out = TokenStream(tokenizer, eos_ids, stop, max_tokens, parser)
        deltas = out.feed(token_id)      # list of deltas; out.done once this token ended it
        deltas = out.finish()            # the tail (held-back text, the parser's last deltas)
        out.finish_reason                # "stop", "length" or "tool_calls"

    Deltas: {"text": s} without a parser; with one, the parser's {"reasoning_content": s},
    {"content": s} and {"tool_call": call, "index": i} (chat.py). Ends: an eos id ("stop", never
    shown), a stop string ("stop", cut off, never shown), max_tokens ("length"); "stop" with tool
    calls becomes "tool_calls". Without stop strings a chat parser reads token ids, so only
    special ids are markup (a model that spells `<|tool_call_begin|>` in plain tokens makes no
    call); stop strings cut decoded text, so with them the parser reads that text.
    tools: "all" keeps every parsed call (a malformed one carries "error"), "valid" drops the
    malformed ones, "none" drops all (tool_choice "none"); indexes count the calls kept.
    """

    def __init__(self, tokenizer, eos_ids=(), stop=(), max_tokens=None, parser=None, tools="all"):
        self.eos, self.stop = set(eos_ids), [s for s in stop if s]
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the model folder has no tiktoken.model)")
        self.max_tokens = max_tokens
        self.parser, self.tools = parser, tools
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.by_id = parser is not None and not self.stop and getattr(parser, "tokenizer", None) is not None
        self.ids: list = []          # generated ids (no eos)
        self.text = ""               # their decoded text, cut at a stop string
        self.sent = 0                # chars of `text` already passed on
        self.calls: list = []        # tool calls kept
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, t: int) -> list:
        """One sampled token; returns its deltas. Ends the stream at eos, a stop string or max_tokens."""
        if self.done:
            raise ValueError("the stream has finished")
        if t in self.eos:
            return self.finish("stop")
        self.ids.append(t)
        out = []
        if self.by_id:
            out = self._calls(self.parser.feed_token(t))
        elif self.decoder is not None:
            self.text += self.decoder.feed(t)
            cut, end = find_stop(self.text, self.sent, self.stop)
            if cut >= 0:
                self.text = self.text[:cut]
                return self.finish("stop", flush=False)
            out = self._show(end)
        if self.max_tokens is not None and len(self.ids) >= self.max_tokens:
            out += self.finish("length")
        return out

    def finish(self, reason: str = "length", flush: bool = True) -> list:
        """End the stream (idempotent): the text held back and the parser's tail."""
        if self.done:
            return []
        out = []
        if self.decoder is not None and not self.by_id:
            if flush:
                self.text += self.decoder.flush()
            out = self._show(len(self.text))
        if self.parser is not None:
            out += self._calls(self.parser.finish())
        self.finish_reason = "tool_calls" if reason == "stop" and self.calls else reason
        return out

    def _show(self, end: int) -> list:
        """Pass on text[sent:end]: as text, or through the chat parser."""
        s, self.sent = self.text[self.sent:end], max(self.sent, end)
        if not s:
            return []
        return [{"text": s}] if self.parser is None else self._calls(self.parser.feed_text(s))

    def _calls(self, deltas) -> list:
        """Parser deltas, tool calls kept or dropped by `tools` and numbered as kept."""
        out = []
        for d in deltas:
            if "tool_call" in d:
                call = d["tool_call"]
                if self.tools == "none" or (self.tools == "valid" and "error" in call):
                    continue
                d = {"tool_call": call, "index": len(self.calls)}
                self.calls.append(call)
            out.append(d)
        return out


def _nothing():
    yield from ()


class _Stream:
    """An iterator over the generator `self._run()` that can be closed early."""

    def __iter__(self):
        return self._it

    def __next__(self):
        return next(self._it)

    def close(self):
        self._it.close()


class TextStream(_Stream):
    """Iterate for deltas; afterwards `.completion` holds the whole Completion.

    The deltas are text, or with a chat parser its deltas (ChatStream). Stops at an eos id (not
    shown), at the first stop string (cut off) or after max_tokens (a TokenStream decides).
    Closing it early (break, Ctrl-C) frees the sequence and still fills `.completion`.
    """

    def __init__(self, llm, prompt_ids, sampler, max_tokens, stop=(), eos_ids=(), seq=None, parser=None):
        self.llm, self.prompt_ids, self.sampler = llm, list(prompt_ids), sampler
        self.max_tokens, self.seq = int(max_tokens), seq
        limit = min(self.max_tokens, max(llm.context - len(self.prompt_ids), 0))
        self.out = TokenStream(llm.tokenizer, eos_ids, stop, limit, parser)
        self.stop = self.out.stop
        self.completion: Completion | None = None
        self._it = self._run()

    def _run(self):
        llm, out = self.llm, self.out
        usage = Usage(prompt_tokens=len(self.prompt_ids))
        t0 = time.perf_counter()
        t1 = None
        todo = self.prompt_ids
        if out.max_tokens > 0 and self.seq is not None:
            usage.cached_tokens = self.seq.reuse_prefix(todo)
            todo = todo[usage.cached_tokens:]
        steps = generate_step(llm, todo, self.sampler, self.seq) if out.max_tokens > 0 else _nothing()
        tail = []
        try:
            for t, _ in steps:
                usage.decode_steps += t1 is not None
                if t1 is None:
                    t1 = time.perf_counter()
                    usage.prompt_seconds = t1 - t0
                yield from self._deltas(out.feed(t))
                if out.done:
                    break
        finally:
            steps.close()
            tail = out.finish("length")
            now = time.perf_counter()
            usage.generation_seconds = now - t1 if t1 is not None else 0.0
            usage.completion_tokens = len(out.ids)
            usage.peak_memory = peak_memory_bytes()
            self.completion = Completion(out.text, out.ids, out.finish_reason, usage,
                                         os.path.basename(os.path.normpath(llm.path)))
            self._done()
        yield from self._deltas(tail)

    def _deltas(self, deltas):
        for d in deltas:
            yield d["text"]

    def _done(self):
        pass


class ChatStream(TextStream):
    """Iterate for parser deltas ({"reasoning_content"}, {"content"}, {"tool_call", "index"});
    afterwards `.result` holds the ChatResult (and `.completion` the raw Completion)."""

    def __init__(self, llm, prompt_ids, sampler, max_tokens, stop=(), eos_ids=(), seq=None, parser=None):
        self.result: ChatResult | None = None
        super().__init__(llm, prompt_ids, sampler, max_tokens, stop, eos_ids, seq, parser)

    def _deltas(self, deltas):
        yield from deltas

    def _done(self):
        c, r = self.completion, self.out.parser.result()
        if c.finish_reason == "tool_calls":
            c.finish_reason = "stop"            # the Completion tells how the text ended
        self.result = ChatResult(r["content"], r["reasoning_content"], r["tool_calls"], self.out.finish_reason,
                                 c.usage, c.text, c.token_ids, c.model)


class GenerationMixin:
    """generate / stream / chat / stream_chat for LLM (needs self.sequence, .tokenizer, .path)."""

    @property
    def generation_defaults(self) -> dict:
        if not hasattr(self, "_gen_defaults"):
            self._gen_defaults = generation_defaults(self.path)
        return self._gen_defaults

    @property
    def eos_ids(self) -> tuple:
        """Ids that end a generation: the tokenizer's, config.json's, generation_config's."""
        ids = list(getattr(self.tokenizer, "eos_ids", None) or [])
        ids += list(self.config.eos_ids) + list(self.generation_defaults.get("eos_ids", ()))
        return tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def chat_template(self):
        """The checkpoint's chat template (chat_template.ChatTemplate), None for a base model."""
        return getattr(self.tokenizer, "chat_template", None)

    @property
    def is_chat_model(self) -> bool:
        """Whether the checkpoint carries a chat template: base models (K2 Base, k2-nano) have
        none and are prompted raw."""
        return self.chat_template is not None

    @property
    def kind(self) -> str:
        """"base", or the chat template's mode: "thinking", "instruct", "hybrid" (a thinking switch)."""
        t = self.chat_template
        return "base" if t is None else t.mode

    def describe(self) -> dict:
        """What this checkpoint is, for `k2lite info` and the server's /v1/models: its model type,
        mode (base / thinking / instruct / hybrid), chat template and whether k2lite knows it."""
        t = self.chat_template
        return {"model_type": self.config.model_type, "mode": self.kind,
                "chat_template": None if t is None else t.name,
                "chat_template_recognised": None if t is None else t.recognised,
                "tokenizer": None if self.tokenizer is None else "tiktoken"}

    def make_sampler(self, temperature=None, top_p=None, top_k=None, min_p=None, seed=None) -> Sampler:
        d = self.generation_defaults
        pick = lambda v, k: d[k] if v is None else v    # noqa: E731
        return Sampler(float(pick(temperature, "temperature")), int(pick(top_k, "top_k")),
                       float(pick(top_p, "top_p")), float(pick(min_p, "min_p")), seed)

    def encode_prompt(self, prompt) -> list:
        """A str through the tokenizer (special-token names recognised, no BOS), or ids as is."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.path} has no tokenizer (tiktoken.model): pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in self._check_ids(prompt)]

    def stream(self, prompt, max_tokens=None, temperature=None, top_p=None, top_k=None, min_p=None,
               seed=None, stop=None, sequence=None) -> TextStream:
        """Text deltas as they are produced; `.completion` is set once the stream ends.

        sequence: a Sequence to run in, left open afterwards. The prompt is still the whole
        text: the tokens already cached there that start it are reused, not recomputed
        (prompt caching; pass the same one every turn of a conversation).
        """
        return self._stream(TextStream, prompt, max_tokens, temperature, top_p, top_k, min_p, seed, stop,
                            sequence)

    def _stream(self, cls, prompt, max_tokens=None, temperature=None, top_p=None, top_k=None, min_p=None,
                seed=None, stop=None, sequence=None, parser=None):
        ids = self.encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        n = self.generation_defaults["max_tokens"] if max_tokens is None else int(max_tokens)
        return cls(self, ids, self.make_sampler(temperature, top_p, top_k, min_p, seed), n,
                   stop, self.eos_ids, sequence, parser)

    def generate(self, prompt, max_tokens=None, temperature=None, top_p=None, top_k=None, min_p=None,
                 seed=None, stop=None, sequence=None) -> Completion:
        """Complete `prompt` (text or token ids): Completion(text, token_ids, finish_reason, usage)."""
        s = self.stream(prompt, max_tokens, temperature, top_p, top_k, min_p, seed, stop, sequence)
        for _ in s:
            pass
        return s.completion

    def chat_prompt(self, messages, tools=None, thinking=None, chat_template_kwargs=None) -> tuple:
        """(prompt ids, whether the answer opens in reasoning) for a conversation, through the
        checkpoint's chat template. thinking: the template's `thinking` switch where it has one
        (K2.6; None: its default); chat_template_kwargs: any other template variables."""
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer (tiktoken.model): chat needs one")
        if self.chat_template is None:
            raise ValueError(f"{self.path} has no chat template (a base model): use generate() with "
                             "raw text, or load it with chat_template=FILE|NAME")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError("chat_template_kwargs must be a dict of template variables")
        kw = dict(chat_template_kwargs or {})
        if thinking is not None:
            kw["thinking"] = bool(thinking)
        from .chat import is_media
        for i, m in enumerate(messages if isinstance(messages, (list, tuple)) else ()):
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list) and any(is_media(p) for p in c):
                # the templates have markup for images, but no K2 text model can see them
                raise ValueError(f"messages[{i}]: image and video inputs are not supported (text only)")
        parts = self.chat_template.render_parts(messages, tools, True, **kw)
        opens = self.chat_template.opens_in_reasoning("".join(t for _, t in parts), **kw)
        return self.tokenizer.encode_parts(parts), opens

    def chat_ids(self, messages, tools=None, **template_kwargs) -> list:
        return self.chat_prompt(messages, tools, chat_template_kwargs=template_kwargs)[0]

    def stream_chat(self, messages, tools=None, thinking=None, chat_template_kwargs=None,
                    **sampling) -> ChatStream:
        """Deltas of the assistant's answer; `.result` (a ChatResult) is set once it ends.

        Whether the answer starts in reasoning follows the template and the rendered prompt: K2
        Thinking always, K2.6 unless thinking=False, K2 Instruct never (see chat_prompt).
        sampling: stream()'s keywords, `sequence` among them: give the same Sequence every
        turn and only the new part of the conversation is computed.
        """
        from .chat import StreamParser
        ids, opens = self.chat_prompt(messages, tools, thinking, chat_template_kwargs)
        return self._stream(ChatStream, ids, parser=StreamParser(self.tokenizer, thinking=opens), **sampling)

    def chat(self, messages, tools=None, thinking=None, chat_template_kwargs=None, **sampling) -> ChatResult:
        """One assistant turn: ChatResult(content, reasoning_content, tool_calls, finish_reason, usage)."""
        s = self.stream_chat(messages, tools, thinking, chat_template_kwargs, **sampling)
        for _ in s:
            pass
        return s.result


# ---------------------------------------------------------------- evaluation
def perplexity(llm, ids, ctx: int = 512) -> tuple:
    """(tokens scored, mean NLL in nats) over `ids` cut into independent windows of `ctx` tokens.

    Each window is a fresh sequence; every token but a window's first is scored given the ones
    before it in the window (llama.cpp's `perplexity` scores only the second half of each window;
    scoring all of it is the simpler, slightly pessimistic variant).
    """
    ids = np.asarray(ids, np.int64)
    ctx = max(2, min(int(ctx), llm.context))
    total, n = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        w = ids[start:start + ctx]
        if len(w) < 2:
            break
        z = llm.logits(w[:-1]).astype(np.float64)                 # [T-1, V]
        zmax = z.max(-1, keepdims=True)
        logz = zmax[:, 0] + np.log(np.exp(z - zmax).sum(-1))
        total += float((logz - z[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    if n == 0:
        raise ValueError("perplexity needs at least 2 tokens")
    return n, total / n
