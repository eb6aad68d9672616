"""Continuous batching over the paged latent cache, with a prompt cache: the engine of
`k2lite serve` (api.py and transport.py are its HTTP side), usable without HTTP too. It speaks the server's
reasons where it refuses or fails a request (Refused; "error" events), which the HTTP side maps
to statuses.

One thread owns the model: `Scheduler.submit(requests)` queues them; the loop admits waiting
requests while the batch and the cache have room, prefills one chunk of one new request, then
runs ONE batched decode step for every live sequence, samples per request, detokenizes, parses
(chat) and puts deltas on each request's event queue.

Admission reserves the pages a request can ever need (prompt + max_tokens), so a decode step
never runs out of cache mid-answer: when the cache is full new requests wait, and when the
waiting queue is full too submit() raises Refused("busy"). The queue bound counts HTTP requests
(the n choices of one count once), and admission is fair between them: the next request
admitted is the oldest of those whose HTTP request has the fewest choices running, so one
request with n = 40 takes turns with the others instead of holding the batch until it ends. A finished or cancelled request gives
its pages back before the next step: its sequence is parked in the prompt cache, whose pages
count as free and are evicted (least recently used) as soon as a reservation needs them.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from ..chat import StreamParser
from ..generate import TokenStream
from ..kvcache import common_prefix
from ..sampler import Sampler

log = logging.getLogger("k2lite.scheduler")


class Refused(Exception):
    """submit() cannot take the request: reason "busy" (the queue is full: retry later) or
    "stopping" (the scheduler is shutting down). The message says so in one line."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ---------------------------------------------------------------- requests
@dataclass(eq=False)
class Request:
    """One generation (one choice): what the client asked for, and the scheduler's progress on it."""
    prompt: list                    # prompt token ids (the same list object for the n choices of a prompt)
    sampler: Sampler                # its own settings and seeded rng
    max_tokens: int                 # already clamped to the context and cache
    stop: list                      # stop strings (cut off, never shown)
    eos: set                        # ids that end the answer (never shown)
    parser: StreamParser | None     # chat: reasoning/content/tool-call deltas; None: raw text
    index: int = 0                  # its choice index in the response
    presence: float = 0.0           # presence_penalty / frequency_penalty over the generated ids
    frequency: float = 0.0
    bias: tuple | None = None       # logit_bias as (ids, values) arrays
    echo: str = ""                  # /v1/completions echo=true: the prompt text, sent first
    events: queue.Queue = field(default_factory=queue.Queue)   # (req, "delta", d) ... (req, "end", None)
    cancelled: bool = False         # set by the HTTP thread when the client goes away
    tools: bool = True              # deliver tool calls (tool_choice "none": drop them)
    # scheduler-side state
    reserve: int = 0                # pages this request may need in all
    state: object = None            # CacheSlot once admitted
    fed: int = 0                    # prompt tokens prefilled so far (or found in the prompt cache)
    cached: int = 0                 # prompt tokens reused from the prompt cache
    next_token: int = -1            # the sampled token the next decode step feeds
    stream: TokenStream | None = None   # its output (generate.TokenStream), made at admission
    group: object = None            # shared by the choices of one submit() (one HTTP request)
    submitted: float = 0.0          # time.monotonic() at submit (time to first token)
    last_token: float = 0.0         # time.monotonic() of the last sampled token
    finish_reason: str | None = None
    id: str = ""                    # "chatcmpl-..." / "cmpl-...", set by the HTTP side

    @property
    def out(self) -> list:
        """The generated ids so far (no eos)."""
        return self.stream.ids if self.stream is not None else []


