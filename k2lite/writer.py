"""Write checkpoints in the K2 Thinking release layout, streaming and resumable.

Shards `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`; routed experts
(`model.layers.L.mlp.experts.E.{gate,up,down}_proj`) as compressed-tensors `pack-quantized`
INT4 (`weight_packed` I32, `weight_scale` BF16, `weight_shape` I32); the router's
`e_score_correction_bias` as F32; every other tensor as BF16 (or, with `fp8=True`, every
projection as DeepSeek-style FP8 blocks, for K2 Base/Instruct-shaped test checkpoints); and a
release-style config.json with its `quantization_config`.

Memory stays bounded: each tensor is encoded and appended to its shard file at once, and the
shard's header is written into room reserved at its start when the shard is closed. A progress file records closed
shards, so an interrupted `write_checkpoint(..., resume=True)` skips what is already written
(tensors may be given as zero-argument callables so skipped ones are never even read).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct

import numpy as np

from .errors import ModelFormatError
from .formats import Fp8Tensor, Int4Tensor, bf16_to_f32, f32_to_bf16, quantize_fp8, quantize_int4

EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")
PROJ_RE = re.compile(r"^(.*_proj)\.weight$")          # every Linear except lm_head and the router
F32_NAMES = ("e_score_correction_bias",)
RELEASE_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                  "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
PROGRESS = ".k2lite-progress.json"


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


def fp8_quantization_config(block=(128, 128)) -> dict:
    """The fp8 block of DeepSeek-V3 / Kimi K2 Base and Instruct config.json."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block)}


def encode(name: str, w, int4_experts: bool, group_size: int, qat_grid: bool, fp8: bool = False):
    """One logical tensor -> [(stored name, array, safetensors dtype)]."""
    m = EXPERT_RE.match(name)
    if m and (int4_experts or isinstance(w, Int4Tensor)):
        t = w if isinstance(w, Int4Tensor) else quantize_int4(_float(w), group_size, qat_grid)
        base = m.group(1)
        return [(base + ".weight_packed", t.packed, "I32"),
                (base + ".weight_scale", t.scales, "BF16" if t.scales.dtype == np.uint16 else "F32"),
                (base + ".weight_shape", np.array(t.shape, np.int32), "I32")]
    p = PROJ_RE.match(name)
    if isinstance(w, Fp8Tensor) or (fp8 and p):
        t = w if isinstance(w, Fp8Tensor) else quantize_fp8(_float(w))
        return [(name, t.weight, "F8_E4M3"), (name[:-len(".weight")] + ".weight_scale_inv", t.scale_inv, "F32")]
    if any(name.endswith(s) for s in F32_NAMES):
        return [(name, np.asarray(w, np.float32), "F32")]
    w = np.asarray(w)
    bits = w if w.dtype == np.uint16 else f32_to_bf16(w)   # uint16 input is already bf16 bits
    return [(name, bits, "BF16")]


def _float(w) -> np.ndarray:
    """float32 view of a tensor given as floats or as bf16 bits (uint16)."""
    w = np.asarray(w)
    return bf16_to_f32(w) if w.dtype == np.uint16 else w.astype(np.float32, copy=False)


class _Shard:
    """One output shard, written in one pass: `reserve` bytes are left for the header, data
    streams in after them, and close() writes the header padded with spaces (JSON allows it)
    into that room. A header that outgrows the room (or a small shard, where the room would
    be wasted) costs one compacting copy instead."""

    def __init__(self, tmp: str, reserve: int = 1 << 20):
        self.tmp, self.header, self.size, self.logical, self.reserve = tmp, {}, 0, [], reserve
        self.f = open(tmp, "wb")
        self.f.seek(8 + reserve)

    def add(self, stored: str, arr: np.ndarray, dt: str):
        arr = np.ascontiguousarray(arr)
        self.header[stored] = {"dtype": dt, "shape": list(arr.shape),
                               "data_offsets": [self.size, self.size + arr.nbytes]}
        self.f.write(arr.reshape(-1).view(np.uint8).data)
        self.size += arr.nbytes

    def close(self):
        raw = json.dumps({**self.header, "__metadata__": {"format": "pt"}}, separators=(",", ":")).encode()
        if len(raw) <= self.reserve and self.reserve - len(raw) <= self.size // 100:
            self.f.seek(0)
            self.f.write(struct.pack("<Q", self.reserve) + raw + b" " * (self.reserve - len(raw)))
            self.f.close()
            return
        self.f.close()       # header too big for its room, or a small shard: one compacting copy
        raw += b" " * (-len(raw) % 8)
        os.replace(self.tmp, self.tmp + ".data")
        with open(self.tmp, "wb") as out, open(self.tmp + ".data", "rb") as src:
            out.write(struct.pack("<Q", len(raw)) + raw)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, out, 16 << 20)
        os.remove(self.tmp + ".data")


