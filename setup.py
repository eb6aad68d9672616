"""Build k2lite: the pure-Python package plus two native modules.

k2lite.backends._cpu_{avx512,avx2,scalar}  pybind11 C++17 kernels in src/cpu, one build per SIMD level
k2lite.backends._cuda  CUDA kernels in src/cuda (built when nvcc is found; K2LITE_CUDA=1 forces, =0 disables)
"""
import copy
import os
import platform
import shutil
import subprocess
import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


# One build runs on any x86-64: the kernels are compiled once per SIMD level and
# k2lite/backends/cpu.py picks the best level the running CPU supports (K2LITE_SIMD overrides).
SIMD_LEVELS = {
    # Zen 4 / Sapphire Rapids class: AVX-512 with VNNI (INT4), BF16 and VBMI (FP8 decode)
    "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mavx512vbmi"],
    "avx2": ["-march=x86-64-v3"],          # Haswell and later: AVX2 + FMA, kernels auto-vectorised
    "scalar": ["-march=x86-64"],            # any x86-64: the portable loops
}


def cpu_extensions():
    sources = sorted(glob("src/cpu/*.cpp")) + ["src/bindings_cpu.cpp"]
    # -fno-wrapv: Python's CFLAGS carry -fwrapv, which keeps gcc from vectorising some loops
    # with int indices (the portable mla_decode loops ran 1.5x slower with it)
    base = ["-O3", "-std=c++17", "-fopenmp", "-fno-wrapv"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    levels = SIMD_LEVELS if x86 else {"scalar": []}
    return [Pybind11Extension(f"k2lite.backends._cpu_{name}", sources, include_dirs=["src"],
                              define_macros=[("K2LITE_CPU_MODULE", f"_cpu_{name}")],
                              extra_compile_args=base + flags, extra_link_args=["-fopenmp"])
            for name, flags in levels.items()]


def want_cuda():
    flag = os.environ.get("K2LITE_CUDA")
    if flag == "0":
        return False
    found = shutil.which("nvcc") is not None and bool(glob("src/cuda/*.cu"))
    if flag == "1" and not found:
        raise RuntimeError("K2LITE_CUDA=1 but nvcc or src/cuda/*.cu was not found")
    return found


class BuildExt(build_ext):
    """build_ext that also compiles the .cu files of k2lite.backends._cuda with nvcc, and compiles each
    SIMD level of the CPU kernels in a folder of its own: they share their sources, so in one
    folder their objects would overwrite each other (with `-j`, a level could link another
    level's objects, module-init symbol included)."""

    def build_extension(self, ext):
        if ext.name.startswith("k2lite.backends._cpu_") and not getattr(self, "_per_level", False):
            level = copy.copy(self)           # build_ext -j runs extensions in threads: no shared state
            level._per_level = True
            level.build_temp = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[1])
            return level.build_extension(ext)
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            os.makedirs(self.build_temp, exist_ok=True)
            archs = os.environ.get("K2LITE_CUDA_ARCHS", "80;89;90").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX
            for src in cu:
                obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                cmd = ["nvcc", "-c", src, "-o", obj, "-O3", "-std=c++17", "-Isrc",
                       "-Xcompiler", "-fPIC", *gencode]
                subprocess.check_call(cmd)
                ext.extra_objects.append(obj)
        super().build_extension(ext)


def cuda_home():
    """The toolkit folder: $CUDA_HOME, else where the real nvcc lives (/usr/local/bin/nvcc may
    be a wrapper script), else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in sorted(glob("/usr/local/cuda*"), reverse=True) + [os.path.dirname(os.path.dirname(
            os.path.realpath(shutil.which("nvcc"))))]:
        if os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    return "/usr/local/cuda"


SERVE = ["starlette>=0.37", "uvicorn>=0.30"]
ext_modules = cpu_extensions()
if want_cuda():
    home = cuda_home()
    ext_modules.append(Pybind11Extension(
        "k2lite.backends._cuda", sorted(glob("src/cuda/*.cu")) + ["src/bindings_cuda.cpp"],
        include_dirs=["src", os.path.join(home, "include")],
        # static cudart: the module imports on machines without the toolkit's shared libs
        library_dirs=[os.path.join(home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")],
        libraries=["cudart_static", "rt", "dl", "pthread"],
        extra_compile_args=["-O3", "-std=c++17"]))

setup(
    name="k2lite",
    version="0.1.0",
    description="A small, fast, readable inference engine for Kimi K2 (DeepSeek-V3 architecture)",
    # models/ ships inside the package as k2lite.models_data, so an installed k2lite finds
    # its default model (k2-nano) and the K2 Thinking config/tokenizer files
    packages=find_packages(include=["k2lite", "k2lite.*"]) + ["k2lite.models_data"],
    package_dir={"k2lite.models_data": "models"},
    package_data={"k2lite.models_data": ["k2-nano/*", "kimi-k2-thinking/*"], "k2lite.serve": ["static/*.html"]},
    python_requires=">=3.9",
    install_requires=["numpy>=1.22", "tiktoken>=0.5", "click>=8.0"],
    extras_require={
        # `k2lite serve`: the OpenAI API on an ASGI stack (the library and `generate` need none of it)
        "serve": SERVE,
        # jinja2 renders chat templates k2lite does not know itself (the Kimi ones need nothing)
        "templates": ["jinja2"],
        # prometheus_client parses /metrics; selenium drives Chromium through the chat page
        "test": ["pytest", "torch", "transformers>=4.57", "compressed-tensors", "safetensors", "openai",
                 "prometheus_client", "selenium>=4.11", "jinja2", *SERVE],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    entry_points={"console_scripts": ["k2lite=k2lite.cli:main"]},
)
