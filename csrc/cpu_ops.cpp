// CPU (C++/OpenMP through at::parallel_for) kernels of the vsam_ext ops; the semantics are
// those of vsam_ext/ops/reference.py. Every op comes in two forms that share one implementation
// of its maths: over flat 1-D buffers (segment_sumsq, ..., adamw_step) and over lists of tensors
// wherever they live (segment_sumsq_list, ..., adamw_step_list: the flat op applied to each
// tensor, with the tensors as the segments and the statistics over the tensors from stat_first
// on). The two differ in their launcher only: each builds a Plan of pieces (tensor index,
// element range), and one at::parallel_for runs the same bodies over all the pieces of all the
// tensors (a flat buffer is the list of one tensor).
//
// Work is cut into fixed pieces (at most kChunk elements, cut from the start of each segment or
// tensor), so every reduction is a per-piece partial (double accumulators) summed in piece
// order: results do not depend on the number of threads. Maths in float (double for double
// buffers), one rounding per store, no fused multiply-add (built with -ffp-contract=off): the
// bits of the reference backend. Scalars (sums, statistics) are returned in the maths dtype:
// float, double for double buffers.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using at::TensorList;
using OptList = std::optional<TensorList>;
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kNoStats = std::numeric_limits<int64_t>::max();

// The buffers of one op are distinct tensors (param, grad, psf, backup, state): telling the
// compiler so lets it vectorise loops over five or more of them, where its runtime alias checks
// give up.
#define VSAM_NO_ALIAS _Pragma("GCC ivdep")

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

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

// ---------------------------------------------------------------------------------------------
// The launcher. A piece: elements [begin, end) of tensor t of the op's lists (t = 0 for a flat
// buffer), part of output segment `seg` (the segment ops); `stats`: its elements count towards
// the statistics (the fused steps).
struct Piece {
  int64_t t, begin, end, seg;
  bool stats;
};

// The pieces of one op call. Every range is cut into pieces of at most kChunk elements from its
// own start, so the pieces, and with them every per-piece partial sum, depend on the sizes only,
// never on the number of threads. Consecutive pieces are grouped into jobs of up to kChunk
// elements (a tensor's tail shares a job with the small tensors after it: every job costs about
// the same), and all the jobs run in one at::parallel_for.
class Plan {
 public:
  // [begin, end) of tensor t, segment seg; the elements from stat_from on are statistics ones
  // (the piece that holds stat_from is split there).
  void add(int64_t t, int64_t begin, int64_t end, int64_t seg = 0, int64_t stat_from = kNoStats) {
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t e = std::min(end, b + kChunk);
      if (b < stat_from && stat_from < e) {
        pieces_.push_back({t, b, stat_from, seg, false});
        pieces_.push_back({t, stat_from, e, seg, true});
      } else {
        pieces_.push_back({t, b, e, seg, b >= stat_from});
      }
    }
  }

  const std::vector<Piece>& pieces() const { return pieces_; }

  // Runs f(k, piece) for every piece k, the jobs in parallel.
  template <typename F>
  void run(const F& f) const {
    std::vector<int64_t> starts;   // job j: the pieces [starts[j], starts[j + 1])
    int64_t fill = kChunk;
    for (size_t k = 0; k < pieces_.size(); ++k) {
      const int64_t len = pieces_[k].end - pieces_[k].begin;
      if (fill + len > kChunk) {
        starts.push_back(static_cast<int64_t>(k));
        fill = 0;
      }
      fill += len;
    }
    starts.push_back(static_cast<int64_t>(pieces_.size()));
    // Below two jobs a parallel region costs more than it saves.
    at::parallel_for(0, static_cast<int64_t>(starts.size()) - 1, 2, [&](int64_t j0, int64_t j1) {
      for (int64_t k = starts[j0]; k < starts[j1]; ++k) f(k, pieces_[k]);
    });
  }

 private:
  std::vector<Piece> pieces_;
};

