// CPU (C++/OpenMP through at::parallel_for) kernels of the vsam_ext ops; the semantics are
// those of vsam_ext/ops/reference.py. Work is cut into fixed chunks, so every reduction is a
// per-chunk partial (double accumulators) summed in chunk order: results do not depend on the
// number of threads. Maths in float (double for double buffers), one rounding per store, no
// fused multiply-add (built with -ffp-contract=off): the bits of the reference backend.
// Scalars (sums, statistics) are returned in the maths dtype: float, double for double buffers.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
constexpr int64_t kChunk = 1 << 15;

// The buffers of one op are distinct tensors (param, grad, psf, backup, state): telling the
// compiler so lets it vectorise loops over five or more of them, where its runtime alias checks
// give up.
#define VSAM_NO_ALIAS _Pragma("GCC ivdep")

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

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

template <typename T>
const T* ptr_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Runs f(begin, end, chunk_index) over [0, n) in fixed chunks, in parallel.
template <typename F>
void for_chunks(int64_t n, const F& f) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // Below two chunks a parallel region costs more than it saves.
  at::parallel_for(0, chunks, 2, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c * kChunk, std::min(n, (c + 1) * kChunk), c);
  });
}

// K sums over [begin, end) with 8 independent double lanes each (vectorisable, accurate):
// out[k] = sum_i t[k], where term(i, t) writes the K terms t of element i.
template <int K, typename Term>
void sum_range(int64_t begin, int64_t end, const Term& term, double* out) {
  double lanes[K][8] = {};
  double t[K];
  int64_t i = begin;
  for (; i + 8 <= end; i += 8)
    for (int l = 0; l < 8; ++l) {
      term(i + l, t);
      for (int k = 0; k < K; ++k) lanes[k][l] += t[k];
    }
  for (; i < end; ++i) {
    term(i, t);
    for (int k = 0; k < K; ++k) lanes[k][0] += t[k];
  }
  for (int k = 0; k < K; ++k) {
    const double* v = lanes[k];
    out[k] = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
}

// Sum of squares of load(i) over [begin, end).
template <typename Load>
double sumsq_range(int64_t begin, int64_t end, const Load& load) {
  double out;
  sum_range<1>(begin, end, [&](int64_t i, double* t) {
    const double v = load(i);
    t[0] = v * v;
  }, &out);
  return out;
}

// The statistics pair (sum g^2, sum PSF^2) over [stat_start, n), as a tensor of out_t (the
// maths dtype), from per-chunk partials; empty tensor when there are none.
struct Stats {
  std::vector<double> g, psf;
  explicit Stats(int64_t n) : g((n + kChunk - 1) / kChunk, 0.0), psf((n + kChunk - 1) / kChunk, 0.0) {}
  template <typename out_t>
  Tensor result() const {
    double sg = 0, sp = 0;
    for (size_t c = 0; c < g.size(); ++c) { sg += g[c]; sp += psf[c]; }
    Tensor out = at::empty({2}, at::TensorOptions().dtype(std::is_same_v<out_t, double> ? at::kDouble : at::kFloat));
    out.data_ptr<out_t>()[0] = static_cast<out_t>(sg);
    out.data_ptr<out_t>()[1] = static_cast<out_t>(sp);
    return out;
  }
};

Tensor no_stats() { return at::empty({0}, at::TensorOptions().dtype(at::kFloat)); }

// ---------------------------------------------------------------------------------------------
// The segment ops: segment k is [bounds[k], bounds[k+1]), cut into fixed chunks (jobs); each job
// gives K double partial sums, added per segment in job order.
struct SegJob { int64_t seg, begin, end; };

std::vector<SegJob> segment_jobs(at::IntArrayRef bounds, int64_t n) {
  TORCH_CHECK(!bounds.empty(), "bounds: expected at least one boundary");
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  for (int64_t s = 0; s < nseg; ++s)
    TORCH_CHECK(0 <= bounds[s] && bounds[s] <= bounds[s + 1] && bounds[s + 1] <= n,
                "bounds: must be non-decreasing within [0, ", n, "]");
  std::vector<SegJob> jobs;
  for (int64_t s = 0; s < nseg; ++s)
    for (int64_t b = bounds[s]; b < bounds[s + 1]; b += kChunk) jobs.push_back({s, b, std::min(bounds[s + 1], b + kChunk)});
  return jobs;
}

// Runs job_sums(job, out) (out: the job's K sums) for every job in parallel; returns the
// per-segment sums as out_t (float, or double), of shape (nseg,) when K == 1, else (nseg, K).
template <int K, typename out_t = float, typename F>
Tensor segment_reduce(at::IntArrayRef bounds, int64_t n, const F& job_sums) {
  const std::vector<SegJob> jobs = segment_jobs(bounds, n);
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<double> partial(jobs.size() * K, 0.0);
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 2, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) job_sums(jobs[j], &partial[j * K]);
  });
  std::vector<double> sums(nseg * K, 0.0);
  for (size_t j = 0; j < jobs.size(); ++j)
    for (int k = 0; k < K; ++k) sums[jobs[j].seg * K + k] += partial[j * K + k];
  const auto opts = at::TensorOptions().dtype(std::is_same_v<out_t, double> ? at::kDouble : at::kFloat);
  Tensor out = K == 1 ? at::zeros({nseg}, opts) : at::zeros({nseg, K}, opts);
  out_t* o = out.data_ptr<out_t>();
  for (int64_t s = 0; s < nseg * K; ++s) o[s] = static_cast<out_t>(sums[s]);
  return out;
}

