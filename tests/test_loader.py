"""Checkpoint parsing: corruption always gives ModelFormatError; opening maps, never reads."""
import copy
import dataclasses
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
from k2lite.safetensors import SafetensorsFile, save_file
from k2lite.testing.random_model import preset, write_random_model, write_sparse_layout
from k2lite.writer import fp8_quantization_config, quantization_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
E0 = "model.layers.1.mlp.experts.0.up_proj"


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
    "dtype_not_a_string": lambda h: h["model.norm.weight"].update(dtype=["BF16"]),
    "metadata_not_an_object": lambda h: h.update(__metadata__=["pt"]),
    "two_names_one_range": lambda h: h["model.norm.weight"].update(
        data_offsets=h["model.layers.0.input_layernorm.weight"]["data_offsets"]),
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


def edit_raw_header(path, edit):
    """Like rewrite_header, on the header's JSON text (for what a dict cannot hold)."""
    fn = os.path.join(path, SHARD)
    with open(fn, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    raw = edit(blob[8:8 + n].decode().rstrip())
    with open(fn, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw.encode() + blob[8 + n:])


def duplicate_name(text):
    entry = json.dumps(json.loads(text)["model.layers.0.input_layernorm.weight"])
    return text[:-1] + f', "model.norm.weight": {entry}}}'


def append_bytes(path):
    with open(os.path.join(path, SHARD), "ab") as f:
        f.write(b"\0" * 16)


def same_tensors_in_two_files(path):
    os.remove(os.path.join(path, INDEX))
    shutil.copy(os.path.join(path, SHARD), os.path.join(path, "model-extra.safetensors"))


def index_without(name):
    def corrupt(path):
        with open(os.path.join(path, INDEX)) as f:
            index = json.load(f)
        del index["weight_map"][name]
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump(index, f)
    return corrupt


@pytest.mark.parametrize("corrupt", [
    lambda p: edit_raw_header(p, duplicate_name),      # one name twice: the first is hidden
    append_bytes,                                      # bytes after the last tensor
    same_tensors_in_two_files,                         # which copy is the model?
    index_without("model.norm.weight"),                # the index hides a stored tensor
], ids=["duplicate_name", "trailing_bytes", "tensor_in_two_files", "tensor_not_in_index"])
def test_stored_data_nobody_reads_is_an_error(tiny_model, tmp_path, corrupt):
    """Every byte of every shard belongs to exactly one tensor the index can reach, as the
    reference reader requires: otherwise something stored would be silently ignored."""
    path = copy_model(tiny_model, tmp_path / "m")
    corrupt(path)
    with pytest.raises(ModelFormatError, match=r"\.safetensors") as e:
        load_and_run(path)
    assert "\n" not in str(e.value)


def edit_tensors(path, edit):
    """Rewrite the shard (and the index) after edit(tensors, dtypes) changed its contents."""
    fn = os.path.join(path, SHARD)
    sf = SafetensorsFile(fn)
    tensors = {n: np.array(sf.get(n)) for n in sf.keys()}
    dtypes = {n: sf.dtype(n) for n in sf.keys()}
    del sf
    edit(tensors, dtypes)
    save_file(tensors, fn, dtypes)
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"weight_map": {n: SHARD for n in tensors}}, f)


def edit_config(path, edit):
    fn = os.path.join(path, "config.json")
    with open(fn) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(fn, "w") as f:
        json.dump(cfg, f)


def weights_of(c):
    return c["quantization_config"]["config_groups"]["group_0"]["weights"]


def add_tensor(name, like, value=None):
    """A tensor shaped and typed like `like` (or `value`, stored as F32)."""
    def edit(t, d):
        t[name], d[name] = (t[like], d[like]) if value is None else (value, "F32")
    return lambda path: edit_tensors(path, edit)