// A flat buffer of n elements: pieces aligned on multiples of kChunk, the statistics from
// stat_start (clamped to [0, n]).
Plan flat_plan(int64_t n, int64_t stat_start = kNoStats) {
  Plan plan;
  plan.add(0, 0, n, 0, std::max<int64_t>(0, std::min(stat_start, n)));
  return plan;
}

// The flat segment ops: segment s is [bounds[s], bounds[s+1]) of the one buffer.
Plan segment_plan(at::IntArrayRef bounds, int64_t n) {
  TORCH_CHECK(!bounds.empty(), "bounds: expected at least one boundary");
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  for (int64_t s = 0; s < nseg; ++s)
    TORCH_CHECK(0 <= bounds[s] && bounds[s] <= bounds[s + 1] && bounds[s + 1] <= n,
                "bounds: must be non-decreasing within [0, ", n, "]");
  Plan plan;
  for (int64_t s = 0; s < nseg; ++s) plan.add(0, bounds[s], bounds[s + 1], s);
  return plan;
}

// A list: tensor t is segment t; the statistics over the tensors from stat_first on (clamped to
// [0, len], as the flat ops clamp stat_start).
Plan list_plan(TensorList ts, int64_t stat_first = kNoStats) {
  Plan plan;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t) {
    const int64_t n = ts[t].numel();
    plan.add(t, 0, n, t, t >= stat_first ? 0 : n);
  }
  return plan;
}

// The data pointers of one argument, one per tensor of its list; none when it is absent.
template <typename T>
struct Ptrs {
  std::vector<T*> v;
  Ptrs() = default;
  explicit Ptrs(TensorList ts) {
    v.reserve(ts.size());
    for (const Tensor& x : ts) v.push_back(x.data_ptr<T>());
  }
  T* operator[](int64_t t) const { return v.empty() ? nullptr : v[t]; }
};

template <typename T>
Ptrs<T> ptrs_or_none(const OptList& l) {
  return l.has_value() ? Ptrs<T>(*l) : Ptrs<T>();
}

// A flat op's optional buffer as an optional list of one.
struct OptOne {
  std::vector<Tensor> v;
  OptOne(const c10::optional<Tensor>& t) {   // NOLINT: implicit on purpose
    if (t.has_value()) v.push_back(*t);
  }
  operator OptList() const { return v.empty() ? OptList() : OptList(TensorList(v)); }   // NOLINT
};

// ---------------------------------------------------------------------------------------------
// Reductions.

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

at::TensorOptions out_options(at::ScalarType maths) { return at::TensorOptions().dtype(maths); }

Tensor no_stats() { return at::empty({0}, at::TensorOptions().dtype(at::kFloat)); }

// ---------------------------------------------------------------------------------------------
// The segment ops: piece_sums(piece, out) writes the K double partial sums of a piece; they are
// added per segment in piece order. Returns (nseg,) when K == 1, else (nseg, K), in out_t.
template <int K, typename out_t, typename F>
Tensor segment_reduce(const Plan& plan, int64_t nseg, const F& piece_sums) {
  const std::vector<Piece>& pieces = plan.pieces();
  std::vector<double> partial(pieces.size() * K, 0.0);
  plan.run([&](int64_t k, const Piece& pc) { piece_sums(pc, &partial[k * K]); });
  std::vector<double> sums(nseg * K, 0.0);
  for (size_t k = 0; k < pieces.size(); ++k)
    for (int j = 0; j < K; ++j) sums[pieces[k].seg * K + j] += partial[k * K + j];
  const auto opts = out_options(std::is_same_v<out_t, double> ? at::kDouble : at::kFloat);
  Tensor out = K == 1 ? at::zeros({nseg}, opts) : at::zeros({nseg, K}, opts);
  out_t* o = out.data_ptr<out_t>();
  for (int64_t s = 0; s < nseg * K; ++s) o[s] = static_cast<out_t>(sums[s]);
  return out;
}