def _read_progress(path: str) -> list:
    """The closed shards an interrupted write recorded, checked (the file is ours, but a
    damaged one must not resume into a wrong checkpoint)."""
    try:
        with open(path, "rb") as f:
            shards = json.loads(f.read().decode("utf-8"))["shards"]
        strs = lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)   # noqa: E731
        if not isinstance(shards, list) or not all(
                isinstance(d, dict) and isinstance(d.get("tmp"), str) and os.path.basename(d["tmp"]) == d["tmp"]
                and strs(d.get("names")) and strs(d.get("logical")) and isinstance(d.get("size"), int)
                for d in shards):
            raise ValueError("unexpected layout")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{path}: unreadable resume state ({e}); delete it to start over") from None
    return shards


def write_checkpoint(out_dir: str, config: dict, tensors, *, int4_experts: bool = True,
                     group_size: int = 32, qat_grid: bool = False, fp8: bool = False,
                     max_shard_bytes: int = 4 << 30, resume: bool = False, progress=None) -> list:
    """Write `tensors` (a dict or an iterable of (name, array | Int4Tensor | Fp8Tensor | callable
    returning one)) and `config` (an HF config dict; the matching quantization_config is set)
    to out_dir. `progress(name, done_bytes)` is called after each tensor. Returns shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, PROGRESS)
    done = []                                   # closed shards: {"tmp", "names", "logical", "size"}
    if resume and os.path.exists(state_path):
        done = [d for d in _read_progress(state_path) if os.path.exists(os.path.join(out_dir, d["tmp"]))]
    skip = {n for d in done for n in d["logical"]}
    items = tensors.items() if isinstance(tensors, dict) else tensors
    shard, total = None, sum(d["size"] for d in done)

    def close_shard():
        nonlocal shard
        if shard is not None and shard.header:
            shard.close()
            done.append({"tmp": os.path.basename(shard.tmp), "names": list(shard.header),
                         "logical": shard.logical, "size": shard.size})
            with open(state_path + ".tmp", "w") as f:
                json.dump({"shards": done}, f)
            os.replace(state_path + ".tmp", state_path)
        shard = None

    for name, w in items:
        if name in skip:
            continue
        w = w() if callable(w) else w
        parts = encode(name, w, int4_experts, group_size, qat_grid, fp8)
        nbytes = sum(a.nbytes for _, a, _ in parts)
        if shard is not None and shard.size and shard.size + nbytes > max_shard_bytes:
            close_shard()
        if shard is None:
            shard = _Shard(os.path.join(out_dir, f"shard-{len(done):05d}.tmp"),
                           reserve=min(1 << 20, max(4096, max_shard_bytes // 64)))
        for stored, arr, dt in parts:
            shard.add(stored, arr, dt)
        shard.logical.append(name)
        total += nbytes
        if progress:
            progress(name, total)
    close_shard()

    n, paths, weight_map = len(done), [], {}
    for i, d in enumerate(done):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, d["tmp"]), os.path.join(out_dir, fname))
        paths.append(os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in d["names"]})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = dict(config)
    cfg.pop("quantization_config", None)
    if int4_experts:
        cfg["quantization_config"] = quantization_config(group_size)
    elif fp8:
        cfg["quantization_config"] = fp8_quantization_config()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if os.path.exists(state_path):
        os.remove(state_path)
    return paths
