"""CUDA backend: ref.py's ops over k2lite.backends._cuda (src/cuda/*.cu).

Importing this module fails with ImportError unless the CUDA module was built (setup.py does
so when nvcc is found) and a GPU is visible, so `ops.available("cuda")` means "usable here".

On the GPU (first kernels, not yet run on one): `bf16_matmul` and `int4_matmul` (src/cuda/matmul.cu), with
ref.py's signatures: host numpy in, host float32 numpy out. Each weight array is uploaded to
the device once, on first use, and its DeviceBuffer cached (keyed by id() and holding a
reference to the array, so the id cannot be reused while cached: weights must not be modified
in place afterwards; `clear_cache()` frees them). Activations are copied host -> device and
results device -> host on every call. Every other op in ops.KERNELS (fp8_matmul, rmsnorm,
attention, mla_decode, ...) is not defined here: k2lite/ops.py takes it from the cpu backend
when that is built (else ref), and the fused moe too, so routed experts run on the CPU; the
composite ops (linear, swiglu_expert) use the GPU matmuls.
"""
from __future__ import annotations

import numpy as np

from . import _cuda
from .checks import bf16_args, fp8_args, int4_args
from ..ref import cache_dtype  # noqa: F401  (fp32 activations here: a float32 cache, not the cpu's bf16)
from ..formats import Fp8Tensor, dequantize_fp8, f32_to_bf16

if _cuda.device_count() == 0:
    raise ImportError("k2lite.backends._cuda is built but no CUDA device is visible")


def devices() -> list:
    return [_cuda.device_name(i) for i in range(_cuda.device_count())]


# ---------------------------------------------------------------- device copies of weights
_buffers: dict = {}     # id(array) -> (array, DeviceBuffer)


def device_buffer(a: np.ndarray):
    """The cached DeviceBuffer of host array `a` (uploaded on first use)."""
    hit = _buffers.get(id(a))
    if hit is not None and hit[0] is a:
        return hit[1]
    buf = _cuda.upload(a)
    _buffers[id(a)] = (a, buf)
    return buf


def clear_cache() -> None:
    """Free every cached device copy of a weight."""
    _buffers.clear()


def cached_bytes() -> int:
    return sum(buf.nbytes for _, buf in _buffers.values())


# ---------------------------------------------------------------- linear layers
def bf16_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y[T,N] = x[T,I] · w[N,I]ᵀ with w as bf16 bits."""
    x = bf16_args(x, w)
    n, i = w.shape[0], x.shape[1]
    out = np.empty((x.shape[0], n), np.float32)
    _cuda.bf16_matmul(out, x, device_buffer(w), n, i)
    return out


def int4_matmul(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """y[T,N] = x[T,I] · W[N,I]ᵀ, W = (codes - 8) * scale[n, i // group_size] (rounded to
    bf16 when the scales are bf16, as compressed-tensors dequantizes)."""
    x, n, group_size = int4_args(x, packed, scales, group_size)
    i = x.shape[1]
    out = np.empty((x.shape[0], n), np.float32)
    _cuda.int4_matmul(out, x, device_buffer(packed), device_buffer(scales), n, i, group_size,
                      bool(scales.dtype == np.float32))
    return out


def fp8_matmul(x: np.ndarray, weight: np.ndarray, scale_inv: np.ndarray, block: tuple) -> np.ndarray:
    """FP8 block-quantized weights (K2 Base / Instruct): dequantized on first use to BF16 on the
    device (one host pass, the host copy dropped after upload), then the BF16 GEMV. Each
    dequantized weight is rounded to bf16 (relative error <= 2^-9 per weight). No native FP8
    kernel yet."""
    x, n, bo, bi = fp8_args(x, weight, scale_inv, block)
    i = x.shape[1]
    hit = _buffers.get(id(weight))
    if hit is None or hit[0] is not weight:
        w16 = f32_to_bf16(dequantize_fp8(Fp8Tensor(weight, scale_inv, (n, i), (bo, bi))))
        hit = _buffers[id(weight)] = (weight, _cuda.upload(w16))
    out = np.empty((x.shape[0], n), np.float32)
    _cuda.bf16_matmul(out, x, hit[1], n, i)
    return out
