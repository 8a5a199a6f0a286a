// The CPU kernels as a table of entry points, one table per instruction set; cpu_ops.cpp checks
// the arguments, builds the Plan and calls the table chosen once per process (cpu_ops.cpp:
// kernels()). Each entry is the maths of one op over every piece of a Plan (cpu_kernels_body.h).
#pragma once

#include "cpu_plan.h"

#include <ATen/Dispatch.h>

namespace vsam_cpu {

// The host scalars of a fused step, in double (vsam_ext/ops/scalars.py): derived from the op's
// float arguments, or read from its `scalars` tensor (a captured step's). `reuse`: psf without
// backup is the reuse rule d = g + coeff * psf (chosen by the float coeff != 0).
struct StepScalars {
  double coeff;
  double lr;           // SGD
  double decay;        // AdamW: 1 - lr * weight_decay
  double step_size;    // AdamW: lr / (1 - beta1^step)
  double bc2_sqrt;     // AdamW: sqrt(1 - beta2^step)
  bool reuse;
};

struct Kernels {
  const char* name;   // "default" or "avx2"
  Tensor (*sumsq)(TensorList x, const OptList& weight, double eta, const Plan& plan, int64_t nseg);
  Tensor (*gram)(TensorList a, TensorList b, const Plan& plan, int64_t nseg);
  Tensor (*axpby)(TensorList y, TensorList x, const Tensor& alpha, const Tensor& beta, const Plan& plan,
                  int64_t nseg);
  void (*perturb)(TensorList param, TensorList grad, const Tensor& scale, TensorList backup, bool adaptive,
                  const OptList& grad_keep, double eta, const Plan& plan);
  Tensor (*restore)(TensorList param, TensorList backup, TensorList grad_sam, const OptList& psf, const Plan& plan);
  void (*reuse)(TensorList grad, TensorList psf, double coeff, const Plan& plan);
  Tensor (*sgd)(TensorList param, TensorList grad, const OptList& momentum_buffer, const OptList& psf,
                const OptList& backup, const StepScalars& s, const Plan& plan, double weight_decay,
                double momentum, double dampening, bool nesterov, bool maximize, bool first);
  Tensor (*adamw)(TensorList param, TensorList grad, TensorList exp_avg, TensorList exp_avg_sq, const OptList& psf,
                  const OptList& backup, const StepScalars& s, const Plan& plan, double beta1, double beta2,
                  double eps, bool maximize);
};

// The compiler's baseline for the target (SSE2 on x86-64): runs everywhere.
namespace baseline { extern const Kernels kernels; }

#if defined(__x86_64__) && defined(__GNUC__)
#define VSAM_CPU_HAS_AVX2 1
// 256-bit vectors and hardware half<->float conversion; chosen when the CPU has AVX2 and F16C.
namespace avx2 { extern const Kernels kernels; }
#endif

}  // namespace vsam_cpu