@pytest.mark.parametrize("corrupt", [
    add_tensor("model.layers.3.input_layernorm.weight", "model.norm.weight"),
    add_tensor(E0 + ".weight_zero_point", E0 + ".weight_shape"),
    add_tensor(E0 + ".weight", "model.layers.1.mlp.shared_experts.up_proj.weight"),
    lambda p: edit_config(p, lambda c: c.update(n_shared_experts=0)),
], ids=["layer_past_num_hidden_layers", "zero_point", "dense_beside_packed", "config_drops_shared_experts"])
def test_tensors_the_config_leaves_unused_are_an_error(tiny_model, tmp_path, corrupt):
    path = copy_model(tiny_model, tmp_path / "m")
    corrupt(path)
    with pytest.raises(ModelFormatError, match=f"{SHARD}: tensor .* is not used by the model that config.json"):
        load_and_run(path)


def test_rope_caches_and_mtp_layers_may_be_left_unused(tiny_model, tmp_path):
    path = copy_model(tiny_model, tmp_path / "m")
    add_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", None, np.ones(4, np.float32))(path)
    add_tensor("model.layers.3.input_layernorm.weight", "model.norm.weight")(path)
    with pytest.raises(ModelFormatError, match="layers.3"):
        load_and_run(path)
    edit_config(path, lambda c: c.update(num_nextn_predict_layers=1))    # layer 3 is DeepSeek's MTP layer
    load_and_run(path)


@pytest.mark.parametrize("edit,match", [
    (lambda t, d: t.update({"model.norm.weight": np.full(64, 0x7FC0, np.uint16)}), "'model.norm.weight' has NaN"),
    (lambda t, d: t["model.layers.2.mlp.gate.e_score_correction_bias"].__setitem__(3, np.inf), "bias' has NaN or Inf"),
    (lambda t, d: t.update({E0 + ".weight_shape": np.array([[32], [64]], np.int32)}), "weight_shape' is"),
    (lambda t, d: t.pop(E0 + ".weight_packed"), f"missing tensor '{E0}.weight_packed'"),
], ids=["nan_norm", "inf_router_bias", "weight_shape_2x1", "packed_codes_missing"])
def test_bad_tensor_contents(tiny_model, tmp_path, edit, match):
    """Norms and the router bias are copied at load, so NaN/Inf there is caught for free (the
    big matrices stay mapped and unread: a NaN there shows in the logits)."""
    path = copy_model(tiny_model, tmp_path / "m")
    edit_tensors(path, edit)
    with pytest.raises(ModelFormatError, match=match):
        load_and_run(path)


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8"))
    return write_random_model(path, preset("tiny"), seed=1, fp8=True)


def test_fp8_weight_without_scales(tiny_fp8, tmp_path):
    path = copy_model(tiny_fp8, tmp_path / "m")
    edit_tensors(path, lambda t, d: t.pop("model.layers.0.self_attn.o_proj.weight_scale_inv"))
    with pytest.raises(ModelFormatError, match="o_proj.weight' is FP8 but .*weight_scale_inv' is missing"):
        load_and_run(path)


@pytest.mark.parametrize("corrupt", [
    lambda p: edit_tensors(p, lambda t, d: t[E0 + ".weight_shape"].__setitem__(slice(None), [64, 32])),
    lambda p: edit_config(p, lambda c: weights_of(c).update(group_size=64)),
    add_tensor("model.layers.0.mlp.extra.weight", "model.norm.weight"),
], ids=["weight_shape_swapped", "group_size_disagrees", "unused_tensor"])
def test_convert_checks_the_source_before_writing(tiny_model, tmp_path, corrupt):
    """convert used to copy these through into a checkpoint that cannot load."""
    from k2lite.convert import convert
    src, dst = copy_model(tiny_model, tmp_path / "src"), str(tmp_path / "dst")
    corrupt(src)
    with pytest.raises(ModelFormatError, match=SHARD):
        convert(src, dst, verbose=False)
    assert not os.path.exists(dst) or not os.listdir(dst)


