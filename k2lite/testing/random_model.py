"""Write random checkpoints in exactly the K2 Thinking release layout.

    python -m k2lite.testing.random_model OUT --preset tiny|k2-slice [--seed 0] [--bf16-experts]

`tiny` is a few-hundred-KB model for tests. `k2-slice` has K2's real widths (hidden 7168,
64 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128, expert 2048, dense 18432,
vocab 163840) with 1 dense + 3 MoE layers and 32 experts, top-8: about 7 GB.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import numpy as np

from ..writer import write_checkpoint

K2_THINKING = os.path.join(os.path.dirname(__file__), "..", "..", "models", "kimi-k2-thinking", "config.json")

TINY = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
    "vocab_size": 384, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "routed_scaling_factor": 2.827,
    "max_position_embeddings": 4096, "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 64,
                     "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "torch_dtype": "bfloat16",
    "num_nextn_predict_layers": 0,
}

K2_SLICE_OVERRIDES = {"num_hidden_layers": 4, "first_k_dense_replace": 1, "n_routed_experts": 32,
                      "num_experts_per_tok": 8}


def preset(name: str, **overrides) -> dict:
    if name == "tiny":
        cfg = copy.deepcopy(TINY)
    elif name == "k2-slice":
        with open(K2_THINKING) as f:
            cfg = json.load(f)
        cfg.pop("quantization_config", None)
        cfg.update(K2_SLICE_OVERRIDES)
    else:
        raise ValueError(f"unknown preset {name!r}: tiny or k2-slice")
    cfg.update(overrides)
    return cfg


def tensor_shapes(cfg: dict):
    """(name, shape) of every tensor of a DeepseekV3ForCausalLM, in checkpoint order."""
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    C, qr = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    yield "model.embed_tokens.weight", (cfg["vocab_size"], D)
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        yield p + "input_layernorm.weight", (D,)
        if qr:
            yield p + "self_attn.q_a_proj.weight", (qr, D)
            yield p + "self_attn.q_a_layernorm.weight", (qr,)
            yield p + "self_attn.q_b_proj.weight", (H * (nope + rope), qr)
        else:
            yield p + "self_attn.q_proj.weight", (H * (nope + rope), D)
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (C + rope, D)
        yield p + "self_attn.kv_a_layernorm.weight", (C,)
        yield p + "self_attn.kv_b_proj.weight", (H * (nope + v), C)
        yield p + "self_attn.o_proj.weight", (D, H * v)
        yield p + "post_attention_layernorm.weight", (D,)
        moe = (cfg.get("n_routed_experts") and L >= cfg.get("first_k_dense_replace", 0)
               and L % cfg.get("moe_layer_freq", 1) == 0)
        if not moe:
            F = cfg["intermediate_size"]
            yield p + "mlp.gate_proj.weight", (F, D)
            yield p + "mlp.up_proj.weight", (F, D)
            yield p + "mlp.down_proj.weight", (D, F)
            continue
        E, F = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        yield p + "mlp.gate.weight", (E, D)
        yield p + "mlp.gate.e_score_correction_bias", (E,)
        for e in range(E):
            for proj, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
                yield p + f"mlp.experts.{e}.{proj}.weight", shape
        if cfg.get("n_shared_experts"):
            S = F * cfg["n_shared_experts"]
            yield p + "mlp.shared_experts.gate_proj.weight", (S, D)
            yield p + "mlp.shared_experts.up_proj.weight", (S, D)
            yield p + "mlp.shared_experts.down_proj.weight", (D, S)
    yield "model.norm.weight", (D,)
    yield "lm_head.weight", (cfg["vocab_size"], D)


def random_tensors(cfg: dict, seed: int = 0, peak: float = 1.0):
    """Yield (name, float32 array): matrices ~ N(0, 1/fan_in) so activations stay O(1), norms
    near 1, a router bias large enough to change which experts are picked. `peak` scales
    lm_head so a larger value gives peaked (near-deterministic) next-token distributions."""
    rng = np.random.default_rng(seed)
    for name, shape in tensor_shapes(cfg):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        elif name.endswith("e_score_correction_bias"):
            w = 0.5 * rng.standard_normal(shape, np.float32)
        elif name == "model.embed_tokens.weight":
            w = rng.standard_normal(shape, np.float32)
        else:
            w = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(shape[-1]))
            if name == "lm_head.weight":
                w *= np.float32(peak)
        yield name, w


def write_random_model(out_dir: str, cfg: dict | str = "tiny", seed: int = 0, int4_experts: bool = True,
                       peak: float = 1.0, max_shard_bytes: int = 2 << 30, fp8: bool = False) -> str:
    """fp8=True writes K2 Base/Instruct's format instead: every projection FP8 (e4m3, 128×128
    block scales), experts included; int4_experts=False with fp8=False writes plain BF16."""
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    write_checkpoint(out_dir, cfg, random_tensors(cfg, seed, peak), int4_experts=int4_experts and not fp8,
                     fp8=fp8, group_size=32, max_shard_bytes=max_shard_bytes)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "k2-slice"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16-experts", action="store_true", help="store routed experts as BF16, not INT4")
    ap.add_argument("--fp8", action="store_true", help="K2 Base/Instruct format: FP8 block-quantized projections")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    ap.add_argument("--experts", type=int, help="override n_routed_experts")
    a = ap.parse_args(argv)
    over = {k: v for k, v in (("num_hidden_layers", a.layers), ("n_routed_experts", a.experts)) if v}
    write_random_model(a.out, preset(a.preset, **over), a.seed, int4_experts=not a.bf16_experts, fp8=a.fp8)
    print(f"wrote {a.preset} checkpoint to {a.out}")


if __name__ == "__main__":
    main()


def write_sparse_layout(out_dir: str, cfg: dict, n_shards: int = 8) -> int:
    """Write a checkpoint with the full tensor layout of `cfg` (INT4 experts, real names,
    shapes, dtypes, index) whose data regions are holes in sparse files: the real K2
    Thinking's 594 GB layout costs a few MB of disk. For testing open time and memory."""
    import struct
    from ..writer import quantization_config
    entries = []
    for name, shape in tensor_shapes(cfg):
        if ".mlp.experts." in name:
            base, (o, i) = name[:-len(".weight")], shape
            entries += [(base + ".weight_packed", "I32", [o, i // 8], 4, None),
                        (base + ".weight_scale", "BF16", [o, i // 32], 2, None),
                        (base + ".weight_shape", "I32", [2], 4, np.array([o, i], "<i4").tobytes())]
        elif name.endswith("e_score_correction_bias"):
            entries.append((name, "F32", list(shape), 4, None))
        else:
            entries.append((name, "BF16", list(shape), 2, None))
    os.makedirs(out_dir, exist_ok=True)
    per = -(-len(entries) // n_shards)
    weight_map, total = {}, 0
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        header, off, data = {}, 0, []
        for name, dt, shape, size, content in entries[s * per:(s + 1) * per]:
            n = int(np.prod(shape)) * size
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
            weight_map[name] = fname
            if content is not None:
                data.append((off, content))
            off += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + off)          # a hole: no data blocks are written
            for at, content in data:                # except the few small tensors with meaning
                f.seek(8 + len(raw) + at)
                f.write(content)
        total += off
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**cfg, "quantization_config": quantization_config(32)}, f)
    return total
