"""`k2lite convert`: any K2/DeepSeek-V3 checkpoint (BF16, FP8 blocks, INT4) -> the INT4 release layout.

Tensors stream one at a time from the memory-mapped source to the writer (writer.py), so
peak memory is a few tensors, whatever the model size: FP8 and BF16 matrices are widened in
row blocks, routed experts are quantized to group-wise INT4, everything else is stored BF16.
An interrupted run resumes where its last finished shard ended. The source is checked first
exactly as `k2lite.load` checks it, so a bad checkpoint fails before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from .config import Config
from .errors import ModelFormatError
from .formats import dequantize_fp8, dequantize_int4, f32_to_bf16
from .loader import Checkpoint, load_weights, read_matrix
from .writer import EXPERT_RE, write_checkpoint

COPY_FILES = ("tiktoken.model", "tokenizer_config.json", "generation_config.json",
              "special_tokens_map.json", "chat_template.jinja", "LICENSE", "README.md")
ROWS = 2048   # row block for widening FP8 -> BF16 without a full float32 copy


def _logical_tensors(ck: Checkpoint, cfg: Config, int4_experts: bool, group_size: int):
    """(name, loader) for every logical tensor of the source, in file order."""
    names = sorted(ck.where, key=lambda n: (ck.where[n], n))
    aux = (".weight_scale_inv", ".weight_scale", ".weight_shape", "rotary_emb.inv_freq")
    for name in names:
        if name.endswith(aux):
            continue
        if name.endswith(".weight_packed"):
            base = name[:-len(".weight_packed")]
            yield base + ".weight", (lambda b=base: _int4(ck, cfg, b, int4_experts, group_size))
        elif name.endswith(".weight") and name + "_scale_inv" in ck:    # + X.weight_scale_inv: fp8 blocks
            yield name, (lambda n=name: _fp8(ck, cfg, n, int4_experts))
        else:
            yield name, (lambda n=name: _plain(ck, n))
        ck.release(name)                    # its pages are consumed: keep RSS flat


def _plain(ck, name):
    a = ck.get(name)
    return a if a.dtype in (np.uint16, np.float32) or "e_score" in name else a.astype(np.float32)


def _matrix_shape(ck, base) -> tuple:
    """(out, in) of a quantized matrix, from its weight_shape (INT4; without one, 8 columns per
    packed word, as the loader accepts it) or its FP8 codes; the loader's read_matrix then
    checks every part against it."""
    if base + ".weight_shape" in ck:
        name = base + ".weight_shape"
        ws = ck.read(name)
        shape = tuple(int(v) for v in ws.reshape(-1)) if ws.dtype.kind == "i" else ()
    elif base + ".weight_packed" in ck:
        name = base + ".weight_packed"
        shape = ck.info(name)[1]
        shape = (shape[0], shape[1] * 8) if len(shape) == 2 else ()
    else:
        name = base + ".weight"
        shape = ck.info(name)[1]
    if len(shape) != 2:
        raise ModelFormatError(f"{ck.file_of(name)}: tensor '{name}' does not give an [out, in] matrix shape")
    return shape


def _int4(ck, cfg, base, int4_experts, group_size):
    t = read_matrix(ck, base, _matrix_shape(ck, base), cfg)
    keep = EXPERT_RE.match(base + ".weight") and int4_experts and t.group_size == group_size
    return t if keep else dequantize_int4(t)    # passed through untouched when the grid matches


def _fp8(ck, cfg, name, int4_experts):
    base = name[:-len(".weight")]
    t = read_matrix(ck, base, _matrix_shape(ck, base), cfg)
    w = t.weight
    if EXPERT_RE.match(name) and int4_experts:
        return dequantize_fp8(t)                  # float32, quantized to INT4 by the writer
    out = np.empty(w.shape, np.uint16)            # straight to bf16 bits, a row block at a time
    for r in range(0, w.shape[0], ROWS):
        out[r:r + ROWS] = f32_to_bf16(dequantize_fp8(t, slice(r, r + ROWS)))
    return out


def convert(src: str, dst: str, experts: str = "int4", group_size: int = 32, qat_grid: bool = False,
            max_shard_bytes: int = 4 << 30, resume: bool = True, verbose: bool = True) -> dict:
    """Convert checkpoint folder src to dst; returns {bytes_in, bytes_out, seconds, peak_rss_mb}."""
    if experts not in ("int4", "bf16"):
        raise ValueError(f"--experts must be int4 or bf16, got {experts!r}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("destination must differ from the source")
    cfg = Config.from_json(src)
    ck = Checkpoint(src)
    load_weights(cfg, ck)       # every tensor checked against config.json (mapped, not read)
    with open(os.path.join(src, "config.json")) as f:
        raw_cfg = json.load(f)
    bytes_in, t0 = ck.total_bytes(), time.time()
    seen = [0]

    def progress(name, done):
        seen[0] += 1
        if verbose and (seen[0] % 16 == 0 or done >= bytes_in):
            rate = done / max(time.time() - t0, 1e-9) / 1e9
            sys.stderr.write(f"\r[{seen[0]:6d} tensors] {done / 1e9:8.2f} GB written, {rate:.2f} GB/s   ")
            sys.stderr.flush()

    paths = write_checkpoint(dst, raw_cfg, _logical_tensors(ck, cfg, experts == "int4", group_size),
                             int4_experts=experts == "int4", group_size=group_size, qat_grid=qat_grid,
                             max_shard_bytes=max_shard_bytes, resume=resume, progress=progress)
    for fname in COPY_FILES:
        if os.path.exists(os.path.join(src, fname)):
            shutil.copy(os.path.join(src, fname), os.path.join(dst, fname))
    seconds = time.time() - t0
    if verbose:
        sys.stderr.write("\n")
    import resource
    return {"bytes_in": bytes_in, "bytes_out": sum(os.path.getsize(p) for p in paths), "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