// Sums of squares of x, or of (|weight| + eta) * x (rounded to acc_t, as the reference does).
Tensor segment_sumsq(const Tensor& x, at::IntArrayRef bounds, const c10::optional<Tensor>& weight, double eta) {
  check_first(x, "x");
  if (weight.has_value()) check_buffer(*weight, x, "weight");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_sumsq", [&] {
    using a_t = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = ptr_or_null<scalar_t>(weight);
    const a_t e = static_cast<a_t>(eta);
    out = segment_reduce<1, a_t>(bounds, x.numel(), [&](const SegJob& job, double* sums) {
      sums[0] = wp ? sumsq_range(job.begin, job.end, [&](int64_t i) {
                       return static_cast<double>((std::abs(static_cast<a_t>(wp[i])) + e) * static_cast<a_t>(xp[i]));
                     })
                   : sumsq_range(job.begin, job.end, [&](int64_t i) { return static_cast<double>(xp[i]); });
    });
  });
  return out;
}

// Per segment (sum a^2, sum a*b, sum b^2): fp32, fp64 for double buffers.
Tensor segment_gram(const Tensor& a, const Tensor& b, at::IntArrayRef bounds) {
  check_first(a, "a");
  check_buffer(b, a, "b");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "segment_gram", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    out = segment_reduce<3, acc_t<scalar_t>>(bounds, a.numel(), [&](const SegJob& job, double* sums) {
      sum_range<3>(job.begin, job.end, [&](int64_t i, double* t) {
        const double u = static_cast<double>(ap[i]), v = static_cast<double>(bp[i]);
        t[0] = u * u;
        t[1] = u * v;
        t[2] = v * v;
      }, sums);
    });
  });
  return out;
}

