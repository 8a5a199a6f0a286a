// CPU (C++/OpenMP through at::parallel_for) kernels of the vsam_ext ops; the semantics are
// those of vsam_ext/ops/reference.py. Every op comes in two forms that share one implementation
// of its maths: over flat 1-D buffers (segment_sumsq, ..., adamw_step) and over lists of tensors
// wherever they live (segment_sumsq_list, ..., adamw_step_list: the flat op applied to each
// tensor, with the tensors as the segments and the statistics over the tensors from stat_first
// on). The two differ in their launcher only: each builds a Plan of pieces (tensor index,
// element range), and one at::parallel_for runs the same bodies over all the pieces of all the
// tensors (a flat buffer is the list of one tensor).
//
// The kernels themselves are compiled once per instruction set (cpu_kernels.h): this file checks
// the arguments, builds the Plan and calls the set chosen at the first call (AVX2 + F16C where
// the CPU has them, else the baseline; $VSAM_EXT_CPU_CAPABILITY=default forces the baseline).
//
// Work is cut into fixed pieces (at most kChunk elements, cut from the start of each segment or
// tensor), so every reduction is a per-piece partial (double accumulators) summed in piece
// order: results do not depend on the number of threads. Maths in float (double for double
// buffers), one rounding per store, no fused multiply-add (built with -ffp-contract=off): the
// bits of the reference backend. Scalars (sums, statistics) are returned in the maths dtype:
// float, double for double buffers.
#include "cpu_kernels.h"

#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

namespace {

using namespace vsam_cpu;

at::ScalarType maths_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------
// Argument checks. Every check of an op runs before anything is written.

// Flat buffers: the first one sets device, dtype and length.
void check_buffer(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, ": expected a 1-D contiguous buffer");
  TORCH_CHECK(t.numel() == like.numel(), name, ": expected ", like.numel(), " elements, got ", t.numel());
}

void check_first(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": the cpu backend takes CPU tensors");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, ": expected a 1-D contiguous buffer");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point buffer");
}

// Tensor lists: the first list sets the length, the dtype (one for all lists) and each index's
// number of elements; every tensor is a contiguous CPU tensor of any shape.
class ListArgs {
 public:
  ListArgs(TensorList first, const char* name) : first_(first), name_(name) {
    for (size_t i = 0; i < first.size(); ++i) {
      check_tensor(first[i], name, i);
      const auto st = first[i].scalar_type();
      TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name, "[", i,
                  "]: expected a float32, float64, float16 or bfloat16 tensor, got ", st);
      TORCH_CHECK(st == first[0].scalar_type(), name, "[", i, "]: expected dtype ", first[0].scalar_type(), " (as ",
                  name, "[0]), got ", st);
    }
  }

  // Another list: as long as the first, each tensor of the first's dtype and of as many
  // elements as the first's tensor of the same index.
  void same(TensorList l, const char* name) const {
    TORCH_CHECK(l.size() == first_.size(), name, ": expected ", first_.size(), " tensors (as many as ", name_,
                "), got ", l.size());
    for (size_t i = 0; i < l.size(); ++i) {
      check_tensor(l[i], name, i);
      TORCH_CHECK(l[i].scalar_type() == first_[0].scalar_type(), name, "[", i, "]: expected dtype ",
                  first_[0].scalar_type(), " (as ", name_, "), got ", l[i].scalar_type());
      TORCH_CHECK(l[i].numel() == first_[i].numel(), name, "[", i, "]: expected ", first_[i].numel(),
                  " elements (as ", name_, "[", i, "]), got ", l[i].numel());
    }
  }
  void same(const OptList& l, const char* name) const {
    if (l.has_value()) same(*l, name);
  }

  bool empty() const { return first_.empty(); }
  int64_t size() const { return static_cast<int64_t>(first_.size()); }
  at::ScalarType dtype() const { return first_[0].scalar_type(); }

  // A tensor of coefficients (scale, alpha, beta): `count` values, contiguous, on the CPU, in the
  // maths dtype of the lists (float32; float64 for float64 tensors; either for empty lists).
  void coefficients(const Tensor& c, int64_t count, const char* name) const {
    TORCH_CHECK(c.device().is_cpu(), name, ": expected a CPU tensor, got one on ", c.device());
    if (empty()) {
      TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble, name,
                  ": expected a float32 or float64 tensor, got ", c.scalar_type());
    } else {
      const auto want = maths_type(dtype());
      TORCH_CHECK(c.scalar_type() == want, name, ": expected dtype ", want, " (the maths dtype of ", dtype(),
                  " tensors), got ", c.scalar_type());
    }
    TORCH_CHECK(c.is_contiguous(), name, ": expected a contiguous tensor");
    TORCH_CHECK(c.numel() == count, name, ": expected ", count, " value(s), got ", c.numel());
  }

 private:
  static void check_tensor(const Tensor& t, const char* name, size_t i) {
    TORCH_CHECK(t.defined(), name, "[", i, "]: expected a tensor, got an undefined one");
    TORCH_CHECK(t.device().is_cpu(), name, "[", i, "]: the cpu backend takes CPU tensors, got one on ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, "[", i, "]: expected a contiguous tensor (any shape), got one of shape ",
                t.sizes(), " and strides ", t.strides());
  }

  TensorList first_;
  const char* name_;
};

