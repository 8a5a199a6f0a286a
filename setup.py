"""Builds the pure-Python package and, when there are sources in csrc/, the extension vsam_ext._C:
C++ (CPU, OpenMP) always, CUDA C++ only when the installed torch has CUDA. Says what it built.

Install with ``pip install -e . --no-build-isolation`` so that the torch already installed is
the one compiled against (an isolated build would fetch its own torch).
"""
import glob
import json
import os
import sys

from setuptools import find_packages, setup


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp and not cu:
        print("vsam_ext: no sources in csrc/ yet; building the pure-Python package only", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    with open(os.path.join("csrc", "compile_flags.json")) as f:   # shared with .ci/nvcc_check.sh
        flags = json.load(f)
    cxx = flags["cxx"]
    if torch.version.cuda and cu and os.environ.get("VSAM_EXT_NO_CUDA") != "1":
        print(f"vsam_ext: building vsam_ext._C with C++ {cpp} and CUDA {cu}", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            "vsam_ext._C", cpp + cu, extra_compile_args={"cxx": cxx, "nvcc": flags["nvcc"]},
            extra_link_args=["-fopenmp"])
    else:
        why = "torch has no CUDA" if not torch.version.cuda else "no .cu sources or VSAM_EXT_NO_CUDA=1"
        print(f"vsam_ext: building vsam_ext._C with C++ {cpp}; skipping CUDA ({why})", file=sys.stderr)
        ext = cpp_extension.CppExtension("vsam_ext._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="vsam_ext",
    version="0.2.0",
    description="Efficient Sharpness-Aware Minimization (SAM, vSAM, SAM-k) optimizers for PyTorch",
    packages=find_packages(include=["vsam_ext", "vsam_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],   # numpy: the reference backend's IEEE square root
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
