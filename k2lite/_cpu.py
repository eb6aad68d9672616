"""The native CPU kernels, in the best build this machine runs (chosen once, at import).

setup.py compiles src/cpu once per SIMD level: k2lite._cpu_avx512 (AVX-512 with VNNI, BF16
and VBMI), _cpu_avx2 (AVX2 + FMA) and _cpu_scalar (any x86-64; the only build elsewhere).
A build must not even be imported on a CPU without its instructions (its code may use them
anywhere), so the choice reads the CPU's feature flags first. K2LITE_SIMD=avx512|avx2|scalar
forces a level (tests use it to cover every level).
"""
import importlib
import os

NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16",
               "avx512vbmi"},
    "avx2": {"avx2", "fma", "f16c", "bmi2", "movbe"},
    "scalar": set(),
}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_levels() -> list:
    flags = cpu_flags()
    return [level for level, need in NEEDS.items() if need <= flags]


def _load():
    forced = os.environ.get("K2LITE_SIMD")
    levels = [forced] if forced else supported_levels()
    for i, level in enumerate(levels):
        try:
            mod = importlib.import_module(f"k2lite._cpu_{level}")
        except ImportError as e:
            if forced:
                raise
            failed = e
            continue
        if i:   # a faster build this CPU runs is broken or missing: say so, it costs several times
            import warnings
            warnings.warn(f"k2lite: the {levels[0]} kernels did not load ({failed}); using the slower "
                          f"{level} build (rebuild: pip install -e .)", RuntimeWarning, stacklevel=2)
        return level, mod
    raise ImportError("no k2lite CPU kernel build is installed (k2lite._cpu_scalar missing)")


LEVEL, _mod = _load()
globals().update({k: getattr(_mod, k) for k in dir(_mod) if not k.startswith("__")})
