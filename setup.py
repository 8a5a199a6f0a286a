"""Builds the extension vsam_ext._C (the metadata is in pyproject.toml): C++ (CPU, OpenMP)
always, CUDA C++ too when the installed torch has CUDA and the CUDA compiler (nvcc) is there.
Says what it built and why (``pip install -v`` shows it).

* A torch with CUDA but no nvcc (no CUDA toolkit, or a runtime-only one) still installs: the C++
  extension is built and the message says so; on the GPU the Triton backend runs the kernels.
* ``VSAM_EXT_NO_CUDA=1`` builds the C++ extension only, whatever torch and the toolkit have.

Install with ``pip install -e . --no-build-isolation`` so that the torch already installed is
the one compiled against (an isolated build would fetch its own torch, or have none).
The compiler flags come from csrc/compile_flags.json (shared with .ci/nvcc_check.sh).
"""
import glob
import json
import os
import sys

from setuptools import setup

_TRUE = ("1", "true", "yes", "on")


def no_cuda_requested() -> bool:
    """``VSAM_EXT_NO_CUDA`` set to 1 / true / yes / on."""
    return os.environ.get("VSAM_EXT_NO_CUDA", "").strip().lower() in _TRUE


def _nvcc(cuda_home):
    if not cuda_home:
        return None
    for name in ("nvcc", "nvcc.exe"):
        path = os.path.join(cuda_home, "bin", name)
        if os.path.isfile(path):
            return path
    return None


def choose_extension(torch_cuda, cuda_home, have_cu, no_cuda):
    """Which extension to build: ``("cuda", why)`` (C++ and CUDA) or ``("cpp", why)`` (C++ only).

    ``torch_cuda``: ``torch.version.cuda`` (None for a CPU build); ``cuda_home``: torch's
    ``cpp_extension.CUDA_HOME`` (None when it found no toolkit); ``have_cu``: there are .cu
    sources; ``no_cuda``: ``VSAM_EXT_NO_CUDA`` is set."""
    if no_cuda:
        return "cpp", "VSAM_EXT_NO_CUDA is set"
    if not torch_cuda:
        return "cpp", "torch has no CUDA"
    if not have_cu:
        return "cpp", "no .cu sources"
    nvcc = _nvcc(cuda_home)
    if nvcc is None:
        where = (f"CUDA_HOME={cuda_home} has no bin/nvcc" if cuda_home else
                 "no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda")
        return "cpp", (f"torch has CUDA {torch_cuda} but there is no CUDA compiler ({where}): the CUDA kernels are "
                       f"not built; on the GPU the Triton backend runs instead (pip install triton). To build them, "
                       f"install the CUDA toolkit {torch_cuda.split('.')[0]}.x and set CUDA_HOME to it; "
                       f"VSAM_EXT_NO_CUDA=1 skips them on purpose")
    return "cuda", f"torch has CUDA {torch_cuda}, nvcc at {nvcc}"


def extensions():
    """(ext_modules, cmdclass) for setup(): vsam_ext._C from the sources in csrc/, or nothing
    when there are none. Paths are relative to the project root (the current directory of a build)."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp and not cu:
        print("vsam_ext: no sources in csrc/ yet; building the pure-Python package only", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(f"vsam_ext: the build compiles against the installed torch, and this build environment has "
                         f"none ({exc}). Install torch first, then: pip install -e . --no-build-isolation "
                         f"(pip's default isolated build does not see it)") from None

    with open(os.path.join("csrc", "compile_flags.json")) as f:   # shared with .ci/nvcc_check.sh
        flags = json.load(f)
    cxx = flags["cxx"]
    kind, why = choose_extension(torch.version.cuda, cpp_extension.CUDA_HOME, bool(cu), no_cuda_requested())
    if kind == "cuda":
        print(f"vsam_ext: building vsam_ext._C with C++ {cpp} and CUDA {cu} ({why})", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            "vsam_ext._C", cpp + cu, extra_compile_args={"cxx": cxx, "nvcc": flags["nvcc"]},
            extra_link_args=["-fopenmp"])
    else:
        print(f"vsam_ext: building vsam_ext._C with C++ {cpp}; skipping CUDA: {why}", file=sys.stderr)
        ext = cpp_extension.CppExtension("vsam_ext._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


if __name__ == "__main__":       # pip / setuptools run this file as __main__; tests import it
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
