"""INT4 pack-quantized and BF16 conversions, bit-exact against compressed-tensors and torch."""
import numpy as np
import pytest

from k2lite.formats import (bf16_to_f32, dequantize_int4, f32_to_bf16, pack_int4,
                            quantize_int4, unpack_int4)

torch = pytest.importorskip("torch")
ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def test_worked_examples_from_the_spec():
    q = np.array([[1, -2, 3, -4, 5, -6, 7, -8], [-7, 0, 7, -1, 2, -3, 6, 5]])
    words = pack_int4(q)
    assert words.dtype == np.int32
    assert words[0, 0] == 254_626_665 and words[1, 0] == -564_494_463
    assert (unpack_int4(words, 8) == q).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(5, 64), (33, 96), (7, 8), (3, 13)])
def test_pack_unpack_bit_exact_with_compressed_tensors(seed, shape):
    q = np.random.default_rng(seed).integers(-8, 8, shape).astype(np.int8)
    want = ct_helpers.pack_to_int32(torch.from_numpy(q), 4).numpy()
    got = pack_int4(q)
    assert got.shape == want.shape and (got == want).all()
    back = ct_helpers.unpack_from_int32(torch.from_numpy(got), 4, torch.Size(shape)).numpy()
    assert (back == q).all() and (unpack_int4(got, shape[1]) == q).all()


@pytest.mark.parametrize("seed", [0, 3])
def test_quantize_and_dequantize_match_compressed_tensors(seed):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((19, 128)).astype(np.float32)
    t = quantize_int4(w, 32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    g = torch.from_numpy(w).reshape(19, 4, 32)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    assert (f32_to_bf16(scale.float().numpy()) == t.scales).all()
    scale_t = torch.from_numpy(t.scales.view(np.int16)).view(torch.bfloat16)
    q = quantize(torch.from_numpy(w), scale_t, None, args).to(torch.int8).numpy()
    assert (unpack_int4(t.packed, 128) == q).mean() > 0.99   # bf16 rounding of w may flip ties
    want = dequantize(torch.from_numpy(unpack_int4(t.packed, 128)), scale_t, None, args).float().numpy()
    assert (dequantize_int4(t) == want).all()


def test_bf16_round_to_nearest_even_matches_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.0e38], np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert (f32_to_bf16(x) == want).all()
    assert (bf16_to_f32(want) == torch.from_numpy(x).to(torch.bfloat16).float().numpy()).all()


def test_qat_grid_uses_fifteen_levels():
    w = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    q = unpack_int4(quantize_int4(w, 32, qat_grid=True).packed, 64)
    assert q.min() >= -7 and q.max() <= 7


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_int4(np.array([[8, 0, 0, 0, 0, 0, 0, 0]]))