// Sums of squares of x, or of (|weight| + eta) * x (rounded to acc_t, as the reference does).
Tensor sumsq_impl(TensorList x, const OptList& weight, double eta, const Plan& plan, int64_t nseg) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x[0].scalar_type(), "segment_sumsq", [&] {
    using a_t = acc_t<scalar_t>;
    const Ptrs<scalar_t> xs(x), ws = ptrs_or_none<scalar_t>(weight);
    const a_t e = static_cast<a_t>(eta);
    out = segment_reduce<1, a_t>(plan, nseg, [&](const Piece& pc, double* sums) {
      const scalar_t* xp = xs[pc.t];
      const scalar_t* wp = ws[pc.t];
      sums[0] = wp ? sumsq_range(pc.begin, pc.end, [&](int64_t i) {
                       return static_cast<double>((std::abs(static_cast<a_t>(wp[i])) + e) * static_cast<a_t>(xp[i]));
                     })
                   : sumsq_range(pc.begin, pc.end, [&](int64_t i) { return static_cast<double>(xp[i]); });
    });
  });
  return out;
}

// Per segment (sum a^2, sum a*b, sum b^2): fp32, fp64 for double buffers.
Tensor gram_impl(TensorList a, TensorList b, const Plan& plan, int64_t nseg) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "segment_gram", [&] {
    const Ptrs<scalar_t> as(a), bs(b);
    out = segment_reduce<3, acc_t<scalar_t>>(plan, nseg, [&](const Piece& pc, double* sums) {
      const scalar_t* ap = as[pc.t];
      const scalar_t* bp = bs[pc.t];
      sum_range<3>(pc.begin, pc.end, [&](int64_t i, double* t) {
        const double u = static_cast<double>(ap[i]), v = static_cast<double>(bp[i]);
        t[0] = u * u;
        t[1] = u * v;
        t[2] = v * v;
      }, sums);
    });
  });
  return out;
}

