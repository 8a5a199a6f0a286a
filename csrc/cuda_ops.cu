// The CUDA kernels of vsam_ext._C: TORCH_LIBRARY_IMPL(vsam_ext, CUDA) for the sixteen ops of
// registration.cpp (eight over flat buffers, their *_list forms over lists of tensors), with the
// semantics of vsam_ext/ops/reference.py (the oracle). The shared machinery (vector loads, the
// multi-tensor-apply launcher, deterministic block sums, argument checks) is in cuda_utils.cuh;
// this file holds one functor per op and its host side.
//
// Every op has ONE implementation of its maths, its functor, and one launcher: the flat op is
// the list of one buffer (the segment ops: its segments are the spans), the list op one span
// per tensor, so the two give the same bits, element-wise and in the sums of a tensor
// (segment ops). Each launch covers as many spans as fit in its kernel argument (Table<Ptrs>:
// 45 to 78 spans, by the functor's number of buffers), one block per chunk of 16 KiB of each
// buffer; the segment ops launch once for any number of spans (a table in device memory when
// they do not fit one kernel argument); the sums take one more launch.
//
// One translation unit on purpose: torch's headers cost about 50 s of nvcc time per file, the
// kernels themselves a few seconds, so three files took 3 minutes to compile on a 2-core CI
// machine and one takes about half that.
#include "cuda_utils.cuh"

#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace vsam_ext {
namespace gpu {
namespace {

// ===============================================================================================
// the segment ops: segment_sumsq, segment_gram, segment_axpby
// ===============================================================================================
// Per-segment sums, deterministic (launch in cuda_utils.cuh). Flat ops: segment k is
// `x[bounds[k]:bounds[k+1]]` as Python slices it (as the reference does): an empty or reversed
// range gives 0. List ops: segment k is tensor k. Sums in acc_t (fp32; fp64 for double),
// returned in acc_t too: shape (nseg,), or (nseg, 3) for segment_gram.
//
//   segment_sumsq:  out[k] = sum v_i^2,  v_i = x_i, or (|w_i| + eta) * x_i when weight is given
//   segment_gram:   out[k] = (sum a_i^2, sum a_i b_i, sum b_i^2)
//   segment_axpby:  y_i <- T(alpha[k] * y_i + beta[k] * x_i) (alpha, beta: acc_t, read on the
//                   device); out[k] = sum of the squares of the stored new y_i

template <typename T>
struct SumsqF {
  using acc = acc_t<T>;     // fp64 buffers: fp64 sums, so the norm's sqrt is fp64 too
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 1;
  static constexpr bool kPerSegment = true;
  struct Ptrs {
    const T* x;
    const T* w;   // nullptr: no weight
  };
  static constexpr int kRows = kChunkVecs;   // a thread's vectors of a whole chunk: loads first
  Ptrs p;
  acc eta;

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t, int64_t) { p = q; }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S& s) const {
    apply_rows<N, 1>(i, 0, s);
  }

  // The pieces i, i + stride, ... (R of N elements): every load, then the adds in piece order.
  template <int N, int R, typename S>
  __host__ __device__ __forceinline__ void apply_rows(int64_t i, int64_t stride, S& s) const {
    T xr[R][N];
    VSAM_UNROLL
    for (int r = 0; r < R; ++r) load<N>(xr[r], p.x + i + r * stride);
    if (p.w != nullptr) {
      T wr[R][N];
      VSAM_UNROLL
      for (int r = 0; r < R; ++r) load<N>(wr[r], p.w + i + r * stride);
      VSAM_UNROLL
      for (int r = 0; r < R; ++r) {
        VSAM_UNROLL
        for (int j = 0; j < N; ++j) {
          const acc v = (dev_abs(static_cast<acc>(wr[r][j])) + eta) * static_cast<acc>(xr[r][j]);
          s[0] += v * v;
        }
      }
    } else {
      VSAM_UNROLL
      for (int r = 0; r < R; ++r) {
        VSAM_UNROLL
        for (int j = 0; j < N; ++j) {
          const acc v = static_cast<acc>(xr[r][j]);
          s[0] += v * v;
        }
      }
    }
  }
};

template <typename T>
struct GramF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 3;
  static constexpr bool kPerSegment = true;
  struct Ptrs {
    const T* a;
    const T* b;
  };
  static constexpr int kRows = kChunkVecs;
  Ptrs p;

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t, int64_t) { p = q; }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S& s) const {
    apply_rows<N, 1>(i, 0, s);
  }

  template <int N, int R, typename S>
  __host__ __device__ __forceinline__ void apply_rows(int64_t i, int64_t stride, S& s) const {
    T ar[R][N], br[R][N];
    VSAM_UNROLL
    for (int r = 0; r < R; ++r) load<N>(ar[r], p.a + i + r * stride);
    VSAM_UNROLL
    for (int r = 0; r < R; ++r) load<N>(br[r], p.b + i + r * stride);
    VSAM_UNROLL
    for (int r = 0; r < R; ++r) {
      VSAM_UNROLL
      for (int j = 0; j < N; ++j) {
        const acc u = static_cast<acc>(ar[r][j]), v = static_cast<acc>(br[r][j]);
        s[0] += u * u;
        s[1] += u * v;
        s[2] += v * v;
      }
    }
  }
};