class Scheduler:
    """Continuous batching over the paged latent cache; owns the model from its own thread."""

    def __init__(self, llm, max_batch: int = 8, max_queue: int | None = None, metrics=None):
        from .metrics import Metrics
        self.llm, self.model, self.cache = llm, llm.model, llm.cache
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_batch = max(1, int(max_batch))
        self.max_queue = 4 * self.max_batch if max_queue is None else max(0, int(max_queue))
        self.waiting: deque = deque()    # submitted, not admitted (guarded by cond)
        self.live: list = []             # admitted: prefilling or decoding (scheduler thread only)
        self.cond = threading.Condition()
        self.steps = 0                   # batched decode steps run
        self.max_batch_seen = 0          # most sequences in one decode step
        self.cancelled = 0               # requests dropped because the client went away
        # Prompt cache: the sequences of finished requests, kept with their token ids (oldest
        # first) until their pages are needed. A new request adopts the one sharing the longest
        # start with its prompt, so a chat client resending its history computes only the new turn.
        self.idle: OrderedDict = OrderedDict()   # CacheSlot -> ids cached in it (int64 array)
        self.max_idle = 4 * self.max_batch
        self.cached_tokens = 0           # prompt tokens served from the prompt cache
        self.mix_prompt = 16             # prompt remainders this short ride in decode steps (0: never)
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

    def submit(self, reqs):
        """Queue a request, or all the choices of one HTTP request (all or none: Refused when full).
        max_queue counts HTTP requests of which no choice runs yet; those the batch and cache can
        take right away do not count."""
        reqs = [reqs] if isinstance(reqs, Request) else list(reqs)
        group, now = object(), time.monotonic()
        for r in reqs:
            r.group, r.submitted = group, now
        with self.cond:
            if self._stopping:
                raise Refused("stopping", "the server is shutting down")
            slots, budget = self._room()
            queued = list(self.waiting) + reqs
            running = self._running_per_group()
            while queued and slots > 0:         # what admission would take now
                r = self._next(queued, running)
                if r.reserve > budget:
                    break
                queued.remove(r)
                slots, budget = slots - 1, budget - r.reserve
                running[r.group] = running.get(r.group, 0) + 1
            # a request some of whose choices run is running: only the ones not started wait
            if len({id(r.group) for r in queued if not running.get(r.group)}) > self.max_queue:
                raise Refused("busy", f"server busy: {len(self.live)} requests running and {len(self.waiting)} "
                                      "waiting for cache space; retry later")
            self.waiting.extend(reqs)
            self.cond.notify()

    def cancel(self, req: Request):
        """Called from an HTTP thread; the scheduler frees the pages before its next step."""
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    def stats(self) -> dict:
        return {"live": len(self.live), "waiting": len(self.waiting), "steps": self.steps,
                "max_batch_seen": self.max_batch_seen, "cancelled": self.cancelled,
                "pages_free": self.cache.pages_free, "pages_cached": self._idle_pages(),
                "cached_sequences": len(self.idle), "cached_tokens": self.cached_tokens}

    def _running_per_group(self) -> dict:
        running = {}
        for r in list(self.live):
            running[r.group] = running.get(r.group, 0) + 1
        return running

    @staticmethod
    def _next(waiting, running):
        """The request admission takes next: the oldest of those whose group runs fewest."""
        return min(waiting, key=lambda r: running.get(r.group, 0))    # min keeps the first of ties

    def _idle_pages(self) -> int:
        return sum(len(st.pages) for st in list(self.idle))

    def _owed(self, live) -> int:
        """Pages promised to live requests and not taken yet."""
        return sum(r.reserve - len(r.state.pages) for r in live if r.state is not None)

    def _room(self):
        """(free batch slots, cache pages not promised to a live request; the prompt cache's
        pages count as free: they are given back whenever a request needs them)."""
        live = list(self.live)
        return self.max_batch - len(live), self.cache.pages_free + self._idle_pages() - self._owed(live)

    # ------------------------------------------------------------ the prompt cache
    def _adopt(self, r: Request):
        """Give r the cached sequence sharing the longest start with its prompt (keeping at
        least one prompt token to compute), else a new one; then make room for its reserve.
        A cached conversation that r continues is taken over; one that r only shares a start
        with (a system prompt, an earlier turn) stays cached and r gets a copy of that start,
        so clients taking turns do not cut each other's caches back."""
        best, kept = None, 0
        prompt = np.asarray(r.prompt[:-1], np.int64)
        for st, ids in self.idle.items():
            n = common_prefix(ids, prompt)
            if n > kept:
                best, kept = st, n
        state = None
        if best is not None and kept < len(self.idle[best]) - 1:    # a shared start only
            need = self.cache.pages_for(kept)
            for st in [st for st in self.idle if st is not best]:   # least recently used first
                if self.cache.pages_free >= need:
                    break
                self._evict(st)
            if self.cache.pages_free >= need:
                state = self.cache.copy_prefix(best, kept)
                self.idle.move_to_end(best)
        if best is not None and state is None:
            state = best
            del self.idle[best]
            self.cache.truncate(best, kept)
        r.state = state if state is not None else self.cache.new_seq()
        r.fed = r.cached = kept
        self.cached_tokens += kept
        self.metrics.admitted(len(r.prompt), kept)
        # every page promised to a live request (r's included) must be free when it asks
        owed = self._owed(self.live)
        while self.idle and self.cache.pages_free < owed:
            self._evict(next(iter(self.idle)))                       # the least recently used

    def _park(self, r: Request):
        """Keep r's sequence for later prompts (what it cached: its prompt, then its answer)."""
        self.idle[r.state] = np.asarray((r.prompt + r.out)[:r.state.length], np.int64)
        while len(self.idle) > self.max_idle:
            self._evict(next(iter(self.idle)))

    def _evict(self, st):
        del self.idle[st]
        self.cache.free(st)

    # ------------------------------------------------------------ the loop
    def _loop(self):
        while True:
            with self.cond:
                while not (self._stopping or self.live or self.waiting):
                    self.cond.wait()
                if self._stopping:
                    break
            try:
                with self.cond:
                    for r in [r for r in self.waiting if r.cancelled]:
                        self.waiting.remove(r)
                        self._finish(r, "cancelled")
                    self._admit()
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
            while self.idle:                # the cache goes back whole (the LLM may serve again)
                self._evict(next(iter(self.idle)))

    def _admit(self):
        """Move waiting requests into the batch (fairly: _next) while the batch and the cache have
        room. A request that does not fit waits, and the ones behind it too (no overtaking by
        smaller ones, so a large request is never starved)."""
        slots, budget = self._room()
        running = self._running_per_group()
        while self.waiting and slots > 0:
            r = self._next(self.waiting, running)
            if r.reserve > budget:
                break
            self.waiting.remove(r)
            slots, budget = slots - 1, budget - r.reserve
            running[r.group] = running.get(r.group, 0) + 1
            self.live.append(r)
            try:
                self._adopt(r)
                r.stream = TokenStream(self.llm.tokenizer, r.eos, r.stop, r.max_tokens, r.parser,
                                       tools="valid" if r.tools else "none")
            except Exception as e:
                log.error("request %s failed: %s: %s", r.id, type(e).__name__, e)
                self._finish(r, "error")
        if self.waiting and not self.live and self._next(self.waiting, {}).reserve > self._room()[1]:
            r = self._next(self.waiting, {})     # nothing running will free pages: it would wait forever
            self.waiting.remove(r)
            log.error("request %s needs %d cache pages, only %d are free", r.id, r.reserve, self._room()[1])
            self._finish(r, "error")

    def _step(self):
        """One prefill chunk of the oldest new request, then one decode step for all the others.
        Short prompt remainders (<= mix_prompt tokens) ride in the decode step instead, one
        token a step, whenever that step has other rows: a burst of short requests then runs
        in lockstep, and no step reads every weight for one short prefill alone."""
        feeding = [r for r in self.live if r.fed < len(r.prompt)]
        mixed = []
        if len(feeding) < len(self.live) or len(feeding) > 1:
            mixed = [r for r in feeding if len(r.prompt) - r.fed <= self.mix_prompt]
        pre = next((r for r in feeding if r not in mixed), None)
        if pre is not None:    # chunked, so a long prompt delays the running answers one chunk at most
            chunk = pre.prompt[pre.fed:pre.fed + self.llm.prefill_chunk]
            last = pre.fed + len(chunk) == len(pre.prompt)
            logits = self.model.forward(chunk, self.cache, [pre.state], decode=False, last_only=True,
                                        head=last)         # earlier chunks only fill the cache
            pre.fed += len(chunk)
            if pre.fed == len(pre.prompt):
                self._emit(pre, logits[-1])
        batch = [r for r in self.live if r.fed == len(r.prompt)] + mixed
        if not batch:
            return
        # tokens [B], one per sequence: each weight is read once for the whole batch
        tokens = [r.next_token if r.fed == len(r.prompt) else r.prompt[r.fed] for r in batch]
        # logits only where a token is sampled: answers, and the last token of a prompt
        rows = [i for i, r in enumerate(batch) if r.fed >= len(r.prompt) - 1]
        t0 = time.perf_counter()
        logits = self.model.forward(tokens, self.cache, [r.state for r in batch], decode=True,
                                    rows=rows, head=bool(rows))
        self.metrics.decode_step(len(batch), time.perf_counter() - t0)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        for r in batch:
            r.fed = min(r.fed + 1, len(r.prompt))
        for i, z in zip(rows, logits if rows else []):
            self._emit(batch[i], z)

    def _emit(self, r: Request, logits):
        """Sample r's next token and account it; a failure here fails r alone."""
        try:
            self._account(r, self._sample(r, logits))
        except Exception as e:
            log.error("request %s failed: %s: %s", r.id, type(e).__name__, e)
            self._finish(r, "error")

    def _sample(self, r: Request, logits) -> int:
        if r.bias is not None or (r.out and (r.presence or r.frequency)):
            logits = np.array(logits, np.float32)
            if r.bias is not None:
                logits[r.bias[0]] += r.bias[1]
            if r.out and (r.presence or r.frequency):
                ids, counts = np.unique(np.asarray(r.out), return_counts=True)
                logits[ids] -= r.frequency * counts + r.presence
        return int(r.sampler(logits))

    # ------------------------------------------------------------ output
    def _account(self, r: Request, t: int):
        """One sampled token through r's TokenStream (eos, stop strings, max_tokens, parsing): its
        deltas go to the client; the request ends when the stream does."""
        now = time.monotonic()
        self.metrics.token(now - (r.last_token or r.submitted), first=not r.last_token, counted=t not in r.eos)
        r.last_token = now
        r.next_token = t
        for d in r.stream.feed(t):
            r.events.put((r, "delta", d))
        if r.stream.done:
            self._finish(r, r.stream.finish_reason)

    def _finish(self, r: Request, reason: str):
        """End a request (reason: the stream's "stop" / "length" / "tool_calls", or "cancelled",
        "error", "shutdown"): its "end" (or "error") event, then its pages: parked for later
        prompts, or freed (last, so that a failure before it frees them instead)."""
        if r in self.live:
            self.live.remove(r)
        r.finish_reason = reason
        if reason in ("error", "shutdown"):
            r.events.put((r, "error", reason))
        else:
            self.cancelled += reason == "cancelled"
            r.events.put((r, "end", None))
        if r.state is not None and not r.state.closed and r.state not in self.idle:
            if reason in ("stop", "length", "tool_calls", "cancelled") and r.state.length:
                self._park(r)
            else:                       # an error may have left the cache half-written
                self.cache.free(r.state)