// A flat op's optional buffer as an optional list of one.
struct OptOne {
  std::vector<Tensor> v;
  OptOne(const c10::optional<Tensor>& t) {   // NOLINT: implicit on purpose
    if (t.has_value()) v.push_back(*t);
  }
  operator OptList() const { return v.empty() ? OptList() : OptList(TensorList(v)); }   // NOLINT
};

// ---------------------------------------------------------------------------------------------
// The instruction set. Chosen once per process, at the first op call: $VSAM_EXT_CPU_CAPABILITY
// ("default" or "avx2") if set, else AVX2 where the CPU has AVX2 and F16C, else the baseline.
// Every set gives the same bits (cpu_kernels_body.h); the choice is about speed only.

bool cpu_runs_avx2_set() {
#ifdef VSAM_CPU_HAS_AVX2
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const Kernels* by_name(const std::string& name) {
  if (name == "default") return &baseline::kernels;
#ifdef VSAM_CPU_HAS_AVX2
  if (name == "avx2") {
    TORCH_CHECK(cpu_runs_avx2_set(), "cpu capability 'avx2': this CPU lacks AVX2 or F16C; use 'default'");
    return &avx2::kernels;
  }
#endif
  TORCH_CHECK(false, "cpu capability: expected one of ", cpu_runs_avx2_set() ? "'default', 'avx2'" : "'default'",
              ", got '", name, "'");
}

const Kernels* best_for_this_cpu() {
  if (const char* env = std::getenv("VSAM_EXT_CPU_CAPABILITY"); env && *env) return by_name(env);
  return by_name(cpu_runs_avx2_set() ? "avx2" : "default");
}

std::atomic<const Kernels*> chosen{nullptr};

const Kernels& kernels() {
  const Kernels* k = chosen.load(std::memory_order_acquire);
  if (!k) {
    k = best_for_this_cpu();
    chosen.store(k, std::memory_order_release);
  }
  return *k;
}

// The set in use; with a name, switch to it first (tests compare the sets' bits in one process).
std::string cpu_capability(c10::string_view name) {
  if (!name.empty()) chosen.store(by_name(std::string(name)), std::memory_order_release);
  return kernels().name;
}

// =============================================================================================
// The flat ops: checks, then the list of one buffer.

void check_scale(const Tensor& scale, const Tensor& param) {
  const auto want = maths_type(param.scalar_type());
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == want && scale.device().is_cpu(),
              "perturb: scale must be one ", want, " value on the CPU (the maths dtype of a ", param.scalar_type(),
              " buffer), got ", scale.numel(), " ", scale.scalar_type(), " value(s) on ", scale.device());
}

Tensor segment_sumsq(const Tensor& x, at::IntArrayRef bounds, const c10::optional<Tensor>& weight, double eta) {
  check_first(x, "x");
  if (weight.has_value()) check_buffer(*weight, x, "weight");
  const Plan plan = segment_plan(bounds, x.numel());
  return kernels().sumsq(x, OptOne(weight), eta, plan, static_cast<int64_t>(bounds.size()) - 1);
}