@pytest.mark.parametrize("state", ["{broken", '{"shards": [{"tmp": 3}]}', '{"shards": [{"tmp": "../x"}]}', "[]"])
def test_damaged_resume_state_is_an_error(tiny_model, tmp_path, state):
    from k2lite.convert import convert
    from k2lite.writer import PROGRESS
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / PROGRESS).write_text(state)
    with pytest.raises(ModelFormatError, match="resume state"):
        convert(tiny_model, str(dst), verbose=False)


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
    for shard in ("", "."):
        path = copy_model(tiny_model, tmp_path / f"d{len(shard)}")
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"weight_map": {"model.norm.weight": shard}}, f)
        with pytest.raises(ModelFormatError, match="plain file name"):
            load_and_run(path)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c.update(num_hidden_layers="three"), "num_hidden_layers"),
    (lambda c: c.update(n_group=3), "n_group"),
    (lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (lambda c: c.update(moe_layer_freq=0), "moe_layer_freq"),             # was ZeroDivisionError in the loader
    (lambda c: c.update(rope_scaling="yarn"), "rope_scaling"),            # was AttributeError in the model
    (lambda c: c.update(rope_theta="50000"), "rope_theta"),               # was TypeError in numpy
])
def test_bad_config_is_a_clear_error(tiny_model, tmp_path, edit, match):
    path = copy_model(tiny_model, tmp_path / "m")
    cfg = json.load(open(os.path.join(path, "config.json")))
    edit(cfg)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ModelFormatError, match=match):
        load_and_run(path)


TINY_INT4 = dict(preset("tiny"), quantization_config=quantization_config(32))
TINY_FP8 = dict(preset("tiny"), quantization_config=fp8_quantization_config())
ROPE = "rope_scaling"


@pytest.mark.parametrize("base,edit,match", [
    ("int4", lambda c: c.update(hidden_size=0), "'hidden_size' must be an integer in 1\\.\\.131072, got 0"),
    ("int4", lambda c: c.update(n_routed_experts=True), "n_routed_experts"),
    ("int4", lambda c: c.update(num_experts_per_tok=0), "num_experts_per_tok"),
    ("int4", lambda c: c.update(n_group=3), "n_group=3 does not divide n_routed_experts"),
    ("int4", lambda c: c.update(topk_group=0), "topk_group"),
    ("int4", lambda c: c.update(n_group=2, num_experts_per_tok=5), "topk_group=1 of n_group=2 groups cannot hold"),
    ("int4", lambda c: c.update(n_group=2, topk_method="group_limited_greedy"), "topk_method"),
    ("int4", lambda c: c.update(topk_method="greedy_v9"), "unsupported topk_method"),
    ("int4", lambda c: c.update(rope_theta=1), "rope_theta"),
    ("int4", lambda c: c.update(rms_norm_eps=float("nan")), "rms_norm_eps"),
    ("int4", lambda c: c.update(routed_scaling_factor=-1), "routed_scaling_factor"),
    ("int4", lambda c: c.update(norm_topk_prob="false"), "norm_topk_prob"),
    ("int4", lambda c: c.update(tie_word_embeddings=1), "tie_word_embeddings"),
    ("int4", lambda c: c.update(max_position_embeddings="4096"), "max_position_embeddings"),
    ("int4", lambda c: c.update(architectures=[]), "architectures"),            # k2lite info read [0]
    ("int4", lambda c: c.update(model_type=3), "model_type"),
    ("int4", lambda c: c.update(eos_token_id="x"), "eos_token_id"),
    ("int4", lambda c: c.update(eos_token_id=[1, 10**6]), "eos_token_id"),
    ("int4", lambda c: c.update(bos_token_id=-1), "bos_token_id"),
    ("int4", lambda c: c[ROPE].pop("type"), "unsupported rope_scaling type None"),
    ("int4", lambda c: c[ROPE].update(factor=None), "rope_scaling.factor"),
    ("int4", lambda c: c[ROPE].update(factor=0.5), "rope_scaling.factor"),
    ("int4", lambda c: c[ROPE].pop("original_max_position_embeddings"), "original_max_position_embeddings"),
    ("int4", lambda c: c[ROPE].update(beta_fast=-1), "beta_fast"),
    ("int4", lambda c: c[ROPE].update(mscale="1"), "mscale"),
    ("int4", lambda c: c[ROPE].update(attention_factor=0), "attention_factor"),
    ("int4", lambda c: c[ROPE].update(truncate="no"), "truncate"),
    ("int4", lambda c: c.update(rope_scaling=None, rope_parameters="yarn"), "rope_parameters"),
    ("int4", lambda c: c["quantization_config"].update(config_groups=[]), "config_groups"),
    ("int4", lambda c: c["quantization_config"]["config_groups"].update(group_0=[]), "weights"),
    ("int4", lambda c: weights_of(c).update(symmetric="false"), "symmetric"),
    ("int4", lambda c: weights_of(c).update(group_size="32"), "group_size"),
    ("int4", lambda c: weights_of(c).update(num_bits=8), "4-bit"),
    ("int4", lambda c: c["quantization_config"].update(ignore="lm_head"), "ignore"),
    ("fp8", lambda c: c["quantization_config"].update(weight_block_size=[128]), "weight_block_size"),
    ("fp8", lambda c: c["quantization_config"].update(weight_block_size=[0, 128]), "weight_block_size"),
    ("fp8", lambda c: c["quantization_config"].update(weight_block_size=[64.5, 128]), "weight_block_size"),
    ("fp8", lambda c: c["quantization_config"].update(modules_to_not_convert={"a": 1}), "modules_to_not_convert"),
], ids=lambda v: None if callable(v) else v)
def test_config_values_are_checked(base, edit, match):
    """Each was accepted and then crashed deep in the loader or the model, or ran silently
    wrong (a string "false" is true); now one line naming the file and the key."""
    cfg = copy.deepcopy({"int4": TINY_INT4, "fp8": TINY_FP8}[base])
    edit(cfg)
    with pytest.raises(ModelFormatError, match=match) as e:
        Config.from_dict(cfg, source="m/config.json")
    assert str(e.value).startswith("m/config.json: ") and "\n" not in str(e.value)