// A per-segment coefficient tensor: contiguous, on the CPU, in the maths dtype of the buffer
// `like` (float; double for double buffers), one value per segment.
void check_per_segment(const Tensor& c, const Tensor& like, int64_t nseg, const char* name) {
  const auto want = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(c.device().is_cpu(), name, ": expected a CPU tensor, got one on ", c.device());
  TORCH_CHECK(c.scalar_type() == want, name, ": expected dtype ", want, " (the maths dtype of a ", like.scalar_type(),
              " buffer), got ", c.scalar_type());
  TORCH_CHECK(c.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(c.numel() == nseg, name, ": expected ", nseg, " values (one per segment), got ", c.numel());
}

// Per segment s: y <- alpha[s] * y + beta[s] * x; the sums of squares of the stored new y.
Tensor segment_axpby(const Tensor& y, const Tensor& x, const Tensor& alpha, const Tensor& beta,
                     at::IntArrayRef bounds) {
  check_first(y, "y");
  check_buffer(x, y, "x");
  TORCH_CHECK(!bounds.empty(), "bounds: expected at least one boundary");
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  check_per_segment(alpha, y, nseg, "alpha");
  check_per_segment(beta, y, nseg, "beta");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "segment_axpby", [&] {
    using a_t = acc_t<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const a_t* al = alpha.data_ptr<a_t>();
    const a_t* be = beta.data_ptr<a_t>();
    out = segment_reduce<1, a_t>(bounds, y.numel(), [&](const SegJob& job, double* sums) {
      const a_t sa = al[job.seg], sb = be[job.seg];
      for (int64_t i = job.begin; i < job.end; ++i)
        yp[i] = static_cast<scalar_t>(sa * static_cast<a_t>(yp[i]) + sb * static_cast<a_t>(xp[i]));
      // The chunk is still in cache: a second pass over the stored values.
      sums[0] = sumsq_range(job.begin, job.end, [&](int64_t i) { return static_cast<double>(static_cast<a_t>(yp[i])); });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
void perturb(const Tensor& param, const Tensor& grad, const Tensor& scale, const Tensor& backup, bool adaptive,
             const c10::optional<Tensor>& grad_keep, double eta) {
  check_first(param, "param");
  check_buffer(grad, param, "grad");
  check_buffer(backup, param, "backup");
  if (grad_keep.has_value()) check_buffer(*grad_keep, param, "grad_keep");
  const auto want = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == want && scale.device().is_cpu(),
              "perturb: scale must be one ", want, " value on the CPU (the maths dtype of a ", param.scalar_type(),
              " buffer), got ", scale.numel(), " ", scale.scalar_type(), " value(s) on ", scale.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "perturb", [&] {
    using a_t = acc_t<scalar_t>;
    const a_t s = scale.data_ptr<a_t>()[0];
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* b = backup.data_ptr<scalar_t>();
    scalar_t* keep = grad_keep.has_value() ? grad_keep->data_ptr<scalar_t>() : nullptr;
    const a_t sc = s;
    const a_t e = static_cast<a_t>(eta);
    for_chunks(param.numel(), [&](int64_t i0, int64_t i1, int64_t) {
      for (int64_t i = i0; i < i1; ++i) {
        const a_t w = static_cast<a_t>(p[i]);
        const a_t gi = static_cast<a_t>(g[i]);
        b[i] = p[i];
        if (keep) keep[i] = g[i];
        a_t step = gi * sc;
        if (adaptive) {
          const a_t t = std::abs(w) + e;   // ASAM's T = |w| + eta
          step = step * t * t;
        }
        p[i] = static_cast<scalar_t>(w + step);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// The shared front of the fused steps: restore (+ PSF + statistics) or reuse, giving the final
// gradient d of each element. The mode is a template parameter and the statistics range is
// split off, so each inner loop is branch-free and vectorises.
enum Mode { kPlain = 0, kReuse = 1, kRestore = 2, kRestorePsf = 3 };

inline Mode mode_of(bool has_backup, bool has_psf, double coeff) {
  if (has_backup) return has_psf ? kRestorePsf : kRestore;
  return (has_psf && coeff != 0.0) ? kReuse : kPlain;
}

template <typename scalar_t>
struct Front {
  using a_t = acc_t<scalar_t>;
  scalar_t* __restrict__ p;
  const scalar_t* __restrict__ g;
  scalar_t* __restrict__ psf;
  const scalar_t* __restrict__ backup;
  a_t coeff;
  a_t sign;  // -1 when maximizing

  // d for element i; in the restore modes also writes p[i] <- backup[i] (and returns the weight
  // in w), in kRestorePsf psf[i] <- g[i] - psf[i] with the statistics when kStats.
  template <Mode kMode, bool kStats>
  inline a_t operator()(int64_t i, a_t& w, double& acc_g, double& acc_psf) const {
    a_t d = static_cast<a_t>(g[i]);
    if constexpr (kMode == kRestore || kMode == kRestorePsf) {
      w = static_cast<a_t>(backup[i]);
      if constexpr (kMode == kRestorePsf) {
        const a_t old = static_cast<a_t>(psf[i]);
        const scalar_t stored = static_cast<scalar_t>(d - old);
        psf[i] = stored;
        if constexpr (kStats) {
          const double nv = static_cast<double>(static_cast<a_t>(stored));
          acc_g += static_cast<double>(old) * static_cast<double>(old);
          acc_psf += nv * nv;
        }
      }
    } else {
      w = static_cast<a_t>(p[i]);
      if constexpr (kMode == kReuse) d = d + coeff * static_cast<a_t>(psf[i]);
    }
    return sign * d;
  }
};

template <typename scalar_t>
Front<scalar_t> make_front(const Tensor& param, const Tensor& grad, const c10::optional<Tensor>& psf,
                           const c10::optional<Tensor>& backup, double coeff, bool maximize) {
  using a_t = acc_t<scalar_t>;
  return Front<scalar_t>{param.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                         psf.has_value() ? psf->data_ptr<scalar_t>() : nullptr,
                         backup.has_value() ? backup->data_ptr<scalar_t>() : nullptr, static_cast<a_t>(coeff),
                         maximize ? a_t(-1) : a_t(1)};
}

// Runs body.template run<kMode, kStats>(i0, i1, acc_g, acc_psf) over fixed chunks, the
// statistics range [stat_start, n) split from the rest; returns the statistics (or none).
template <typename out_t, typename Body>
Tensor run_fused(int64_t n, Mode mode, int64_t stat_start, const Body& body) {
  Stats stats(n);
  const int64_t s0 = std::max<int64_t>(0, std::min(stat_start, n));
  auto go = [&](auto mode_tag) {
    constexpr Mode kMode = decltype(mode_tag)::value;
    for_chunks(n, [&](int64_t i0, int64_t i1, int64_t c) {
      double ag = 0, ap = 0;
      const int64_t cut = std::max(i0, std::min(i1, s0));
      body.template run<kMode, false>(i0, cut, ag, ap);
      body.template run<kMode, kMode == kRestorePsf>(cut, i1, ag, ap);
      stats.g[c] = ag;
      stats.psf[c] = ap;
    });
  };
  switch (mode) {
    case kPlain: go(std::integral_constant<Mode, kPlain>{}); break;
    case kReuse: go(std::integral_constant<Mode, kReuse>{}); break;
    case kRestore: go(std::integral_constant<Mode, kRestore>{}); break;
    case kRestorePsf: go(std::integral_constant<Mode, kRestorePsf>{}); break;
  }
  return mode == kRestorePsf ? stats.template result<out_t>() : no_stats();
}

// restore_psf_stats is the front alone.
template <typename scalar_t>
struct RestoreBody {
  Front<scalar_t> f;
  template <Mode kMode, bool kStats>
  void run(int64_t i0, int64_t i1, double& ag, double& ap) const {
    VSAM_NO_ALIAS
    for (int64_t i = i0; i < i1; ++i) {
      acc_t<scalar_t> w;
      f.template operator()<kMode, kStats>(i, w, ag, ap);
      f.p[i] = f.backup[i];
    }
  }
};

Tensor restore_psf_stats(const Tensor& param, const Tensor& backup, const Tensor& grad_sam,
                         const c10::optional<Tensor>& psf, int64_t stat_start) {
  check_first(param, "param");
  check_buffer(backup, param, "backup");
  check_buffer(grad_sam, param, "grad_sam");
  if (psf.has_value()) check_buffer(*psf, param, "psf");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "restore_psf_stats", [&] {
    RestoreBody<scalar_t> body{make_front<scalar_t>(param, grad_sam, psf, backup, 0.0, false)};
    out = run_fused<acc_t<scalar_t>>(param.numel(), mode_of(true, psf.has_value(), 0.0), stat_start, body);
  });
  return out;
}

void reuse(const Tensor& grad, const Tensor& psf, double coeff) {
  check_first(grad, "grad");
  check_buffer(psf, grad, "psf");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "reuse", [&] {
    using a_t = acc_t<scalar_t>;
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* f = psf.data_ptr<scalar_t>();
    const a_t c = static_cast<a_t>(coeff);
    for_chunks(grad.numel(), [&](int64_t i0, int64_t i1, int64_t) {
      for (int64_t i = i0; i < i1; ++i) g[i] = static_cast<scalar_t>(static_cast<a_t>(g[i]) + c * static_cast<a_t>(f[i]));
    });
  });
}

// ---------------------------------------------------------------------------------------------
void check_step_inputs(const Tensor& param, const Tensor& grad, const c10::optional<Tensor>& psf,
                       const c10::optional<Tensor>& backup) {
  check_first(param, "param");
  check_buffer(grad, param, "grad");
  if (psf.has_value()) check_buffer(*psf, param, "psf");
  if (backup.has_value()) check_buffer(*backup, param, "backup");
}

template <typename scalar_t>
struct SgdBody {
  using a_t = acc_t<scalar_t>;
  Front<scalar_t> f;
  scalar_t* __restrict__ buf;
  a_t lr, wd, mom, damp1;
  bool nesterov, first;

  template <Mode kMode, bool kStats>
  void run(int64_t i0, int64_t i1, double& ag, double& ap) const {
    // Loop-invariant choices outside the loops, so each loop body is straight-line code.
    if (!buf) {
      VSAM_NO_ALIAS
      for (int64_t i = i0; i < i1; ++i) {
        a_t w;
        const a_t d = f.template operator()<kMode, kStats>(i, w, ag, ap) + wd * w;
        f.p[i] = static_cast<scalar_t>(w - lr * d);
      }
    } else if (first) {
      VSAM_NO_ALIAS
      for (int64_t i = i0; i < i1; ++i) {
        a_t w;
        const a_t d = f.template operator()<kMode, kStats>(i, w, ag, ap) + wd * w;
        buf[i] = static_cast<scalar_t>(d);
        f.p[i] = static_cast<scalar_t>(w - lr * (nesterov ? d + mom * d : d));
      }
    } else {
      VSAM_NO_ALIAS
      for (int64_t i = i0; i < i1; ++i) {
        a_t w;
        const a_t d = f.template operator()<kMode, kStats>(i, w, ag, ap) + wd * w;
        const a_t b = mom * static_cast<a_t>(buf[i]) + damp1 * d;
        buf[i] = static_cast<scalar_t>(b);
        f.p[i] = static_cast<scalar_t>(w - lr * (nesterov ? d + mom * b : b));
      }
    }
  }
};

Tensor sgd_step(const Tensor& param, const Tensor& grad, const c10::optional<Tensor>& momentum_buffer,
                const c10::optional<Tensor>& psf, const c10::optional<Tensor>& backup, double coeff,
                int64_t stat_start, double lr, double weight_decay, double momentum, double dampening,
                bool nesterov, bool maximize, bool first) {
  check_step_inputs(param, grad, psf, backup);
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "momentum_buffer: required when momentum != 0");
  if (momentum_buffer.has_value()) check_buffer(*momentum_buffer, param, "momentum_buffer");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sgd_step", [&] {
    using a_t = acc_t<scalar_t>;
    SgdBody<scalar_t> body{make_front<scalar_t>(param, grad, psf, backup, coeff, maximize),
                           momentum != 0.0 ? momentum_buffer->data_ptr<scalar_t>() : nullptr,
                           static_cast<a_t>(lr), static_cast<a_t>(weight_decay), static_cast<a_t>(momentum),
                           static_cast<a_t>(1.0 - dampening), nesterov, first};
    out = run_fused<a_t>(param.numel(), mode_of(backup.has_value(), psf.has_value(), coeff), stat_start, body);
  });
  return out;
}

template <typename scalar_t>
struct AdamWBody {
  using a_t = acc_t<scalar_t>;
  Front<scalar_t> f;
  scalar_t* __restrict__ m;
  scalar_t* __restrict__ v;
  a_t decay, b1c, b2, b2c, step_size, bc2_sqrt, eps;

  template <Mode kMode, bool kStats>
  void run(int64_t i0, int64_t i1, double& ag, double& ap) const {
    VSAM_NO_ALIAS
    for (int64_t i = i0; i < i1; ++i) {
      a_t w;
      const a_t d = f.template operator()<kMode, kStats>(i, w, ag, ap);
      const a_t mi = static_cast<a_t>(m[i]);
      const a_t m_new = mi + b1c * (d - mi);
      const a_t v_new = b2 * static_cast<a_t>(v[i]) + b2c * d * d;
      m[i] = static_cast<scalar_t>(m_new);
      v[i] = static_cast<scalar_t>(v_new);
      const a_t denom = std::sqrt(v_new) / bc2_sqrt + eps;
      f.p[i] = static_cast<scalar_t>(w * decay - step_size * m_new / denom);
    }
  }
};

Tensor adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                  const c10::optional<Tensor>& psf, const c10::optional<Tensor>& backup, double coeff,
                  int64_t stat_start, double lr, double beta1, double beta2, double eps, double weight_decay,
                  int64_t step, bool maximize) {
  check_step_inputs(param, grad, psf, backup);
  check_buffer(exp_avg, param, "exp_avg");
  check_buffer(exp_avg_sq, param, "exp_avg_sq");
  TORCH_CHECK(step >= 1, "step: expected >= 1 (the count after this step's increment), got ", step);
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "adamw_step", [&] {
    using a_t = acc_t<scalar_t>;
    const double s = static_cast<double>(step);
    AdamWBody<scalar_t> body{make_front<scalar_t>(param, grad, psf, backup, coeff, maximize),
                             exp_avg.data_ptr<scalar_t>(), exp_avg_sq.data_ptr<scalar_t>(),
                             static_cast<a_t>(1.0 - lr * weight_decay), static_cast<a_t>(1.0 - beta1),
                             static_cast<a_t>(beta2), static_cast<a_t>(1.0 - beta2),
                             static_cast<a_t>(lr / (1.0 - std::pow(beta1, s))),
                             static_cast<a_t>(std::sqrt(1.0 - std::pow(beta2, s))), static_cast<a_t>(eps)};
    out = run_fused<a_t>(param.numel(), mode_of(backup.has_value(), psf.has_value(), coeff), stat_start, body);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vsam_ext, CPU, m) {
  m.impl("segment_sumsq", &segment_sumsq);
  m.impl("segment_gram", &segment_gram);
  m.impl("segment_axpby", &segment_axpby);
  m.impl("perturb", &perturb);
  m.impl("restore_psf_stats", &restore_psf_stats);
  m.impl("reuse", &reuse);
  m.impl("sgd_step", &sgd_step);
  m.impl("adamw_step", &adamw_step);
}
