"""`GET /metrics` of `k2lite serve`: counters and histograms in Prometheus' text format (0.0.4).

No client library: a handful of counters the scheduler thread and the HTTP side bump under one
lock, rendered on each scrape together with gauges read from the scheduler at that moment.
Names are prefixed `k2lite_`; times are seconds.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
RATE_WINDOW = 10.0      # seconds of decode steps behind k2lite_decode_tokens_per_second


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum = tuple(buckets), [0] * (len(buckets) + 1), 0.0

    def observe(self, v: float):
        self.counts[bisect.bisect_left(self.buckets, v)] += 1     # le: v <= bound
        self.sum += v

    def lines(self, name):
        out, total = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else repr(bound)}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = Counter()            # (route, status) -> answers
        self.prompt_tokens = 0               # prompt tokens of admitted requests
        self.cached_tokens = 0               # of those, reused from the prompt cache
        self.cache_hits = 0                  # requests that reused a cached start
        self.generation_tokens = 0
        self.ttft = Histogram()              # submit -> first token
        self.itl = Histogram()               # between two tokens of one answer
        self.steps: deque = deque()          # (end time, sequences, seconds) of recent decode steps

    # hooks --------------------------------------------------------------------------
    def count_request(self, route: str, status: int):
        with self.lock:
            self.requests[route, status] += 1

    def admitted(self, prompt: int, cached: int):
        with self.lock:
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.cache_hits += cached > 0

    def token(self, since: float, first: bool, counted: bool = True):
        with self.lock:
            self.generation_tokens += counted         # an end-of-turn token is no answer token
            (self.ttft if first else self.itl).observe(since)

    def decode_step(self, sequences: int, seconds: float):
        now = time.monotonic()
        with self.lock:
            self.steps.append((now, sequences, seconds))
            while self.steps and self.steps[0][0] < now - RATE_WINDOW:
                self.steps.popleft()

    # rendering -------------------------------------------------------------------------
    def render(self, scheduler) -> str:
        s = scheduler.stats()
        cache = scheduler.cache
        now = time.monotonic()
        with self.lock:
            # speed while decoding (idle time left out), as llama-server's predicted_per_second
            recent = [(n, dt) for t, n, dt in self.steps if t >= now - RATE_WINDOW]
            busy = sum(dt for _, dt in recent)
            rate = sum(n for n, _ in recent) / busy if busy > 0 else 0.0
            out = []

            def metric(name, kind, help_, samples):
                out.extend([f"# HELP k2lite_{name} {help_}", f"# TYPE k2lite_{name} {kind}"])
                out.extend(f"k2lite_{name}{labels} {value!r}" if not isinstance(value, int) else
                           f"k2lite_{name}{labels} {value}" for labels, value in samples)

            metric("requests_total", "counter", "HTTP answers by route and status.",
                   [(f'{{route="{r}",status="{st}"}}', n) for (r, st), n in sorted(self.requests.items())])
            metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
                   [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            metric("prompt_cache_hits_total", "counter", "Requests that reused a cached prompt start.",
                   [("", self.cache_hits)])
            metric("prompt_cache_hit_tokens_total", "counter", "Prompt tokens served from the prompt cache.",
                   [("", self.cached_tokens)])
            for name, h, what in (("time_to_first_token_seconds", self.ttft, "Submit to first token."),
                                  ("inter_token_latency_seconds", self.itl, "Time between two tokens of one answer.")):
                out.extend([f"# HELP k2lite_{name} {what}", f"# TYPE k2lite_{name} histogram"])
                out.extend(h.lines(f"k2lite_{name}"))
        used = cache.max_pages - s["pages_free"] - s["pages_cached"]
        metric("requests_running", "gauge", "Requests in the batch (prefilling or decoding).", [("", s["live"])])
        metric("requests_waiting", "gauge", "Requests queued for a batch slot or cache pages.", [("", s["waiting"])])
        metric("requests_cancelled_total", "counter", "Requests whose client went away.", [("", s["cancelled"])])
        metric("decode_steps_total", "counter", "Batched decode steps run.", [("", s["steps"])])
        metric("kv_pages", "gauge", "KV cache pages: used by requests, cached prompts, free.",
               [('{state="used"}', used), ('{state="cached"}', s["pages_cached"]), ('{state="free"}', s["pages_free"])])
        metric("kv_page_tokens", "gauge", "Tokens per KV cache page.", [("", cache.page_size)])
        metric("decode_tokens_per_second", "gauge",
               f"Tokens per second of the batched decode steps of the last {RATE_WINDOW:g} s (time decoding only).",
               [("", float(rate))])
        return "\n".join(out) + "\n"
