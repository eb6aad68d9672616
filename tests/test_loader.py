"""Checkpoint parsing: corruption always gives ModelFormatError; opening maps, never reads."""
import json
import os
import shutil
import struct
import time

import numpy as np
import pytest

import k2lite
from k2lite import ModelFormatError
from k2lite.config import Config
from k2lite.testing.random_model import write_sparse_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "model-00001-of-00001.safetensors"


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def load_and_run(path):
    llm = k2lite.load(path, device="ref")
    llm.logits([1, 2, 3])


def expect_format_error_or_ok(path):
    """A corruption must give ModelFormatError (or, if harmless, load fine): nothing else."""
    try:
        load_and_run(path)
    except ModelFormatError as e:
        assert "\n" not in str(e) and len(str(e)) < 500
        return "error"
    return "ok"


def test_truncated_file_at_many_points(tiny_model, tmp_path):
    size = os.path.getsize(os.path.join(tiny_model, SHARD))
    for i, cut in enumerate([0, 4, 8, 9, 100, 5000, size // 2, size - 1]):
        path = copy_model(tiny_model, tmp_path / f"t{i}")
        with open(os.path.join(path, SHARD), "r+b") as f:
            f.truncate(cut)
        with pytest.raises(ModelFormatError, match="safetensors"):
            load_and_run(path)


@pytest.mark.parametrize("seed", range(4))
def test_random_byte_flips_in_header(tiny_model, tmp_path, seed):
    rng = np.random.default_rng(seed)
    with open(os.path.join(tiny_model, SHARD), "rb") as f:
        blob = bytearray(f.read())
    n = struct.unpack("<Q", blob[:8])[0]
    outcomes = []
    for trial in range(12):
        path = copy_model(tiny_model, tmp_path / f"f{trial}")
        b = bytearray(blob)
        for pos in rng.integers(0, 8 + n, 3):
            b[pos] = rng.integers(0, 256)
        with open(os.path.join(path, SHARD), "wb") as f:
            f.write(b)
        outcomes.append(expect_format_error_or_ok(path))
    assert "error" in outcomes


def rewrite_header(path, edit):
    fn = os.path.join(path, SHARD)
    with open(fn, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    with open(fn, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


LIES = {
    "absurd_header_length": None,
    "shape_lies": lambda h: h["model.norm.weight"].update(shape=[65]),
    "offsets_past_end": lambda h: h["lm_head.weight"].update(data_offsets=[0, 10**12]),
    "offsets_reversed": lambda h: h["lm_head.weight"].update(data_offsets=[100, 10]),
    "unknown_dtype": lambda h: h["model.norm.weight"].update(dtype="Q4_K"),
    "wrong_dtype_for_packed": lambda h: h["model.layers.1.mlp.experts.0.up_proj.weight_packed"].update(dtype="F32"),
    "negative_dim": lambda h: h["model.norm.weight"].update(shape=[-64]),
    "missing_tensor": lambda h: h.pop("model.layers.0.self_attn.o_proj.weight"),
    "not_an_object": lambda h: h.update({"model.norm.weight": [1, 2]}),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_header_lies(tiny_model, tmp_path, lie):
    path = copy_model(tiny_model, tmp_path / "m")
    if lie == "absurd_header_length":
        with open(os.path.join(path, SHARD), "r+b") as f:
            f.write(struct.pack("<Q", 2**62))
    else:
        rewrite_header(path, LIES[lie])
    with pytest.raises(ModelFormatError) as e:
        load_and_run(path)
    assert SHARD in str(e.value) or "index" in str(e.value)


def test_config_shape_disagreement_names_tensor(tiny_model, tmp_path):
    path = copy_model(tiny_model, tmp_path / "m")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["kv_lora_rank"] = 64
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ModelFormatError, match="kv_a_proj_with_mqa"):
        load_and_run(path)


def test_missing_shard_and_bad_index(tiny_model, tmp_path):
    path = copy_model(tiny_model, tmp_path / "a")
    os.remove(os.path.join(path, SHARD))
    with pytest.raises(ModelFormatError, match="not found"):
        load_and_run(path)
    path = copy_model(tiny_model, tmp_path / "b")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelFormatError, match="index"):
        load_and_run(path)
    path = copy_model(tiny_model, tmp_path / "c")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "../../etc/passwd"}}, f)
    with pytest.raises(ModelFormatError):
        load_and_run(path)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c.update(num_hidden_layers="three"), "num_hidden_layers"),
    (lambda c: c.update(n_group=3), "n_group"),
    (lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
])
def test_bad_config_is_a_clear_error(tiny_model, tmp_path, edit, match):
    path = copy_model(tiny_model, tmp_path / "m")
    cfg = json.load(open(os.path.join(path, "config.json")))
    edit(cfg)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ModelFormatError, match=match):
        load_and_run(path)


