"""CUDA backend: ref.py's ops over k2lite._cuda (src/cuda/*.cu).

Importing this module fails with ImportError unless the CUDA module was built (setup.py does
so when nvcc is found) and a GPU is visible, so `ops.available("cuda")` means "usable here".
No op is implemented on the GPU yet (issue 7): every op falls back to ref through ops.py.
"""
from __future__ import annotations

from . import _cuda

if _cuda.device_count() == 0:
    raise ImportError("k2lite._cuda is built but no CUDA device is visible")


def devices() -> list:
    return [_cuda.device_name(i) for i in range(_cuda.device_count())]
