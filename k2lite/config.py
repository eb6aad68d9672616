"""Config: the model hyper-parameters, read from a checkpoint's config.json.

Field names are Hugging Face's (DeepseekV3Config), so a config.json maps onto this with no
renaming. Kimi K2.5 nests the text model under `text_config`; that is unwrapped here. Unknown
keys are ignored; a missing required key, or a value of the wrong type or range, is a
ModelFormatError naming the file and the key (checked here, before any of it sizes an array).
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
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers stored after the last (not run)
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

    # The sizes are required: a config.json without them cannot describe the checkpoint's shapes.
    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim")
    # A missing key the model reads takes transformers' DeepseekV3Config default, as the oracle
    # builds the model (an explicit null q_lora_rank / n_routed_experts still means none). The
    # token ids stay None when missing (transformers says bos 0, eos 1: Kimi's come from its
    # tokenizer), and num_nextn_predict_layers 0 (it only lets MTP tensors go unused).
    HF_DEFAULTS = {"moe_intermediate_size": 2048, "q_lora_rank": 1536, "n_routed_experts": 256,
                   "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
                   "routed_scaling_factor": 2.5, "first_k_dense_replace": 3}

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
        kw.update({k: v for k, v in cls.HF_DEFAULTS.items() if k not in d})
        if "topk_group" not in d and _is_int(kw.get("n_group")):
            kw["topk_group"] = min(kw["topk_group"], kw["n_group"])   # 4 of fewer groups: all of them
        rp = d.get("rope_parameters")                   # transformers 5 spelling
        if rp is not None and not isinstance(rp, dict):
            raise ModelFormatError(f"{source}: 'rope_parameters' must be an object, got {rp!r}")
        if kw.get("rope_scaling") is None and rp:
            if rp.get("rope_type", rp.get("type")) not in (None, "default"):
                kw["rope_scaling"] = dict(rp)
            kw.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        _check_types(kw, source)
        if d.get("architectures") is not None and not _names(d["architectures"], f"{source}: 'architectures'"):
            raise ModelFormatError(f"{source}: 'architectures' is empty")
        if kw.get("n_routed_experts"):
            _check_routing(kw, source)
        else:
            kw["n_routed_experts"] = None
        kw.setdefault("moe_intermediate_size", kw["intermediate_size"])   # an explicit null
        kw["rope_scaling"] = _rope_scaling(kw.get("rope_scaling"), source)
        kw["quantization"] = _quant_config(d.get("quantization_config"), source)
        return cls(**kw, extra=dict(d))

    @classmethod
    def from_json(cls, path: str) -> "Config":
        """path: a checkpoint folder or its config.json."""
        if os.path.isdir(path) and os.path.basename(os.path.normpath(path)) != "config.json":
            path = os.path.join(path, "config.json")
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: file not found") from None
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
        except (ValueError, RecursionError) as e:    # UnicodeDecodeError, JSONDecodeError
            raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict:
        """HF-style dict (without quantization_config) for writing config.json."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("quantization", "extra")}
        return d


# config.json values checked by type and range. Upper bounds are far above any released model;
# past them a value cannot be right and would size arrays or loops from garbage (a corrupt
# num_nextn_predict_layers of 10**12 made the loader build that many layer-name prefixes).
INTS = {  # key -> (smallest, largest) allowed integer
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 17), "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 4096), "num_attention_heads": (1, 4096), "kv_lora_rank": (1, 1 << 16),
    "qk_nope_head_dim": (0, 1 << 14), "qk_rope_head_dim": (2, 1 << 14), "v_head_dim": (1, 1 << 14),
    "moe_intermediate_size": (1, 1 << 20), "n_routed_experts": (0, 1 << 16), "n_shared_experts": (0, 64),
    "num_experts_per_tok": (1, 1 << 16), "n_group": (1, 1 << 16), "topk_group": (1, 1 << 16),
    "first_k_dense_replace": (0, 4096), "moe_layer_freq": (1, 4096), "num_nextn_predict_layers": (0, 64),
    "q_lora_rank": (0, 1 << 17), "max_position_embeddings": (1, 1 << 30)}
