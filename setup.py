"""Build manualconv and its C++ extension manualconv._C.

    pip install --no-build-isolation .             # install (pyproject.toml); -e: editable
    pip wheel --no-build-isolation --no-deps .     # a wheel
    python setup.py build_ext --inplace            # in place, as the Makefile does

The CUDA kernels (csrc/cuda/*.cu) are built into the same extension when
    MANUALCONV_CUDA=1   always (fails if no CUDA toolkit is found);
    MANUALCONV_CUDA=0   never: the CPU-only extension;
    unset               when torch sees a CUDA GPU and a CUDA toolkit (CUDA_HOME) is found.
CUDA_HOME: torch's guess (from the location of nvcc, else /usr/local/cuda when nvcc is a wrapper
script outside the toolkit) unless set; it must hold the toolkit's include/ and lib64/.
GPU architectures: TORCH_CUDA_ARCH_LIST when set (e.g. "9.0" or "8.0;9.0"), else sm_80 and
sm_90 (A100, H100/H200).
"""
import glob
import os
import shutil

# torch guesses CUDA_HOME from the location of nvcc (CUDA_HOME/bin/nvcc). Where nvcc is a wrapper
# script outside the toolkit (e.g. /usr/local/bin/nvcc, guess /usr/local) and the toolkit is in
# the standard place, use that (before torch.utils.cpp_extension reads it).
_nvcc = shutil.which("nvcc")
_guess = os.path.dirname(os.path.dirname(_nvcc)) if _nvcc else None
if (not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and _guess
        and not os.path.exists(os.path.join(_guess, "include", "cuda_runtime.h"))
        and os.path.exists("/usr/local/cuda/include/cuda_runtime.h")):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

# -fopenmp at compile time selects ATen's OpenMP backend for at::parallel_for in our
# headers (without it the kernels would run single-threaded); torch >= 2.10 needs C++20.
# -fno-trapping-math: nothing here reads floating-point exception flags, so the compiler may
# evaluate both sides of a select (x < 0 ? a : b) where only AVX-512 could mask them; no value
# changes (no reassociation, NaN and ±inf as before). Without it GCC left GELU's loops scalar in
# the AVX2 build: 15.6 ms forward against 2.7 ms with it (AMD EPYC Zen 4, 1 thread, 2M entries).
extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math"]}
extra_link_args = ["-fopenmp"]

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))


def build_cuda() -> bool:
    """Whether to build the CUDA kernels too (MANUALCONV_CUDA, see the docstring)."""
    flag = os.environ.get("MANUALCONV_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"MANUALCONV_CUDA must be 0 or 1 (or unset), got {flag!r}")
    if flag == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    # torch guesses CUDA_HOME from the location of nvcc; where nvcc is a wrapper script outside
    # the toolkit (e.g. /usr/local/bin/nvcc) that guess has no headers or libraries
    toolkit = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    if flag == "1":
        if not toolkit:
            raise SystemExit(f"MANUALCONV_CUDA=1, but no CUDA toolkit was found (CUDA_HOME={CUDA_HOME!r} "
                             "has no include/cuda_runtime.h): set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda")
        return True
    return torch.cuda.is_available() and toolkit


def math_library_includes() -> list:
    """ATen's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER headers. A minimal CUDA toolkit
    (nvcc + cudart) lacks them; the nvidia-* wheels torch depends on ship them. Their include
    folders are then added with -isystem, which nvcc searches after the toolkit's own."""
    import importlib.util

    from torch.utils.cpp_extension import CUDA_HOME

    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    folders = sorted(f for root in roots for f in glob.glob(os.path.join(root, "*", "include"))
                     if glob.glob(os.path.join(f, "cu*.h")))
    return [arg for folder in folders for arg in ("-isystem", folder)]


def emulate_cuda() -> bool:
    """MANUALCONV_EMULATE_CUDA=1 (tests only, in a scratch copy of the tree): the CUDA kernels
    compiled as C++ for the CPU (csrc/cuda/emulate_on_host.cpp) and bound to the CPU key in place
    of the CPU kernels, so that the op tests run the CUDA kernel bodies without a GPU."""
    return os.environ.get("MANUALCONV_EMULATE_CUDA", "").strip() == "1"


if emulate_cuda():
    extension = CppExtension(
        name="manualconv._C",
        sources=sources + [os.path.join("csrc", "cuda", "emulate_on_host.cpp")],
        extra_compile_args={"cxx": extra_compile_args["cxx"] + ["-DMANUALCONV_EMULATE_ON_HOST"]},
        extra_link_args=extra_link_args,
    )
elif build_cuda():
    from torch.utils.cpp_extension import CUDAExtension

    # -O3, exact arithmetic (no --use_fast_math: the kernels must match the CPU ones).
    nvcc_args = ["-O3", "-std=c++20"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # explicit -gencode flags: torch adds none of its own then
        nvcc_args += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    nvcc_args += math_library_includes()
    extension = CUDAExtension(
        name="manualconv._C",
        sources=sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
        extra_compile_args={**extra_compile_args, "nvcc": nvcc_args},
        extra_link_args=extra_link_args,
    )
else:
    extension = CppExtension(
        name="manualconv._C",
        sources=sources,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )

# name, version (manualconv/__init__.py), dependencies and packages: pyproject.toml
setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},  # uses ninja when it is installed
)