Tensor segment_gram(const Tensor& a, const Tensor& b, at::IntArrayRef bounds) {
  check_first(a, "a");
  check_buffer(b, a, "b");
  const Plan plan = segment_plan(bounds, a.numel());
  return kernels().gram(a, b, plan, static_cast<int64_t>(bounds.size()) - 1);
}

// A per-segment coefficient tensor: contiguous, on the CPU, in the maths dtype of the buffer
// `like` (float; double for double buffers), one value per segment.
void check_per_segment(const Tensor& c, const Tensor& like, int64_t nseg, const char* name) {
  const auto want = maths_type(like.scalar_type());
  TORCH_CHECK(c.device().is_cpu(), name, ": expected a CPU tensor, got one on ", c.device());
  TORCH_CHECK(c.scalar_type() == want, name, ": expected dtype ", want, " (the maths dtype of a ", like.scalar_type(),
              " buffer), got ", c.scalar_type());
  TORCH_CHECK(c.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(c.numel() == nseg, name, ": expected ", nseg, " values (one per segment), got ", c.numel());
}

Tensor segment_axpby(const Tensor& y, const Tensor& x, const Tensor& alpha, const Tensor& beta,
                     at::IntArrayRef bounds) {
  check_first(y, "y");
  check_buffer(x, y, "x");
  TORCH_CHECK(!bounds.empty(), "bounds: expected at least one boundary");
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  check_per_segment(alpha, y, nseg, "alpha");
  check_per_segment(beta, y, nseg, "beta");
  const Plan plan = segment_plan(bounds, y.numel());
  return kernels().axpby(y, x, alpha, beta, plan, nseg);
}

void perturb(const Tensor& param, const Tensor& grad, const Tensor& scale, const Tensor& backup, bool adaptive,
             const c10::optional<Tensor>& grad_keep, double eta) {
  check_first(param, "param");
  check_buffer(grad, param, "grad");
  check_buffer(backup, param, "backup");
  if (grad_keep.has_value()) check_buffer(*grad_keep, param, "grad_keep");
  check_scale(scale, param);
  kernels().perturb(param, grad, scale, backup, adaptive, OptOne(grad_keep), eta, flat_plan(param.numel()));
}

Tensor restore_psf_stats(const Tensor& param, const Tensor& backup, const Tensor& grad_sam,
                         const c10::optional<Tensor>& psf, int64_t stat_start) {
  check_first(param, "param");
  check_buffer(backup, param, "backup");
  check_buffer(grad_sam, param, "grad_sam");
  if (psf.has_value()) check_buffer(*psf, param, "psf");
  return kernels().restore(param, backup, grad_sam, OptOne(psf), flat_plan(param.numel(), stat_start));
}

// The `scalars` tensor of a captured step (vsam_ext/ops/scalars.py): n float64 values on the
// parameters' device, read here (CPU tensors: no device to wait for).
const double* read_scalars(const c10::optional<Tensor>& scalars, int64_t n, at::Device device, const char* op) {
  if (!scalars.has_value()) return nullptr;
  const Tensor& t = *scalars;
  TORCH_CHECK_VALUE(t.scalar_type() == at::kDouble && t.dim() == 1 && t.numel() == n && t.is_contiguous() &&
                  t.device() == device,
              op, ": scalars must be a contiguous 1-D float64 tensor of ", n, " value(s) on ", device,
              " (vsam_ext.ops.scalars), got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  return t.data_ptr<double>();
}

StepScalars sgd_scalars(double coeff, double lr, const c10::optional<Tensor>& scalars, at::Device device) {
  const double* s = read_scalars(scalars, 2, device, "sgd_step");
  return s ? StepScalars{s[0], s[1], 0, 0, 0, coeff != 0.0} : StepScalars{coeff, lr, 0, 0, 0, coeff != 0.0};
}

void check_adamw_step(int64_t step) {
  TORCH_CHECK(step >= 1, "step: expected >= 1 (the count after this step's increment), got ", step);
}

StepScalars adamw_scalars(double coeff, double lr, double beta1, double beta2, double weight_decay, int64_t step,
                          const c10::optional<Tensor>& scalars, at::Device device) {
  check_adamw_step(step);
  if (const double* s = read_scalars(scalars, 4, device, "adamw_step")) {
    return StepScalars{s[0], 0, s[1], s[2], s[3], coeff != 0.0};
  }
  const double n = static_cast<double>(step);
  return StepScalars{coeff, lr, 1.0 - lr * weight_decay, lr / (1.0 - std::pow(beta1, n)),
                     std::sqrt(1.0 - std::pow(beta2, n)), coeff != 0.0};
}

double reuse_coeff(double coeff, const c10::optional<Tensor>& scalars, at::Device device) {
  const double* s = read_scalars(scalars, 1, device, "reuse");
  return s ? s[0] : coeff;
}

void reuse(const Tensor& grad, const Tensor& psf, double coeff, const c10::optional<Tensor>& scalars) {
  check_first(grad, "grad");
  check_buffer(psf, grad, "psf");
  kernels().reuse(grad, psf, reuse_coeff(coeff, scalars, grad.device()), flat_plan(grad.numel()));
}

void check_step_inputs(const Tensor& param, const Tensor& grad, const c10::optional<Tensor>& psf,
                       const c10::optional<Tensor>& backup) {
  check_first(param, "param");
  check_buffer(grad, param, "grad");
  if (psf.has_value()) check_buffer(*psf, param, "psf");
  if (backup.has_value()) check_buffer(*backup, param, "backup");
}

Tensor sgd_step(const Tensor& param, const Tensor& grad, const c10::optional<Tensor>& momentum_buffer,
                const c10::optional<Tensor>& psf, const c10::optional<Tensor>& backup, double coeff,
                int64_t stat_start, double lr, double weight_decay, double momentum, double dampening,
                bool nesterov, bool maximize, bool first, const c10::optional<Tensor>& scalars) {
  check_step_inputs(param, grad, psf, backup);
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "momentum_buffer: required when momentum != 0");
  if (momentum_buffer.has_value()) check_buffer(*momentum_buffer, param, "momentum_buffer");
  const StepScalars s = sgd_scalars(coeff, lr, scalars, param.device());
  return kernels().sgd(param, grad, OptOne(momentum_buffer), OptOne(psf), OptOne(backup), s,
                       flat_plan(param.numel(), stat_start), weight_decay, momentum, dampening, nesterov, maximize,
                       first);
}

Tensor adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                  const c10::optional<Tensor>& psf, const c10::optional<Tensor>& backup, double coeff,
                  int64_t stat_start, double lr, double beta1, double beta2, double eps, double weight_decay,
                  int64_t step, bool maximize, const c10::optional<Tensor>& scalars) {
  check_step_inputs(param, grad, psf, backup);
  check_buffer(exp_avg, param, "exp_avg");
  check_buffer(exp_avg_sq, param, "exp_avg_sq");
  const StepScalars s = adamw_scalars(coeff, lr, beta1, beta2, weight_decay, step, scalars, param.device());
  return kernels().adamw(param, grad, exp_avg, exp_avg_sq, OptOne(psf), OptOne(backup), s,
                         flat_plan(param.numel(), stat_start), beta1, beta2, eps, maximize);
}

