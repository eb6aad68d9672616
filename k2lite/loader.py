"""Open a checkpoint folder: safetensors shards -> zero-copy views -> model.Weights.

Every checkpoint quirk lives here (mlx-lm's sanitize()): which tensors are INT4
(`X.weight_packed` present => X is pack-quantized, else `X.weight`), bf16 bits kept as
uint16, norm vectors converted to float32 (they are tiny), shapes and dtypes checked against
config.json so a mismatch is a ModelFormatError naming the tensor, not a numpy error later.
Nothing is dropped silently: a tensor of the language model that the config leaves unused
(a layer past num_hidden_layers, shared experts with n_shared_experts 0, a zero point) is an
error too.
"""
from __future__ import annotations

import json
import math
import mmap
import os

import numpy as np

from .config import Config
from .errors import ModelFormatError
from .formats import Fp8Tensor, Int4Tensor, bf16_to_f32, tile_bf16, tiled_bf16_shape
from .model import MLP, Attention, Layer, MoE, Weights
from .safetensors import DTYPES, SafetensorsFile

MATRIX_DTYPES = ("BF16", "F32", "F16")
UNUSED_OK = ("rotary_emb.inv_freq",)     # K2-Instruct ships these; RoPE is computed from config


class Checkpoint:
    """All tensors of a folder: through model.safetensors.index.json, else every *.safetensors."""

    def __init__(self, path: str, use_mmap: bool = True, repack: bool = False):
        self.use_mmap, self.repack = use_mmap, repack
        if not os.path.isdir(path):
            raise ModelFormatError(f"{path}: not a directory")
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        self.files, self.where = {}, {}
        self.used = set()       # names handed out by get()/read(): load_weights checks the rest
        if os.path.exists(index):
            try:
                with open(index, "rb") as f:
                    wm = json.loads(f.read().decode("utf-8"))["weight_map"]
                if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                    raise TypeError("weight_map must map names to file names")
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise ModelFormatError(f"{index}: bad index file ({type(e).__name__}: {e})") from None
            for shard in sorted(set(wm.values())):
                if shard in ("", ".", "..") or os.path.basename(shard) != shard:
                    raise ModelFormatError(f"{index}: shard name {shard!r} must be a plain file name")
                self.files[shard] = SafetensorsFile(os.path.join(path, shard))
            for name, shard in wm.items():
                if name not in self.files[shard]:
                    raise ModelFormatError(f"{os.path.join(path, shard)}: tensor '{name}' listed in the index is missing")
                self.where[name] = shard
            for shard, sf in self.files.items():    # the index must account for every tensor
                for name in sf.keys():
                    if wm.get(name) != shard:
                        raise ModelFormatError(f"{sf.path}: tensor '{name}' is " + (
                            f"not in {index}" if name not in wm else f"also in {wm[name]}, where the index points"))
        else:
            shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not shards:
                raise ModelFormatError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
            for shard in shards:
                self.files[shard] = sf = SafetensorsFile(os.path.join(path, shard))
                for name in sf.keys():
                    if name in self.where:
                        raise ModelFormatError(f"{sf.path}: tensor '{name}' is also in {self.where[name]}")
                    self.where[name] = shard

    def __contains__(self, name):
        return name in self.where

    def file_of(self, name) -> str:
        return os.path.join(self.path, self.where[name])

    def info(self, name) -> tuple:
        f = self.files[self.where[name]]
        return f.dtype(name), f.shape(name)

    def release(self, name: str):
        """Unmap a tensor's pages once it has been consumed (see SafetensorsFile.release)."""
        self.files[self.where[name]].release(name)

    def read(self, name: str) -> np.ndarray:
        """A small tensor, copied (not mapped)."""
        if name not in self.where:
            raise ModelFormatError(f"{self.path}: missing tensor '{name}'")
        self.used.add(name)
        return self.files[self.where[name]].read(name)

    def get(self, name: str, shape=None, dtypes=None) -> np.ndarray:
        if name not in self.where:
            raise ModelFormatError(f"{self.path}: missing tensor '{name}'")
        f = self.files[self.where[name]]
        dt, sh = f.dtype(name), f.shape(name)
        if dtypes and dt not in dtypes:
            raise ModelFormatError(f"{f.path}: tensor '{name}' has dtype {dt}, expected one of {'/'.join(dtypes)}")
        if shape is not None and tuple(sh) != tuple(shape):
            raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(sh)}, config says {list(shape)}")
        self.used.add(name)
        a = f.get(name) if self.use_mmap else f.load(name)
        return a.astype(np.float32) if dt == "F16" else a    # F16 has no fast kernel: widen once

    def total_bytes(self) -> int:
        return sum(math.prod(shape) * DTYPES[dt].itemsize for dt, shape in map(self.info, self.where))


