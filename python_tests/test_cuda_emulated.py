"""The CUDA backend's functors and launcher run on the CPU (python_tests/emulated_launch.cu):
the batched loads of the reductions keep each thread's order of additions, the finalize loop
keeps its order, and the one-launch table of the segment ops (GlobalTable) gives every block the
work the kernel-argument Tables gave it, all bit for bit. What the GPU would run differently is
only the launch itself (and block_sum, unchanged), so the sums of segment_sumsq/segment_gram
keep their bits without a GPU to show it.

Opt-in, since nvcc compiles torch's headers for about a minute: ``VSAM_EXT_CUDA_EMULATE=1``
(needs nvcc, found as .ci/nvcc_check.sh finds it). The program includes csrc/cuda_ops.cu with
VSAM_EXT_EMULATED_LAUNCH, which leaves out the op registration; the host ops stay compiled but
are never called, so the link leaves libc10_cuda's symbols (absent from a CPU build of torch)
unresolved."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "python_tests", "emulated_launch.cu")


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.mark.skipif(os.environ.get("VSAM_EXT_CUDA_EMULATE") != "1",
                    reason="opt-in (about a minute of nvcc): VSAM_EXT_CUDA_EMULATE=1")
def test_emulated_launch_keeps_the_bits():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    from torch.utils import cpp_extension as c
    import torch
    with open(os.path.join(ROOT, "csrc", "compile_flags.json")) as f:
        ours = json.load(f)["nvcc"]
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "emulated_launch")
        cmd = ([nvcc, SOURCE, "-o", exe, "-I" + os.path.join(ROOT, "csrc")]
               + ["-I" + p for p in c.include_paths()] + list(c.COMMON_NVCC_FLAGS) + ours
               + ["-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-gencode", "arch=compute_90,code=sm_90",
                  "-L" + lib, "-lc10", "-Xlinker", "-rpath", "-Xlinker", lib,
                  "-Xlinker", "--unresolved-symbols=ignore-all", "-Xlinker", "-z", "-Xlinker", "lazy",
                  "-Xcompiler", "-no-pie", "-Xlinker", "-no-pie"])
        build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert build.returncode == 0, build.stderr[-6000:]
        run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "emulated launch: ok" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
