"""What a checkpoint costs: parameters (total / active per token), bytes by dtype, the bytes a
decode step reads, and the latent KV cache against plain multi-head attention.

Works from config.json alone (the release layout is implied: routed experts INT4 when the
config has a compressed-tensors quantization_config, the router bias F32, everything else BF16)
or, when safetensors are present, from their headers through loader.Checkpoint (no data read).

Counting convention: a parameter is one weight of a logical matrix, so an INT4 matrix [out, in]
counts out*in whatever it is packed into; scales and weight_shape count as bytes, not params.
"Active" is what one token touches: every non-expert weight, the top-k routed experts of each
MoE layer, and one row of the embedding table (the rest of it is never read).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .config import Config

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "F8_E4M3": 1, "U8": 1, "I8": 1}
_EXPERT = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.\d+\.")
_EMBED = re.compile(r"embed_tokens\.weight$")


@dataclass
class ModelInfo:
    config: Config
    source: str                                   # "config" or "safetensors"
    total_params: int = 0
    active_params: int = 0
    bytes_by_dtype: dict = field(default_factory=dict)
    total_bytes: int = 0
    expert_bytes: int = 0                         # all routed experts, all layers
    embed_bytes: int = 0                          # the embedding table
    decode_bytes_per_token: int = 0               # weight bytes one decode step reads

    # --- KV cache: MLA keeps kv_lora_rank + rope dims per token per layer
    def kv_elems_per_token(self) -> int:
        c = self.config
        return c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)

    def kv8_bytes_per_token(self) -> int:
        """An int8 cache row per layer: codes plus two scales and two code sums (kvcache.kv8_row_bytes)."""
        from .kvcache import kv8_row_bytes
        c = self.config
        return c.num_hidden_layers * kv8_row_bytes(c.kv_lora_rank + c.qk_rope_head_dim)

    def mha_kv_elems_per_token(self) -> int:
        """Plain multi-head attention would cache full per-head keys (nope+rope) and values."""
        c = self.config
        return c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)

    def context_bytes(self, tokens: int, kv_itemsize: int = 4) -> int:
        """Weights plus the latent cache for `tokens` tokens at kv_itemsize bytes per value (f32 4,
        bf16 2; the int8 cache: kv8_bytes_per_token)."""
        return self.total_bytes + tokens * self.kv_elems_per_token() * kv_itemsize


_PROJ = re.compile(r"_proj\.weight$")


def config_tensors(cfg: Config):
    """(name, dtype, shape, params) of every stored tensor, as the release layout would hold it."""
    from .testing.random_model import tensor_shapes    # the one place the layout is spelled out
    q = cfg.quantization
    int4 = q is not None and q.method == "compressed-tensors"
    g = q.group_size if int4 else 32
    fp8 = q is not None and q.method == "fp8"
    for name, shape in tensor_shapes(cfg.to_dict()):
        n = 1
        for s in shape:
            n *= s
        if int4 and _EXPERT.search(name):
            base = name[:-len(".weight")]
            out, n_in = shape
            yield base + ".weight_packed", "I32", (out, -(-n_in // 8)), n
            yield base + ".weight_scale", "BF16", (out, n_in // g), 0
            yield base + ".weight_shape", "I32", (2,), 0
        elif name.endswith("e_score_correction_bias"):
            yield name, "F32", shape, n
        elif fp8 and _PROJ.search(name):          # DeepSeek-V3 / K2 Base, Instruct: FP8 blocks
            (out, n_in), (bo, bi) = shape, q.weight_block_size
            yield name, "F8_E4M3", shape, n
            yield name[:-len(".weight")] + ".weight_scale_inv", "F32", (-(-out // bo), -(-n_in // bi)), 0
        else:
            yield name, "BF16", shape, n


def checkpoint_tensors(path: str):
    """(name, dtype, shape, params) from the safetensors headers; no tensor data is read."""
    from .loader import Checkpoint
    ck = Checkpoint(path)
    for name in ck.where:
        dt, shape = ck.info(name)
        n = 1
        for s in shape:
            n *= s
        if name.endswith(".weight_packed"):
            n *= 8                                # eight 4-bit codes per int32
        elif name.endswith((".weight_scale", ".weight_shape", "inv_freq")):
            n = 0
        yield name, dt, tuple(shape), n


def has_weights(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def model_info(path: str) -> ModelInfo:
    """Figures for a checkpoint folder, or a config.json alone (then computed from the config)."""
    cfg = Config.from_json(path)
    weights = has_weights(path)
    tensors = checkpoint_tensors(path) if weights else config_tensors(cfg)
    info = ModelInfo(cfg, "safetensors" if weights else "config")
    expert_params, embed_params, embed_row = 0, 0, 0
    for name, dt, shape, n in tensors:
        b = DTYPE_BYTES.get(dt, 2)
        nbytes = b
        for s in shape:
            nbytes *= s
        info.bytes_by_dtype[dt] = info.bytes_by_dtype.get(dt, 0) + nbytes
        info.total_bytes += nbytes
        info.total_params += n
        if _EXPERT.search(name):
            info.expert_bytes += nbytes
            expert_params += n
        elif _EMBED.search(name):
            info.embed_bytes += nbytes
            embed_params += n
            embed_row = nbytes // max(shape[0], 1)
    # One token uses K of E experts in each MoE layer; all MoE layers have the same experts.
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
    info.active_params = (info.total_params - expert_params - embed_params
                          + round(expert_params * frac) + cfg.hidden_size)
    info.decode_bytes_per_token = (info.total_bytes - info.expert_bytes - info.embed_bytes
                                   + round(info.expert_bytes * frac) + embed_row)
    return info


def human(n: float, unit: str = "B") -> str:
    """1234567 -> '1.23 MB' (powers of 1000, as parameter counts are quoted)."""
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or prefix == "P":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.2f} {prefix}{unit}"
        n /= 1000.0


def summary(info: ModelInfo, context: int) -> str:
    """The text `k2lite info` prints."""
    c = info.config
    moe = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    q = c.quantization
    lines = [
        f"architecture   {c.extra.get('architectures', ['DeepseekV3ForCausalLM'])[0]} ({c.model_type})",
        f"layers         {c.num_hidden_layers} ({c.num_hidden_layers - len(moe)} dense, {len(moe)} MoE)",
        f"hidden         {c.hidden_size}, heads {c.num_attention_heads}, vocab {c.vocab_size}",
        f"attention      MLA: q_lora {c.q_lora_rank}, kv_lora {c.kv_lora_rank}, "
        f"qk {c.qk_nope_head_dim}+{c.qk_rope_head_dim} (nope+rope), v {c.v_head_dim}",
        f"experts        {c.n_routed_experts or 0} routed (top-{c.num_experts_per_tok}) + "
        f"{c.n_shared_experts} shared, width {c.moe_intermediate_size}; dense FFN {c.intermediate_size}",
        f"quantization   {f'{q.format} int{q.num_bits} g{q.group_size} (routed experts)' if q else 'none'}",
        f"context        max {c.max_position_embeddings} positions",
        f"parameters     {human(info.total_params, '')} total, {human(info.active_params, '')} active per token"
        f"   (from {info.source})",
        "bytes          " + ", ".join(f"{dt} {human(b)}" for dt, b in sorted(info.bytes_by_dtype.items()))
        + f"; total {human(info.total_bytes)}",
        f"decode reads   {human(info.decode_bytes_per_token)} of weights per token",
    ]
    kv, mha = info.kv_elems_per_token(), info.mha_kv_elems_per_token()
    lines += [
        f"KV per token   latent {kv} values = {human(2 * kv)} bf16 / {human(4 * kv)} f32; plain MHA "
        f"would need {mha} = {human(2 * mha)} bf16 ({mha / kv:.1f}x)",
        f"at {context} tokens  KV {human(2 * kv * context)} bf16 (k2lite's cache on AVX512-BF16 CPUs) / "
        f"{human(4 * kv * context)} f32 / {human(info.kv8_bytes_per_token() * context)} int8 (--kv-cache int8); "
        f"weights + bf16 KV = {human(info.context_bytes(context, 2))}",
    ]
    return "\n".join(lines)


def chat_summary(path: str) -> str:
    """The lines `k2lite info` prints about text: the tokenizer, and the chat template's family
    and mode (base / thinking / instruct / hybrid), or what is missing for them."""
    folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    if not os.path.exists(os.path.join(folder, "tiktoken.model")):
        other = [f for f in ("tokenizer.json", "tokenizer.model") if os.path.exists(os.path.join(folder, f))]
        why = f" ({other[0]} is not a tiktoken vocabulary: k2lite reads Kimi's tiktoken.model)" if other else ""
        return (f"tokenizer      none: no tiktoken.model{why}; token ids only (llm.logits, "
                "sequence().append, /v1/completions with id prompts)")
    from .tokenizer import Tokenizer
    tok = Tokenizer.from_dir(folder)
    t = tok.chat_template
    mode = ("base model: no chat template, prompts go in raw (give one with --chat-template)"
            if t is None else t.describe())
    return f"tokenizer      tiktoken, {tok.vocab_size} ids\nchat           {mode}"


# ---------------------------------------------------------------- measurement (k2lite bench)
class ReadMeter:
    """Streaming-read bandwidth, sampled on demand: the native kernels' parallel sum over an
    nbytes float32 array (same threads as the model) when built, else numpy's sum. On a shared
    machine bandwidth drifts by tens of percent within seconds, so benchmarks sample it right
    before and after each thing they time and compare the pair, not one figure per run."""

    def __init__(self, nbytes: int = 1 << 30):
        import numpy as np
        try:
            from .backends.cpu import stream_read as read
        except ImportError:
            read = np.sum
        self.read, self.buf = read, np.ones(max(nbytes // 4, 1), np.float32)
        self.sample()                          # the first pass also faults the pages in

    def sample(self) -> float:
        """One pass: bytes/s."""
        import time
        t = time.perf_counter()
        self.read(self.buf)
        return self.buf.nbytes / (time.perf_counter() - t)


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Streaming-read bandwidth in bytes/s, best of `repeats` passes (see ReadMeter)."""
    meter = ReadMeter(nbytes)
    return max(meter.sample() for _ in range(repeats))


def bench(llm, n_prompt: int = 512, n_gen: int = 128, repeats: int = 3, seed: int = 0) -> dict:
    """llama-bench's two tests: pp (one prefill of n_prompt random ids) and tg (n_gen decode
    steps from a one-token context), each run `repeats` times: {"pp512": [t/s, ...], ...}."""
    import time

    import numpy as np
    rng = np.random.default_rng(seed)
    V = llm.config.vocab_size
    out = {}
    if n_prompt > 0:
        runs = []
        for _ in range(repeats):
            ids = rng.integers(0, V, n_prompt)
            with llm.sequence() as seq:
                t = time.perf_counter()
                seq.append(ids, last_only=True)
                runs.append(n_prompt / (time.perf_counter() - t))
        out[f"pp{n_prompt}"] = runs
    if n_gen > 0:
        runs = []
        for _ in range(repeats):
            with llm.sequence() as seq:
                tok = int(np.argmax(seq.append(rng.integers(0, V, 1))[-1]))
                t = time.perf_counter()
                for _ in range(n_gen):
                    tok = int(np.argmax(seq.append([tok])[-1]))   # greedy: sampling is not timed
                runs.append(n_gen / (time.perf_counter() - t))
        out[f"tg{n_gen}"] = runs
    return out
