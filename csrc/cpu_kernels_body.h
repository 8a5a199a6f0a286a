// The CPU kernels' maths, compiled once per instruction set: cpu_kernels.cpp (the compiler's
// baseline for the target) and cpu_kernels_avx2.cpp (x86-64 with AVX2 and F16C) include this
// file inside their own namespace, vsam_cpu::<set>, and cpu_ops.cpp picks one set at run time
// (cpu_kernels.h). The source is one, the build flags are the project's (-ffp-contract=off: no
// fused multiply-add on any set), and every loop keeps its order: wider vectors change the speed,
// never the bits.
//
// Included after every header it needs (cpu_plan.h and the standard library), so that an
// instruction-set pragma in the including file applies to the code below only.

// The buffers of one op are distinct tensors (param, grad, psf, backup, state): telling the
// compiler so lets it vectorise loops over five or more of them, where its runtime alias checks
// give up.
#define VSAM_NO_ALIAS _Pragma("GCC ivdep")

namespace {

// An element in the maths dtype (load) and back, rounded once (store), and written (put).
template <typename T>
inline acc_t<T> load(T x) { return static_cast<acc_t<T>>(x); }
template <typename T>
inline T store(acc_t<T> v) { return static_cast<T>(v); }

// Half and bfloat16 are structs in C++; writing their 16 bits, rather than copying the struct, is
// what lets the compiler vectorise the loops that store them.
template <typename T>
inline void put(T& dst, T v) { dst = v; }
inline void put(c10::Half& dst, c10::Half v) { dst.x = v.x; }
inline void put(c10::BFloat16& dst, c10::BFloat16 v) { dst.x = v.x; }

// bfloat16 as c10::BFloat16 converts it (round to nearest even, NaN -> 0x7FC0), written without
// a branch so that the loops holding it vectorise: the same bits as c10's conversion for every
// input (test_cpu_capability checks all 65536 values). Half keeps c10's conversion (its software
// one leaves the loops scalar either way) except in the avx2 set, below.
inline float load(c10::BFloat16 x) { return c10::bit_cast<float>(static_cast<uint32_t>(x.x) << 16); }
template <>
inline c10::BFloat16 store<c10::BFloat16>(float v) {
  const uint32_t u = c10::bit_cast<uint32_t>(v);
  const auto rounded = static_cast<uint16_t>((u + ((u >> 16) & 1) + UINT32_C(0x7FFF)) >> 16);
  const auto nan = static_cast<uint16_t>(-static_cast<int>(v != v));   // all ones for a NaN
  return c10::BFloat16(static_cast<uint16_t>((rounded & ~nan) | (0x7FC0 & nan)), c10::BFloat16::from_bits());
}

#if VSAM_CPU_F16C
// With F16C (the avx2 set) half converts in hardware, to nearest even as c10's software does: the
// same bits for every value but NaNs, whose payload F16C keeps where the software makes them
// canonical. The loops stay scalar, about 3x faster than with the software conversion.
inline float load(c10::Half x) { return _cvtsh_ss(x.x); }
template <>
inline c10::Half store<c10::Half>(float v) {
  return c10::Half(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT), c10::Half::from_bits());
}
#endif

