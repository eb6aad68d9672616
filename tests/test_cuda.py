"""CUDA module: built wherever nvcc exists; usable only with a GPU (skips cleanly otherwise)."""
import importlib

import numpy as np
import pytest

from k2lite import ops


def test_cuda_module_reports_devices_when_built():
    try:
        cuda_ext = importlib.import_module("k2lite.backends._cuda")
    except ImportError:
        pytest.skip("k2lite.backends._cuda not built (no nvcc at install time)")
    n = cuda_ext.device_count()
    assert isinstance(n, int) and n >= 0
    assert ops.available("cuda") == (n > 0)
    with pytest.raises(ValueError):
        cuda_ext.device_name(n)


@pytest.mark.skipif(not ops.available("cuda"), reason="no CUDA device")
def test_cuda_device_names():
    from k2lite.backends import cuda
    assert all(cuda.devices())


# ---------------------------------------------------------------- GEMV kernels vs ref
# Fresh random inputs at sizes that hit every path of src/cuda/matmul.cu: I not a multiple of
# 8 / 32 / 256 (scalar and tail paths), N odd and not a multiple of the 8 rows per block, T
# below, at and above the 16-token chunk, groups that do and do not divide 8.
from k2lite import ref  # noqa: E402
from k2lite.formats import f32_to_bf16, pack_int4  # noqa: E402

needs_cuda = pytest.mark.skipif(not ops.available("cuda"), reason="no CUDA device")
SEEDS = (0, 1, 2)
TOKENS = (1, 3, 16, 20)
BF16_SIZES = [(7, 9), (64, 33), (129, 17), (256, 8), (1000, 31), (2048, 64), (7168, 5)]   # (I, N)
INT4_SIZES = [(7, 9, 32), (64, 33, 32), (100, 17, 32), (256, 8, 32), (1000, 31, 128),
              (2048, 64, 32), (7168, 5, 32), (13, 3, 13), (45, 11, 12), (300, 7, 100), (96, 5, 96),
              (250, 9, 32), (96, 5, 12), (120, 5, 20)]   # (I, N, group)


def _nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean((a - b) ** 2) / max(np.mean(b ** 2), 1e-30))


def _check(got, want):
    assert got.shape == want.shape and got.dtype == np.float32, (got.shape, got.dtype)
    assert not np.isnan(got).any()
    assert _nmse(got, want) <= 1e-10, _nmse(got, want)
    mad = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert mad <= 1e-5 * max(1.0, float(np.max(np.abs(want)))), mad


def _int4_inputs(rng, T, I, N, g, f32_scales=False):
    """Any codes, any (I, group): built directly, as quantize_int4 needs I % group == 0."""
    q = rng.integers(-8, 8, (N, I))
    s = rng.uniform(0.01, 0.2, (N, -(-I // g))).astype(np.float32)
    scales = s if f32_scales else f32_to_bf16(s)
    return rng.standard_normal((T, I)).astype(np.float32), pack_int4(q), scales, g


@needs_cuda
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("I,N", BF16_SIZES)
def test_cuda_bf16_matmul(I, N, T, seed):
    from k2lite.backends import cuda
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, I)).astype(np.float32)
    w = f32_to_bf16(rng.standard_normal((N, I)).astype(np.float32))
    _check(cuda.bf16_matmul(x, w), ref.bf16_matmul(x, w))


@needs_cuda
@pytest.mark.parametrize("f32_scales", (False, True), ids=("bf16s", "f32s"))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("I,N,g", INT4_SIZES)
def test_cuda_int4_matmul(I, N, g, T, seed, f32_scales):
    from k2lite.backends import cuda
    args = _int4_inputs(np.random.default_rng(seed), T, I, N, g, f32_scales)
    _check(cuda.int4_matmul(*args), ref.int4_matmul(*args))


@needs_cuda
def test_cuda_int4_padding_codes_ignored():
    """Nibbles past I in the last word (any value) do not change the result."""
    from k2lite.backends import cuda
    x, packed, scales, g = _int4_inputs(np.random.default_rng(9), 2, 13, 5, 13)
    dirty = packed.copy()
    dirty[:, -1] |= np.int32(0x7 << 20) | np.int32(0xF << 24)   # columns 13, 14 (word 1 holds 8..15)
    _check(cuda.int4_matmul(x, dirty, scales, g), ref.int4_matmul(x, packed, scales, g))


@needs_cuda
def test_cuda_weights_uploaded_once():
    from k2lite.backends import cuda
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    w = f32_to_bf16(rng.standard_normal((8, 64)).astype(np.float32))
    cuda.bf16_matmul(x, w)
    buf = cuda.device_buffer(w)
    assert (buf.dtype, buf.shape, buf.nbytes) == ("uint16", (8, 64), w.nbytes)
    cuda.bf16_matmul(x, w)
    assert cuda.device_buffer(w) is buf
    cuda.clear_cache()
    assert cuda.cached_bytes() == 0


@needs_cuda
@pytest.mark.parametrize("bad", ["x_cols", "w_dtype", "w_1d", "w_noncontig", "packed_dtype", "packed_shape",
                                 "scales_shape", "scales_dtype", "group_zero", "x_3d"])
def test_cuda_bad_inputs_raise(bad):
    from k2lite.backends import cuda
    rng = np.random.default_rng(4)
    xb = rng.standard_normal((2, 64)).astype(np.float32)
    wb = f32_to_bf16(rng.standard_normal((8, 64)).astype(np.float32))
    x, packed, scales, g = _int4_inputs(rng, 2, 256, 8, 32)
    calls = {
        "x_cols": lambda: cuda.bf16_matmul(xb[:, :32], wb),
        "w_dtype": lambda: cuda.bf16_matmul(xb, wb.astype(np.int16)),
        "w_1d": lambda: cuda.bf16_matmul(xb, wb.reshape(-1)),
        "w_noncontig": lambda: cuda.bf16_matmul(xb[:, :32], wb[:, ::2]),
        "packed_dtype": lambda: cuda.int4_matmul(x, packed.view(np.uint32), scales, g),
        "packed_shape": lambda: cuda.int4_matmul(x[:, :128], packed, scales, g),
        "scales_shape": lambda: cuda.int4_matmul(x, packed, scales[:, :4].copy(), g),
        "scales_dtype": lambda: cuda.int4_matmul(x, packed, scales.astype(np.float64), g),
        "group_zero": lambda: cuda.int4_matmul(x, packed, scales, 0),
        "x_3d": lambda: cuda.int4_matmul(x[None], packed, scales, g),
    }
    with pytest.raises(ValueError):
        calls[bad]()


@needs_cuda
def test_cuda_native_checks_raise():
    """The pybind11 layer checks on its own: a direct call with mismatched buffers raises."""
    from k2lite import _cuda
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w = _cuda.upload(f32_to_bf16(rng.standard_normal((8, 64)).astype(np.float32)))
    out = np.empty((2, 8), np.float32)
    _cuda.bf16_matmul(out, x, w, 8, 64)
    for args in ((out, x, w, 8, 32), (out, x, w, 9, 64), (out[:, :4], x, w, 8, 64),
                 (out, x.astype(np.float64), w, 8, 64), (out.T, x, w, 8, 64)):
        with pytest.raises(ValueError):
            _cuda.bf16_matmul(*args)
    with pytest.raises(ValueError):
        _cuda.int4_matmul(out, x, w, w, 8, 64, 32, False)
