"""The numpy specification of every k2lite op: plain, slow, and the oracle for the kernels.

Each function here has a twin with the same name and signature in every native backend
(`k2lite/backends/cpu.py` and `k2lite/backends/cuda.py` over their native modules); `ops.py` picks
one backend and falls back to these. All arithmetic is float32, as in the reference PyTorch
implementations run in float32; BF16 weights are uint16 bit arrays (see formats.py).

Dimension letters: T tokens, S keys, D hidden, N outputs, I inputs, H heads,
C latent (kv_lora_rank), R rope dims, E experts, K experts per token, B sequences, P pages.
"""
from __future__ import annotations

import numpy as np

from .formats import (Fp8Tensor, TiledBF16, bf16_to_f32, dequantize_fp8, dequantize_int4_arrays,
                      tiled_bf16_shape, to_dense, untile_bf16)
from .kvcache import kv8_dequantize


# ---------------------------------------------------------------- linear layers
def bf16_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y[T,N] = x[T,I] · w[N,I]ᵀ with w as bf16 bits."""
    return x @ bf16_to_f32(w).T


def bf16_tiled_matmul(x: np.ndarray, data: np.ndarray, n: int) -> np.ndarray:
    """bf16_matmul with w in TiledBF16's layout, data[N/16, I/32, 16, 32] (padded), N = n."""
    want = tiled_bf16_shape((n, x.shape[1]))
    if data.shape != want:
        raise ValueError(f"data: expected shape {want} for N={n}, I={x.shape[1]}, got {data.shape}")
    return bf16_matmul(x, untile_bf16(TiledBF16(data, (n, x.shape[1]))))


def int4_matmul(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """y[T,N] = x[T,I] · W[N,I]ᵀ, W = (codes - 8) * scale[n, i // group_size] (rounded to
    bf16 when the scales are bf16, as compressed-tensors dequantizes)."""
    return x @ dequantize_int4_arrays(packed, scales, x.shape[1], group_size).T


def fp8_matmul(x: np.ndarray, weight: np.ndarray, scale_inv: np.ndarray, block: tuple) -> np.ndarray:
    """y[T,N] = x[T,I] · W[N,I]ᵀ, W = e4m3(weight) * scale_inv[n // bo, i // bi]."""
    t = Fp8Tensor(weight, scale_inv, weight.shape, tuple(block))
    return x @ dequantize_fp8(t).T


def f32_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x @ np.asarray(w, np.float32).T


# ---------------------------------------------------------------- elementwise
def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x²) + eps) * w, in float32."""
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))).astype(np.float32) * w


def cache_dtype():
    """What the latent cache stores: float32 here, exactly what was computed. A backend whose
    BF16 matmuls take bf16 activations stores bf16 (half the memory and decode reads), so that
    the prefill form (kv_b applied to the cached latent) and the absorbed decode form see the
    same latent."""
    return np.float32


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs (2i, 2i+1) of x[T,H,R] by angle positions[t]·inv_freq[i].
    This is DeepSeek's complex multiply on the weights' native pair order (docs/architecture.md#rope-pairs)."""
    theta = positions.astype(np.float32)[:, None] * inv_freq[None, :]      # [T, R/2] fp32 angles
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]         # [T, 1, R/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out


# ---------------------------------------------------------------- mixture of experts
def swiglu(x: np.ndarray, gate, up, down) -> np.ndarray:
    """One expert, down( silu(gate·x) ⊙ (up·x) ) for x[T,D], on the weights dequantized to f32."""
    g, u = x @ to_dense(gate).T, x @ to_dense(up).T
    return (silu(g) * u) @ to_dense(down).T


def moe(x: np.ndarray, experts: list, idx: np.ndarray, weights: np.ndarray, expert_fn=swiglu) -> np.ndarray:
    """Routed-expert sum Σ_k weights[t,k] · expert_fn(x[t], *experts[idx[t,k]]) for x[T,D].
    experts[e] = (gate_proj, up_proj, down_proj). ops.py passes its own swiglu_expert (the
    backend's matmuls, picked by weight format in ops.linear, the one place that happens).
    Tokens are grouped per expert so each chosen expert's weights are read once for the batch."""
    out = np.zeros_like(x)
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=len(experts))
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok, k = np.divmod(sel, idx.shape[1])
        y = expert_fn(x[tok], *experts[e])
        np.add.at(out, tok, weights[tok, k][:, None] * y)
    return out


# ---------------------------------------------------------------- attention
def softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, q_offset: int) -> np.ndarray:
    """Causal multi-head attention, expanded form: q[T,H,Dk], k[S,H,Dk], v[S,H,Dv] -> [T,H,Dv].
    Query t sits at position q_offset + t and sees keys 0..q_offset+t. Softmax in fp32."""
    T, S = q.shape[0], k.shape[0]
    scores = np.einsum("thd,shd->hts", q, k) * np.float32(scale)            # [H, T, S]
    future = np.arange(S)[None, :] > (q_offset + np.arange(T))[:, None]     # [T, S]
    scores = np.where(future[None], -np.inf, scores)
    return np.einsum("hts,shd->thd", softmax(scores), v).astype(np.float32)


