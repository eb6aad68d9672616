"""`k2lite bench --depth`: synthetic cache fill, per-layer attribution, projection, JSON lines."""
import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

import k2lite
from k2lite import bench
from k2lite.cli import main
from k2lite.testing.random_model import preset


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_depth_json_lines(tiny_model):
    r = run("bench", tiny_model, "--depth", "0,70,200", "-p", 8, "-n", 3, "-t", 1, "--bw-bytes", 1 << 20, "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["depth"] for row in rows] == [0, 70, 200]       # tiny's widths: no projection rows
    for row in rows:
        assert row["kind"] == "measured"
        for key in ("pp_tok_s", "tg_tok_s", "weight_gb_per_token", "read_gb_s", "weight_gb_s", "read_fraction"):
            assert row[key] > 0, key
        L = 3
        assert len(row["tg_ms"]["attn"]) == L and len(row["tg_ms"]["weights"]) == L
        assert row["pp_tokens"] == 8 and row["tg_tokens"] == 3


def test_depth_table(tiny_model):
    r = run("bench", tiny_model, "--depth", "0,100", "-p", 4, "-n", 2, "-t", 1, "--bw-bytes", 1 << 20)
    assert r.exit_code == 0, r.output
    assert "| depth | pp4 t/s | tg t/s |" in r.stdout
    assert "\n| 100 | " in r.stdout and "no projection" in r.stdout


@pytest.mark.parametrize("args, msg", [
    (["--depth", "0,x"], "--depth"),
    (["--depth", "-5"], "--depth"),
    (["--depth", "5000"], "context"),              # tiny: 4096 positions
    (["--json"], "--depth"),
])
def test_depth_errors_are_one_line(tiny_model, args, msg):
    r = run("bench", tiny_model, "-p", 4, "-n", 2, *args)
    assert r.exit_code == 2
    assert r.stderr.startswith("error:") and msg in r.stderr and r.stderr.count("\n") == 1


def test_kv_cache_option_is_passed(tiny_model):
    for kind in ("f32", "int8"):
        r = run("bench", tiny_model, "--depth", "0", "-p", 2, "-n", 1, "--bw-bytes", 1 << 20, "--kv-cache", kind, "--json")
        assert r.exit_code == 0, r.output


def test_fill_tiles_a_real_prefill(tiny_model):
    llm = k2lite.load(tiny_model, device="ref")
    n, depth = bench.SEED_TOKENS, bench.SEED_TOKENS + 37
    with llm.sequence() as seq:
        bench.fill(seq, depth, seed=3)
        assert len(seq) == depth and len(seq.tokens) == depth
        with llm.sequence() as real:             # the first n rows are a real prefill's
            real.append(seq.tokens[:n])
            for layer in range(llm.cache.n_layers):
                rows = llm.cache.gather(layer, seq.state, depth)
                np.testing.assert_array_equal(rows[:n], llm.cache.gather(layer, real.state, n))
                np.testing.assert_array_equal(rows[n:], rows[:depth - n])
        seq.append([5])                          # decoding on top of it works
        assert len(seq) == depth + 1
    with llm.sequence() as seq:                  # shallower than the seed: a plain prefill
        bench.fill(seq, 10)
        assert len(seq) == 10


def test_breakdown_attributes_and_restores(tiny_model):
    llm = k2lite.load(tiny_model, device="ref")
    shared = llm.model.ops
    with llm.sequence() as seq, bench.Breakdown(llm.model) as bd:
        seq.append([1, 2, 3])
        bd.reset()
        for _ in range(2):
            t = time.perf_counter()
            seq.append([4])
            bd.step(time.perf_counter() - t)
        ms = bd.per_layer()
    L = llm.config.num_hidden_layers
    assert len(ms["attn"]) == L and all(a > 0 for a in ms["attn"]) and all(w > 0 for w in ms["weights"])
    assert ms["head"] > 0
    assert llm.model.ops is shared and not {"mla", "moe", "mlp"} & set(vars(llm.model))


def test_projection_arithmetic(tiny_model, tmp_path):
    """Target = tiny's widths with 10 layers (2 dense) and 64 experts: the sums by hand."""
    cfg = preset("tiny", num_hidden_layers=10, first_k_dense_replace=2, n_routed_experts=64)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    llm = k2lite.load(tiny_model, device="ref")      # 1 dense + 2 MoE layers
    row = {"depth": 100, "read_gb_s": 1e6,          # reading the experts costs ~nothing
           "tg_ms": {"attn": [1.0, 2.0, 3.0], "weights": [10.0, 4.0, 6.0], "head": 7.0},
           "pp_tokens": 16, "pp_ms": {"attn": [3.0, 3.0, 3.0], "weights": [20.0, 30.0, 30.0], "head": 1.0}}
    p = bench.project(llm, row, str(path))
    assert p["kind"] == "projection" and p["layers"] == 10 and p["experts"] == 64
    assert p["tg_weights_ms"] == pytest.approx(2 * 10 + 8 * 5 + 7)
    assert p["tg_attn_ms"] == pytest.approx(10 * 2)
    assert p["tg_tok_s"] == pytest.approx(1e3 / (67 + 20))
    assert p["pp_weights_ms"] == pytest.approx(2 * 20 + 8 * 30 + 1)
    assert p["pp_tok_s"] == pytest.approx(16e3 / (281 + 30))
    slow = dict(row, read_gb_s=1e-3)                 # now reading the touched experts dominates
    assert bench.project(llm, slow, str(path))["pp_weights_ms"] > 2 * 281
    other = preset("tiny", hidden_size=128)
    path.write_text(json.dumps(other))
    assert bench.project(llm, row, str(path)) is None
