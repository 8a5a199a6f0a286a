"""No fused multiply-add and no approximate sqrt/div in the compiled kernels (ALGORITHMS.md,
"Precision of the scalars"): the flags that forbid them, and the PTX check that CI runs on
cuda_ops.cu (.ci/nvcc_check.sh -> .ci/ptx_fma_check.py) proven to catch what it must. On the
H200, nvcc's default contraction was seen only as 1-ulp differences; here no GPU is needed."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, ".ci", "ptx_fma_check.py")
FLAGS = json.load(open(os.path.join(ROOT, "csrc", "compile_flags.json")))
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)

# Each line is one thing the kernels do: a*b+c (SGD, axpby), sqrt and a division (AdamW).
KERNEL = r"""
__global__ void k(float* y, const float* x, float a, double* z, const double* w, double b) {
  int i = threadIdx.x;
  y[i] = a * x[i] + y[i];
  z[i] = b * w[i] + z[i];
  y[i + 32] = sqrtf(x[i]) / y[i + 64];
  z[i + 32] = sqrt(w[i]) / z[i + 64];
}
"""


def _check(ptx_text, tmp_path):
    path = tmp_path / "k.ptx"
    path.write_text(ptx_text)
    return subprocess.run([sys.executable, CHECK, str(path)], capture_output=True, text=True)


def test_the_build_flags_forbid_contraction_and_approximations():
    assert "-ffp-contract=off" in FLAGS["cxx"]
    for flag in ("-fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false"):
        assert flag in FLAGS["nvcc"]
    assert "--use_fast_math" not in FLAGS["nvcc"] and "-ffast-math" not in FLAGS["cxx"]
    setup = open(os.path.join(ROOT, "setup.py")).read()
    check = open(os.path.join(ROOT, ".ci", "nvcc_check.sh")).read()
    assert "compile_flags.json" in setup and "compile_flags.json" in check and "ptx_fma_check.py" in check


@pytest.mark.parametrize("line,bad", [
    ("\tfma.rn.f32 \t%f4, %f2, %f1, %f3;", True),
    ("\tfma.rn.f64 \t%fd4, %fd2, %fd1, %fd3;", True),
    ("\tfma.rn.bf16x2 \t%r1, %r2, %r3, %r4;", True),
    ("\t@%p1 mad.rn.f32 \t%f4, %f2, %f1, %f3;", True),
    ("\tmul.f32 \t%f3, %f2, %f1;", True),            # unrounded: ptxas may fuse it with an add
    ("\tadd.ftz.f32 \t%f3, %f2, %f1;", True),
    ("\tsqrt.approx.ftz.f32 \t%f2, %f1;", True),
    ("\tdiv.full.f32 \t%f4, %f2, %f3;", True),
    ("\trcp.approx.ftz.f64 \t%fd2, %fd1;", True),
    ("\tmul.rn.f32 \t%f3, %f2, %f1;", False),
    ("\tadd.rn.f64 \t%fd3, %fd2, %fd1;", False),
    ("\tsqrt.rn.f32 \t%f2, %f1;", False),
    ("\tdiv.rn.f64 \t%fd4, %fd2, %fd3;", False),
    ("\tmul.wide.s32 \t%rd9, %r1, 4;", False),       # integer address arithmetic
    ("\tadd.s64 \t%rd10, %rd8, %rd9;", False),
    ("\tmad.lo.s32 \t%r5, %r3, %r4, %r1;", False),
])
def test_the_ptx_check_knows_each_instruction(line, bad, tmp_path):
    result = _check(f".version 8.0\n{line}\nret;\n", tmp_path)
    assert result.returncode == (1 if bad else 0), result.stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("flags,bad", [
    (FLAGS["nvcc"], False),                          # the project's flags: clean
    ([f for f in FLAGS["nvcc"] if f != "-fmad=false"], True),     # nvcc's default: fma.rn
    (["-O3", "--use_fast_math"], True),              # approximate sqrt/div, ftz, fma
    (FLAGS["nvcc"] + ["--use_fast_math"], False),    # e.g. NVCC_APPEND_FLAGS: our explicit flags still win
], ids=["project", "without-fmad-false", "fast-math", "project-and-fast-math"])
def test_nvcc_with_our_flags_emits_no_fma_and_the_check_catches_it_without(flags, bad, tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(KERNEL)
    ptx = tmp_path / "k.ptx"
    subprocess.run([NVCC, "-arch=sm_90", "--ptx", str(src), "-o", str(ptx), *flags], check=True,
                   capture_output=True, timeout=120)
    result = subprocess.run([sys.executable, CHECK, str(ptx)], capture_output=True, text=True)
    assert result.returncode == (1 if bad else 0), result.stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_the_built_cpu_kernels_hold_no_fma_instruction():
    """The AVX2 kernel set (csrc/cpu_kernels_avx2.cpp) is vector code, and no FMA: its target
    list leaves "fma" out. Read off the extension this suite imports, on x86-64."""
    import platform
    import re
    import vsam_ext
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the instruction names checked are x86-64's")
    lib = next((os.path.join(os.path.dirname(vsam_ext.__file__), f) for f in os.listdir(os.path.dirname(vsam_ext.__file__))
                if f.startswith("_C") and f.endswith(".so")), None)
    if lib is None:
        pytest.skip("the extension is not built")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", lib], capture_output=True, text=True, check=True).stdout
    assert "ymm" in text, "no 256-bit vector code: the AVX2 kernel set was not built"
    fma = re.findall(r"\bvf(?:n)?m(?:add|sub)\w*", text)
    assert not fma, f"FMA instructions in {lib}: {sorted(set(fma))[:5]}"