// Per segment s: y <- alpha[s] * y + beta[s] * x; the sums of squares of the stored new y.
Tensor axpby_impl(TensorList y, TensorList x, const Tensor& alpha, const Tensor& beta, const Plan& plan,
                  int64_t nseg) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y[0].scalar_type(), "segment_axpby", [&] {
    using a_t = acc_t<scalar_t>;
    const Ptrs<scalar_t> ys(y), xs(x);
    const a_t* al = alpha.data_ptr<a_t>();
    const a_t* be = beta.data_ptr<a_t>();
    out = segment_reduce<1, a_t>(plan, nseg, [&](const Piece& pc, double* sums) {
      scalar_t* yp = ys[pc.t];
      const scalar_t* xp = xs[pc.t];
      const a_t sa = al[pc.seg], sb = be[pc.seg];
      for (int64_t i = pc.begin; i < pc.end; ++i)
        yp[i] = static_cast<scalar_t>(sa * static_cast<a_t>(yp[i]) + sb * static_cast<a_t>(xp[i]));
      // The piece is still in cache: a second pass over the stored values.
      sums[0] = sumsq_range(pc.begin, pc.end, [&](int64_t i) { return static_cast<double>(static_cast<a_t>(yp[i])); });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// SAM/ASAM ascent; scale: one value in the maths dtype.
void perturb_impl(TensorList param, TensorList grad, const Tensor& scale, TensorList backup, bool adaptive,
                  const OptList& grad_keep, double eta, const Plan& plan) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "perturb", [&] {
    using a_t = acc_t<scalar_t>;
    const a_t sc = scale.data_ptr<a_t>()[0];
    const a_t e = static_cast<a_t>(eta);
    const Ptrs<scalar_t> ps(param), gs(grad), bs(backup), keeps = ptrs_or_none<scalar_t>(grad_keep);
    plan.run([&](int64_t, const Piece& pc) {
      scalar_t* p = ps[pc.t];
      const scalar_t* g = gs[pc.t];
      scalar_t* b = bs[pc.t];
      scalar_t* keep = keeps[pc.t];
      for (int64_t i = pc.begin; i < pc.end; ++i) {
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

void reuse_impl(TensorList grad, TensorList psf, double coeff, const Plan& plan) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad[0].scalar_type(), "reuse", [&] {
    using a_t = acc_t<scalar_t>;
    const Ptrs<scalar_t> gs(grad), fs(psf);
    const a_t c = static_cast<a_t>(coeff);
    plan.run([&](int64_t, const Piece& pc) {
      scalar_t* g = gs[pc.t];
      const scalar_t* f = fs[pc.t];
      for (int64_t i = pc.begin; i < pc.end; ++i)
        g[i] = static_cast<scalar_t>(static_cast<a_t>(g[i]) + c * static_cast<a_t>(f[i]));
    });
  });
}

// ---------------------------------------------------------------------------------------------
// The shared front of the fused steps: restore (+ PSF + statistics) or reuse, giving the final
// gradient d of each element. The mode is a template parameter and the statistics pieces are
// apart from the others, so each inner loop is branch-free and vectorises.
enum Mode { kPlain = 0, kReuse = 1, kRestore = 2, kRestorePsf = 3 };

inline Mode mode_of(bool has_backup, bool has_psf, double coeff) {
  if (has_backup) return has_psf ? kRestorePsf : kRestore;
  return (has_psf && coeff != 0.0) ? kReuse : kPlain;
}

// The front over one tensor: its data pointers.
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

// The front over all the tensors: Front for tensor t.
template <typename scalar_t>
struct Fronts {
  using a_t = acc_t<scalar_t>;
  Ptrs<scalar_t> p, g, psf, backup;
  a_t coeff, sign;

  Fronts(TensorList param, TensorList grad, const OptList& psf_, const OptList& backup_, double coeff_,
         bool maximize)
      : p(param), g(grad), psf(ptrs_or_none<scalar_t>(psf_)), backup(ptrs_or_none<scalar_t>(backup_)),
        coeff(static_cast<a_t>(coeff_)), sign(maximize ? a_t(-1) : a_t(1)) {}

  Front<scalar_t> at(int64_t t) const { return {p[t], g[t], psf[t], backup[t], coeff, sign}; }
};

// Runs body.template run<kMode, kStats>(t, i0, i1, acc_g, acc_psf) over every piece, kStats on
// the statistics pieces in kRestorePsf mode; returns the statistics (sum g^2, sum PSF^2) as a
// tensor of out_t, summed in piece order, in kRestorePsf mode, else none.
template <typename out_t, typename Body>
Tensor run_fused(const Plan& plan, Mode mode, const Body& body) {
  const size_t np = plan.pieces().size();
  std::vector<double> pg(np, 0.0), pp(np, 0.0);
  auto go = [&](auto mode_tag) {
    constexpr Mode kMode = decltype(mode_tag)::value;
    plan.run([&](int64_t k, const Piece& pc) {
      double ag = 0, ap = 0;
      if (pc.stats)
        body.template run<kMode, kMode == kRestorePsf>(pc.t, pc.begin, pc.end, ag, ap);
      else
        body.template run<kMode, false>(pc.t, pc.begin, pc.end, ag, ap);
      pg[k] = ag;
      pp[k] = ap;
    });
  };
  switch (mode) {
    case kPlain: go(std::integral_constant<Mode, kPlain>{}); break;
    case kReuse: go(std::integral_constant<Mode, kReuse>{}); break;
    case kRestore: go(std::integral_constant<Mode, kRestore>{}); break;
    case kRestorePsf: go(std::integral_constant<Mode, kRestorePsf>{}); break;
  }
  if (mode != kRestorePsf) return no_stats();
  double sg = 0, sp = 0;
  for (size_t k = 0; k < np; ++k) {
    sg += pg[k];
    sp += pp[k];
  }
  Tensor out = at::empty({2}, out_options(std::is_same_v<out_t, double> ? at::kDouble : at::kFloat));
  out.data_ptr<out_t>()[0] = static_cast<out_t>(sg);
  out.data_ptr<out_t>()[1] = static_cast<out_t>(sp);
  return out;
}

// restore_psf_stats is the front alone.
template <typename scalar_t>
struct RestoreBody {
  Fronts<scalar_t> fs;
  template <Mode kMode, bool kStats>
  void run(int64_t t, int64_t i0, int64_t i1, double& ag, double& ap) const {
    const Front<scalar_t> f = fs.at(t);
    VSAM_NO_ALIAS
    for (int64_t i = i0; i < i1; ++i) {
      acc_t<scalar_t> w;
      f.template operator()<kMode, kStats>(i, w, ag, ap);
      f.p[i] = f.backup[i];
    }
  }
};

Tensor restore_impl(TensorList param, TensorList backup, TensorList grad_sam, const OptList& psf,
                    const Plan& plan) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "restore_psf_stats", [&] {
    RestoreBody<scalar_t> body{Fronts<scalar_t>(param, grad_sam, psf, backup, 0.0, false)};
    out = run_fused<acc_t<scalar_t>>(plan, mode_of(true, psf.has_value(), 0.0), body);
  });
  return out;
}

template <typename scalar_t>
struct SgdBody {
  using a_t = acc_t<scalar_t>;
  Fronts<scalar_t> fs;
  Ptrs<scalar_t> bufs;   // none without momentum
  a_t lr, wd, mom, damp1;
  bool nesterov, first;

  template <Mode kMode, bool kStats>
  void run(int64_t t, int64_t i0, int64_t i1, double& ag, double& ap) const {
    const Front<scalar_t> f = fs.at(t);
    scalar_t* __restrict__ buf = bufs[t];
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

Tensor sgd_impl(TensorList param, TensorList grad, const OptList& momentum_buffer, const OptList& psf,
                const OptList& backup, double coeff, const Plan& plan, double lr, double weight_decay,
                double momentum, double dampening, bool nesterov, bool maximize, bool first) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "sgd_step", [&] {
    using a_t = acc_t<scalar_t>;
    SgdBody<scalar_t> body{Fronts<scalar_t>(param, grad, psf, backup, coeff, maximize),
                           momentum != 0.0 ? Ptrs<scalar_t>(*momentum_buffer) : Ptrs<scalar_t>(),
                           static_cast<a_t>(lr), static_cast<a_t>(weight_decay), static_cast<a_t>(momentum),
                           static_cast<a_t>(1.0 - dampening), nesterov, first};
    out = run_fused<a_t>(plan, mode_of(backup.has_value(), psf.has_value(), coeff), body);
  });
  return out;
}

template <typename scalar_t>
struct AdamWBody {
  using a_t = acc_t<scalar_t>;
  Fronts<scalar_t> fs;
  Ptrs<scalar_t> ms, vs;
  a_t decay, b1c, b2, b2c, step_size, bc2_sqrt, eps;

  template <Mode kMode, bool kStats>
  void run(int64_t t, int64_t i0, int64_t i1, double& ag, double& ap) const {
    const Front<scalar_t> f = fs.at(t);
    scalar_t* __restrict__ m = ms[t];
    scalar_t* __restrict__ v = vs[t];
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

Tensor adamw_impl(TensorList param, TensorList grad, TensorList exp_avg, TensorList exp_avg_sq, const OptList& psf,
                  const OptList& backup, double coeff, const Plan& plan, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step, bool maximize) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "adamw_step", [&] {
    using a_t = acc_t<scalar_t>;
    const double s = static_cast<double>(step);
    AdamWBody<scalar_t> body{Fronts<scalar_t>(param, grad, psf, backup, coeff, maximize), Ptrs<scalar_t>(exp_avg),
                             Ptrs<scalar_t>(exp_avg_sq), static_cast<a_t>(1.0 - lr * weight_decay),
                             static_cast<a_t>(1.0 - beta1), static_cast<a_t>(beta2), static_cast<a_t>(1.0 - beta2),
                             static_cast<a_t>(lr / (1.0 - std::pow(beta1, s))),
                             static_cast<a_t>(std::sqrt(1.0 - std::pow(beta2, s))), static_cast<a_t>(eps)};
    out = run_fused<a_t>(plan, mode_of(backup.has_value(), psf.has_value(), coeff), body);
  });
  return out;
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
  return sumsq_impl(x, OptOne(weight), eta, plan, static_cast<int64_t>(bounds.size()) - 1);
}

Tensor segment_gram(const Tensor& a, const Tensor& b, at::IntArrayRef bounds) {
  check_first(a, "a");
  check_buffer(b, a, "b");
  const Plan plan = segment_plan(bounds, a.numel());
  return gram_impl(a, b, plan, static_cast<int64_t>(bounds.size()) - 1);
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
  return axpby_impl(y, x, alpha, beta, plan, nseg);
}

void perturb(const Tensor& param, const Tensor& grad, const Tensor& scale, const Tensor& backup, bool adaptive,
             const c10::optional<Tensor>& grad_keep, double eta) {
  check_first(param, "param");
  check_buffer(grad, param, "grad");
  check_buffer(backup, param, "backup");
  if (grad_keep.has_value()) check_buffer(*grad_keep, param, "grad_keep");
  check_scale(scale, param);
  perturb_impl(param, grad, scale, backup, adaptive, OptOne(grad_keep), eta, flat_plan(param.numel()));
}

Tensor restore_psf_stats(const Tensor& param, const Tensor& backup, const Tensor& grad_sam,
                         const c10::optional<Tensor>& psf, int64_t stat_start) {
  check_first(param, "param");
  check_buffer(backup, param, "backup");
  check_buffer(grad_sam, param, "grad_sam");
  if (psf.has_value()) check_buffer(*psf, param, "psf");
  return restore_impl(param, backup, grad_sam, OptOne(psf), flat_plan(param.numel(), stat_start));
}

void reuse(const Tensor& grad, const Tensor& psf, double coeff) {
  check_first(grad, "grad");
  check_buffer(psf, grad, "psf");
  reuse_impl(grad, psf, coeff, flat_plan(grad.numel()));
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
                bool nesterov, bool maximize, bool first) {
  check_step_inputs(param, grad, psf, backup);
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "momentum_buffer: required when momentum != 0");
  if (momentum_buffer.has_value()) check_buffer(*momentum_buffer, param, "momentum_buffer");
  return sgd_impl(param, grad, OptOne(momentum_buffer), OptOne(psf), OptOne(backup), coeff,
                  flat_plan(param.numel(), stat_start), lr, weight_decay, momentum, dampening, nesterov, maximize,
                  first);
}

void check_adamw_step(int64_t step) {
  TORCH_CHECK(step >= 1, "step: expected >= 1 (the count after this step's increment), got ", step);
}

Tensor adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                  const c10::optional<Tensor>& psf, const c10::optional<Tensor>& backup, double coeff,
                  int64_t stat_start, double lr, double beta1, double beta2, double eps, double weight_decay,
                  int64_t step, bool maximize) {
  check_step_inputs(param, grad, psf, backup);
  check_buffer(exp_avg, param, "exp_avg");
  check_buffer(exp_avg_sq, param, "exp_avg_sq");
  check_adamw_step(step);
  return adamw_impl(param, grad, exp_avg, exp_avg_sq, OptOne(psf), OptOne(backup), coeff,
                    flat_plan(param.numel(), stat_start), lr, beta1, beta2, eps, weight_decay, step, maximize);
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
  return sumsq_impl(x, weight, eta, list_plan(x), args.size());
}

Tensor segment_gram_list(TensorList a, TensorList b) {
  const ListArgs args(a, "a");
  args.same(b, "b");
  if (args.empty()) return at::zeros({0, 3}, out_options(at::kFloat));
  return gram_impl(a, b, list_plan(a), args.size());
}

Tensor segment_axpby_list(TensorList y, TensorList x, const Tensor& alpha, const Tensor& beta) {
  const ListArgs args(y, "y");
  args.same(x, "x");
  args.coefficients(alpha, args.size(), "alpha");
  args.coefficients(beta, args.size(), "beta");
  if (args.empty()) return at::zeros({0}, out_options(at::kFloat));
  return axpby_impl(y, x, alpha, beta, list_plan(y), args.size());
}

void perturb_list(TensorList param, TensorList grad, const Tensor& scale, TensorList backup, bool adaptive,
                  OptList grad_keep, double eta) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(backup, "backup");
  args.same(grad_keep, "grad_keep");
  args.coefficients(scale, 1, "scale");
  if (args.empty()) return;
  perturb_impl(param, grad, scale, backup, adaptive, grad_keep, eta, list_plan(param));
}