template <typename T>
struct AxpbyF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 1;
  static constexpr bool kPerSegment = true;
  struct Ptrs {
    T* y;
    const T* x;
  };
  Ptrs p;
  const acc* alpha_ptr;     // one value per segment, on the device
  const acc* beta_ptr;
  acc alpha, beta;          // this block's segment's, set by bind

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t, int64_t seg) {
    p = q;
    alpha = alpha_ptr[seg];
    beta = beta_ptr[seg];
  }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S& s) const {
    T yr[N], xr[N];
    load<N>(yr, p.y + i);
    load<N>(xr, p.x + i);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) {
      yr[j] = static_cast<T>(alpha * static_cast<acc>(yr[j]) + beta * static_cast<acc>(xr[j]));
      const acc v = static_cast<acc>(yr[j]);
      s[0] += v * v;
    }
    store<N>(p.y + i, yr);
  }
};

// The implementations, shared by the flat ops (one tensor per list; the spans are its segments)
// and the list ops (a span per tensor). Every argument is checked; the lists are not empty.
at::Tensor sumsq_impl(at::TensorList x, const OptList& weight, double eta, const std::vector<Span>& spans) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x[0].scalar_type(), "vsam_ext::segment_sumsq", [&] {
    using T = scalar_t;
    using F = SumsqF<T>;
    const F f{{}, static_cast<acc_t<T>>(eta)};
    out = launch(f, spans, [&](int64_t t) { return typename F::Ptrs{x[t].data_ptr<T>(), at_or_null<T>(weight, t)}; },
                 x[0].options(), "segment_sumsq");
  });
  return out;
}

at::Tensor gram_impl(at::TensorList a, at::TensorList b, const std::vector<Span>& spans) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "vsam_ext::segment_gram", [&] {
    using T = scalar_t;
    using F = GramF<T>;
    const F f{};
    out = launch(f, spans, [&](int64_t t) { return typename F::Ptrs{a[t].data_ptr<T>(), b[t].data_ptr<T>()}; },
                 a[0].options(), "segment_gram");
  });
  return out;
}

at::Tensor axpby_impl(at::TensorList y, at::TensorList x, const at::Tensor& alpha, const at::Tensor& beta,
                      const std::vector<Span>& spans) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y[0].scalar_type(), "vsam_ext::segment_axpby", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    using F = AxpbyF<T>;
    const F f{{}, alpha.data_ptr<A>(), beta.data_ptr<A>(), A(0), A(0)};
    out = launch(f, spans, [&](int64_t t) { return typename F::Ptrs{y[t].data_ptr<T>(), x[t].data_ptr<T>()}; },
                 y[0].options(), "segment_axpby");
  });
  return out;
}

