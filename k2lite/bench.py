"""`k2lite bench --depth`: decode (tg) and prefill-chunk (pp) speed with D tokens already in
the cache, where each step costs weights + attention over D rows, and a projection of those
measurements to the full Kimi K2 Thinking.

Synthetic fill. Prefilling 32K real tokens takes many minutes on a small CPU, and attention
costs the same whatever the cached values are, so the cache is filled by a short real prefill
(`SEED_TOKENS` tokens: latents of the model's real scale) whose rows are then tiled to D rows
through the cache API (PagedKVCache.gather / write, so a quantized cache quantizes them as a
real prefill would). The tiled rope keys repeat the seed's positions; that changes the scores,
not the work.

Attribution (for the projection). During the timed steps the model instance is instrumented
(nothing in model.py changes): Model.mla, Model.moe and Model.mlp are timed per layer, and
inside mla the linear() calls on the attention projections (q_a/q_b/q_proj, kv_a, o_proj) and
the absorbed kv_b products (mla_absorb_q/o) count as *weights*; the rest of mla (latent norm,
rope, cache write, the attention kernels, and in the prefill form the kv_b expansion of the
cached latent) counts as *attention*. What is outside every layer (embedding, final norm,
lm_head, Python between layers) is *head*.
"""
from __future__ import annotations

import json
import statistics
import time
import types
from collections import defaultdict

import numpy as np

SEED_TOKENS = 64          # real prefill the synthetic fill is tiled from
FILL_BLOCK = 4096         # rows written per cache.write call (bounds the temporary)


# ---------------------------------------------------------------- synthetic fill
def fill(seq, depth: int, seed: int = 0) -> None:
    """Bring an empty Sequence to `depth` cached tokens: a real prefill of min(depth,
    SEED_TOKENS) random ids, then those rows tiled up to depth through the kvcache API."""
    llm = seq.llm
    if depth <= 0:
        return
    rng = np.random.default_rng(seed)
    n = min(depth, SEED_TOKENS)
    ids = rng.integers(0, llm.config.vocab_size, n)
    seq.append(ids, last_only=True)
    cache, st = llm.cache, seq.state
    rows = [cache.gather(layer, st, n) for layer in range(cache.n_layers)]   # f32 [n, C+R]
    for start in range(n, depth, FILL_BLOCK):
        pos = np.arange(start, min(start + FILL_BLOCK, depth), dtype=np.int64)
        cache.reserve([st], pos)
        for layer in range(cache.n_layers):
            cache.write(layer, [st], pos, rows[layer][pos % n])
        cache.advance([st], pos)
        seq.tokens.extend(int(t) for t in ids[pos % n])


# ---------------------------------------------------------------- per-layer attribution
class Breakdown:
    """Times a Model's layers by part (see the module docstring) while installed:
        with Breakdown(llm.model) as bd: ...;  bd.per_layer() -> {"attn": [...], "weights": [...]}"""

    def __init__(self, model):
        self.model = model
        self.sec = defaultdict(float)      # (part, layer) -> seconds
        self.calls = 0
        self._layer, self._in_ffn = 0, False

    def __enter__(self):
        m, bd = self.model, self
        self._saved_ops = m.ops
        proj = set()
        for layer in m.weights.layers:
            a = layer.self_attn
            proj.update(id(w) for w in (a.q_a_proj, a.q_b_proj, a.q_proj, a.kv_a_proj_with_mqa, a.o_proj)
                        if w is not None)
        ops = types.SimpleNamespace(**vars(m.ops))     # a copy: the shared op table stays as it was

        def weight_op(fn, is_proj=lambda *a: True):
            def run(*a):
                if not is_proj(*a):
                    return fn(*a)
                t = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    bd.sec["proj", bd._layer] += time.perf_counter() - t
            return run

        ops.linear = weight_op(ops.linear, lambda x, w: id(w) in proj)
        ops.mla_absorb_q = weight_op(ops.mla_absorb_q)
        ops.mla_absorb_o = weight_op(ops.mla_absorb_o)
        m.ops = ops
        cls = type(m)

        def mla(layer, *a):
            bd._layer = layer
            t = time.perf_counter()
            try:
                return cls.mla(m, layer, *a)
            finally:
                bd.sec["mla", layer] += time.perf_counter() - t

        def ffn(name):
            def run(*a):
                if bd._in_ffn:                     # the shared expert inside moe
                    return getattr(cls, name)(m, *a)
                bd._in_ffn = True
                t = time.perf_counter()
                try:
                    return getattr(cls, name)(m, *a)
                finally:
                    bd._in_ffn = False
                    bd.sec["ffn", bd._layer] += time.perf_counter() - t
            return run

        m.mla, m.moe, m.mlp = mla, ffn("moe"), ffn("mlp")
        return self

    def __exit__(self, *exc):
        m = self.model
        m.ops = self._saved_ops
        for name in ("mla", "moe", "mlp"):
            m.__dict__.pop(name, None)

    def reset(self):
        self.sec.clear()
        self.calls = 0

    def step(self, total: float):
        """Account one timed call (its wall time, which includes everything outside the layers)."""
        self.sec["total", -1] += total
        self.calls += 1

    def per_layer(self) -> dict:
        """Milliseconds per timed call: attn[layer], weights[layer], head."""
        n = max(self.calls, 1)
        L = len(self.model.weights.layers)
        s = self.sec
        attn = [1e3 * (s["mla", i] - s["proj", i]) / n for i in range(L)]
        weights = [1e3 * (s["proj", i] + s["ffn", i]) / n for i in range(L)]
        head = 1e3 * s["total", -1] / n - sum(attn) - sum(weights)
        return {"attn": attn, "weights": weights, "head": head}