NUMBERS = {  # key -> (lower bound, inclusive, upper bound inclusive); an eps of 0.5 is no epsilon
    "rope_theta": (1.0, False, 1e12), "rms_norm_eps": (0.0, True, 0.1),
    "routed_scaling_factor": (0.0, False, 1e4)}
BOOLS = ("norm_topk_prob", "tie_word_embeddings")
STRS = ("model_type", "torch_dtype")
CHOICES = {"scoring_func": ("sigmoid", "softmax"), "topk_method": ("noaux_tc", "greedy", "group_limited_greedy")}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_number(v, what: str, bound: float | None, inclusive: bool, source: str, upper: float | None = None):
    """v is a finite number, above bound (at or above when inclusive; None: any), at most upper."""
    if (not _is_number(v) or (bound is not None and (v < bound or (v == bound and not inclusive)))
            or (upper is not None and v > upper)):
        limit = "" if bound is None else f" {'>=' if inclusive else '>'} {bound:g}"
        limit += "" if upper is None else f"{' and' if limit else ''} <= {upper:g}"
        raise ModelFormatError(f"{source}: {what} must be a number{limit}, got {v!r}")


def _check_types(kw: dict, source: str):
    for k, (lo, hi) in INTS.items():
        if k in kw and (not _is_int(kw[k]) or not lo <= kw[k] <= hi):
            raise ModelFormatError(f"{source}: '{k}' must be an integer in {lo}..{hi}, got {kw[k]!r}")
    for k, (bound, inclusive, upper) in NUMBERS.items():
        if k in kw:
            _check_number(kw[k], f"'{k}'", bound, inclusive, source, upper)
    for k in BOOLS:
        if k in kw and not isinstance(kw[k], bool):
            raise ModelFormatError(f"{source}: '{k}' must be true or false, got {kw[k]!r}")
    for k in STRS:
        if k in kw and not isinstance(kw[k], str):
            raise ModelFormatError(f"{source}: '{k}' must be a string, got {kw[k]!r}")
    for k, allowed in CHOICES.items():
        if k in kw and kw[k] not in allowed:
            raise ModelFormatError(f"{source}: unsupported {k} {kw[k]!r} (supported: {', '.join(allowed)})")
    if kw["qk_rope_head_dim"] % 2:
        raise ModelFormatError(f"{source}: 'qk_rope_head_dim' must be even, got {kw['qk_rope_head_dim']}")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):   # pad: some configs use -1
        if k not in kw:          # optional (DeepSeek-V3 has no pad_token_id): transformers' default None
            continue
        ids = kw[k]
        ids = ids if isinstance(ids, list) and k == "eos_token_id" else [ids]
        if not all(_is_int(i) and (k == "pad_token_id" or 0 <= i < kw["vocab_size"]) for i in ids):
            raise ModelFormatError(f"{source}: '{k}' must be a token id below vocab_size={kw['vocab_size']}, "
                                   f"got {kw[k]!r}")