def _vector(ck: Checkpoint, name: str, n: int) -> np.ndarray:
    """A norm weight or router bias as float32. These small vectors are copied anyway, so they
    are also checked for NaN/Inf (matrices stay mapped and unread: scanning them would read
    the whole checkpoint at open)."""
    a = ck.get(name, (n,), ("BF16", "F32", "F16"))
    v = bf16_to_f32(a) if a.dtype == np.uint16 else np.array(a, np.float32)
    if not np.isfinite(v).all():
        raise ModelFormatError(f"{ck.file_of(name)}: tensor '{name}' has NaN or Inf values")
    return v


def read_matrix(ck: Checkpoint, prefix: str, shape, cfg: Config):
    """`prefix`.weight as bf16/f32, or the pack-quantized triplet as an Int4Tensor."""
    if prefix + ".weight_packed" in ck:
        q = cfg.quantization
        if q is None or q.method != "compressed-tensors":
            raise ModelFormatError(f"{ck.file_of(prefix + '.weight_packed')}: tensor '{prefix}.weight_packed' "
                                   "found but config.json has no compressed-tensors quantization_config")
        out, n_in = shape
        g = q.group_size
        if n_in % g:
            raise ModelFormatError(f"{ck.path}: '{prefix}' input dim {n_in} is not a multiple of group_size {g}")
        packed = ck.get(prefix + ".weight_packed", (out, -(-n_in // 8)), ("I32",))
        scales = ck.get(prefix + ".weight_scale", (out, n_in // g), ("BF16", "F32"))
        if prefix + ".weight_shape" in ck:
            if ck.info(prefix + ".weight_shape")[0] not in ("I32", "I64"):
                raise ModelFormatError(f"{ck.file_of(prefix + '.weight_shape')}: tensor '{prefix}.weight_shape' "
                                       "must be I32 or I64")
            ws = ck.read(prefix + ".weight_shape")
            if ws.shape != (2,) or tuple(int(v) for v in ws) != (out, n_in):
                raise ModelFormatError(f"{ck.file_of(prefix + '.weight_shape')}: tensor '{prefix}.weight_shape' "
                                       f"is {ws.tolist()}, config says {[out, n_in]}")
        return Int4Tensor(packed, scales, (out, n_in), g)
    if prefix + ".weight_scale_inv" in ck:
        q = cfg.quantization
        if q is None or q.method != "fp8":
            raise ModelFormatError(f"{ck.file_of(prefix + '.weight_scale_inv')}: tensor '{prefix}.weight_scale_inv' "
                                   "found but config.json has no fp8 quantization_config")
        bo, bi = q.weight_block_size
        w = ck.get(prefix + ".weight", shape, ("F8_E4M3",))
        s = ck.get(prefix + ".weight_scale_inv", (-(-shape[0] // bo), -(-shape[1] // bi)), ("F32", "BF16"))
        s = bf16_to_f32(s) if s.dtype == np.uint16 else s
        return Fp8Tensor(w, s, tuple(shape), (bo, bi))
    name = prefix + ".weight"
    if name not in ck:
        for part in (".weight_scale", ".weight_shape"):     # an INT4 triplet that lost its codes
            if prefix + part in ck:
                raise ModelFormatError(f"{ck.path}: missing tensor '{prefix}.weight_packed' "
                                       f"('{prefix}{part}' is there)")
    elif ck.info(name)[0].startswith("F8_"):
        raise ModelFormatError(f"{ck.file_of(name)}: tensor '{name}' is FP8 but "
                               f"'{prefix}.weight_scale_inv' is missing")
    return ck.get(name, shape, MATRIX_DTYPES)


def _tiled(ck: Checkpoint, prefix: str, w):
    """With ck.repack, a BF16 matrix that only ever goes through linear() is copied into 16-row
    tiles in anonymous huge-page memory (formats.TiledBF16: one sequential stream per tile for
    the single-token GEMV); when mapped, its file pages are dropped from our mapping but the
    view is kept for batches, which fault them back from the page cache. Anything else is
    returned as it is."""
    if not ck.repack or not isinstance(w, np.ndarray) or w.dtype != np.uint16 or w.ndim != 2:
        return w
    nbytes = math.prod(tiled_bf16_shape(w.shape)) * 2
    buf = mmap.mmap(-1, max(nbytes, 1))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    t = tile_bf16(w, np.frombuffer(buf, np.uint16, count=nbytes // 2))
    if ck.use_mmap:                 # batches read the mapped rows (see TiledBF16.rows)
        ck.release(prefix + ".weight")
        t.rows = w
    return t


def load_weights(cfg: Config, ck: Checkpoint, progress=None) -> Weights:
    """Build model.Weights from checkpoint names, checking every shape against the config.
    progress(i, n) is called after each layer."""
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    N, R, C, Vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
    pre = "language_model.model." if "language_model.model.embed_tokens.weight" in ck else "model."
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"{pre}layers.{i}."

        def m(name, shape):
            return read_matrix(ck, p + name, shape, cfg)

        def lin(name, shape):   # a matrix used only by linear(): tiled when repacking
            return _tiled(ck, p + name, m(name, shape))

        qr = cfg.q_lora_rank
        attn = Attention(
            q_a_proj=lin("self_attn.q_a_proj", (qr, D)) if qr else None,
            q_a_layernorm=_vector(ck, p + "self_attn.q_a_layernorm.weight", qr) if qr else None,
            q_b_proj=lin("self_attn.q_b_proj", (H * (N + R), qr)) if qr else None,
            q_proj=None if qr else lin("self_attn.q_proj", (H * (N + R), D)),
            kv_a_proj_with_mqa=lin("self_attn.kv_a_proj_with_mqa", (C + R, D)),
            kv_a_layernorm=_vector(ck, p + "self_attn.kv_a_layernorm.weight", C),
            kv_b_proj=m("self_attn.kv_b_proj", (H * (N + Vd), C)),
            o_proj=lin("self_attn.o_proj", (D, H * Vd)))
        if cfg.is_moe_layer(i):
            E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
            experts = [(m(f"mlp.experts.{e}.gate_proj", (F, D)), m(f"mlp.experts.{e}.up_proj", (F, D)),
                        m(f"mlp.experts.{e}.down_proj", (D, F))) for e in range(E)]
            S = F * cfg.n_shared_experts
            shared = MLP(lin("mlp.shared_experts.gate_proj", (S, D)), lin("mlp.shared_experts.up_proj", (S, D)),
                         lin("mlp.shared_experts.down_proj", (D, S))) if cfg.n_shared_experts else None
            bias_name = p + "mlp.gate.e_score_correction_bias"
            bias = _vector(ck, bias_name, E) if (bias_name in ck or cfg.topk_method == "noaux_tc") \
                else np.zeros(E, np.float32)
            mlp = MoE(m("mlp.gate", (E, D)), bias, experts, shared)
        else:
            Fd = cfg.intermediate_size
            mlp = MLP(lin("mlp.gate_proj", (Fd, D)), lin("mlp.up_proj", (Fd, D)), lin("mlp.down_proj", (D, Fd)))
        layers.append(Layer(_vector(ck, p + "input_layernorm.weight", D), attn,
                            _vector(ck, p + "post_attention_layernorm.weight", D), mlp))
        if progress:
            progress(i + 1, cfg.num_hidden_layers)
    embed = ck.get(pre + "embed_tokens.weight", (V, D), MATRIX_DTYPES)
    head_name = ("language_model." if pre.startswith("language_model") else "") + "lm_head"
    if cfg.tie_word_embeddings and head_name + ".weight" not in ck:
        lm_head = embed
    else:
        lm_head = _tiled(ck, head_name, read_matrix(ck, head_name, (V, D), cfg))
    weights = Weights(embed, layers, _vector(ck, pre + "norm.weight", D), lm_head)
    _check_all_used(ck, cfg, pre)
    return weights


def _check_all_used(ck: Checkpoint, cfg: Config, pre: str):
    """Every tensor of the language model was consumed: one left over means config.json and
    the checkpoint disagree, and running without it would be silently wrong. Skipped: RoPE
    caches, multi-token-prediction layers (num_nextn_predict_layers, after the last layer) and,
    for K2.5, everything outside `language_model.` (the vision tower)."""
    root = pre[:-len("model.")]
    L = cfg.num_hidden_layers
    mtp = tuple(f"{pre}layers.{i}." for i in range(L, L + cfg.num_nextn_predict_layers))
    left = [n for n in ck.where if n not in ck.used and n.startswith(root)
            and not n.endswith(UNUSED_OK) and not n.startswith(mtp)]
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise ModelFormatError(f"{ck.file_of(left[0])}: tensor '{left[0]}'{more} is not used by the model "
                               "that config.json describes")