# ---------------------------------------------------------------- measurement
def run_depth(llm, depth: int, n_prompt: int, n_gen: int, repeats: int, meter, seed: int = 0) -> dict:
    """One depth: pp (n_prompt tokens appended at depth, then forgotten) and tg (n_gen greedy
    decode steps from depth), medians over `repeats`, read bandwidth sampled before and after
    each timed run (the larger sample of each pair, median over the runs)."""
    from .info import model_info
    rng = np.random.default_rng(seed + 1)
    V = llm.config.vocab_size
    out, reads = {"depth": depth}, []
    with llm.sequence() as seq:
        fill(seq, depth, seed)                               # not timed
        with Breakdown(llm.model) as bd:
            if n_prompt > 0:
                runs = []
                for _ in range(repeats):
                    ids = rng.integers(0, V, n_prompt)
                    before = meter.sample()
                    t = time.perf_counter()
                    seq.append(ids, last_only=True)
                    dt = time.perf_counter() - t
                    reads.append(max(before, meter.sample()))
                    bd.step(dt)
                    runs.append(n_prompt / dt)
                    seq.truncate(depth)
                out.update(pp_tokens=n_prompt, pp_tok_s=statistics.median(runs), pp_ms=bd.per_layer())
            if n_gen > 0:
                runs = []
                tok = int(rng.integers(0, V))
                bd.reset()
                for _ in range(repeats):
                    before = meter.sample()
                    t0 = time.perf_counter()
                    for _ in range(n_gen):
                        t = time.perf_counter()
                        tok = int(np.argmax(seq.append([tok])[-1]))    # greedy: sampling is not timed
                        bd.step(time.perf_counter() - t)
                    dt = time.perf_counter() - t0
                    reads.append(max(before, meter.sample()))
                    runs.append(n_gen / dt)
                    seq.truncate(depth)
                out.update(tg_tokens=n_gen, tg_tok_s=statistics.median(runs), tg_ms=bd.per_layer())
    per_token = model_info(llm.path).decode_bytes_per_token
    out["weight_gb_per_token"] = per_token / 1e9
    out["read_gb_s"] = statistics.median(reads) / 1e9 if reads else 0.0
    if "tg_tok_s" in out:
        out["weight_gb_s"] = out["tg_tok_s"] * per_token / 1e9
        out["read_fraction"] = out["weight_gb_s"] / out["read_gb_s"] if out["read_gb_s"] else 0.0
    return out


# ---------------------------------------------------------------- projection to the full model
WIDTHS = ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
          "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size", "num_experts_per_tok")


def same_widths(cfg, tgt) -> bool:
    """A layer measured here is a layer of the target only when every width matches (k2-slice:
    K2's widths, fewer layers and experts)."""
    return all(getattr(cfg, k) == getattr(tgt, k) for k in WIDTHS)


def project(llm, row: dict, target_config: str) -> dict:
    """The full model's step, built from this run's per-layer times: each dense layer costs
    the mean measured dense-layer weight time, each MoE layer the mean measured MoE-layer
    weight time (one token reads top-k experts whatever their number, so decode needs no
    scaling; a prefill chunk touches nearly all of the target's experts, so its MoE time is at
    least reading those bytes at this run's read bandwidth), every layer the measured mean
    attention time at this depth, and the head scales with the lm_head bytes."""
    from .config import Config
    cfg, tgt = llm.config, Config.from_json(target_config)
    if not same_widths(cfg, tgt):
        return None
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    n_moe = sum(tgt.is_moe_layer(i) for i in range(tgt.num_hidden_layers))
    n_dense = tgt.num_hidden_layers - n_moe
    head_ratio = (tgt.vocab_size * tgt.hidden_size) / (cfg.vocab_size * cfg.hidden_size)
    read = row["read_gb_s"] * 1e9
    import os
    name = os.path.basename(os.path.dirname(os.path.abspath(target_config)))
    out = {"kind": "projection", "model": name, "depth": row["depth"],
           "layers": tgt.num_hidden_layers, "experts": tgt.n_routed_experts}

    def mean(xs, fallback):
        return statistics.mean(xs) if xs else fallback

    for test, tokens in (("tg", 1), ("pp", row.get("pp_tokens", 0))):
        ms = row.get(f"{test}_ms")
        if ms is None:
            continue
        w_moe = mean([ms["weights"][i] for i in moe], None)
        w_dense = mean([ms["weights"][i] for i in dense], w_moe)
        w_moe = w_dense if w_moe is None else w_moe
        if tokens > 1 and tgt.n_routed_experts and read:   # experts a chunk touches, read once
            E, K = tgt.n_routed_experts, tgt.num_experts_per_tok
            touched = E * (1 - (1 - K / E) ** tokens)
            expert_bytes = 3 * tgt.hidden_size * tgt.moe_intermediate_size * (0.5 + 1 / 16)  # int4 g32
            w_moe = max(w_moe, 1e3 * touched * expert_bytes / read)
        weights = n_dense * w_dense + n_moe * w_moe + ms["head"] * head_ratio
        attn = tgt.num_hidden_layers * statistics.mean(ms["attn"])
        per = tokens if tokens > 1 else 1
        out[f"{test}_weights_ms"] = weights
        out[f"{test}_attn_ms"] = attn
        out[f"{test}_tok_s"] = 1e3 * per / (weights + attn)
        out[f"{test}_attn_share"] = attn / (weights + attn)
    return out