def attention_partial(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, q_offset: int,
                      prev=None) -> tuple:
    """attention() over one block of keys (key s at position s; query t at q_offset + t, which
    may be negative: a block past some queries), also returning each query's log-sum-exp of the
    scaled scores, lse[T,H] (-inf where it sees no key). prev = (out, lse) of the other blocks of
    the same queries: the result is then over all of them (online softmax). A long history is
    attended block by block this way, its per-head keys and values never all held at once."""
    T, S = q.shape[0], k.shape[0]
    scores = np.einsum("thd,shd->hts", q, k) * np.float32(scale)            # [H, T, S]
    future = np.arange(S)[None, :] > (q_offset + np.arange(T))[:, None]     # [T, S]
    scores = np.where(future[None], -np.inf, scores)
    mx = scores.max(axis=-1, initial=-np.inf)                               # [H, T]
    p = np.exp(scores - np.where(np.isfinite(mx), mx, 0)[..., None])
    l = p.sum(-1)
    out = np.einsum("hts,shd->thd", p / np.where(l > 0, l, 1)[..., None], v).astype(np.float32)
    with np.errstate(divide="ignore"):
        lse = (mx + np.log(l)).T.astype(np.float32)                         # [T, H]
    if prev is not None:
        po, pl = prev
        m = np.maximum(pl, lse)
        m = np.where(np.isfinite(m), m, 0)
        a, b = np.exp(pl - m), np.exp(lse - m)
        out = ((po * a[..., None] + out * b[..., None]) / np.where(a + b > 0, a + b, 1)[..., None]).astype(np.float32)
        with np.errstate(divide="ignore"):
            lse = (m + np.log(a + b)).astype(np.float32)
    return out, lse


def mla_attention_partial(q: np.ndarray, kv: np.ndarray, k_pe: np.ndarray, scale: float, q_offset: int,
                          prev=None) -> tuple:
    """MLA's expanded form over one block of the history: q[T,H,N+R], kv[S,H,N+V] (kv_b over the
    cached latent: per head N key dims, then V value dims), k_pe[S,R] (the rotated rope key,
    shared by the heads). attention_partial with k = kv[..., :N] | k_pe, v = kv[..., N:]."""
    S, H = kv.shape[:2]
    N = q.shape[2] - k_pe.shape[1]
    k = np.concatenate([kv[..., :N], np.broadcast_to(k_pe[:, None, :], (S, H, k_pe.shape[1]))], -1)
    return attention_partial(q, k, kv[..., N:], scale, q_offset, prev)


def mla_absorb_q(q_nope: np.ndarray, kv_b) -> np.ndarray:
    """Fold W_UK into the query (absorbed MLA): q_nope[B,H,N], kv_b = kv_b_proj [H*(N+V), C]
    (bf16 bits or float32; per head N rows of W_UK then V rows of W_UV) -> q_latent[B,H,C]."""
    B, H, N = q_nope.shape
    w = to_dense(kv_b).reshape(H, -1, kv_b.shape[1])
    return np.einsum("bhn,hnc->bhc", q_nope, w[:, :N]).astype(np.float32)


def mla_absorb_o(u: np.ndarray, kv_b, N: int) -> np.ndarray:
    """Apply W_UV to the attended latent: u[B,H,C] -> o[B,H,V], kv_b as in mla_absorb_q."""
    B, H, C = u.shape
    w = to_dense(kv_b).reshape(H, -1, C)
    return np.einsum("bhc,hvc->bhv", u, w[:, N:]).astype(np.float32)


def mla_decode(q_latent: np.ndarray, q_pe: np.ndarray, pool: np.ndarray, page_table: np.ndarray,
               lengths: np.ndarray, scale: float) -> np.ndarray:
    """Absorbed MLA decode for B sequences, one new query each, over the paged latent cache.
    q_latent[B,H,C] (q_nope already folded through W_UK), q_pe[B,H,R] (rotated),
    pool[P, page, C+R] one layer's pages (latent c then rotated k_pe per token; float32, or
    uint16 bf16 bits for a bf16 cache; int8 [P, page, kvcache.kv8_row_bytes(C+R)] rows),
    page_table[B, maxpages] page ids, lengths[B] tokens cached (the new one included).
    Returns u[B,H,C] = Σ_t softmax_t(scale·(q_latent·c_t + q_pe·k_pe_t)) · c_t (zeros for an
    empty sequence)."""
    B, H, C = q_latent.shape
    page = pool.shape[1]
    out = np.zeros((B, H, C), np.float32)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        pages = page_table[b, :(n + page - 1) // page]
        kv = pool[pages].reshape(-1, pool.shape[2])[:n]                      # [S, C+R]
        if kv.dtype == np.int8:
            kv = kv8_dequantize(kv, C, C + q_pe.shape[2])
        kv = bf16_to_f32(kv) if kv.dtype == np.uint16 else kv
        c, k_pe = kv[:, :C], kv[:, C:]
        scores = (q_latent[b] @ c.T + q_pe[b] @ k_pe.T) * np.float32(scale)  # [H, S]
        out[b] = softmax(scores) @ c
    return out
