#!/usr/bin/env bash
# Compile-only check of the CUDA sources (csrc/*.cu) with nvcc, for machines without a GPU or
# without a CUDA build of torch: every file is compiled with `nvcc -c` into a temporary
# directory, with torch's include paths and the flags torch's CUDAExtension passes (so what
# compiles here compiles in `pip install` on a GPU machine), plus the project's own flags from
# csrc/compile_flags.json (the ones setup.py uses). The PTX that nvcc generates on the way is
# kept and checked by .ci/ptx_fma_check.py: no fused multiply-add (ALGORITHMS.md, "Precision
# of the scalars"), which a GPU would show only as 1-ulp differences. Prints the time of each
# file and exits non-zero if any file fails to compile or its PTX could contract.
#
#   PYTHON=.venv/bin/python bash .ci/nvcc_check.sh        # the python whose torch to use
#   NVCC=/usr/local/cuda/bin/nvcc                         # default: nvcc on PATH, else /usr/local/bin, /usr/local/cuda/bin
#   VSAM_EXT_NVCC_ARCH=sm_90                              # target (default sm_90: H100/H200)
#   VSAM_EXT_SKIP_NVCC=1                                  # no nvcc here: say so and exit 0
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
where="NVCC=${NVCC:-} is not an executable"
if [ -z "${NVCC:-}" ]; then
    where="not on PATH, not in /usr/local/bin or /usr/local/cuda/bin"
    NVCC=$(command -v nvcc || true)
    for cand in /usr/local/bin/nvcc /usr/local/cuda/bin/nvcc; do
        [ -n "$NVCC" ] && break
        [ -x "$cand" ] && NVCC=$cand
    done
fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
    if [ "${VSAM_EXT_SKIP_NVCC:-0}" = "1" ]; then
        echo "nvcc_check: nvcc not found ($where); skipping the CUDA compile check (VSAM_EXT_SKIP_NVCC=1)"
        exit 0
    fi
    echo "nvcc_check: nvcc not found ($where)." >&2
    echo "nvcc_check: install the CUDA toolkit, set NVCC=/path/to/nvcc, or set VSAM_EXT_SKIP_NVCC=1 to skip." >&2
    exit 1
fi

shopt -s nullglob
sources=(csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "nvcc_check: no csrc/*.cu files; nothing to check"
    exit 0
fi

# torch's include paths and its standard CUDA flags (-D__CUDA_NO_HALF_OPERATORS__ ...), then ours.
if ! torch_flags=$("$PYTHON" -c '
import json
from torch.utils import cpp_extension as c
ours = json.load(open("csrc/compile_flags.json"))["nvcc"]
print(" ".join("-I" + p for p in c.include_paths()) + " " + " ".join(c.COMMON_NVCC_FLAGS + ours))
'); then
    echo "nvcc_check: could not import torch with PYTHON=$PYTHON" >&2
    exit 1
fi

arch=${VSAM_EXT_NVCC_ARCH:-sm_90}
arch_num=${arch#sm_}
# shellcheck disable=SC2206
flags=($torch_flags -std=c++20 --expt-relaxed-constexpr -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
       -gencode "arch=compute_${arch_num},code=sm_${arch_num}" -Xcompiler -fPIC
       -Xcompiler -Wall -Xcudafe --display_error_number)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "nvcc_check: $("$NVCC" --version | tail -1); ${#sources[@]} file(s); arch $arch"

failed=0
for src in "${sources[@]}"; do      # one at a time: parallel nvcc runs were slower on 2 cores
    name=$(basename "$src" .cu)
    start=$(date +%s.%N)
    mkdir -p "$tmp/$name.keep"
    "$NVCC" -c "$src" -o "$tmp/$name.o" "${flags[@]}" --keep --keep-dir "$tmp/$name.keep" >"$tmp/$name.log" 2>&1
    rc=$?
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    nwarn=$(grep -c -i "warning" "$tmp/$name.log" || true)
    if [ "$rc" -eq 0 ]; then
        echo "  ok    $src  ${secs} s  ($nwarn warning line(s))"
    else
        echo "  FAIL  $src  ${secs} s  (nvcc exit status $rc)"
        failed=1
    fi
    if [ -s "$tmp/$name.log" ]; then
        sed 's/^/        /' "$tmp/$name.log"
    fi
    if [ "$rc" -eq 0 ]; then
        ptx=("$tmp/$name.keep"/*.ptx)
        if [ ${#ptx[@]} -eq 0 ]; then
            echo "  FAIL  $src: nvcc kept no PTX to check"
            failed=1
        elif ! "$PYTHON" .ci/ptx_fma_check.py "${ptx[@]}" | sed "s|$tmp/$name.keep/||; s/^/        /"; then
            failed=1
        fi
    fi
done
if [ "$failed" -ne 0 ]; then
    echo "nvcc_check: compile errors" >&2
    exit 1
fi
echo "nvcc_check: all ${#sources[@]} CUDA file(s) compile"