at::Tensor segment_sumsq_cuda(const at::Tensor& x, c10::IntArrayRef bounds, const std::optional<at::Tensor>& weight,
                              double eta) {
  check_main(x, "x");
  if (present(weight)) check_like(*weight, "weight", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return sumsq_impl(x, one_or_none(weight), eta, segment_spans(bounds, x.numel()));
}

at::Tensor segment_gram_cuda(const at::Tensor& a, const at::Tensor& b, c10::IntArrayRef bounds) {
  check_main(a, "a");
  check_like(b, "b", a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  return gram_impl(a, b, segment_spans(bounds, a.numel()));
}

// `alpha`/`beta` of the flat segment_axpby: contiguous, on `ref`'s device, in ref's maths dtype
// (float32; float64 for double buffers), one value per segment.
void check_per_segment(const at::Tensor& c, const char* name, const at::Tensor& ref, int64_t nseg) {
  const auto want = maths_dtype(ref);
  TORCH_CHECK(c.defined(), "vsam_ext: ", name, " is undefined");
  TORCH_CHECK(c.is_cuda() && c.device() == ref.device(), "vsam_ext: ", name, " must be on y's device ",
              ref.device(), " (a device tensor, never read on the host), got one on ", c.device());
  TORCH_CHECK(c.scalar_type() == want, "vsam_ext: ", name, " must be ", want, " (the maths dtype of a ",
              ref.scalar_type(), " buffer), got ", c.scalar_type());
  TORCH_CHECK(c.is_contiguous(), "vsam_ext: ", name, " must be contiguous");
  TORCH_CHECK(c.numel() == nseg, "vsam_ext: ", name, " must hold ", nseg, " values (one per segment), got ",
              c.numel());
}

at::Tensor segment_axpby_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& alpha,
                              const at::Tensor& beta, c10::IntArrayRef bounds) {
  check_main(y, "y");
  check_like(x, "x", y, "y");
  const int64_t nseg = bounds.size() > 1 ? static_cast<int64_t>(bounds.size()) - 1 : 0;
  check_per_segment(alpha, "alpha", y, nseg);
  check_per_segment(beta, "beta", y, nseg);
  const c10::cuda::CUDAGuard guard(y.device());
  return axpby_impl(y, x, alpha, beta, segment_spans(bounds, y.numel()));
}

// An empty list of a segment op: zeros(0) (zeros(0, 3)) in the maths dtype of the coefficients
// when there are some (on their device), else float32 on the CPU.
at::Tensor no_segments(int width, const at::Tensor* like = nullptr) {
  const auto opts = like != nullptr ? like->options() : at::TensorOptions().dtype(at::kFloat);
  return width == 1 ? at::zeros({0}, opts) : at::zeros({0, width}, opts);
}

at::Tensor segment_sumsq_list_cuda(at::TensorList x, OptList weight, double eta) {
  const ListArgs args(x, "x");
  args.same(weight, "weight");
  if (args.empty()) return no_segments(1);
  const c10::cuda::CUDAGuard guard(args.device());
  return sumsq_impl(x, weight, eta, list_spans(x));
}

at::Tensor segment_gram_list_cuda(at::TensorList a, at::TensorList b) {
  const ListArgs args(a, "a");
  args.same(b, "b");
  if (args.empty()) return no_segments(3);
  const c10::cuda::CUDAGuard guard(args.device());
  return gram_impl(a, b, list_spans(a));
}

at::Tensor segment_axpby_list_cuda(at::TensorList y, at::TensorList x, const at::Tensor& alpha,
                                   const at::Tensor& beta) {
  const ListArgs args(y, "y");
  args.same(x, "x");
  args.coefficients(alpha, args.size(), "alpha");
  args.coefficients(beta, args.size(), "beta");
  TORCH_CHECK(alpha.scalar_type() == beta.scalar_type(), "vsam_ext: alpha has dtype ", alpha.scalar_type(),
              " but beta has dtype ", beta.scalar_type());
  if (args.empty()) return no_segments(1, &alpha);
  const c10::cuda::CUDAGuard guard(args.device());
  return axpby_impl(y, x, alpha, beta, list_spans(y));
}

// ===============================================================================================
// the SAM passes: perturb, restore_psf_stats, reuse
// ===============================================================================================
// Element-wise, maths in acc_t (fp32; fp64 for double buffers).
//
//   perturb:            backup <- p;  keep <- g (when given);
//                       p <- T(w + s * g)              (SAM)
//                       p <- T(w + ((s * g) * t) * t)  (ASAM, adaptive; t = |w| + eta)
//                       with w = acc(p), s = *scale read on the device.
//   restore_psf_stats:  p <- backup;  with psf: PSF = T(acc(g_sam) - acc(psf)) -> psf and the
//                       pair (sum g^2 over the old psf, sum PSF^2 over the new psf) on
//                       [stat_start, n) (lists: the tensors from stat_first on) in acc_t;
//                       without psf: a plain copy (CopyF), no statistics.
//   reuse:              grad <- T(acc(grad) + coeff * acc(psf)).
//
// Device scalars (reuse, sgd_step, adamw_step; vsam_ext/ops/scalars.py): an optional float64
// tensor `scalars` whose values replace the host doubles derived from the float arguments
// (reuse: [coeff]; sgd_step: [coeff, lr]; adamw_step: [coeff, 1 - lr * wd, step_size, bc2]), so
// that a captured CUDA graph reads the values of each replay. The functor holds its pointer
// (nullptr: the host values) and bind reads it, once per thread, and rounds each value to acc_t
// once, as the host rounds its doubles (static_cast, to nearest): the same bits as the call with
// those values as floats. The float arguments still pick the kernel (pick_mode, step >= 1).

template <typename T>
struct PerturbF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 0;
  static constexpr bool kPerSegment = false;
  struct Ptrs {
    T* param;
    const T* grad;
    T* backup;
    T* keep;              // nullptr: the gradient is not kept
  };
  Ptrs p;
  const acc* scale_ptr;   // in the maths dtype (check_scale)
  bool adaptive;
  acc eta;                // ASAM's T = |w| + eta
  acc scale;              // *scale_ptr, read once per thread by bind

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t, int64_t) {
    p = q;
    scale = *scale_ptr;
  }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S&) const {
    T w[N], g[N], out[N];
    load<N>(w, p.param + i);
    load<N>(g, p.grad + i);
    store<N>(p.backup + i, w);
    if (p.keep != nullptr) store<N>(p.keep + i, g);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) {
      const acc wa = static_cast<acc>(w[j]);
      acc step = static_cast<acc>(g[j]) * scale;
      if (adaptive) {
        const acc t = dev_abs(wa) + eta;
        step = step * t * t;
      }
      out[j] = static_cast<T>(wa + step);
    }
    store<N>(p.param + i, out);
  }
};

template <typename T>
struct RestorePsfF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 2;
  static constexpr bool kPerSegment = false;
  struct Ptrs {
    T* param;
    const T* backup;
    const T* grad_sam;
    T* psf;
  };
  Ptrs p;
  int64_t stat_start;     // the span's, set by bind

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t stat_from, int64_t) {
    p = q;
    stat_start = stat_from;
  }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S& s) const {
    T b[N], gs[N];
    load<N>(b, p.backup + i);
    load<N>(gs, p.grad_sam + i);
    store<N>(p.param + i, b);
    psf_and_stats<N>(gs, p.psf, i, stat_start, s[0], s[1]);
  }
};

// restore_psf_stats without psf: param <- backup.
template <typename T>
struct CopyF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 0;
  static constexpr bool kPerSegment = false;
  struct Ptrs {
    T* dst;
    const T* src;
  };
  Ptrs p;

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t, int64_t) { p = q; }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S&) const {
    T r[N];
    load<N>(r, p.src + i);
    store<N>(p.dst + i, r);
  }
};

template <typename T>
struct ReuseF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 0;
  static constexpr bool kPerSegment = false;
  struct Ptrs {
    T* grad;
    const T* psf;
  };
  Ptrs p;
  acc coeff;
  const double* scalars;  // nullptr, or [coeff] on the device (read by bind)

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t, int64_t) {
    p = q;
    if (scalars != nullptr) coeff = static_cast<acc>(scalars[0]);
  }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S&) const {
    T g[N], q[N], out[N];
    load<N>(g, p.grad + i);
    load<N>(q, p.psf + i);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) out[j] = static_cast<T>(static_cast<acc>(g[j]) + coeff * static_cast<acc>(q[j]));
    store<N>(p.grad + i, out);
  }
};

