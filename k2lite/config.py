"""Config: the model hyper-parameters, read from a checkpoint's config.json.

Field names are Hugging Face's (DeepseekV3Config), so a config.json maps onto this with no
renaming. Kimi K2.5 nests the text model under `text_config`; that is unwrapped here. Unknown
keys are ignored; a missing required key is a ModelFormatError naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import ModelFormatError


@dataclass(frozen=True)
class QuantConfig:
    """compressed-tensors `pack-quantized` settings of the routed experts (K2 Thinking)."""
    method: str = "compressed-tensors"
    format: str = "pack-quantized"
    num_bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    ignore: tuple = ()                 # module-name patterns kept unquantized ("re:" = regex)
    weight_block_size: Optional[tuple] = None  # fp8 checkpoints: [128, 128]


@dataclass(frozen=True)
class Config:
    # --- sizes
    vocab_size: int
    hidden_size: int
    intermediate_size: int             # dense FFN width (layers < first_k_dense_replace)
    moe_intermediate_size: int         # each routed expert's width
    num_hidden_layers: int
    num_attention_heads: int
    # --- MLA attention
    kv_lora_rank: int                  # C: latent width cached per token
    qk_nope_head_dim: int
    qk_rope_head_dim: int              # R: rope part, shared by all heads on the key side
    v_head_dim: int
    q_lora_rank: Optional[int] = None  # None: q_proj straight from x (DeepSeek-V2-Lite)
    # --- MoE
    n_routed_experts: Optional[int] = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # --- positions and norms
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # --- tokens
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None   # int or list of ints
    pad_token_id: Optional[int] = None
    # --- format
    quantization: Optional[QuantConfig] = None
    model_type: str = "deepseek_v3"
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # whole original dict

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim")

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (self.n_routed_experts is not None and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale² when rope_scaling is YaRN (always, as HF)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if rs.get("rope_type", rs.get("type")) == "yarn":
            factor = float(rs.get("factor", 1.0))
            m_all = float(rs.get("mscale_all_dim", 0.0) or 0.0)
            if m_all and factor > 1:
                m = 0.1 * m_all * math.log(factor) + 1.0
                scale *= m * m
        return scale

    @property
    def eos_ids(self) -> tuple:
        e = self.eos_token_id
        return tuple(e) if isinstance(e, (list, tuple)) else (() if e is None else (e,))

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Config":
        if not isinstance(d, dict):
            raise ModelFormatError(f"{source}: top level is not a JSON object")
        if isinstance(d.get("text_config"), dict):      # Kimi K2.5: vision wrapper
            d = {**d["text_config"], "quantization_config": d.get("quantization_config",
                 d["text_config"].get("quantization_config"))}
        for key in cls.REQUIRED:
            if d.get(key) is None:
                raise ModelFormatError(f"{source}: missing required key '{key}'")
        names = {f.name for f in dataclasses.fields(cls)} - {"quantization", "extra"}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        if kw.get("rope_scaling") is None and isinstance(d.get("rope_parameters"), dict):
            rp = d["rope_parameters"]                   # transformers 5 spelling
            if rp.get("rope_type", rp.get("type")) not in (None, "default"):
                kw["rope_scaling"] = dict(rp)
            kw.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "num_experts_per_tok", "n_group", "topk_group",
                "first_k_dense_replace", "moe_layer_freq")
        for k in ints:
            if k in kw and (not isinstance(kw[k], int) or isinstance(kw[k], bool) or kw[k] < 0):
                raise ModelFormatError(f"{source}: '{k}' must be a non-negative integer, got {kw[k]!r}")
        for k in ("moe_intermediate_size", "n_routed_experts", "q_lora_rank", "n_shared_experts"):
            if k in kw and (not isinstance(kw[k], int) or kw[k] < 0):
                raise ModelFormatError(f"{source}: '{k}' must be an integer, got {kw[k]!r}")
        if kw.get("n_routed_experts"):
            kw.setdefault("moe_intermediate_size", kw["intermediate_size"])
            n, g = kw["n_routed_experts"], kw.get("n_group", 1)
            if g < 1 or n % g or kw.get("topk_group", 1) > g:
                raise ModelFormatError(f"{source}: n_group={g}/topk_group must divide n_routed_experts={n}")
            if kw.get("num_experts_per_tok", 1) > n:
                raise ModelFormatError(f"{source}: num_experts_per_tok > n_routed_experts")
        else:
            kw["n_routed_experts"] = None
            kw.setdefault("moe_intermediate_size", kw["intermediate_size"])
        if kw.get("scoring_func", "sigmoid") not in ("sigmoid", "softmax"):
            raise ModelFormatError(f"{source}: unsupported scoring_func {kw['scoring_func']!r}")
        if kw.get("qk_rope_head_dim", 0) % 2:
            raise ModelFormatError(f"{source}: qk_rope_head_dim must be even")
        if isinstance(kw.get("rope_scaling"), dict):
            rs = kw["rope_scaling"]
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in (None, "default", "yarn"):
                raise ModelFormatError(f"{source}: unsupported rope_scaling type {kind!r}")
            if kind in (None, "default"):
                kw["rope_scaling"] = None
        kw["quantization"] = _quant_config(d.get("quantization_config"), source)
        return cls(**kw, extra=dict(d))

    @classmethod
    def from_json(cls, path: str) -> "Config":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: file not found") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict:
        """HF-style dict (without quantization_config) for writing config.json."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("quantization", "extra")}
        return d


def _quant_config(q, source) -> Optional[QuantConfig]:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ModelFormatError(f"{source}: quantization_config is not an object")
    method = q.get("quant_method", "")
    if method == "fp8":
        bs = q.get("weight_block_size") or [128, 128]
        return QuantConfig(method="fp8", format="fp8", num_bits=8, group_size=0,
                           ignore=tuple(q.get("modules_to_not_convert") or ()),
                           weight_block_size=tuple(bs))
    if method != "compressed-tensors":
        raise ModelFormatError(f"{source}: unsupported quant_method {method!r}")
    fmt = q.get("format")
    groups = q.get("config_groups") or {}
    if not groups:
        raise ModelFormatError(f"{source}: quantization_config.config_groups is empty")
    if len(groups) != 1:
        raise ModelFormatError(f"{source}: only one quantization config group is supported")
    g = next(iter(groups.values()))
    w = (g or {}).get("weights") or {}
    fmt = g.get("format", fmt)
    if fmt != "pack-quantized":
        raise ModelFormatError(f"{source}: unsupported compressed-tensors format {fmt!r}")
    bits, gs = w.get("num_bits"), w.get("group_size")
    if w.get("type", "int") != "int" or bits not in (4, 8) or not isinstance(gs, int) or gs <= 0:
        raise ModelFormatError(f"{source}: unsupported weights quantization {w!r}")
    if w.get("strategy", "group") != "group" or not w.get("symmetric", True):
        raise ModelFormatError(f"{source}: only symmetric group quantization is supported")
    if bits != 4:
        raise ModelFormatError(f"{source}: only 4-bit pack-quantized is supported")
    return QuantConfig(num_bits=bits, group_size=gs, symmetric=True,
                       ignore=tuple(q.get("ignore") or ()))
