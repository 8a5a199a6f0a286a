// The CPU kernels for the compiler's baseline instruction set (cpu_kernels.h).
#include "cpu_kernels.h"

#include <cmath>

namespace vsam_cpu::baseline {
#define VSAM_CPU_SET_NAME "default"
#define VSAM_CPU_F16C 0
#include "cpu_kernels_body.h"
}  // namespace vsam_cpu::baseline