def _check_routing(kw: dict, source: str):
    """Router settings that the MoE can actually run: K experts out of the kept groups."""
    n, k = kw["n_routed_experts"], kw["num_experts_per_tok"]
    g, tg = kw.get("n_group", 1), kw.get("topk_group", 1)
    if k > n:
        raise ModelFormatError(f"{source}: num_experts_per_tok={k} > n_routed_experts={n}")
    if n % g:
        raise ModelFormatError(f"{source}: n_group={g} does not divide n_routed_experts={n}")
    if tg > g or tg * (n // g) < k:
        raise ModelFormatError(f"{source}: topk_group={tg} of n_group={g} groups cannot hold "
                               f"num_experts_per_tok={k} experts")
    if g > 1 and kw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ModelFormatError(f"{source}: topk_method {kw['topk_method']!r} with n_group > 1 is not "
                               "supported (group routing follows noaux_tc)")


def _rope_scaling(rs, source: str) -> Optional[dict]:
    """rope_scaling: None for plain RoPE, else a checked YaRN dict (model.yarn_inv_freq reads it)."""
    if rs is None or rs == {}:
        return None
    if not isinstance(rs, dict):
        raise ModelFormatError(f"{source}: 'rope_scaling' must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ModelFormatError(f"{source}: unsupported rope_scaling type {kind!r} (supported: yarn, default)")
    where = "rope_scaling"
    _check_number(rs.get("factor"), f"{where}.factor", 1.0, True, source, 1e4)
    orig = rs.get("original_max_position_embeddings")
    if not _is_int(orig) or orig < 1:
        raise ModelFormatError(f"{source}: {where}.original_max_position_embeddings must be a positive "
                               f"integer, got {orig!r}")
    if orig > 1 << 30:
        raise ModelFormatError(f"{source}: {where}.original_max_position_embeddings must be at most "
                               f"{1 << 30}, got {orig!r}")
    # mscale enters the softmax scale as (0.1 * mscale * ln(factor) + 1)^2: released values are ~1
    # (DeepSeek-V3, K2: 1.0); 1e30 overflowed to inf and gave NaN logits without a word
    for k, bound, inclusive, upper in (("beta_fast", 0.0, True, 1e4), ("beta_slow", 0.0, True, 1e4),
                                       ("mscale", 0.0, True, 100.0), ("mscale_all_dim", 0.0, True, 100.0),
                                       ("attention_factor", 0.0, False, 100.0)):
        if rs.get(k) is not None:
            _check_number(rs[k], f"{where}.{k}", bound, inclusive, source, upper)
    if not isinstance(rs.get("truncate", True), bool):
        raise ModelFormatError(f"{source}: {where}.truncate must be true or false, got {rs['truncate']!r}")
    return rs


def _quant_config(q, source) -> Optional[QuantConfig]:
    if q is None:
        return None
    where = f"{source}: quantization_config"
    if not isinstance(q, dict):
        raise ModelFormatError(f"{where} is not an object")
    method = q.get("quant_method", "")
    if method == "fp8":
        bs = q.get("weight_block_size") or [128, 128]
        if not isinstance(bs, list) or len(bs) != 2 or not all(_is_int(b) and b > 0 for b in bs):
            raise ModelFormatError(f"{where}.weight_block_size must be two positive integers, got {bs!r}")
        return QuantConfig(method="fp8", format="fp8", num_bits=8, group_size=0,
                           ignore=_names(q.get("modules_to_not_convert"), f"{where}.modules_to_not_convert"),
                           weight_block_size=tuple(bs))
    if method != "compressed-tensors":
        raise ModelFormatError(f"{source}: unsupported quant_method {method!r}")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ModelFormatError(f"{where}.config_groups is empty or not an object")
    if len(groups) != 1:
        raise ModelFormatError(f"{source}: only one quantization config group is supported")
    name, g = next(iter(groups.items()))
    if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
        raise ModelFormatError(f"{where}.config_groups.{name}.weights is not an object")
    w = g["weights"]
    fmt = g.get("format", q.get("format"))
    if fmt != "pack-quantized":
        raise ModelFormatError(f"{source}: unsupported compressed-tensors format {fmt!r}")
    kind, bits, gs = w.get("type", "int"), w.get("num_bits"), w.get("group_size")
    if kind != "int" or bits != 4:
        raise ModelFormatError(f"{source}: only 4-bit int pack-quantized is supported, got type {kind!r} "
                               f"num_bits {bits!r}")
    if w.get("strategy", "group") != "group" or w.get("symmetric", True) is not True:
        raise ModelFormatError(f"{source}: only symmetric group quantization is supported, got strategy "
                               f"{w.get('strategy')!r} symmetric {w.get('symmetric')!r}")
    if not _is_int(gs) or gs <= 0:
        raise ModelFormatError(f"{where}: group_size must be a positive integer, got {gs!r}")
    return QuantConfig(num_bits=4, group_size=gs, symmetric=True, ignore=_names(q.get("ignore"), f"{where}.ignore"))


def _names(v, what: str) -> tuple:
    """A list of module-name patterns (or nothing)."""
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        raise ModelFormatError(f"{what} must be a list of names, got {v!r}")
    return tuple(v)
