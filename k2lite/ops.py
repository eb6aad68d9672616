"""The only door from the model to the kernels.

A backend is a module with some of ref.py's functions, same names and signatures:
`ref` (numpy, always there), `cpu` (k2lite/cpu.py over the pybind11 module k2lite._cpu) and
`cuda` (k2lite/cuda.py over k2lite._cuda). `get(name)` returns a namespace whose every op
comes from the chosen backend where it has it, and from `ref` otherwise, so a backend can
grow one op at a time. The default is chosen once at import: K2LITE_BACKEND=ref|cpu|cuda
overrides, else `cpu` when its module imports, else `ref`.
"""
from __future__ import annotations

import importlib
import os
import types

from . import ref

OPS = ("bf16_matmul", "int4_matmul", "f32_matmul", "linear", "dense", "rmsnorm", "silu",
       "rope", "swiglu_expert", "moe", "softmax", "attention", "mla_decode")
_cache: dict = {}


def available(name: str) -> bool:
    try:
        _module(name)
        return True
    except ImportError:
        return False


def _module(name: str):
    if name == "ref":
        return ref
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown backend {name!r}: expected ref, cpu or cuda")
    return importlib.import_module(f"k2lite.{name}")


def get(name: str | None = None) -> types.SimpleNamespace:
    """Op table for backend `name` (None: the default), ref filling any gaps."""
    name = name or DEFAULT
    if name not in _cache:
        mod = _module(name)
        ns = types.SimpleNamespace(name=name)
        for op in OPS:
            setattr(ns, op, getattr(mod, op, None) or getattr(ref, op))
        if hasattr(mod, "set_threads"):
            ns.set_threads = mod.set_threads
        _cache[name] = ns
    return _cache[name]


def _default() -> str:
    env = os.environ.get("K2LITE_BACKEND")
    if env:
        return env
    return "cpu" if available("cpu") else "ref"


DEFAULT = _default()
