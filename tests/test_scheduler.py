"""The scheduler's step policy: short prompts ride in the batched decode step (lockstep bursts)."""
import numpy as np
import pytest

import k2lite
from k2lite.sampler import Sampler
from k2lite.serve.scheduler import Request, Scheduler


def burst(llm, prompts, max_tokens, mix_prompt):
    sched = Scheduler(llm, max_batch=8)
    sched.mix_prompt = mix_prompt
    page = llm.cache.page_size
    reqs = [Request(list(p), Sampler(temperature=0.0), max_tokens, [], set(), None,
                    reserve=-(-(len(p) + max_tokens) // page)) for p in prompts]
    sched.submit(reqs)                  # all admitted together at the first step
    sched.start()
    try:
        for r in reqs:
            while r.events.get(timeout=60)[1] not in ("end", "error"):
                pass
    finally:
        sched.stop()
    assert [r.finish_reason for r in reqs] == ["length"] * len(reqs)
    st = sched.stats()
    assert st["pages_free"] + st["pages_cached"] == llm.cache.max_pages
    return reqs, sched.steps


@pytest.mark.parametrize("device", ["ref", "cpu"])
def test_short_prompts_run_in_lockstep(tiny_model, device):
    if device == "cpu" and not k2lite.ops.available("cpu"):
        pytest.skip("native kernels not built")
    llm = k2lite.load(tiny_model, device=device, threads=1, context=256)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, llm.config.vocab_size, n).tolist() for n in (5, 5, 3, 9)]
    mixed, steps = burst(llm, prompts, 6, mix_prompt=16)
    # one step per prompt token (the last one's logits give the first answer token), then one
    # per further answer token; the longest prompt sets the pace
    assert steps == max(len(p) for p in prompts) + 6 - 1
    chunked, _ = burst(llm, prompts, 6, mix_prompt=0)      # one prefill chunk per request
    for r, c, p in zip(mixed, chunked, prompts):
        alone = llm.generate(p, max_tokens=6, temperature=0)
        assert r.out == c.out == alone.token_ids


def test_a_lone_request_is_still_prefilled_in_one_chunk(tiny_model):
    llm = k2lite.load(tiny_model, device="ref", context=256)
    (r,), steps = burst(llm, [[5, 6, 7, 8, 9, 10]], 3, mix_prompt=16)
    assert steps == 2               # the prefill chunk gives token 1, two decode steps tokens 2 and 3
