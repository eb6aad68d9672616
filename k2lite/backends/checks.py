"""Argument checks shared by the native backends (cpu.py, cuda.py): one-line ValueErrors that
name the argument, raised before any pointer reaches C++ or CUDA."""
from __future__ import annotations

import numpy as np


def activation(a, name: str, ndim: int, dtype=np.float32) -> np.ndarray:
    """An activation: converted to a C-contiguous array of dtype (cheap, small)."""
    a = np.ascontiguousarray(a, dtype)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {a.shape}")
    return a


def weight(a, name: str, dtype, shape: tuple) -> np.ndarray:
    """A weight: used in place (no copy), so dtype, layout and shape must already be right."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (weights are not copied)")
    return a


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_scales(s, name: str, shape: tuple) -> np.ndarray:
    """INT4 group scales: bf16 bits (uint16) or float32, used in place."""
    if not isinstance(s, np.ndarray) or s.dtype not in (np.uint16, np.float32):
        raise ValueError(f"{name}: expected uint16 (bf16 bits) or float32 scales")
    return weight(s, name, s.dtype, shape)


def bf16_args(x, w) -> np.ndarray:
    """bf16_matmul's arguments checked: x as float32 [T, I] (w: uint16 [N, I], in place)."""
    x = activation(x, "x", 2)
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError("w: expected a 2-D uint16 array")
    weight(w, "w", np.uint16, (w.shape[0], x.shape[1]))
    return x


def int4_args(x, packed, scales, group_size) -> tuple:
    """int4_matmul's arguments checked: (x as float32 [T, I], N, group_size)."""
    x = activation(x, "x", 2)
    group_size = int(group_size)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if not isinstance(packed, np.ndarray) or packed.ndim != 2:
        raise ValueError("packed: expected a 2-D int32 array")
    n, i = packed.shape[0], x.shape[1]
    weight(packed, "packed", np.int32, (n, cdiv(i, 8)))
    group_scales(scales, "scales", (n, cdiv(i, group_size)))
    return x, n, group_size


def block_sizes(block) -> tuple:
    """An FP8 weight_block_size: (bo, bi), both positive."""
    try:
        bo, bi = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block: expected (bo, bi), got {block!r}") from None
    if bo <= 0 or bi <= 0:
        raise ValueError(f"block sizes must be positive, got {(bo, bi)}")
    return bo, bi


def fp8_args(x, codes, scale_inv, block) -> tuple:
    """fp8_matmul's arguments checked: (x as float32 [T, I], N, bo, bi)."""
    x = activation(x, "x", 2)
    if not isinstance(codes, np.ndarray) or codes.ndim != 2:
        raise ValueError("weight: expected a 2-D uint8 array of e4m3fn codes")
    _, _, bo, bi = fp8_weight(codes, scale_inv, block, "fp8", (codes.shape[0], x.shape[1]))
    return x, codes.shape[0], bo, bi


def fp8_weight(codes, scale_inv, block, name: str, shape: tuple) -> tuple:
    """Checks an FP8 matrix (codes [N, I] uint8, scale_inv float32 [ceil(N/bo), ceil(I/bi)]):
    (codes, scale_inv, bo, bi)."""
    bo, bi = block_sizes(block)
    weight(codes, name + ".weight", np.uint8, shape)
    weight(scale_inv, name + ".scale_inv", np.float32, (cdiv(shape[0], bo), cdiv(shape[1], bi)))
    return codes, scale_inv, bo, bi