def test_configs_of_the_family_parse():
    c = Config.from_json(os.path.join(REPO, "models", "kimi-k2-thinking", "config.json"))
    assert c.quantization.group_size == 32 and c.is_moe_layer(1) and not c.is_moe_layer(0)
    assert abs(c.softmax_scale - 0.14467963) < 1e-7
    base = json.load(open(os.path.join(REPO, "models", "kimi-k2-thinking", "config.json")))
    base.pop("quantization_config")
    k25 = {"architectures": ["KimiK25ForConditionalGeneration"], "text_config": dict(base),
           "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                   "config_groups": {"g": {"weights": {"num_bits": 4, "group_size": 32,
                                                                       "type": "int", "symmetric": True,
                                                                       "strategy": "group"}}}}}
    assert Config.from_dict(k25).hidden_size == 7168
    fp8 = dict(base, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert Config.from_dict(fp8).quantization.weight_block_size == (128, 128)
    v2lite = dict(base, q_lora_rank=None, rope_scaling=None, n_group=1)
    assert Config.from_dict(v2lite).q_lora_rank is None
    with pytest.raises(ModelFormatError, match="unsupported quant_method"):
        Config.from_dict(dict(base, quantization_config={"quant_method": "gptq"}))


def rss_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def test_open_full_size_k2_layout_reads_nothing(tmp_path):
    """The real K2 Thinking layout (61 layers, 384 INT4 experts, 594 GB, sparse on disk):
    opening it must take seconds and little memory, independent of its size."""
    cfg = json.load(open(os.path.join(REPO, "models", "kimi-k2-thinking", "config.json")))
    cfg.pop("quantization_config")
    total = write_sparse_layout(str(tmp_path), cfg, n_shards=62)
    assert total > 590e9
    before, t0 = rss_mb(), time.time()
    llm = k2lite.load(str(tmp_path), device="ref", max_cache_tokens=1024)
    seconds, grown = time.time() - t0, rss_mb() - before
    print(f"opened {total / 1e9:.0f} GB layout in {seconds:.2f} s, RSS +{grown:.0f} MB")
    assert grown < 1024, f"RSS grew {grown:.0f} MB opening a mapped checkpoint"
    expert = llm.weights.layers[60].mlp.experts[383][2]
    assert expert.shape == (7168, 2048) and expert.packed.shape == (7168, 256)
    assert llm.weights.lm_head.shape == (163840, 7168) and llm.weights.lm_head.dtype == np.uint16


@pytest.mark.parametrize("kw", [dict(mmap=False), dict(repack=True), dict(mmap=False, repack=True)],
                         ids=["no-mmap", "repack", "no-mmap-repack"])
@pytest.mark.parametrize("device", ["ref", "cpu"])
def test_load_modes_agree(tiny_model, kw, device):
    """Copying weights into anonymous memory, and repacking linear-only BF16 matrices into
    16-row tiles, change where bytes live, not the results."""
    from k2lite.formats import TiledBF16
    if device == "cpu" and not k2lite.ops.available("cpu"):
        pytest.skip("native CPU module not built")
    ids = [1, 5, 9, 200, 3, 7]
    want = k2lite.load(tiny_model, device=device).logits(ids)
    llm = k2lite.load(tiny_model, device=device, **kw)
    tiled = isinstance(llm.weights.lm_head, TiledBF16) and isinstance(llm.weights.layers[0].self_attn.o_proj, TiledBF16)
    assert tiled == bool(kw.get("repack"))
    assert not isinstance(llm.weights.layers[0].self_attn.kv_b_proj, TiledBF16)   # absorbed ops read rows
    got = llm.logits(ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with llm.sequence() as seq:      # decode steps through the tiled kernels too
        seq.append(ids[:3])
        step = seq.append([ids[3]])[0]
    assert np.abs(step - want[3]).max() <= 1e-4 * np.abs(want).max()