Tensor restore_psf_stats_list(TensorList param, TensorList backup, TensorList grad_sam, OptList psf,
                              int64_t stat_first) {
  const ListArgs args(param, "param");
  args.same(backup, "backup");
  args.same(grad_sam, "grad_sam");
  args.same(psf, "psf");
  if (args.empty()) return empty_stats(psf.has_value());
  return restore_impl(param, backup, grad_sam, psf, list_plan(param, stat_first));
}

void reuse_list(TensorList grad, TensorList psf, double coeff) {
  const ListArgs args(grad, "grad");
  args.same(psf, "psf");
  if (args.empty()) return;
  reuse_impl(grad, psf, coeff, list_plan(grad));
}

Tensor sgd_step_list(TensorList param, TensorList grad, OptList momentum_buffer, OptList psf, OptList backup,
                     double coeff, int64_t stat_first, double lr, double weight_decay, double momentum,
                     double dampening, bool nesterov, bool maximize, bool first) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(momentum_buffer, "momentum_buffer");
  args.same(psf, "psf");
  args.same(backup, "backup");
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "momentum_buffer: required when momentum != 0");
  if (args.empty()) return empty_stats(backup.has_value() && psf.has_value());
  return sgd_impl(param, grad, momentum_buffer, psf, backup, coeff, list_plan(param, stat_first), lr,
                  weight_decay, momentum, dampening, nesterov, maximize, first);
}

Tensor adamw_step_list(TensorList param, TensorList grad, TensorList exp_avg, TensorList exp_avg_sq, OptList psf,
                       OptList backup, double coeff, int64_t stat_first, double lr, double beta1, double beta2,
                       double eps, double weight_decay, int64_t step, bool maximize) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(exp_avg, "exp_avg");
  args.same(exp_avg_sq, "exp_avg_sq");
  args.same(psf, "psf");
  args.same(backup, "backup");
  check_adamw_step(step);
  if (args.empty()) return empty_stats(backup.has_value() && psf.has_value());
  return adamw_impl(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, list_plan(param, stat_first), lr,
                    beta1, beta2, eps, weight_decay, step, maximize);
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
  m.impl("segment_sumsq_list", &segment_sumsq_list);
  m.impl("segment_gram_list", &segment_gram_list);
  m.impl("segment_axpby_list", &segment_axpby_list);
  m.impl("perturb_list", &perturb_list);
  m.impl("restore_psf_stats_list", &restore_psf_stats_list);
  m.impl("reuse_list", &reuse_list);
  m.impl("sgd_step_list", &sgd_step_list);
  m.impl("adamw_step_list", &adamw_step_list);
}