// Runs body(i, lane_g, lane_psf) over [i0, i1) and adds the two sums of what it adds to its
// lanes to acc_g / acc_psf. With kStats the sums run in 8 independent double lanes per sum (as
// sum_range: a fixed order, and a loop the compiler vectorises rather than one chain of
// dependent additions); without, the lanes are dummies and the loop is the plain one.
template <bool kStats, typename Body>
inline void stat_loop(int64_t i0, int64_t i1, double& acc_g, double& acc_psf, const Body& body) {
  if constexpr (!kStats) {
    double dummy_g = 0, dummy_psf = 0;
    VSAM_NO_ALIAS
    for (int64_t i = i0; i < i1; ++i) body(i, dummy_g, dummy_psf);
  } else {
    double lg[8] = {}, lp[8] = {};
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      VSAM_NO_ALIAS
      for (int l = 0; l < 8; ++l) body(i + l, lg[l], lp[l]);
    }
    for (; i < i1; ++i) body(i, lg[0], lp[0]);
    acc_g += ((lg[0] + lg[1]) + (lg[2] + lg[3])) + ((lg[4] + lg[5]) + (lg[6] + lg[7]));
    acc_psf += ((lp[0] + lp[1]) + (lp[2] + lp[3])) + ((lp[4] + lp[5]) + (lp[6] + lp[7]));
  }
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
                       return static_cast<double>((std::abs(load(wp[i])) + e) * load(xp[i]));
                     })
                   : sumsq_range(pc.begin, pc.end, [&](int64_t i) { return static_cast<double>(load(xp[i])); });
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
        const double u = static_cast<double>(load(ap[i])), v = static_cast<double>(load(bp[i]));
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
        put(yp[i], store<scalar_t>(sa * load(yp[i]) + sb * load(xp[i])));
      // The piece is still in cache: a second pass over the stored values.
      sums[0] = sumsq_range(pc.begin, pc.end, [&](int64_t i) { return static_cast<double>(load(yp[i])); });
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
        const a_t w = load(p[i]);
        const a_t gi = load(g[i]);
        put(b[i], p[i]);
        if (keep) put(keep[i], g[i]);
        a_t step = gi * sc;
        if (adaptive) {
          const a_t t = std::abs(w) + e;   // ASAM's T = |w| + eta
          step = step * t * t;
        }
        put(p[i], store<scalar_t>(w + step));
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
        put(g[i], store<scalar_t>(load(g[i]) + c * load(f[i])));
    });
  });
}

// ---------------------------------------------------------------------------------------------
// The shared front of the fused steps: restore (+ PSF + statistics) or reuse, giving the final
// gradient d of each element. The mode is a template parameter and the statistics pieces are
// apart from the others, so each inner loop is branch-free and vectorises.
enum Mode { kPlain = 0, kReuse = 1, kRestore = 2, kRestorePsf = 3 };

inline Mode mode_of(bool has_backup, bool has_psf, bool reuse) {
  if (has_backup) return has_psf ? kRestorePsf : kRestore;
  return (has_psf && reuse) ? kReuse : kPlain;
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
    a_t d = load(g[i]);
    if constexpr (kMode == kRestore || kMode == kRestorePsf) {
      w = load(backup[i]);
      if constexpr (kMode == kRestorePsf) {
        const a_t old = load(psf[i]);
        const scalar_t stored = store<scalar_t>(d - old);
        put(psf[i], stored);
        if constexpr (kStats) {
          const double nv = static_cast<double>(load(stored));
          acc_g += static_cast<double>(old) * static_cast<double>(old);
          acc_psf += nv * nv;
        }
      }
    } else {
      w = load(p[i]);
      if constexpr (kMode == kReuse) d = d + coeff * load(psf[i]);
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
    stat_loop<kStats>(i0, i1, ag, ap, [&](int64_t i, double& lg, double& lp) {
      acc_t<scalar_t> w;
      f.template operator()<kMode, kStats>(i, w, lg, lp);
      put(f.p[i], f.backup[i]);
    });
  }
};

