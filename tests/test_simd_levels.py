"""Every SIMD build of the CPU kernels this machine can run passes the op table and the
end-to-end model checks (k2lite/_cpu.py picks one level at import; K2LITE_SIMD forces one)."""
import os
import subprocess
import sys

import pytest

from k2lite import ops

pytestmark = pytest.mark.skipif(not ops.available("cpu"), reason="CPU kernels not built")


def levels():
    from k2lite import _cpu
    return _cpu.supported_levels()


def test_best_level_is_chosen_by_default():
    from k2lite import _cpu
    assert _cpu.LEVEL == levels()[0] or os.environ.get("K2LITE_SIMD")
    assert _cpu.simd in ("avx512", "avx2", "scalar")


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
    probe = subprocess.run([sys.executable, "-c", "from k2lite import _cpu; print(_cpu.simd)"],
                           env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == level
