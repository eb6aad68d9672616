"""Token sampling: temperature -> top-k -> top-p -> min-p, vectorised numpy.

The chain follows llama.cpp's samplers, applied in the order k2lite decided on:

    logits f32 [B, V] --/T--> top-k --> top-p --> min-p --> renormalise --> draw with rng

  temperature  0 means greedy (argmax, ties to the lowest id); otherwise logits / T. Below
               GREEDY_BELOW it is greedy too: logits / 1e-320 overflow to inf and inf - inf is
               NaN, and the distribution is a point mass on the argmax long before that.
  top_k        keep the k most likely tokens (k <= 0 or k >= V: off). Exactly k survive (which of
               several tokens tied at the boundary is not specified, as in llama.cpp).
  top_p        keep the smallest most-likely prefix whose probability reaches p (p >= 1: off);
               at least one token always survives.
  min_p        keep tokens with prob >= min_p * (largest prob) (min_p <= 0: off). The ratio does
               not change under renormalisation, so where it sits after top-p does not matter.

Each filter sees the distribution left by the one before (renormalised), as in llama.cpp.
Draws use one `np.random.Generator` per Sampler, so a seed fixes every token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _as_2d(logits) -> tuple:
    x = np.asarray(logits, np.float32)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"logits must be [V] or [B, V] with V > 0, got shape {x.shape}")
    return (x[None] if x.ndim == 1 else x), x.ndim == 1


NUCLEUS_TRY = 1024
GREEDY_BELOW = 1e-6


def _best(z, k):
    """(ids, logits) of the k largest logits per row, in descending order: [B, k] each."""
    if k < z.shape[1]:
        cand = np.argpartition(-z, k - 1, axis=-1)[:, :k]               # [B, k] unsorted
        o = np.argsort(-np.take_along_axis(z, cand, -1), axis=-1, kind="stable")
        order = np.take_along_axis(cand, o, -1)
    else:
        order = np.argsort(-z, axis=-1, kind="stable")
    return order, np.take_along_axis(z, order, -1)


def filter_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The final sampling distribution, f64 [B, V] (or [V]); zeros where a filter cut a token."""
    x, squeeze = _as_2d(logits)
    B, V = x.shape
    if temperature < GREEDY_BELOW:                              # greedy: all mass on the argmax
        p = np.zeros((B, V))
        p[np.arange(B), np.argmax(x, axis=-1)] = 1.0
        return p[0] if squeeze else p
    z = x.astype(np.float64) / float(temperature)
    if int(top_k) <= 0 and top_p >= 1.0:      # no ordering needed (K2's defaults): skip the sort
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if min_p > 0.0:
            p = np.where(p >= min_p * p.max(-1, keepdims=True), p, 0.0)
            p /= p.sum(-1, keepdims=True)
        return p[0] if squeeze else p
    # Candidates sorted by descending logit. With top-k on, only the k best are sorted
    # (argpartition first): O(V) instead of O(V log V). Top-p alone tries the best NUCLEUS_TRY
    # first: when they hold mass >= p every cut token lies outside them, so that is exact.
    k = int(top_k) if 0 < int(top_k) < V else V
    if k == V and top_p < 1.0 and V > 4 * NUCLEUS_TRY:
        order, zs = _best(z, NUCLEUS_TRY)
        zmax = zs[:, :1]
        ps = np.exp(zs - zmax) / np.exp(z - zmax).sum(-1, keepdims=True)   # true probabilities
        if (ps.sum(-1) < top_p).any():
            order, zs = _best(z, V)
            ps = np.exp(zs - zs[:, :1])
            ps /= ps.sum(-1, keepdims=True)
    else:
        order, zs = _best(z, k)
        ps = np.exp(zs - zs[:, :1])
        ps /= ps.sum(-1, keepdims=True)
    keep = np.ones_like(ps, bool)
    if top_p < 1.0:
        before = np.cumsum(ps, -1) - ps          # mass strictly before each token
        keep &= before < top_p                   # includes the token that crosses p
        keep[:, 0] = True
        ps = np.where(keep, ps, 0.0)
        ps /= ps.sum(-1, keepdims=True)
    if min_p > 0.0:
        keep &= ps >= min_p * ps[:, :1]
        ps = np.where(keep, ps, 0.0)
        ps /= ps.sum(-1, keepdims=True)
    p = np.zeros((B, V))
    np.put_along_axis(p, order, ps, -1)
    return p[0] if squeeze else p


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rng=None):
    """Draw one token id per row: int for [V] logits, int64 [B] for [B, V]."""
    x, squeeze = _as_2d(logits)
    if temperature < GREEDY_BELOW:
        ids = np.argmax(x, axis=-1)
    else:
        rng = rng if rng is not None else np.random.default_rng()
        p = filter_probs(x, temperature, top_k, top_p, min_p)
        cdf = np.cumsum(p, -1)
        u = rng.random(len(x)) * cdf[:, -1]
        # First index whose cdf exceeds u; zero-probability ids can never be chosen.
        ids = np.minimum((cdf <= u[:, None]).sum(-1), x.shape[1] - 1)
    return int(ids[0]) if squeeze else ids.astype(np.int64)


@dataclass
class Sampler:
    """Sampling settings plus the seeded generator: `sampler(logits) -> id`."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits):
        return sample(logits, self.temperature, self.top_k, self.top_p, self.min_p, self.rng)