Tensor restore_impl(TensorList param, TensorList backup, TensorList grad_sam, const OptList& psf,
                    const Plan& plan) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "restore_psf_stats", [&] {
    RestoreBody<scalar_t> body{Fronts<scalar_t>(param, grad_sam, psf, backup, 0.0, false)};
    out = run_fused<acc_t<scalar_t>>(plan, mode_of(true, psf.has_value(), false), body);
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
    // Nesterov a compile-time choice too: a run-time one left in the loop kept the compiler from
    // vectorising some of them (bfloat16).
    if (nesterov)
      run_as<kMode, kStats, true>(t, i0, i1, ag, ap);
    else
      run_as<kMode, kStats, false>(t, i0, i1, ag, ap);
  }

  template <Mode kMode, bool kStats, bool kNesterov>
  void run_as(int64_t t, int64_t i0, int64_t i1, double& ag, double& ap) const {
    const Front<scalar_t> f = fs.at(t);
    scalar_t* __restrict__ buf = bufs[t];
    // Loop-invariant choices outside the loops, so each loop body is straight-line code.
    if (!buf) {
      stat_loop<kStats>(i0, i1, ag, ap, [&](int64_t i, double& lg, double& lp) {
        a_t w;
        const a_t d = f.template operator()<kMode, kStats>(i, w, lg, lp) + wd * w;
        put(f.p[i], store<scalar_t>(w - lr * d));
      });
    } else if (first) {
      stat_loop<kStats>(i0, i1, ag, ap, [&](int64_t i, double& lg, double& lp) {
        a_t w;
        const a_t d = f.template operator()<kMode, kStats>(i, w, lg, lp) + wd * w;
        put(buf[i], store<scalar_t>(d));
        put(f.p[i], store<scalar_t>(w - lr * (kNesterov ? d + mom * d : d)));
      });
    } else {
      stat_loop<kStats>(i0, i1, ag, ap, [&](int64_t i, double& lg, double& lp) {
        a_t w;
        const a_t d = f.template operator()<kMode, kStats>(i, w, lg, lp) + wd * w;
        const a_t b = mom * load(buf[i]) + damp1 * d;
        put(buf[i], store<scalar_t>(b));
        put(f.p[i], store<scalar_t>(w - lr * (kNesterov ? d + mom * b : b)));
      });
    }
  }
};

Tensor sgd_impl(TensorList param, TensorList grad, const OptList& momentum_buffer, const OptList& psf,
                const OptList& backup, const StepScalars& s, const Plan& plan, double weight_decay,
                double momentum, double dampening, bool nesterov, bool maximize, bool first) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "sgd_step", [&] {
    using a_t = acc_t<scalar_t>;
    SgdBody<scalar_t> body{Fronts<scalar_t>(param, grad, psf, backup, s.coeff, maximize),
                           momentum != 0.0 ? Ptrs<scalar_t>(*momentum_buffer) : Ptrs<scalar_t>(),
                           static_cast<a_t>(s.lr), static_cast<a_t>(weight_decay), static_cast<a_t>(momentum),
                           static_cast<a_t>(1.0 - dampening), nesterov, first};
    out = run_fused<a_t>(plan, mode_of(backup.has_value(), psf.has_value(), s.reuse), body);
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
    stat_loop<kStats>(i0, i1, ag, ap, [&](int64_t i, double& lg, double& lp) {
      a_t w;
      const a_t d = f.template operator()<kMode, kStats>(i, w, lg, lp);
      const a_t mi = load(m[i]);
      const a_t m_new = mi + b1c * (d - mi);
      const a_t v_new = b2 * load(v[i]) + b2c * d * d;
      put(m[i], store<scalar_t>(m_new));
      put(v[i], store<scalar_t>(v_new));
      const a_t denom = std::sqrt(v_new) / bc2_sqrt + eps;
      put(f.p[i], store<scalar_t>(w * decay - step_size * m_new / denom));
    });
  }
};

Tensor adamw_impl(TensorList param, TensorList grad, TensorList exp_avg, TensorList exp_avg_sq, const OptList& psf,
                  const OptList& backup, const StepScalars& s, const Plan& plan, double beta1, double beta2,
                  double eps, bool maximize) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "adamw_step", [&] {
    using a_t = acc_t<scalar_t>;
    AdamWBody<scalar_t> body{Fronts<scalar_t>(param, grad, psf, backup, s.coeff, maximize), Ptrs<scalar_t>(exp_avg),
                             Ptrs<scalar_t>(exp_avg_sq), static_cast<a_t>(s.decay), static_cast<a_t>(1.0 - beta1),
                             static_cast<a_t>(beta2), static_cast<a_t>(1.0 - beta2), static_cast<a_t>(s.step_size),
                             static_cast<a_t>(s.bc2_sqrt), static_cast<a_t>(eps)};
    out = run_fused<a_t>(plan, mode_of(backup.has_value(), psf.has_value(), s.reuse), body);
  });
  return out;
}

}  // namespace

const Kernels kernels = {VSAM_CPU_SET_NAME, &sumsq_impl, &gram_impl, &axpby_impl, &perturb_impl, &restore_impl,
                         &reuse_impl, &sgd_impl, &adamw_impl};