// "No statistics": an empty float32 tensor on the buffers' device.
at::Tensor no_stats(const at::TensorOptions& opts) { return at::empty({0}, opts.dtype(at::kFloat)); }

// The result of an op over empty lists (as the cpu backend's): the statistics (0, 0) in float32
// when asked for, else none. (Not reached through the dispatcher, which needs a tensor to pick
// the CUDA kernel: the Python wrappers answer such calls.)
at::Tensor empty_stats(bool asked) {
  return asked ? at::zeros({2}, at::TensorOptions().dtype(at::kFloat)) : no_stats(at::TensorOptions());
}

// `scalars` of reuse / sgd_step / adamw_step (`op`): absent (nullptr), or `count` float64
// values, 1-D, contiguous, on `device` (the buffers'; any CUDA device for empty lists, which
// launch nothing). Its address, read by the kernels, never on the host.
const double* scalars_ptr(const std::optional<at::Tensor>& scalars, const char* op, int64_t count,
                          const std::optional<c10::Device>& device) {
  if (!present(scalars)) return nullptr;
  const at::Tensor& t = *scalars;
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1 && t.numel() == count && t.is_contiguous() &&
                  t.is_cuda() && (!device.has_value() || t.device() == *device),
              op, ": scalars must be a contiguous 1-D float64 tensor of ", count, " value(s) on ",
              device.has_value() ? device->str() : std::string("the parameters' CUDA device"),
              " (vsam_ext.ops.scalars), got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  return t.data_ptr<double>();
}

// The lists' device, none for empty lists.
std::optional<c10::Device> device_of(const ListArgs& args) {
  return args.empty() ? std::nullopt : std::optional<c10::Device>(args.device());
}

void perturb_impl(at::TensorList param, at::TensorList grad, const at::Tensor& scale, at::TensorList backup,
                  bool adaptive, const OptList& keep, double eta, const std::vector<Span>& spans) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "vsam_ext::perturb", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    using F = PerturbF<T>;
    const F f{{}, scale.data_ptr<A>(), adaptive, static_cast<A>(eta), A(0)};
    launch(f, spans, [&](int64_t t) {
      return typename F::Ptrs{param[t].data_ptr<T>(), grad[t].data_ptr<T>(), backup[t].data_ptr<T>(),
                              at_or_null<T>(keep, t)};
    }, param[0].options(), "perturb");
  });
}

at::Tensor restore_impl(at::TensorList param, at::TensorList backup, at::TensorList grad_sam, const OptList& psf,
                        const std::vector<Span>& spans) {
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "vsam_ext::restore_psf_stats",
                                  [&] {
    using T = scalar_t;
    if (psf.has_value()) {
      using F = RestorePsfF<T>;
      const F f{{}, 0};
      stats = launch(f, spans, [&](int64_t t) {
        return typename F::Ptrs{param[t].data_ptr<T>(), backup[t].data_ptr<T>(), grad_sam[t].data_ptr<T>(),
                                (*psf)[t].data_ptr<T>()};
      }, param[0].options(), "restore_psf_stats");
    } else {
      using F = CopyF<T>;
      const F f{};
      launch(f, spans, [&](int64_t t) { return typename F::Ptrs{param[t].data_ptr<T>(), backup[t].data_ptr<T>()}; },
             param[0].options(), "restore_psf_stats");
    }
  });
  return stats.defined() ? stats : no_stats(param[0].options());
}

void reuse_impl(at::TensorList grad, at::TensorList psf, double coeff, const double* scalars,
                const std::vector<Span>& spans) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad[0].scalar_type(), "vsam_ext::reuse", [&] {
    using T = scalar_t;
    using F = ReuseF<T>;
    const F f{{}, static_cast<acc_t<T>>(coeff), scalars};
    launch(f, spans, [&](int64_t t) { return typename F::Ptrs{grad[t].data_ptr<T>(), psf[t].data_ptr<T>()}; },
           grad[0].options(), "reuse");
  });
}

void perturb_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& backup,
                  bool adaptive, const std::optional<at::Tensor>& grad_keep, double eta) {
  check_main(param, "param");
  check_like(grad, "grad", param, "param");
  check_like(backup, "backup", param, "param");
  if (present(grad_keep)) check_like(*grad_keep, "grad_keep", param, "param");
  check_scale(scale, param);
  const c10::cuda::CUDAGuard guard(param.device());
  perturb_impl(param, grad, scale, backup, adaptive, one_or_none(grad_keep), eta, flat_spans(param.numel()));
}

at::Tensor restore_psf_stats_cuda(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad_sam,
                                  const std::optional<at::Tensor>& psf, int64_t stat_start) {
  check_main(param, "param");
  check_like(backup, "backup", param, "param");
  check_like(grad_sam, "grad_sam", param, "param");
  if (present(psf)) check_like(*psf, "psf", param, "param");
  const c10::cuda::CUDAGuard guard(param.device());
  return restore_impl(param, backup, grad_sam, one_or_none(psf), flat_spans(param.numel(), stat_start));
}

