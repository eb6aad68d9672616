"""Sampler: each filter against a hand-worked distribution, their composition, seeds, batches."""
import numpy as np
import pytest

from k2lite.sampler import Sampler, filter_probs, sample

P4 = np.array([0.5, 0.3, 0.15, 0.05])
L4 = np.log(P4).astype(np.float32)     # logits whose softmax is P4


def kept(p):
    return np.flatnonzero(p > 0).tolist()


def test_greedy_is_argmax_and_ignores_rng():
    x = np.array([0.1, 3.0, -1.0, 3.0], np.float32)
    assert sample(x, temperature=0) == 1                      # ties go to the lower id
    assert Sampler(temperature=0, seed=1)(x) == Sampler(temperature=0, seed=2)(x) == 1
    np.testing.assert_array_equal(filter_probs(x, 0), [0, 1, 0, 0])


def test_temperature_scales_logits():
    x = np.array([1.0, 2.0, 0.5], np.float32)
    want = np.exp(x / 2) / np.exp(x / 2).sum()
    np.testing.assert_allclose(filter_probs(x, 2.0), want, rtol=1e-6)


@pytest.mark.parametrize("k,ids", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (0, [0, 1, 2, 3]), (9, [0, 1, 2, 3])])
def test_top_k(k, ids):
    p = filter_probs(L4, 1.0, top_k=k)
    assert kept(p) == ids
    np.testing.assert_allclose(p[ids], P4[ids] / P4[ids].sum())


def test_top_k_exactly_k_on_ties():
    assert len(kept(filter_probs(np.zeros(6, np.float32), 1.0, top_k=2))) == 2


@pytest.mark.parametrize("p,ids", [(0.5, [0]), (0.7, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]),
                                   (1.0, [0, 1, 2, 3]), (1e-9, [0])])
def test_top_p_keeps_the_token_that_crosses_p(p, ids):
    assert kept(filter_probs(L4, 1.0, top_p=p)) == ids


@pytest.mark.parametrize("m,ids", [(0.0, [0, 1, 2, 3]), (0.09, [0, 1, 2, 3]), (0.2, [0, 1, 2]),
                                   (0.5, [0, 1]), (1.0, [0])])
def test_min_p_relative_to_the_top_token(m, ids):
    assert kept(filter_probs(L4, 1.0, min_p=m)) == ids


def test_filters_compose_on_renormalised_mass():
    # top-k 2 leaves [0.625, 0.375]; top-p 0.6 on that keeps one token, on the raw four two.
    assert kept(filter_probs(L4, 1.0, top_p=0.6)) == [0, 1]
    assert kept(filter_probs(L4, 1.0, top_k=2, top_p=0.6)) == [0]
    # temperature first: T=4 flattens to ~[.31,.27,.23,.18], so top-p 0.5 now needs two tokens
    assert kept(filter_probs(L4, 4.0, top_p=0.5)) == [0, 1]
    assert kept(filter_probs(L4, 1.0, top_p=0.9, min_p=0.35)) == [0, 1]


def test_draws_follow_the_filtered_distribution():
    rng = np.random.default_rng(0)
    x = np.tile(L4, (40000, 1))
    ids = sample(x, 1.0, top_k=3, rng=rng)
    freq = np.bincount(ids, minlength=4) / len(ids)
    np.testing.assert_allclose(freq, filter_probs(L4, 1.0, top_k=3), atol=0.01)
    assert freq[3] == 0


def test_seed_fixes_the_sequence():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    a, b, c = Sampler(seed=7), Sampler(seed=7), Sampler(seed=8)
    ra, rb, rc = ([s(x) for _ in range(30)] for s in (a, b, c))
    assert ra == rb and ra != rc


def test_batched_rows_are_independent():
    x = np.stack([L4, L4[::-1]])
    assert sample(x, 0).tolist() == [0, 3]
    p = filter_probs(x, 1.0, top_k=1)
    assert kept(p[0]) == [0] and kept(p[1]) == [3]


def test_large_vocab_top_k_path_matches_full_sort():
    x = np.random.default_rng(2).standard_normal(163840).astype(np.float32)
    a = filter_probs(x, 0.7, top_k=50, top_p=0.9, min_p=0.05)
    b = filter_probs(x, 0.7, top_k=0, top_p=1.0)
    top = np.argsort(-x)[:50]
    assert set(kept(a)) <= set(top.tolist())
    assert abs(a.sum() - 1) < 1e-9 and np.argmax(a) == np.argmax(b)


@pytest.mark.parametrize("peaked", [True, False])
def test_top_p_shortcut_equals_the_full_sort(peaked, monkeypatch):
    import k2lite.sampler as S
    x = np.random.default_rng(3).standard_normal((2, 20000)).astype(np.float32) * (8.0 if peaked else 0.5)
    fast = filter_probs(x, 1.0, top_p=0.9, min_p=0.001)
    monkeypatch.setattr(S, "NUCLEUS_TRY", 10**9)                   # force the full sort
    np.testing.assert_allclose(fast, filter_probs(x, 1.0, top_p=0.9, min_p=0.001), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": -0.1},
                                {"top_k": -1}])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError):
        Sampler(**kw)
