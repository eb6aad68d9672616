"""Kimi K2 (DeepSeek-V3 architecture) forward pass in numpy: the file to read first.

What differs from a textbook pre-norm transformer:
  * MLA attention: keys and values are compressed into one 512-wide latent c (plus a 64-wide
    rotary key k_pe shared by all heads), and only that is cached: 576 numbers per token and
    layer instead of 64 heads × (192 + 128). Prefill expands c back to per-head k/v with
    kv_b_proj; decode instead folds kv_b_proj into the query and the output ("absorbed"), so
    it attends over the latent directly (docs/architecture.md#mla-expanded, #mla-absorbed).
  * YaRN RoPE on the 64 rotary dims only, in DeepSeek's interleaved pair order, and a softmax
    scale multiplied by YaRN's mscale² (0.1447 for K2, not 1/sqrt(192)).
  * Mixture of experts: a sigmoid router picks top-k of 384 experts with a bias that is used
    only for the choice, weights them by the unbiased scores (normalised, × 2.827) and adds
    one always-on shared expert. The first `first_k_dense_replace` layers are dense.
  * Routed experts may be INT4 (compressed-tensors pack-quantized); that is a weight data type
    handled by ops.linear / ops.moe, and this file never branches on it.

Dimension letters: T tokens, B sequences, D hidden, H heads, C latent (kv_lora_rank),
R rope dims, N nope dims, V value dims, E experts, K experts per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import ops as _ops
from .config import Config
from .kvcache import PagedKVCache


# ---------------------------------------------------------------- weights
@dataclass
class Attention:
    q_a_proj: object            # [q_lora, D]      (None when q_lora_rank is None)
    q_a_layernorm: np.ndarray   # f32 [q_lora]
    q_b_proj: object            # [H*(N+R), q_lora]
    q_proj: object              # [H*(N+R), D]     (only when q_lora_rank is None)
    kv_a_proj_with_mqa: object  # [C+R, D]
    kv_a_layernorm: np.ndarray  # f32 [C]
    kv_b_proj: object           # [H*(N+V), C]
    o_proj: object              # [D, H*V]
    kv_b_f32: Optional[np.ndarray] = None  # f32 copy for the absorbed decode, FP8/INT4 kv_b only


@dataclass
class MLP:
    gate_proj: object           # [F, D]
    up_proj: object             # [F, D]
    down_proj: object           # [D, F]


@dataclass
class MoE:
    gate: object                # router [E, D]
    e_score_correction_bias: np.ndarray  # f32 [E], used only to choose experts
    experts: list               # E × (gate_proj [F, D], up_proj [F, D], down_proj [D, F])
    shared_experts: Optional[MLP]


@dataclass
class Layer:
    input_layernorm: np.ndarray           # f32 [D]
    self_attn: Attention
    post_attention_layernorm: np.ndarray  # f32 [D]
    mlp: object                           # MLP (dense layers) or MoE


@dataclass
class Weights:
    embed_tokens: np.ndarray    # bf16 bits [vocab, D]
    layers: list                # [Layer] × num_hidden_layers
    norm: np.ndarray            # f32 [D]
    lm_head: object             # [vocab, D]


# ---------------------------------------------------------------- rotary embedding
def yarn_inv_freq(cfg: Config) -> tuple:
    """(inv_freq f32 [R/2], attention_factor) for the rotary dims, as transformers computes them."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq, 1.0
    factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):     # the rotary dim whose wavelength fits `rotations` times
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = (1 - ramp).astype(np.float32)    # 1: keep the original frequency
    inv_freq = (inv_freq / np.float32(factor)) * (1 - extrapolate) + inv_freq * extrapolate

    def mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    att = rs.get("attention_factor")
    if att is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        att = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    return inv_freq.astype(np.float32), float(att)