// =============================================================================================
// The list ops: checks, then every tensor of every list in one plan. An empty list does nothing
// and returns what the flat op returns for an empty buffer: zeros(0) from the segment ops, the
// statistics (0, 0) when they are asked for (in fp32: there is no dtype to take them from).

Tensor empty_stats(bool asked) { return asked ? at::zeros({2}, out_options(at::kFloat)) : no_stats(); }

Tensor segment_sumsq_list(TensorList x, OptList weight, double eta) {
  const ListArgs args(x, "x");
  args.same(weight, "weight");
  if (args.empty()) return at::zeros({0}, out_options(at::kFloat));
  return kernels().sumsq(x, weight, eta, list_plan(x), args.size());
}

Tensor segment_gram_list(TensorList a, TensorList b) {
  const ListArgs args(a, "a");
  args.same(b, "b");
  if (args.empty()) return at::zeros({0, 3}, out_options(at::kFloat));
  return kernels().gram(a, b, list_plan(a), args.size());
}

Tensor segment_axpby_list(TensorList y, TensorList x, const Tensor& alpha, const Tensor& beta) {
  const ListArgs args(y, "y");
  args.same(x, "x");
  args.coefficients(alpha, args.size(), "alpha");
  args.coefficients(beta, args.size(), "beta");
  if (args.empty()) return at::zeros({0}, out_options(at::kFloat));
  return kernels().axpby(y, x, alpha, beta, list_plan(y), args.size());
}