void reuse_cuda(const at::Tensor& grad, const at::Tensor& psf, double coeff,
                const std::optional<at::Tensor>& scalars) {
  check_main(grad, "grad");
  check_like(psf, "psf", grad, "grad");
  const double* s = scalars_ptr(scalars, "reuse", 1, grad.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  reuse_impl(grad, psf, coeff, s, flat_spans(grad.numel()));
}

void perturb_list_cuda(at::TensorList param, at::TensorList grad, const at::Tensor& scale, at::TensorList backup,
                       bool adaptive, OptList grad_keep, double eta) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(backup, "backup");
  args.same(grad_keep, "grad_keep");
  args.coefficients(scale, 1, "scale");
  if (args.empty()) return;
  const c10::cuda::CUDAGuard guard(args.device());
  perturb_impl(param, grad, scale, backup, adaptive, grad_keep, eta, list_spans(param));
}

at::Tensor restore_psf_stats_list_cuda(at::TensorList param, at::TensorList backup, at::TensorList grad_sam,
                                       OptList psf, int64_t stat_first) {
  const ListArgs args(param, "param");
  args.same(backup, "backup");
  args.same(grad_sam, "grad_sam");
  args.same(psf, "psf");
  if (args.empty()) return empty_stats(psf.has_value());
  const c10::cuda::CUDAGuard guard(args.device());
  return restore_impl(param, backup, grad_sam, psf, list_spans(param, stat_first));
}

void reuse_list_cuda(at::TensorList grad, at::TensorList psf, double coeff,
                     const std::optional<at::Tensor>& scalars) {
  const ListArgs args(grad, "grad");
  args.same(psf, "psf");
  const double* s = scalars_ptr(scalars, "reuse", 1, device_of(args));
  if (args.empty()) return;
  const c10::cuda::CUDAGuard guard(args.device());
  reuse_impl(grad, psf, coeff, s, list_spans(grad));
}

// ===============================================================================================
// the fused base steps: sgd_step, adamw_step
// ===============================================================================================
// ONE element-wise pass each that forms the final gradient d and takes torch.optim.SGD's /
// AdamW's step with it. Maths in acc_t (fp32; fp64 for double buffers); each stored value is
// rounded to T once.
//
// The final gradient (Mode, chosen on the host as reference._final_grad does):
//   kRestore     backup given, no psf:  w = acc(backup) (param is written, never read); d = g
//   kRestorePsf  backup and psf given:  as kRestore, and psf <- PSF = T(g - acc(psf)) with the
//                statistics (sum g_old^2, sum PSF^2) over [stat_start, n) (lists: the tensors
//                from stat_first on) -> 2 values in acc_t
//   kReuse       psf given, coeff != 0: w = acc(param); d = g + coeff * acc(psf), in registers
//                only (the grad buffer is never written)
//   kPlain       otherwise:             w = acc(param); d = g
// then d = -d when maximize. With g = acc(grad) throughout.
//
// SGD (torch.optim.SGD):
//   d += wd * w                                   (weight_decay != 0)
//   buf = first ? d : momentum * buf + (1 - dampening) * d;  momentum_buffer <- T(buf)
//   d = nesterov ? d + momentum * buf : buf       (momentum != 0; buf unrounded)
//   param <- T(w - lr * d)
// AdamW (torch.optim.AdamW, no amsgrad), step >= 1 the count after this step's increment:
//   m = m + (1 - beta1) * (d - m);  v = beta2 * v + (1 - beta2) * d * d;  exp_avg <- T(m),
//   exp_avg_sq <- T(v)  (the update below uses the unrounded m, v)
//   param <- T(w * (1 - lr * wd) - step_size * m / (sqrt(v) / bc2 + eps)),
//   step_size = lr / (1 - beta1^step), bc2 = sqrt(1 - beta2^step)  (host, in double)

enum class Mode { kPlain, kReuse, kRestore, kRestorePsf };

Mode pick_mode(bool has_psf, bool has_backup, double coeff) {
  if (has_backup) return has_psf ? Mode::kRestorePsf : Mode::kRestore;
  return has_psf && coeff != 0.0 ? Mode::kReuse : Mode::kPlain;
}

// Calls go(std::integral_constant<Mode, mode>{}): one kernel instantiation per mode.
template <typename Go>
at::Tensor with_mode(Mode mode, Go&& go) {
  switch (mode) {
    case Mode::kPlain: return go(std::integral_constant<Mode, Mode::kPlain>{});
    case Mode::kReuse: return go(std::integral_constant<Mode, Mode::kReuse>{});
    case Mode::kRestore: return go(std::integral_constant<Mode, Mode::kRestore>{});
    default: return go(std::integral_constant<Mode, Mode::kRestorePsf>{});
  }
}

// The buffers the final gradient reads (and, in kRestorePsf, writes: psf).
template <typename T>
struct StepPtrs {
  T* param;            // read unless restoring (then backup is read); written by the step
  const T* grad;       // read only
  T* psf;              // kReuse: read; kRestorePsf: read (g) and written (PSF)
  const T* backup;     // kRestore*: read
};

template <typename T>
struct StepArgs {
  acc_t<T> coeff;      // kReuse
  int64_t stat_start;  // kRestorePsf: the span's, set by bind
  bool maximize;
};