# ---------------------------------------------------------------- the command's output
def report(llm, depths, n_prompt, n_gen, repeats, meter, as_json: bool, target_config: str | None, echo=print):
    rows = []
    with llm.sequence() as seq:          # warm-up, not timed: first touch of the weight pages
        seq.append(np.arange(min(max(n_prompt, 2), 64)) % llm.config.vocab_size, last_only=True)
        seq.append([1])
    from . import ops
    backend = ops.describe(llm.backend)
    if not as_json:
        kv = {"uint16": "bf16", "float32": "f32", "int8": "int8"}[llm.cache.pool.dtype.name]
        echo(f"backend: {backend}, {kv} latent cache")
        echo(f"| depth | pp{n_prompt} t/s | tg t/s | weights GB/token | weights GB/s | read GB/s | "
             "fraction | tg attention ms/layer | tg weights ms/layer |")
        echo("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in depths:
        row = run_depth(llm, d, n_prompt, n_gen, repeats, meter)
        rows.append(row)
        if as_json:
            echo(json.dumps({"kind": "measured", "backend": backend, **row}))
            continue
        tg = row.get("tg_ms")
        echo(f"| {d} | {row.get('pp_tok_s', float('nan')):.2f} | {row.get('tg_tok_s', float('nan')):.2f} | "
             f"{row['weight_gb_per_token']:.2f} | {row.get('weight_gb_s', float('nan')):.1f} | "
             f"{row['read_gb_s']:.1f} | {row.get('read_fraction', float('nan')):.0%} | "
             f"{statistics.mean(tg['attn']) if tg else float('nan'):.2f} | "
             f"{statistics.mean(tg['weights']) if tg else float('nan'):.2f} |")
    if target_config is None:
        return rows
    proj = [p for p in (project(llm, r, target_config) for r in rows) if p is not None]
    if not proj:
        if not as_json:
            echo("\n(no projection to K2 Thinking: this model's layer widths differ from it)")
        return rows
    if as_json:
        for p in proj:
            echo(json.dumps(p))
        return rows
    p0 = proj[0] if proj else {}
    echo(f"\nPROJECTION (not measured) for {p0.get('model', '?')}: {p0.get('layers')} layers, "
         f"{p0.get('experts')} experts, its lm_head; this run's per-layer times scaled")
    echo("| depth | tg weights ms | tg attention ms | tg t/s | attention share | "
         f"pp{n_prompt} weights ms | pp attention ms | pp t/s |")
    echo("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    nan = float("nan")
    for p in proj:
        echo(f"| {p['depth']} | {p.get('tg_weights_ms', nan):.0f} | {p.get('tg_attn_ms', nan):.0f} | "
             f"{p.get('tg_tok_s', nan):.2f} | {p.get('tg_attn_share', nan):.0%} | "
             f"{p.get('pp_weights_ms', nan):.0f} | {p.get('pp_attn_ms', nan):.0f} | {p.get('pp_tok_s', nan):.1f} |")
    return rows


def bench_depth(path, depth: str, n_prompt: int, n_gen: int, repeats: int, bw_bytes: int, as_json: bool,
                kv_cache: str | None, echo=print, **load_kw):
    """`k2lite bench PATH --depth 0,4096,...`: parse, load, measure, print."""
    import os

    from .info import ReadMeter
    from .llm import load
    from .testing.random_model import K2_THINKING
    try:
        depths = [int(d) for d in depth.split(",")]
    except ValueError:
        raise ValueError(f"--depth: expected comma-separated integers, not {depth!r}") from None
    if min(depths) < 0:
        raise ValueError("--depth: depths must be >= 0")
    need = max(depths) + max(n_prompt, n_gen)
    load_kw["max_cache_tokens"] = need + 64
    load_kw["kv_cache"] = kv_cache
    llm = load(path, **load_kw)
    if need > llm.context:
        raise ValueError(f"--depth: {max(depths)} + {max(n_prompt, n_gen)} tokens is over the model's "
                         f"context of {llm.context}")
    return report(llm, depths, n_prompt, n_gen, repeats, ReadMeter(bw_bytes), as_json,
                  K2_THINKING if os.path.exists(K2_THINKING) else None, echo=echo)