def test_config_file_that_cannot_be_read(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ModelFormatError, match="config.json: cannot read"):
        Config.from_json(str(tmp_path))
    with pytest.raises(ModelFormatError, match="config.json: cannot read"):
        Config.from_json(str(tmp_path / "config.json"))


def test_unreadable_files(tiny_model, tmp_path, monkeypatch):
    """A file the process may not read (permission bits, which root ignores: so the refusal is
    simulated at open) is a one-line ModelFormatError naming it."""
    import builtins
    real_open, real_os_open = builtins.open, os.open
    blocked = []

    def refuse(path):
        if str(path) in blocked:
            raise PermissionError(13, "Permission denied", str(path))

    def fake_open(path, *a, **k):
        refuse(path)
        return real_open(path, *a, **k)

    def fake_os_open(path, *a, **k):
        refuse(path)
        return real_os_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name, match in (("config.json", "config.json: cannot read"), (SHARD, f"{SHARD}: cannot open")):
        path = copy_model(tiny_model, tmp_path / name)
        blocked[:] = [os.path.join(path, name)]
        with pytest.raises(ModelFormatError, match=match):
            load_and_run(path)
        blocked.clear()


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
    base = k2lite.load(tiny_model, device=device)
    want = base.logits(ids)
    llm = k2lite.load(tiny_model, device=device, **kw)
    tiled = isinstance(llm.weights.lm_head, TiledBF16) and isinstance(llm.weights.layers[0].self_attn.o_proj, TiledBF16)
    assert tiled == bool(kw.get("repack"))
    assert not isinstance(llm.weights.layers[0].self_attn.kv_b_proj, TiledBF16)   # absorbed ops read rows
    got = llm.logits(ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    steps = []
    for m in (base, llm):            # decode steps through the tiled kernels too (a decode step
        with m.sequence() as seq:    # and a prefill attend in different forms: compare like with like)
            seq.append(ids[:3])
            steps.append(seq.append([ids[3]])[0])
    assert np.abs(steps[1] - steps[0]).max() <= 1e-5 * np.abs(want).max()


KIMI_DIR = os.path.join(REPO, "models", "kimi-k2-thinking")


def with_tokenizer(path, ranks_lines=None, tok_cfg=None):
    """A tokenizer for the tiny model: the first 128 byte ranks, specials from 128 (384 ids)."""
    with open(os.path.join(KIMI_DIR, "tiktoken.model"), "rb") as f:
        lines = [line for line in f if line.strip() and int(line.split()[1]) < 128]
    with open(os.path.join(path, "tiktoken.model"), "wb") as f:
        f.writelines(lines if ranks_lines is None else ranks_lines(lines))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        f.write(json.dumps({"added_tokens_decoder": {"128": {"content": "[BOS]"}, "129": {"content": "[EOS]"}}})
                if tok_cfg is None else tok_cfg)
    return path


@pytest.mark.parametrize("ranks_lines,tok_cfg,match", [
    (lambda ls: ls[:5] + [b"!!!! 5\n"] + ls[6:], None, r"tiktoken.model:6: expected"),
    (lambda ls: ls[:5] + [b"QUI= 5 7\n"] + ls[6:], None, r"tiktoken.model:6: expected"),
    (lambda ls: ls[:5] + ls[6:], None, "without gaps"),
    (None, "{not json", r"tokenizer_config.json: cannot read"),
    (None, json.dumps({"added_tokens_decoder": [1, 2]}), "must be an object"),
    (None, json.dumps({"added_tokens_decoder": {"128": "[BOS]"}}), r"added_tokens_decoder\['128'\]"),
    (None, json.dumps({"added_tokens_decoder": {"5": {"content": "[BOS]"}}}), "outside the special range"),
])
def test_corrupt_tokenizer_files(tiny_model, tmp_path, ranks_lines, tok_cfg, match):
    path = with_tokenizer(copy_model(tiny_model, tmp_path / "m"), ranks_lines, tok_cfg)
    with pytest.raises(ModelFormatError, match=match):
        k2lite.load(path, device="ref")


def test_tokenizer_larger_than_the_vocabulary(tiny_model, tmp_path):
    path = copy_model(tiny_model, tmp_path / "m")
    shutil.copy(os.path.join(KIMI_DIR, "tiktoken.model"), path)
    shutil.copy(os.path.join(KIMI_DIR, "tokenizer_config.json"), path)
    with pytest.raises(ModelFormatError, match="163840 ids, more than config.json's vocab_size 384"):
        k2lite.load(path, device="ref")
    llm = k2lite.load(with_tokenizer(path), device="ref")        # 384 ids: fits
    assert llm.tokenizer.vocab_size == 384


@pytest.mark.parametrize("kw,match", [
    (dict(threads=10**6), "threads must be between 1 and"),
    (dict(threads=0), "threads must be between 1 and"),
    (dict(page_size=0), "must be positive"),
    (dict(context=0), "must be positive"),
])
def test_bad_load_arguments(tiny_model, kw, match):
    from k2lite import ops
    if "threads" in kw and not ops.available("cpu"):
        pytest.skip("threads are the native backend's")
    with pytest.raises(ValueError, match=match):
        k2lite.load(tiny_model, **kw)


def test_a_file_is_not_a_checkpoint_folder(tiny_model):
    with pytest.raises(ModelFormatError, match="not a checkpoint folder"):
        k2lite.load(os.path.join(tiny_model, SHARD))


def test_bad_token_ids_name_the_id_and_position(tiny_model):
    llm = k2lite.load(tiny_model, device="ref")
    with pytest.raises(ValueError, match=r"token id 384 at position 2 is out of range \[0, 384\)"):
        llm.logits([1, 2, 384])
    with pytest.raises(ValueError, match=r"token id -1 at position 0"):
        llm.logits([-1])


K2_CONFIG = os.path.join(REPO, "models", "kimi-k2-thinking", "config.json")
# DeepSeek-V3's released config.json (and R1's): FP8, an MTP layer, no pad_token_id
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                             "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


def test_deepseek_v3_release_config_parses():
    c = Config.from_dict(DEEPSEEK_V3)
    assert c.pad_token_id is None and c.num_nextn_predict_layers == 1 and c.quantization.method == "fp8"
    assert Config.from_dict(dict(DEEPSEEK_V3, rope_scaling=None)).rope_scaling is None


def _optional_keys():
    cfg = json.load(open(K2_CONFIG))
    return sorted(k for k in cfg if k not in Config.REQUIRED)


@pytest.mark.parametrize("key", _optional_keys())
def test_each_optional_key_may_be_missing(key):
    """Missing optional keys take transformers' DeepseekV3Config defaults; only a value that is
    present and wrong is an error."""
    cfg = json.load(open(K2_CONFIG))
    cfg.pop(key)
    c = Config.from_dict(cfg, source="config.json")
    field = {"quantization_config": "quantization"}.get(key, key)
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    if field == "topk_group":            # transformers' 4, capped at the config's n_group (1 for K2)
        assert c.topk_group == min(4, c.n_group)
    elif field in Config.HF_DEFAULTS:
        assert getattr(c, field) == Config.HF_DEFAULTS[field]
    elif field in defaults:
        assert getattr(c, field) == defaults[field]


def test_missing_keys_take_transformers_defaults_and_null_means_none():
    from transformers import DeepseekV3Config
    hf = DeepseekV3Config()
    c = Config.from_dict({k: DEEPSEEK_V3[k] for k in Config.REQUIRED})
    for k in Config.HF_DEFAULTS:
        assert getattr(c, k) == getattr(hf, k), k
    c = Config.from_dict(dict(DEEPSEEK_V3, q_lora_rank=None, n_routed_experts=None))
    assert c.q_lora_rank is None and c.n_routed_experts is None


def test_deepseek_style_checkpoint_loads_and_runs(tmp_path, model_factory):
    """FP8 weights, no pad/bos ids, rope_scaling null, an MTP layer in the index (skipped)."""
    from k2lite.testing.random_model import preset, write_random_model
    cfg = preset("tiny", num_hidden_layers=3)
    path = str(tmp_path / "dsv3")
    write_random_model(path, cfg, seed=1, fp8=True)
    add_tensor("model.layers.3.input_layernorm.weight", "model.norm.weight")(path)   # the MTP layer
    edit_config(path, lambda c: (c.pop("pad_token_id", None), c.pop("bos_token_id", None),
                                 c.update(num_nextn_predict_layers=1, rope_scaling=None)))
    llm = k2lite.load(path, device="ref")
    assert llm.tokenizer is None and llm.config.pad_token_id is None
    assert np.isfinite(llm.logits([1, 2, 3])).all()


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(num_nextn_predict_layers=10**12), r"'num_nextn_predict_layers' must be an integer in 0\.\.64"),
    (lambda c: c["rope_scaling"].update(mscale_all_dim=1e30), r"rope_scaling\.mscale_all_dim must be a number >= 0 and <= 100"),
    (lambda c: c["rope_scaling"].update(mscale=-3.0), r"rope_scaling\.mscale must be"),
    (lambda c: c["rope_scaling"].update(factor=1e300), r"rope_scaling\.factor must be"),
    (lambda c: c.update(rms_norm_eps=1.5), r"'rms_norm_eps' must be a number >= 0 and <= 0\.1"),
    (lambda c: c.update(hidden_size=10**9), r"'hidden_size' must be an integer in"),
    (lambda c: c.update(routed_scaling_factor=1e300), r"'routed_scaling_factor' must be"),
    (lambda c: c.update(rope_theta=1e300), r"'rope_theta' must be"),
], ids=["mtp_layers_1e12", "mscale_all_dim_1e30", "negative_mscale", "huge_factor", "eps_1.5",
        "hidden_1e9", "huge_routed_scale", "huge_rope_theta"])
def test_values_that_load_but_cannot_be_right(edit, match):
    cfg = json.load(open(K2_CONFIG))
    edit(cfg)
    with pytest.raises(ModelFormatError, match=match) as e:
        Config.from_dict(cfg, source="config.json")
    assert str(e.value).startswith("config.json: ") and "\n" not in str(e.value)