// w (the weights the step starts from) and d (the final gradient) for the N elements at i.
template <Mode M, int N, typename T, typename A>
__host__ __device__ __forceinline__ void final_grad(const StepPtrs<T>& p, const StepArgs<T>& a, int64_t i,
                                                    A (&w)[N], A (&d)[N], A& s0, A& s1) {
  constexpr bool kRestoring = M == Mode::kRestore || M == Mode::kRestorePsf;
  T g[N], wr[N];
  load<N>(g, p.grad + i);
  load<N>(wr, (kRestoring ? p.backup : p.param) + i);
  VSAM_UNROLL
  for (int j = 0; j < N; ++j) {
    w[j] = static_cast<A>(wr[j]);
    d[j] = static_cast<A>(g[j]);
  }
  if constexpr (M == Mode::kReuse) {
    T q[N];
    load<N>(q, p.psf + i);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) d[j] = d[j] + a.coeff * static_cast<A>(q[j]);
  }
  if constexpr (M == Mode::kRestorePsf) psf_and_stats<N>(g, p.psf, i, a.stat_start, s0, s1);
  if (a.maximize) {
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) d[j] = -d[j];
  }
}

template <typename T, Mode M>
struct SgdF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = M == Mode::kRestorePsf ? 2 : 0;
  static constexpr bool kPerSegment = false;
  struct Ptrs {
    StepPtrs<T> in;
    T* buf;            // momentum buffer; nullptr when momentum == 0
  };
  Ptrs p;
  StepArgs<T> a;
  acc lr, weight_decay, momentum, one_minus_dampening;
  bool has_weight_decay, has_momentum, nesterov, first;
  const double* scalars;   // nullptr, or [coeff, lr] on the device (read by bind)

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t stat_from, int64_t) {
    p = q;
    a.stat_start = stat_from;
    if (scalars != nullptr) {
      a.coeff = static_cast<acc>(scalars[0]);
      lr = static_cast<acc>(scalars[1]);
    }
  }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S& s) const {
    acc w[N], d[N];
    if constexpr (kSums == 2) {
      final_grad<M, N>(p.in, a, i, w, d, s[0], s[1]);
    } else {
      acc unused0 = acc(0), unused1 = acc(0);
      final_grad<M, N>(p.in, a, i, w, d, unused0, unused1);
    }
    if (has_weight_decay) {
      VSAM_UNROLL
      for (int j = 0; j < N; ++j) d[j] = d[j] + weight_decay * w[j];
    }
    if (has_momentum) {
      acc b[N];
      T bt[N];
      if (first) {
        VSAM_UNROLL
        for (int j = 0; j < N; ++j) b[j] = d[j];
      } else {
        load<N>(bt, p.buf + i);
        VSAM_UNROLL
        for (int j = 0; j < N; ++j) b[j] = momentum * static_cast<acc>(bt[j]) + one_minus_dampening * d[j];
      }
      VSAM_UNROLL
      for (int j = 0; j < N; ++j) {
        bt[j] = static_cast<T>(b[j]);
        d[j] = nesterov ? d[j] + momentum * b[j] : b[j];
      }
      store<N>(p.buf + i, bt);
    }
    T out[N];
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) out[j] = static_cast<T>(w[j] - lr * d[j]);
    store<N>(p.in.param + i, out);
  }
};

template <typename T, Mode M>
struct AdamWF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = M == Mode::kRestorePsf ? 2 : 0;
  static constexpr bool kPerSegment = false;
  struct Ptrs {
    StepPtrs<T> in;
    T* exp_avg;
    T* exp_avg_sq;
  };
  Ptrs p;
  StepArgs<T> a;
  acc decay;             // 1 - lr * weight_decay
  acc one_minus_beta1, beta2, one_minus_beta2, eps;
  acc step_size;         // lr / (1 - beta1^step)
  acc bias_correction2_sqrt;   // sqrt(1 - beta2^step)
  const double* scalars;  // nullptr, or [coeff, decay, step_size, bias_correction2_sqrt] on the device

  __host__ __device__ __forceinline__ void bind(const Ptrs& q, int64_t stat_from, int64_t) {
    p = q;
    a.stat_start = stat_from;
    if (scalars != nullptr) {
      a.coeff = static_cast<acc>(scalars[0]);
      decay = static_cast<acc>(scalars[1]);
      step_size = static_cast<acc>(scalars[2]);
      bias_correction2_sqrt = static_cast<acc>(scalars[3]);
    }
  }

  template <int N, typename S>
  __host__ __device__ __forceinline__ void apply(int64_t i, S& s) const {
    acc w[N], d[N];
    if constexpr (kSums == 2) {
      final_grad<M, N>(p.in, a, i, w, d, s[0], s[1]);
    } else {
      acc unused0 = acc(0), unused1 = acc(0);
      final_grad<M, N>(p.in, a, i, w, d, unused0, unused1);
    }
    T mt[N], vt[N], out[N];
    load<N>(mt, p.exp_avg + i);
    load<N>(vt, p.exp_avg_sq + i);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) {
      const acc m_old = static_cast<acc>(mt[j]);
      const acc m = m_old + one_minus_beta1 * (d[j] - m_old);
      const acc v = beta2 * static_cast<acc>(vt[j]) + one_minus_beta2 * d[j] * d[j];
      mt[j] = static_cast<T>(m);
      vt[j] = static_cast<T>(v);
      const acc denom = dev_sqrt(v) / bias_correction2_sqrt + eps;
      out[j] = static_cast<T>(w[j] * decay - step_size * m / denom);
    }
    store<N>(p.exp_avg + i, mt);
    store<N>(p.exp_avg_sq + i, vt);
    store<N>(p.in.param + i, out);
  }
};

