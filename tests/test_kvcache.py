"""Paged latent cache: pages across boundaries, several sequences, reuse after free, full."""
import numpy as np
import pytest

import k2lite
from k2lite.kvcache import CacheFullError, PagedKVCache


def test_write_gather_across_pages_and_sequences():
    cache = PagedKVCache(n_layers=2, width=5, page_size=4, max_pages=64, initial_pages=1)
    rng = np.random.default_rng(0)
    seqs = [cache.new_seq() for _ in range(3)]
    want = [np.zeros((0, 5), np.float32) for _ in seqs]
    for step in range(20):
        for i, s in enumerate(seqs):
            n = 1 + (step + i) % 3
            rows = rng.standard_normal((n, 5)).astype(np.float32)
            pos = s.length + np.arange(n)
            cache.reserve([s], pos)
            for layer in range(2):
                cache.write(layer, [s], pos, rows + layer)
            cache.advance([s], pos)
            want[i] = np.concatenate([want[i], rows])
    for i, s in enumerate(seqs):
        assert s.length == len(want[i])
        for layer in range(2):
            assert (cache.gather(layer, s, s.length) == want[i] + layer).all()
    # batched decode writes: one row per sequence
    rows = rng.standard_normal((3, 5)).astype(np.float32)
    pos = np.array([s.length for s in seqs])
    cache.reserve(seqs, pos)
    cache.write(0, seqs, pos, rows)
    table, lengths = cache.page_table(seqs)
    assert (lengths == pos + 1).all()
    for b, s in enumerate(seqs):
        p = int(pos[b])
        assert (cache.pool[0, table[b, p // 4], p % 4] == rows[b]).all()


def test_free_returns_pages_and_full_cache_raises():
    cache = PagedKVCache(n_layers=1, width=2, page_size=8, max_pages=4, initial_pages=2)
    a = cache.new_seq()
    cache.reserve([a], np.arange(30))           # 4 pages
    assert cache.pages_free == 0
    b = cache.new_seq()
    with pytest.raises(CacheFullError):
        cache.reserve([b], np.arange(1))
    cache.free(a)
    assert cache.pages_free == 4
    cache.reserve([b], np.arange(9))
    assert len(b.pages) == 2


def test_sequences_close_and_context_limit(tiny_model):
    llm = k2lite.load(tiny_model, device="ref", context=40, page_size=8)
    total = llm.cache.pages_free
    with llm.sequence() as s:
        s.append(list(range(30)))
        assert llm.cache.pages_free == total - 4
        with pytest.raises(ValueError, match="context"):
            s.append(list(range(20)))
    assert llm.cache.pages_free == total
    with pytest.raises(ValueError, match="out of range"):
        llm.logits([1, 10**6])


def test_last_only_prefill_matches_full_logits(tiny_model):
    llm = k2lite.load(tiny_model, device="ref", prefill_chunk=7)
    ids = list(range(3, 40))
    full = llm.logits(ids)
    with llm.sequence() as s:
        last = s.append(ids, last_only=True)
        assert last.shape == (1, llm.config.vocab_size)
        assert np.abs(last[0] - full[-1]).max() < 1e-5
        assert len(s) == len(ids)