# ---------------------------------------------------------------- the model
class Model:
    """K2 weights + the op backend; forward() runs a step of one or several sequences."""

    def __init__(self, config: Config, weights: Weights, backend: str | None = None):
        self.config, self.weights = config, weights
        self.ops = _ops.get(backend)
        self.inv_freq, self.rope_factor = yarn_inv_freq(config)
        self.scale = config.softmax_scale

    # ------------------------------------------------------------ attention (MLA)
    def mla(self, layer: int, attn: Attention, x, cache: PagedKVCache, seqs, positions, pages,
            trace: Callable | None):
        """x[T,D] -> [T,D]. Writes this step's latent to the cache, then attends over it.
        pages: (page table, lengths) of a decode step, None for the prefill form."""
        cfg, ops = self.config, self.ops
        H, N, R, C, V = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.kv_lora_rank, cfg.v_head_dim)
        T = x.shape[0]
        if attn.q_a_proj is not None:   # low-rank query: D -> q_lora -> H*(N+R)
            cq = ops.rmsnorm(ops.linear(x, attn.q_a_proj), attn.q_a_layernorm, 1e-6)
            q = ops.linear(cq, attn.q_b_proj)
        else:
            q = ops.linear(x, attn.q_proj)
        q = q.reshape(T, H, N + R)
        q_nope, q_pe = q[..., :N], q[..., N:]
        kv_a = ops.linear(x, attn.kv_a_proj_with_mqa)                       # [T, C+R]
        # q/kv_a_layernorm carry no eps in the checkpoint config: HF uses its default 1e-6
        kv_latent = ops.rmsnorm(np.ascontiguousarray(kv_a[:, :C]), attn.kv_a_layernorm, 1e-6)
        k_pe = kv_a[:, None, C:]                                             # [T, 1, R]
        q_pe = ops.rope(np.ascontiguousarray(q_pe), positions, self.inv_freq) * np.float32(self.rope_factor)
        k_pe = ops.rope(np.ascontiguousarray(k_pe), positions, self.inv_freq) * np.float32(self.rope_factor)
        # the cache keeps the *normalised* latent and the *rotated* rope key
        cache.write(layer, seqs, positions, np.concatenate([kv_latent, k_pe[:, 0]], axis=1))
        if trace:
            trace("q_nope", layer, q_nope); trace("q_pe", layer, q_pe)
            trace("kv_latent", layer, kv_latent); trace("k_pe", layer, k_pe[:, 0])

        if pages is not None:       # decode: B sequences, one query each
            o = self.mla_absorbed(attn, q_nope, q_pe, cache.pool[layer], *pages)
        else:                       # prefill chunk of one sequence: the cheaper form
            seq, S = seqs[0], int(positions[-1]) + 1
            if self.prefill_form(T, S, cache.pool.dtype) == "absorbed":
                table, _ = cache.page_table([seq])
                o = self.mla_absorbed(attn, q_nope, q_pe, cache.pool[layer], np.repeat(table, T, axis=0),
                                      (positions + 1).astype(np.int32))
            else:
                o = self.mla_expanded(attn, q_nope, q_pe, lambda a, b: cache.gather(layer, seq, b, a), S,
                                      int(positions[0]))
                # the chunk's last token through the decode kernel: the two forms round differently
                # (bf16 dot products), and a prompt that comes back (prompt caching, a fixed seed)
                # recomputes only its last token, as a decode step: bit for bit the same logits
                table, _ = cache.page_table([seq])
                o[-1:] = self.mla_absorbed(attn, q_nope[-1:], q_pe[-1:], cache.pool[layer], table,
                                           np.array([S], np.int32))
        if trace:
            trace("attn_heads", layer, o)
        return ops.linear(np.ascontiguousarray(o.reshape(T, H * V)), attn.o_proj)

    def mla_absorbed(self, attn: Attention, q_nope, q_pe, pool, table, lengths):
        """Absorbed form: fold W_UK into each query, attend over the cached latent (mla_decode:
        one query per row of table/lengths, which may be the same sequence at successive
        lengths), then apply W_UV. [B,H,N], [B,H,R] -> [B,H,V]."""
        ops, N = self.ops, self.config.qk_nope_head_dim
        kv_b = attn.kv_b_proj
        if getattr(kv_b, "dtype", None) != np.uint16:      # FP8/INT4: widened once, kept
            if attn.kv_b_f32 is None:
                attn.kv_b_f32 = ops.dense(kv_b)
            kv_b = attn.kv_b_f32
        q_latent = ops.mla_absorb_q(np.ascontiguousarray(q_nope), kv_b)       # [B, H, C]
        u = ops.mla_decode(q_latent, np.ascontiguousarray(q_pe), pool, table, lengths, self.scale)
        return ops.mla_absorb_o(u, kv_b, N)

    # history tokens per block of the expanded form: bounds the per-head keys and values built
    # at once (K2: 4096 x 64 heads x (192 + 128) floats = 335 MB) whatever the context
    PREFILL_BLOCK = 4096

    def mla_expanded(self, attn: Attention, q_nope, q_pe, rows, S: int, q0: int):
        """Expanded form for T queries at positions q0.. over S cached tokens (rows(a, b): the
        cached rows a..b-1, float32): kv_b rebuilds per-head keys and values, a block of
        PREFILL_BLOCK history tokens at a time, and the blocks' partial softmaxes are merged
        (ops.attention_partial). [T,H,N], [T,H,R] -> [T,H,V]."""
        cfg, ops = self.config, self.ops
        H, N, R, C, V = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.kv_lora_rank, cfg.v_head_dim)
        q_full = np.ascontiguousarray(np.concatenate([q_nope, q_pe], axis=-1))
        acc = None
        for b0 in range(0, S, self.PREFILL_BLOCK):
            kv_all = rows(b0, min(S, b0 + self.PREFILL_BLOCK))                # [n, C+R]
            n = kv_all.shape[0]
            kv = ops.linear(np.ascontiguousarray(kv_all[:, :C]), attn.kv_b_proj).reshape(n, H, N + V)
            # keys: kv's N dims per head and the rope key k_pe shared by all heads; values: kv's V
            acc = ops.mla_attention_partial(q_full, kv, np.ascontiguousarray(kv_all[:, C:]), self.scale,
                                            q0 - b0, acc)
        return acc[0]

    # Time per MAC of the expanded form, and of the absorbed one on an int8 cache, relative to
    # the absorbed form on a bf16 cache: measured at K2's shapes, 2 threads, 64-512 queries at
    # depth 0-32K (benchmarks/bench_mla.py --prefill): the absorbed form runs at the dot-product
    # peak on L2-resident blocks of the latent; the expanded one also pays kv_b's output, the
    # key/value transposes and a softmax per head; int8 runs vpdpbusd (64 MACs an instruction).
    # The absorbed form handles each query as a sequence of its own, with a fixed cost per
    # query of about a block of keys (ABSORBED_QUERY_KEYS, at most the history): it loses on
    # short histories.
    EXPANDED_MAC_COST, INT8_MAC_COST, ABSORBED_QUERY_KEYS = 1.9, 0.67, 256

    def prefill_form(self, T: int, S: int, cache_dtype) -> str:
        """"expanded" or "absorbed" for a chunk of T queries (the last T of S cached tokens), by
        MACs over the P (query, key) pairs the causal mask leaves: expanded S·C·H·(N+V) (kv_b
        over the cache, shared by the chunk) + P·H·(N+R+V); absorbed P·H·(2C+R) + T·H·C·(N+V)
        (W_UK into the queries, W_UV after), weighed by their measured time per MAC (above).
        K2, 512-query chunks: expanded at the start of a prompt; at depth, absorbed on an int8
        cache, about even on bf16; smaller chunks at depth take the absorbed form."""
        cfg = self.config
        H, N, R, C, V = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.kv_lora_rank, cfg.v_head_dim)
        P = T * (S - T) + T * (T + 1) // 2
        expanded = (S * C * H * (N + V) + P * H * (N + R + V)) * self.EXPANDED_MAC_COST
        latent = (P + T * min(S, self.ABSORBED_QUERY_KEYS)) * H * (2 * C + R)   # over the cache
        if np.dtype(cache_dtype) == np.int8:
            latent *= self.INT8_MAC_COST
        absorbed = latent + T * H * C * (N + V)                                  # W_UK, W_UV
        return "absorbed" if absorbed < expanded else "expanded"

    # ------------------------------------------------------------ feed-forward
    def mlp(self, m: MLP, x):
        return self.ops.swiglu_expert(x, m.gate_proj, m.up_proj, m.down_proj)

    def route(self, moe: MoE, x):
        """(weights f32 [T,K], indices i32 [T,K]): biased scores choose, unbiased ones weigh."""
        cfg = self.config
        logits = self.ops.linear(x, moe.gate)                                # fp32 [T, E]
        if cfg.scoring_func == "softmax":
            scores = self.ops.softmax(logits)
        else:
            scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + moe.e_score_correction_bias                        # bias: selection only
        if cfg.n_group > 1:   # keep the topk_group groups with the best top-2 sums
            T, E = choice.shape
            g = choice.reshape(T, cfg.n_group, E // cfg.n_group)
            group_score = np.sort(g, axis=-1)[..., -2:].sum(-1)              # [T, n_group]
            keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :cfg.topk_group]
            mask = np.zeros_like(group_score, dtype=bool)
            np.put_along_axis(mask, keep, True, axis=-1)
            choice = np.where(np.repeat(mask, E // cfg.n_group, axis=-1), choice, -np.inf)
        idx = np.argsort(-choice, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
        w = np.take_along_axis(scores, idx, axis=-1)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdims=True) + np.float32(1e-20))
        return (w * np.float32(cfg.routed_scaling_factor)).astype(np.float32), idx.astype(np.int32)

    def moe(self, layer: int, moe: MoE, x, trace):
        weights, idx = self.route(moe, x)
        if trace:
            trace("router_weights", layer, weights); trace("router_idx", layer, idx)
        y = self.ops.moe(x, moe.experts, idx, weights)
        if moe.shared_experts is not None:   # always on, weight 1
            y = y + self.mlp(moe.shared_experts, x)
        return y

    # ------------------------------------------------------------ the whole step
    def forward(self, tokens, cache: PagedKVCache, seqs: list, decode: bool,
                trace: Callable | None = None, last_only: bool = False, head: bool = True, rows=None):
        """Run new tokens through the model; returns logits f32 [T, vocab].
        decode=False: tokens[T] all belong to seqs[0] (prefill or multi-token append).
        decode=True:  tokens[B] is one new token for each of seqs[B].
        last_only: logits of the last token only ([1, vocab]); a prefill for generation needs
        no more, and lm_head over 163840 tokens is the largest matmul of the model.
        head=False: only fill the cache, return None (a prefill chunk before the last one).
        rows: logits of these rows only ([len(rows), vocab]; a batched step's prompt tokens need none)."""
        cfg, ops, w = self.config, self.ops, self.weights
        tokens = np.asarray(tokens, np.int64)
        if decode:
            positions = np.array([s.length for s in seqs], np.int64)
        else:
            positions = seqs[0].length + np.arange(len(tokens), dtype=np.int64)
        cache.reserve(seqs, positions)
        pages = cache.page_table(seqs) if decode else None   # the same for every layer
        x = ops.dense(w.embed_tokens[tokens])                                # [T, D] f32
        for i, layer in enumerate(w.layers):
            h = x + self.mla(i, layer.self_attn, ops.rmsnorm(x, layer.input_layernorm, cfg.rms_norm_eps),
                             cache, seqs, positions, pages, trace)
            hn = ops.rmsnorm(h, layer.post_attention_layernorm, cfg.rms_norm_eps)
            ffn = self.moe(i, layer.mlp, hn, trace) if isinstance(layer.mlp, MoE) else self.mlp(layer.mlp, hn)
            x = h + ffn
            if trace:
                trace("hidden", i, x)
        cache.advance(seqs, positions)
        if not head:
            return None
        x = x[-1:] if last_only else x if rows is None else x[np.asarray(rows, np.int64)]
        return ops.linear(ops.rmsnorm(x, w.norm, cfg.rms_norm_eps), w.lm_head)
