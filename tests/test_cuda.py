"""CUDA module: built wherever nvcc exists; usable only with a GPU (skips cleanly otherwise)."""
import importlib

import pytest

from k2lite import ops


def test_cuda_module_reports_devices_when_built():
    try:
        cuda_ext = importlib.import_module("k2lite._cuda")
    except ImportError:
        pytest.skip("k2lite._cuda not built (no nvcc at install time)")
    n = cuda_ext.device_count()
    assert isinstance(n, int) and n >= 0
    assert ops.available("cuda") == (n > 0)
    with pytest.raises(ValueError):
        cuda_ext.device_name(n)


@pytest.mark.skipif(not ops.available("cuda"), reason="no CUDA device")
def test_cuda_device_names():
    from k2lite import cuda
    assert all(cuda.devices())