// The scalars of the functors, from the ops' arguments (host scalars in double, as the reference
// computes them in Python, then rounded once to acc_t).
template <typename T>
StepArgs<T> step_args(double coeff, bool maximize) {
  return StepArgs<T>{static_cast<acc_t<T>>(coeff), 0, maximize};
}

template <typename T, Mode M>
SgdF<T, M> make_sgd(double coeff, bool maximize, double lr, double weight_decay, double momentum, double dampening,
                    bool nesterov, bool first, const double* scalars) {
  using A = acc_t<T>;
  return SgdF<T, M>{{}, step_args<T>(coeff, maximize), static_cast<A>(lr), static_cast<A>(weight_decay),
                    static_cast<A>(momentum), static_cast<A>(1.0 - dampening), weight_decay != 0.0, momentum != 0.0,
                    nesterov, first, scalars};
}

template <typename T, Mode M>
AdamWF<T, M> make_adamw(double coeff, bool maximize, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t step, const double* scalars) {
  using A = acc_t<T>;
  const double step_size = lr / (1.0 - std::pow(beta1, static_cast<double>(step)));
  const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  return AdamWF<T, M>{{}, step_args<T>(coeff, maximize), static_cast<A>(1.0 - lr * weight_decay),
                      static_cast<A>(1.0 - beta1), static_cast<A>(beta2), static_cast<A>(1.0 - beta2),
                      static_cast<A>(eps), static_cast<A>(step_size), static_cast<A>(bias_correction2_sqrt),
                      scalars};
}

template <typename T>
StepPtrs<T> step_ptrs(at::TensorList param, at::TensorList grad, const OptList& psf, const OptList& backup,
                      int64_t t) {
  return StepPtrs<T>{param[t].data_ptr<T>(), grad[t].data_ptr<T>(), at_or_null<T>(psf, t),
                     at_or_null<T>(backup, t)};
}

at::Tensor sgd_impl(at::TensorList param, at::TensorList grad, const OptList& momentum_buffer, const OptList& psf,
                    const OptList& backup, double coeff, const std::vector<Span>& spans, double lr,
                    double weight_decay, double momentum, double dampening, bool nesterov, bool maximize,
                    bool first, const double* scalars) {
  const Mode mode = pick_mode(psf.has_value(), backup.has_value(), coeff);
  const bool has_momentum = momentum != 0.0;
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "vsam_ext::sgd_step", [&] {
    using T = scalar_t;
    stats = with_mode(mode, [&](auto mode_c) {
      constexpr Mode M = decltype(mode_c)::value;
      using F = SgdF<T, M>;
      const F f = make_sgd<T, M>(coeff, maximize, lr, weight_decay, momentum, dampening, nesterov, first, scalars);
      return launch(f, spans, [&](int64_t t) {
        return typename F::Ptrs{step_ptrs<T>(param, grad, psf, backup, t),
                                has_momentum ? (*momentum_buffer)[t].data_ptr<T>() : nullptr};
      }, param[0].options(), "sgd_step");
    });
  });
  return stats.defined() ? stats : no_stats(param[0].options());
}

at::Tensor adamw_impl(at::TensorList param, at::TensorList grad, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                      const OptList& psf, const OptList& backup, double coeff, const std::vector<Span>& spans,
                      double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                      bool maximize, const double* scalars) {
  const Mode mode = pick_mode(psf.has_value(), backup.has_value(), coeff);
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param[0].scalar_type(), "vsam_ext::adamw_step", [&] {
    using T = scalar_t;
    stats = with_mode(mode, [&](auto mode_c) {
      constexpr Mode M = decltype(mode_c)::value;
      using F = AdamWF<T, M>;
      const F f = make_adamw<T, M>(coeff, maximize, lr, beta1, beta2, eps, weight_decay, step, scalars);
      return launch(f, spans, [&](int64_t t) {
        return typename F::Ptrs{step_ptrs<T>(param, grad, psf, backup, t), exp_avg[t].data_ptr<T>(),
                                exp_avg_sq[t].data_ptr<T>()};
      }, param[0].options(), "adamw_step");
    });
  });
  return stats.defined() ? stats : no_stats(param[0].options());
}

void check_step(int64_t step) {
  TORCH_CHECK(step >= 1, "vsam_ext: adamw_step: step must be >= 1 (the count after this step's increment), got ",
              step);
}

// Checks the buffers of the final gradient of a flat step.
void check_final_grad(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& psf,
                      const std::optional<at::Tensor>& backup) {
  check_main(param, "param");
  check_like(grad, "grad", param, "param");
  if (present(psf)) check_like(*psf, "psf", param, "param");
  if (present(backup)) check_like(*backup, "backup", param, "param");
}

at::Tensor sgd_step_cuda(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
                         const std::optional<at::Tensor>& psf, const std::optional<at::Tensor>& backup, double coeff,
                         int64_t stat_start, double lr, double weight_decay, double momentum, double dampening,
                         bool nesterov, bool maximize, bool first, const std::optional<at::Tensor>& scalars) {
  check_final_grad(param, grad, psf, backup);
  if (momentum != 0.0) {
    TORCH_CHECK(present(momentum_buffer), "vsam_ext: sgd_step: momentum_buffer is required when momentum != 0");
    check_like(*momentum_buffer, "momentum_buffer", param, "param");
  }
  const double* s = scalars_ptr(scalars, "sgd_step", 2, param.device());
  const c10::cuda::CUDAGuard guard(param.device());
  return sgd_impl(param, grad, momentum != 0.0 ? one_or_none(momentum_buffer) : OptList(), one_or_none(psf),
                  one_or_none(backup), coeff, flat_spans(param.numel(), stat_start), lr, weight_decay, momentum,
                  dampening, nesterov, maximize, first, s);
}

