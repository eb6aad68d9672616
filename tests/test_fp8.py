"""FP8 checkpoints (K2 Base / Instruct, DeepSeek-V3) and `k2lite convert` to the INT4 release layout."""
import json
import os

import numpy as np
import pytest

import k2lite
from k2lite.formats import E4M3, Fp8Tensor, dequantize_fp8, f32_to_e4m3, quantize_fp8
from k2lite.testing.random_model import preset, write_random_model

torch = pytest.importorskip("torch")
from hf_oracle import hf_logits, hf_model  # noqa: E402
from conftest import BACKENDS  # noqa: E402


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_e4m3_decode_all_256_codes_bit_exact():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(E4M3, want, equal_nan=True)
    assert np.isnan(E4M3[0x7F]) and np.isnan(E4M3[0xFF]) and E4M3[0x7E] == 448


def test_e4m3_encode_matches_torch():
    x = np.concatenate([np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 50,
                        np.array([0, -0.0, 1e-9, 500, -1e6, 2 ** -9, 3 * 2 ** -10], np.float32)])
    want = torch.from_numpy(np.clip(x, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert (f32_to_e4m3(x) == want).all()


def test_block_dequant_odd_shapes():
    w = np.random.default_rng(1).standard_normal((200, 300)).astype(np.float32)
    t = quantize_fp8(w)
    assert t.scale_inv.shape == (2, 3)
    d = dequantize_fp8(t)
    assert rel(d, w) < 0.05
    assert (dequantize_fp8(t, slice(128, 200)) == d[128:]).all()


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8"))
    cfg = preset("tiny", hidden_size=160, intermediate_size=288, moe_intermediate_size=160, q_lora_rank=96)
    write_random_model(path, cfg, seed=7, fp8=True)
    return path


def test_fp8_checkpoint_matches_transformers(fp8_model):
    with open(os.path.join(fp8_model, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "fp8"
    ids = np.random.default_rng(3).integers(0, 384, 40)
    hf = hf_model(fp8_model)
    want = hf_logits(hf, ids)
    # The cpu backend's fast path runs bf16 activations and bf16 attention products, as a GPU
    # does: on this random MoE a score moved by bf16 rounding can flip an expert choice, so its
    # bound is transformers' own bf16 run against fp32 (0.12 here; the fast path 0.08). Its
    # exact mode must match as ref does: the FP8 blocks are decoded exactly either way.
    with torch.no_grad():
        bound = rel(hf.to(torch.bfloat16)(torch.tensor([list(ids)]), use_cache=False).logits[0].float().numpy(), want)
    for b in BACKENDS:
        for exact in ((False, True) if b == "cpu" else (False,)):
            if b == "cpu":
                from k2lite.backends import cpu
                cpu.set_exact(exact)
            try:
                llm = k2lite.load(fp8_model, device=b)
                assert isinstance(llm.weights.layers[1].mlp.experts[0][0], Fp8Tensor)
                err = rel(llm.logits(ids), want)
            finally:
                if b == "cpu":
                    cpu.set_exact(False)
            print(f"fp8 {b} exact={exact}: rel err {err:.2e} (transformers bf16: {bound:.2e})")
            assert err < (1e-4 if b == "ref" or exact else bound), f"{b}: {err:.2e}"


def test_convert_fp8_and_bf16_to_int4_release(fp8_model, tmp_path):
    """The INT4 error budget is what group-32 INT4 itself costs on these random weights: the
    same-seed model written with INT4 experts directly from float32. A BF16 source must convert
    close to that model; an FP8 source (quantized twice) within twice the budget."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from k2lite.convert import convert
    from k2lite.loader import Checkpoint
    ids = np.random.default_rng(4).integers(0, 384, 30)
    bf16, direct = str(tmp_path / "bf16"), str(tmp_path / "direct")
    write_random_model(bf16, preset("tiny"), seed=3, int4_experts=False)
    write_random_model(direct, preset("tiny"), seed=3, int4_experts=True)
    logits = {p: k2lite.load(p, device="ref").logits(ids) for p in (bf16, direct)}
    budget = rel(logits[direct], logits[bf16])
    for src in (bf16, fp8_model):
        dst = str(tmp_path / (os.path.basename(src) + "-int4"))
        stats = convert(src, dst, experts="int4", verbose=False)
        assert stats["bytes_out"] < stats["bytes_in"]
        got = k2lite.load(dst, device="ref").logits(ids)
        if src == bf16:
            err = rel(got, logits[direct])
            print(f"bf16 -> int4: {err:.2e} from direct INT4 (INT4 budget {budget:.3f})")
            assert err < 0.5 * budget     # bf16 rounding flips a few borderline codes
        else:
            src_logits = k2lite.load(src, device="ref").logits(ids)
            err = rel(got, src_logits)
            print(f"fp8 -> int4: {err:.3f} from the FP8 model (INT4 budget {budget:.3f})")
            assert err < 2 * budget
        # compressed-tensors decompresses what we wrote, and transformers agrees with k2lite on it
        ck = Checkpoint(dst)
        name = "model.layers.1.mlp.experts.3.down_proj.weight_packed"
        q = unpack_from_int32(torch.from_numpy(np.array(ck.get(name))), 4,
                              torch.Size(tuple(ck.read(name.replace("packed", "shape")))))
        assert q.min() >= -8 and q.max() <= 7
        assert rel(got, hf_logits(hf_model(dst), ids)) < 1e-4


def test_convert_resumes_after_interruption(tmp_path):
    from k2lite import writer
    from k2lite.convert import convert
    src = str(tmp_path / "src")
    write_random_model(src, preset("tiny"), seed=5, int4_experts=False)
    clean = str(tmp_path / "clean")
    convert(src, clean, max_shard_bytes=40_000, verbose=False)
    broken = str(tmp_path / "broken")
    real_encode, calls = writer.encode, [0]

    def failing_encode(*a, **k):
        calls[0] += 1
        if calls[0] == 60:
            raise KeyboardInterrupt
        return real_encode(*a, **k)
    writer.encode = failing_encode
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(src, broken, max_shard_bytes=40_000, verbose=False)
    finally:
        writer.encode = real_encode
    assert os.path.exists(os.path.join(broken, writer.PROGRESS))
    convert(src, broken, max_shard_bytes=40_000, verbose=False)
    assert sorted(os.listdir(clean)) == sorted(os.listdir(broken))
    for f in os.listdir(clean):
        assert open(os.path.join(clean, f), "rb").read() == open(os.path.join(broken, f), "rb").read(), f


def test_info_counts_fp8_from_config_as_from_headers(fp8_model, tmp_path):
    from k2lite.info import model_info
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text(open(os.path.join(fp8_model, "config.json")).read())
    a, b = model_info(fp8_model), model_info(str(cfg_only))
    assert a.bytes_by_dtype["F8_E4M3"] > 0
    assert a.total_bytes == b.total_bytes and a.bytes_by_dtype == b.bytes_by_dtype
