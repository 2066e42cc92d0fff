"""Build manualconv and its C++ extension manualconv._C.

    pip install --no-build-isolation -e .          # or
    python setup.py build_ext --inplace
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# -fopenmp at compile time selects ATen's OpenMP backend for at::parallel_for in our
# headers (without it the kernels would run single-threaded); torch >= 2.10 needs C++20.
extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-std=c++20"]}
extra_link_args = ["-fopenmp"]

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
ext_modules = [
    CppExtension(
        name="manualconv._C",
        sources=sources,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
]

# --- CUDA extension (future) -------------------------------------------------
# When MANUALCONV_CUDA=1, a CUDAExtension built from csrc/cuda/*.cu will be added
# here. Only the CPU extension is built for now.
# if os.environ.get("MANUALCONV_CUDA", "0") == "1":
#     ...
# -----------------------------------------------------------------------------

setup(
    name="manualconv",
    version="0.1.0",
    description="conv2d and 2-D pooling with hand-derived backward passes",
    packages=["manualconv"],
    python_requires=">=3.9",
    install_requires=["torch"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},  # uses ninja when it is installed
)
