"""Write checkpoints in the K2 Thinking release layout.

Shards `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`; routed experts
(`model.layers.L.mlp.experts.E.{gate,up,down}_proj`) as compressed-tensors `pack-quantized`
INT4 (`weight_packed` I32, `weight_scale` BF16, `weight_shape` I32); the router's
`e_score_correction_bias` as F32; every other tensor as BF16; and a release-style config.json
with its `quantization_config`. Tensors stream in one at a time, so memory stays bounded.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from .formats import Int4Tensor, f32_to_bf16, quantize_int4
from .safetensors import save_file

EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")
F32_NAMES = ("e_score_correction_bias",)
RELEASE_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                  "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]


def quantization_config(group_size: int = 32) -> dict:
    """compressed-tensors block of config.json, as in the K2 Thinking release."""
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "kv_cache_scheme": None,
        "ignore": list(RELEASE_IGNORE),
        "config_groups": {"group_0": {
            "targets": ["Linear"], "input_activations": None, "output_activations": None,
            "format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None,
                        "observer": "minmax", "block_structure": None}}},
    }


def encode(name: str, w, int4_experts: bool, group_size: int, qat_grid: bool):
    """One logical tensor -> [(stored name, array, safetensors dtype)]."""
    m = EXPERT_RE.match(name)
    if m and (int4_experts or isinstance(w, Int4Tensor)):
        t = w if isinstance(w, Int4Tensor) else quantize_int4(w, group_size, qat_grid)
        base = m.group(1)
        return [(base + ".weight_packed", t.packed, "I32"),
                (base + ".weight_scale", t.scales, "BF16" if t.scales.dtype == np.uint16 else "F32"),
                (base + ".weight_shape", np.array(t.shape, np.int32), "I32")]
    if any(name.endswith(s) for s in F32_NAMES):
        return [(name, np.asarray(w, np.float32), "F32")]
    w = np.asarray(w)
    bits = w if w.dtype == np.uint16 else f32_to_bf16(w)   # uint16 input is already bf16 bits
    return [(name, bits, "BF16")]


def write_checkpoint(out_dir: str, config: dict, tensors, *, int4_experts: bool = True,
                     group_size: int = 32, qat_grid: bool = False,
                     max_shard_bytes: int = 4 << 30) -> list:
    """Write `tensors` (a dict or an iterable of (name, float array | bf16 bits | Int4Tensor))
    and `config` (HF config dict; a quantization_config is added when int4_experts) to out_dir.
    Returns the shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    shards, current, size, weight_map, total = [], {}, 0, {}, 0

    def flush():
        nonlocal current, size
        if current:
            path = os.path.join(out_dir, f"shard-{len(shards):05d}.tmp")
            save_file({k: a for k, (a, _) in current.items()}, path,
                      dtypes={k: d for k, (_, d) in current.items()}, metadata={"format": "pt"})
            shards.append((path, list(current)))
            current, size = {}, 0

    for name, w in items:
        for stored, arr, dt in encode(name, w, int4_experts, group_size, qat_grid):
            if size and size + arr.nbytes > max_shard_bytes:
                flush()
            current[stored] = (arr, dt)
            size += arr.nbytes
            total += arr.nbytes
    flush()
    n, paths = len(shards), []
    for i, (tmp, names) in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, os.path.join(out_dir, fname))
        paths.append(os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in names})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = dict(config)
    if int4_experts:
        cfg["quantization_config"] = quantization_config(group_size)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return paths
