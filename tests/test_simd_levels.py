"""Every SIMD build of the CPU kernels this machine can run passes the op table and the
end-to-end model checks (k2lite/backends/cpu.py picks one level at import; K2LITE_SIMD forces one)."""
import os
import subprocess
import sys

import pytest

from k2lite import ops

pytestmark = pytest.mark.skipif(not ops.available("cpu"), reason="CPU kernels not built")


def levels():
    from k2lite.backends import cpu as _cpu
    return _cpu.supported_levels()


def test_best_level_is_chosen_by_default():
    from k2lite.backends import cpu as _cpu
    assert _cpu.LEVEL == levels()[0] or os.environ.get("K2LITE_SIMD")
    assert _cpu.SIMD in ("avx512", "avx2", "scalar")


@pytest.mark.parametrize("level", ["avx512", "avx2", "scalar"])
def test_level_passes_op_table_and_model(level):
    if level not in levels():
        pytest.skip(f"this CPU cannot run the {level} build")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, K2LITE_SIMD=level)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(here, "test_ops.py"),
                        os.path.join(here, "test_oracle.py") + "::test_greedy_tokens_equal_across_backends"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "from k2lite.backends import cpu; print(cpu.SIMD)"],
                           env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == level


def test_default_threads_are_physical_cores(tmp_path, monkeypatch):
    """Default thread count: one per physical core this process may use (SMT siblings once),
    unless OMP_NUM_THREADS says otherwise."""
    from k2lite.backends import cpu
    for c, siblings in enumerate(["0,2", "1,3", "0,2", "1,3", "4"]):   # 2 SMT cores + 1 single
        d = tmp_path / f"cpu{c}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert cpu.physical_cores(str(tmp_path)) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})        # one core's two threads
    assert cpu.physical_cores(str(tmp_path)) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 7})        # no topology for cpu7
    assert cpu.physical_cores(str(tmp_path)) == 2
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = "from k2lite.backends import cpu; print(cpu.get_threads(), cpu.physical_cores())"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    threads, cores = got.stdout.split()
    assert threads == cores
    got = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True)
    assert got.stdout.split()[0] == "1"
