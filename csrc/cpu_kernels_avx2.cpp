// The CPU kernels for x86-64 with AVX2 and F16C (cpu_kernels.h), chosen at run time when the CPU
// has both. The target pragma comes after every #include: the headers' inline functions and
// templates keep the baseline target, so no code that another file may share (a weak symbol)
// is built for AVX2; only the kernels below are. No FMA: "fma" is not in the target list, and
// -ffp-contract=off holds anyway.
#include "cpu_kernels.h"

#include <cmath>
#include <immintrin.h>

#ifdef VSAM_CPU_HAS_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
namespace vsam_cpu::avx2 {
#define VSAM_CPU_SET_NAME "avx2"
#define VSAM_CPU_F16C 1
#include "cpu_kernels_body.h"
}  // namespace vsam_cpu::avx2
#pragma GCC pop_options
#endif
