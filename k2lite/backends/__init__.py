"""The kernel backends behind ops.py: `cpu` (pybind11 C++ in src/cpu, one build per SIMD level,
the best one loaded at import), `cuda` (src/cuda, built where nvcc is), and `checks` (the
argument checks both run at the Python boundary, so no bad input reaches native code). The
numpy specification they follow is k2lite/ref.py."""