at::Tensor adamw_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& psf,
                           const std::optional<at::Tensor>& backup, double coeff, int64_t stat_start, double lr,
                           double beta1, double beta2, double eps, double weight_decay, int64_t step, bool maximize,
                           const std::optional<at::Tensor>& scalars) {
  check_final_grad(param, grad, psf, backup);
  check_like(exp_avg, "exp_avg", param, "param");
  check_like(exp_avg_sq, "exp_avg_sq", param, "param");
  check_step(step);
  const double* s = scalars_ptr(scalars, "adamw_step", 4, param.device());
  const c10::cuda::CUDAGuard guard(param.device());
  return adamw_impl(param, grad, exp_avg, exp_avg_sq, one_or_none(psf), one_or_none(backup), coeff,
                    flat_spans(param.numel(), stat_start), lr, beta1, beta2, eps, weight_decay, step, maximize, s);
}

at::Tensor sgd_step_list_cuda(at::TensorList param, at::TensorList grad, OptList momentum_buffer, OptList psf,
                              OptList backup, double coeff, int64_t stat_first, double lr, double weight_decay,
                              double momentum, double dampening, bool nesterov, bool maximize, bool first,
                              const std::optional<at::Tensor>& scalars) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(momentum_buffer, "momentum_buffer");
  args.same(psf, "psf");
  args.same(backup, "backup");
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(),
              "vsam_ext: sgd_step: momentum_buffer is required when momentum != 0");
  const double* s = scalars_ptr(scalars, "sgd_step", 2, device_of(args));
  if (args.empty()) return empty_stats(backup.has_value() && psf.has_value());
  const c10::cuda::CUDAGuard guard(args.device());
  return sgd_impl(param, grad, momentum_buffer, psf, backup, coeff, list_spans(param, stat_first), lr, weight_decay,
                  momentum, dampening, nesterov, maximize, first, s);
}

at::Tensor adamw_step_list_cuda(at::TensorList param, at::TensorList grad, at::TensorList exp_avg,
                                at::TensorList exp_avg_sq, OptList psf, OptList backup, double coeff,
                                int64_t stat_first, double lr, double beta1, double beta2, double eps,
                                double weight_decay, int64_t step, bool maximize,
                                const std::optional<at::Tensor>& scalars) {
  const ListArgs args(param, "param");
  args.same(grad, "grad");
  args.same(exp_avg, "exp_avg");
  args.same(exp_avg_sq, "exp_avg_sq");
  args.same(psf, "psf");
  args.same(backup, "backup");
  check_step(step);
  const double* s = scalars_ptr(scalars, "adamw_step", 4, device_of(args));
  if (args.empty()) return empty_stats(backup.has_value() && psf.has_value());
  const c10::cuda::CUDAGuard guard(args.device());
  return adamw_impl(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, list_spans(param, stat_first), lr, beta1,
                    beta2, eps, weight_decay, step, maximize, s);
}

}  // namespace
}  // namespace gpu
}  // namespace vsam_ext

// python_tests/emulated_launch.cu includes this file with VSAM_EXT_EMULATED_LAUNCH to run the
// functors and the launcher's host side on the CPU; it registers nothing.
#ifndef VSAM_EXT_EMULATED_LAUNCH
TORCH_LIBRARY_IMPL(vsam_ext, CUDA, m) {
  m.impl("segment_sumsq", &vsam_ext::gpu::segment_sumsq_cuda);
  m.impl("segment_gram", &vsam_ext::gpu::segment_gram_cuda);
  m.impl("segment_axpby", &vsam_ext::gpu::segment_axpby_cuda);
  m.impl("perturb", &vsam_ext::gpu::perturb_cuda);
  m.impl("restore_psf_stats", &vsam_ext::gpu::restore_psf_stats_cuda);
  m.impl("reuse", &vsam_ext::gpu::reuse_cuda);
  m.impl("sgd_step", &vsam_ext::gpu::sgd_step_cuda);
  m.impl("adamw_step", &vsam_ext::gpu::adamw_step_cuda);
  m.impl("segment_sumsq_list", &vsam_ext::gpu::segment_sumsq_list_cuda);
  m.impl("segment_gram_list", &vsam_ext::gpu::segment_gram_list_cuda);
  m.impl("segment_axpby_list", &vsam_ext::gpu::segment_axpby_list_cuda);
  m.impl("perturb_list", &vsam_ext::gpu::perturb_list_cuda);
  m.impl("restore_psf_stats_list", &vsam_ext::gpu::restore_psf_stats_list_cuda);
  m.impl("reuse_list", &vsam_ext::gpu::reuse_list_cuda);
  m.impl("sgd_step_list", &vsam_ext::gpu::sgd_step_list_cuda);
  m.impl("adamw_step_list", &vsam_ext::gpu::adamw_step_list_cuda);
}
#endif  // VSAM_EXT_EMULATED_LAUNCH