void perturb_list(TensorList param, TensorList grad, const Tensor& scale, TensorList backup, bool adaptive,
                  OptList grad_keep, double eta) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(backup, "backup");
  args.same(grad_keep, "grad_keep");
  args.coefficients(scale, 1, "scale");
  if (args.empty()) return;
  kernels().perturb(param, grad, scale, backup, adaptive, grad_keep, eta, list_plan(param));
}

Tensor restore_psf_stats_list(TensorList param, TensorList backup, TensorList grad_sam, OptList psf,
                              int64_t stat_first) {
  const ListArgs args(param, "param");
  args.same(backup, "backup");
  args.same(grad_sam, "grad_sam");
  args.same(psf, "psf");
  if (args.empty()) return empty_stats(psf.has_value());
  return kernels().restore(param, backup, grad_sam, psf, list_plan(param, stat_first));
}

void reuse_list(TensorList grad, TensorList psf, double coeff, const c10::optional<Tensor>& scalars) {
  const ListArgs args(grad, "grad");
  args.same(psf, "psf");
  if (args.empty()) return;
  kernels().reuse(grad, psf, reuse_coeff(coeff, scalars, grad[0].device()), list_plan(grad));
}

Tensor sgd_step_list(TensorList param, TensorList grad, OptList momentum_buffer, OptList psf, OptList backup,
                     double coeff, int64_t stat_first, double lr, double weight_decay, double momentum,
                     double dampening, bool nesterov, bool maximize, bool first,
                     const c10::optional<Tensor>& scalars) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(momentum_buffer, "momentum_buffer");
  args.same(psf, "psf");
  args.same(backup, "backup");
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "momentum_buffer: required when momentum != 0");
  if (args.empty()) return empty_stats(backup.has_value() && psf.has_value());
  const StepScalars s = sgd_scalars(coeff, lr, scalars, param[0].device());
  return kernels().sgd(param, grad, momentum_buffer, psf, backup, s, list_plan(param, stat_first), weight_decay,
                       momentum, dampening, nesterov, maximize, first);
}

Tensor adamw_step_list(TensorList param, TensorList grad, TensorList exp_avg, TensorList exp_avg_sq, OptList psf,
                       OptList backup, double coeff, int64_t stat_first, double lr, double beta1, double beta2,
                       double eps, double weight_decay, int64_t step, bool maximize,
                       const c10::optional<Tensor>& scalars) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(exp_avg, "exp_avg");
  args.same(exp_avg_sq, "exp_avg_sq");
  args.same(psf, "psf");
  args.same(backup, "backup");
  check_adamw_step(step);
  if (args.empty()) return empty_stats(backup.has_value() && psf.has_value());
  const StepScalars s = adamw_scalars(coeff, lr, beta1, beta2, weight_decay, step, scalars, param[0].device());
  return kernels().adamw(param, grad, exp_avg, exp_avg_sq, psf, backup, s, list_plan(param, stat_first), beta1,
                         beta2, eps, maximize);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vsam_ext, m) {
  m.def("cpu_capability(str name='') -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(vsam_ext, CPU, m) {
  m.impl("segment_sumsq", &segment_sumsq);
  m.impl("segment_gram", &segment_gram);
  m.impl("segment_axpby", &segment_axpby);
  m.impl("perturb", &perturb);
  m.impl("restore_psf_stats", &restore_psf_stats);
  m.impl("reuse", &reuse);
  m.impl("sgd_step", &sgd_step);
  m.impl("adamw_step", &adamw_step);
  m.impl("segment_sumsq_list", &segment_sumsq_list);
  m.impl("segment_gram_list", &segment_gram_list);
  m.impl("segment_axpby_list", &segment_axpby_list);
  m.impl("perturb_list", &perturb_list);
  m.impl("restore_psf_stats_list", &restore_psf_stats_list);
  m.impl("reuse_list", &reuse_list);
  m.impl("sgd_step_list", &sgd_step_list);
  m.impl("adamw_step_list", &adamw_step_list);
}
