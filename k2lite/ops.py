"""The only door from the model to the kernels.

A backend is a module with some of ref.py's functions, same names and signatures:
`ref` (numpy, always there), `cpu` (k2lite/backends/cpu.py over its pybind11 modules) and
`cuda` (k2lite/backends/cuda.py over k2lite.backends._cuda). `get(name)` returns a namespace whose every op
comes from the chosen backend where it has it, and from `ref` otherwise, so a backend can
grow one op at a time. The default is chosen once at import: K2LITE_BACKEND=ref|cpu|cuda
overrides, else `cpu` when its module imports, else `ref`.
"""
from __future__ import annotations

import importlib
import os
import types

import numpy as np

from . import ref
from .formats import Fp8Tensor, Int4Tensor, TiledBF16, to_dense

# kernels a backend may provide; the composite ops below are built here from them, so the
# choice of kernel by weight format happens in exactly one place (DeepSeek's linear())
KERNELS = ("bf16_matmul", "bf16_tiled_matmul", "int4_matmul", "fp8_matmul", "f32_matmul", "rmsnorm",
           "silu", "rope", "moe", "softmax", "attention", "attention_partial", "mla_attention_partial",
           "mla_decode", "mla_absorb_q", "mla_absorb_o")
_cache: dict = {}


def available(name: str) -> bool:
    try:
        _module(name)
        return True
    except ImportError:
        return False


def missing_reason(name: str) -> str | None:
    """Why backend `name` cannot be used here (one line), or None when it can."""
    try:
        _module(name)
        return None
    except ImportError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def describe(name: str) -> str:
    """The backend as benchmarks should name it: "cpu (avx512 build, 2 threads)", "ref (numpy)"."""
    if name == "ref":
        return "ref (numpy reference)"
    mod = _module(name)
    if name == "cpu":
        return f"cpu ({mod.LEVEL} build, {mod.get_threads()} threads)"
    return name


def _module(name: str):
    if name == "ref":
        return ref
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown backend {name!r}: expected ref, cpu or cuda")
    return importlib.import_module(f"k2lite.backends.{name}")


def get(name: str | None = None) -> types.SimpleNamespace:
    """Op table for backend `name` (None: the default). Gaps in the cuda backend are filled by
    the cpu backend's kernels when it is built (host ops at native speed, inputs validated),
    every other gap by ref."""
    name = name or DEFAULT
    if name not in _cache:
        mod = _module(name)
        host = _module("cpu") if name == "cuda" and available("cpu") else ref
        ns = types.SimpleNamespace(name=name)
        for op in KERNELS:
            setattr(ns, op, getattr(mod, op, None) or getattr(host, op, None) or getattr(ref, op))
        # not a kernel: how this backend stores the latent cache (a function: exact mode changes it)
        ns.cache_dtype = getattr(mod, "cache_dtype", ref.cache_dtype)
        if hasattr(mod, "set_threads") or hasattr(host, "set_threads"):
            ns.set_threads = getattr(mod, "set_threads", None) or host.set_threads
        if hasattr(mod, "moe"):
            _compose(ns, mod.moe, getattr(mod, "moe_supports", None))
        else:   # cuda without its own moe: the host's fused moe (routed experts on the CPU)
            _compose(ns, getattr(host, "moe", None), getattr(host, "moe_supports", None))
        _cache[name] = ns
    return _cache[name]


def _native_int4_bf16(w) -> bool:
    return isinstance(w, Int4Tensor) or getattr(w, "dtype", None) == np.uint16


def _compose(ns, native_moe, moe_supports=None):
    """linear / dense / swiglu_expert / moe over the backend's kernels. The backend's fused
    moe runs when it supports the experts' format (its `moe_supports(weight)`, else INT4/BF16);
    other formats use ref's grouping over this backend's matmuls."""
    moe_supports = moe_supports or _native_int4_bf16
    def linear(x, w):
        if isinstance(w, Int4Tensor):
            return ns.int4_matmul(x, w.packed, w.scales, w.group_size)
        if isinstance(w, Fp8Tensor):
            return ns.fp8_matmul(x, w.weight, w.scale_inv, w.block)
        if isinstance(w, TiledBF16):
            if x.shape[0] > 1 and w.rows is not None:
                return ns.bf16_matmul(x, w.rows)
            return ns.bf16_tiled_matmul(x, w.data, w.shape[0])
        return ns.bf16_matmul(x, w) if w.dtype == np.uint16 else ns.f32_matmul(x, w)

    def swiglu_expert(x, gate, up, down):
        return linear(ns.silu(linear(x, gate)) * linear(x, up), down)

    def moe(x, experts, idx, weights):
        if native_moe is not None and moe_supports(experts[0][0]):
            return native_moe(x, experts, idx, weights)
        return ref.moe(x, experts, idx, weights, expert_fn=swiglu_expert)   # other formats

    ns.linear, ns.swiglu_expert, ns.moe, ns.dense = linear, swiglu_expert, moe, to_dense


def _default() -> str:
    env = os.environ.get("K2LITE_BACKEND")
    if env:
        return env
    return "cpu" if available("cpu") else "ref"


DEFAULT = _default()
