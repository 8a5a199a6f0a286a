// The CUDA kernels of vsam_ext._C: TORCH_LIBRARY_IMPL(vsam_ext, CUDA) for the eight ops of
// registration.cpp, with the semantics of vsam_ext/ops/reference.py (the oracle). The shared
// machinery (vector loads, the grid-stride loop, deterministic block sums, the launcher,
// argument checks) is in cuda_utils.cuh; this file holds one functor per op and its host side.
//
// One translation unit on purpose: torch's headers cost about 50 s of nvcc time per file, the
// kernels themselves a few seconds, so three files took 3 minutes to compile on a 2-core CI
// machine and one takes about half that.
#include "cuda_utils.cuh"

#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace vsam_ext {
namespace gpu {
namespace {

// ===============================================================================================
// the segment ops: segment_sumsq, segment_gram, segment_axpby
// ===============================================================================================
// Per-segment sums, deterministic. Segment k is `x[bounds[k]:bounds[k+1]]` as Python slices it
// (as the reference does): an empty or reversed range gives 0. Sums in acc_t (fp32; fp64 for
// double), returned in acc_t too: shape (nseg,), or (nseg, K) for K > 1 sums per segment.
//
//   segment_sumsq:  out[k] = sum v_i^2,  v_i = x_i, or (|w_i| + eta) * x_i when weight is given
//   segment_gram:   out[k] = (sum a_i^2, sum a_i b_i, sum b_i^2)
//   segment_axpby:  y_i <- T(alpha[k] * y_i + beta[k] * x_i) (alpha, beta: acc_t, read on the
//                   device);
//                   out[k] = sum of the squares of the stored new y_i
//
// Plan (host): every non-empty segment gets a number of blocks roughly proportional to its
// length (at least one, at most one per kMinChunk elements, about kBlocksPerSm * SMs in all),
// each block a contiguous chunk of its segment. The table of chunks (start, end, segment: 3
// int64 per block) and the first block of each segment (nseg + 1 int64) go to the device in
// one non-blocking copy from pinned memory. Pass 1: block b adds its chunk's K sums into
// partials[k * nblocks + b]. Pass 2: block s adds partials[k * nblocks + first[s] ...
// first[s+1]] in a fixed order into out[s * K + k].
//
// A segment functor has kSums (K), the result type `out`, load_segment_scalars(segment) (called
// once per thread before its chunk) and apply<N>(i, acc (&s)[K]).

constexpr int64_t kMinChunk = 8192;   // elements: a block gets at least this much of a segment

template <typename T>
struct SumsqF {
  using acc = acc_t<T>;
  using out = acc;      // fp64 buffers: fp64 sums, so the norm's sqrt is fp64 too
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 1;
  const T* x;
  const T* w;   // nullptr: no weight
  acc eta;

  __host__ __device__ __forceinline__ void load_segment_scalars(int64_t) {}

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc (&s)[kSums]) const {
    T xr[N];
    load<N>(xr, x + i);
    if (w != nullptr) {
      T wr[N];
      load<N>(wr, w + i);
      VSAM_UNROLL
      for (int j = 0; j < N; ++j) {
        const acc v = (dev_abs(static_cast<acc>(wr[j])) + eta) * static_cast<acc>(xr[j]);
        s[0] += v * v;
      }
    } else {
      VSAM_UNROLL
      for (int j = 0; j < N; ++j) {
        const acc v = static_cast<acc>(xr[j]);
        s[0] += v * v;
      }
    }
  }
};

template <typename T>
struct GramF {
  using acc = acc_t<T>;
  using out = acc;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 3;
  const T* a;
  const T* b;

  __host__ __device__ __forceinline__ void load_segment_scalars(int64_t) {}

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc (&s)[kSums]) const {
    T ar[N], br[N];
    load<N>(ar, a + i);
    load<N>(br, b + i);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) {
      const acc u = static_cast<acc>(ar[j]), v = static_cast<acc>(br[j]);
      s[0] += u * u;
      s[1] += u * v;
      s[2] += v * v;
    }
  }
};

template <typename T>
struct AxpbyF {
  using acc = acc_t<T>;
  using out = acc;
  static constexpr int kV = kVec<T>;
  static constexpr int kSums = 1;
  T* y;
  const T* x;
  const acc* alpha_ptr;     // one value per segment, on the device
  const acc* beta_ptr;
  acc alpha, beta;          // this block's segment's, set by load_segment_scalars

  __host__ __device__ __forceinline__ void load_segment_scalars(int64_t seg) {
    alpha = alpha_ptr[seg];
    beta = beta_ptr[seg];
  }

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc (&s)[kSums]) const {
    T yr[N], xr[N];
    load<N>(yr, y + i);
    load<N>(xr, x + i);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) {
      yr[j] = static_cast<T>(alpha * static_cast<acc>(yr[j]) + beta * static_cast<acc>(xr[j]));
      const acc v = static_cast<acc>(yr[j]);
      s[0] += v * v;
    }
    store<N>(y + i, yr);
  }
};

// Block b: the chunk [chunks[3b], chunks[3b+1]) of segment chunks[3b+2] -> partials[k * nblocks + b].
template <typename F>
__global__ void __launch_bounds__(kThreads) segment_kernel(F f, const int64_t* chunks, bool vec_ok,
                                                           typename F::acc* partials) {
  using A = typename F::acc;
  constexpr int K = F::kSums;
  const int64_t* c = chunks + 3 * static_cast<int64_t>(blockIdx.x);
  f.load_segment_scalars(c[2]);
  A s[K];
  VSAM_UNROLL
  for (int k = 0; k < K; ++k) s[k] = A(0);
  for_range<F::kV>(c[0], c[1], threadIdx.x, blockDim.x, vec_ok, f, s);
  block_sum<K>(s);
  if (threadIdx.x == 0) {
    VSAM_UNROLL
    for (int k = 0; k < K; ++k) partials[k * static_cast<int64_t>(gridDim.x) + blockIdx.x] = s[k];
  }
}

// Block s: out[s * K + k] = sum partials[k * nblocks + first[s] ... first[s+1]] (0 for a segment
// without blocks), as O.
template <typename A, typename O, int K>
__global__ void __launch_bounds__(kThreads) segment_finalize_kernel(const A* partials, int64_t nblocks,
                                                                    const int64_t* first, O* out) {
  const int64_t a = first[blockIdx.x], b = first[blockIdx.x + 1];
  A s[K];
  VSAM_UNROLL
  for (int k = 0; k < K; ++k) s[k] = A(0);
  for (int64_t j = a + threadIdx.x; j < b; j += blockDim.x) {
    VSAM_UNROLL
    for (int k = 0; k < K; ++k) s[k] += partials[k * nblocks + j];
  }
  block_sum<K>(s);
  if (threadIdx.x == 0) {
    VSAM_UNROLL
    for (int k = 0; k < K; ++k) out[static_cast<int64_t>(blockIdx.x) * K + k] = static_cast<O>(s[k]);
  }
}

// The host plan for n > 0: `chunks` gets (start, end, segment) per block, `first` the block
// range of segment k, [first[k], first[k+1]) (nseg + 1 entries). A non-empty segment of len
// elements gets max(1, min(ceil(len / kMinChunk), ceil(len / n * target))) blocks, each a
// contiguous chunk; interior chunk boundaries are multiples of 16 elements, so a chunk's
// vectors are aligned when the buffer is. Empty (or reversed) segments get no block.
void plan_segments(c10::IntArrayRef bounds, int64_t n, int64_t target, std::vector<int64_t>& chunks,
                   std::vector<int64_t>& first) {
  const int64_t nseg = bounds.size() > 1 ? static_cast<int64_t>(bounds.size()) - 1 : 0;
  chunks.clear();
  chunks.reserve(3 * static_cast<size_t>(target + nseg));
  first.assign(nseg + 1, 0);
  for (int64_t k = 0; k < nseg; ++k) {
    first[k] = static_cast<int64_t>(chunks.size() / 3);
    const int64_t a = slice_index(bounds[k], n), e = slice_index(bounds[k + 1], n);
    if (e <= a) continue;
    const int64_t len = e - a;
    const int64_t by_size = (len + kMinChunk - 1) / kMinChunk;
    const int64_t by_share = static_cast<int64_t>(std::ceil(static_cast<double>(len) / n * target));
    const int64_t nb = std::max<int64_t>(1, std::min(by_size, by_share));
    const int64_t cs = ((len + nb - 1) / nb + 15) / 16 * 16;      // chunk length, a multiple of 16
    // Cuts at a + k cs rounded down to a multiple of 16: strictly increasing since cs >= 16.
    int64_t start = a;
    for (int64_t c = a + cs; c < e; c += cs) {
      const int64_t cut = c / 16 * 16;
      chunks.insert(chunks.end(), {start, cut, k});
      start = cut;
    }
    chunks.insert(chunks.end(), {start, e, k});
  }
  first[nseg] = static_cast<int64_t>(chunks.size() / 3);
}

// Runs the segment functor f (buffers of n elements of T like `like`, vec_ok: all its pointers
// 16-byte aligned) over the segments of `bounds`: the sums as F::out, (nseg,) or (nseg, K). The
// caller holds a CUDAGuard.
template <typename T, typename F>
at::Tensor launch_segments(const F& f, bool vec_ok, c10::IntArrayRef bounds, const at::Tensor& like,
                           const char* op) {
  using A = acc_t<T>;
  using O = typename F::out;
  constexpr int K = F::kSums;
  const int64_t n = like.numel();
  const int64_t nseg = bounds.size() > 1 ? static_cast<int64_t>(bounds.size()) - 1 : 0;
  const auto out_opts = like.options().dtype(std::is_same_v<O, double> ? at::kDouble : at::kFloat);
  const auto zeros = [&] { return K == 1 ? at::zeros({nseg}, out_opts) : at::zeros({nseg, K}, out_opts); };
  if (nseg == 0 || n == 0) return zeros();

  // The plan: chunk boundaries per segment, then each segment's first block.
  const int device = like.get_device();
  std::vector<int64_t> chunks, first;
  plan_segments(bounds, n, static_cast<int64_t>(sm_count(device)) * kBlocksPerSm, chunks, first);
  const int64_t nblocks = static_cast<int64_t>(chunks.size() / 3);
  if (nblocks == 0) return zeros();   // every segment is empty
  TORCH_CHECK(nblocks <= INT32_MAX && nseg <= INT32_MAX, "vsam_ext: ", op, ": too many segments (", nseg, ")");

  // One pinned host table -> the device, without blocking the host. The caching host
  // allocator records the copy on the stream, so the pinned block is not reused before it ran.
  const int64_t table_len = 3 * nblocks + nseg + 1;
  at::Tensor host = at::empty({table_len}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(chunks.begin(), chunks.end(), h);
  std::copy(first.begin(), first.end(), h + 3 * nblocks);
  at::Tensor table = at::empty({table_len}, like.options().dtype(at::kLong));
  table.copy_(host, /*non_blocking=*/true);
  const int64_t* d_chunks = table.data_ptr<int64_t>();
  const int64_t* d_first = d_chunks + 3 * nblocks;

  at::Tensor out = K == 1 ? at::empty({nseg}, out_opts) : at::empty({nseg, K}, out_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  at::Tensor partials = at::empty({K * nblocks}, like.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat));
  segment_kernel<F><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(f, d_chunks, vec_ok, partials.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  segment_finalize_kernel<A, O, K><<<static_cast<unsigned>(nseg), kThreads, 0, stream>>>(
      partials.data_ptr<A>(), nblocks, d_first, out.data_ptr<O>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor segment_sumsq_cuda(const at::Tensor& x, c10::IntArrayRef bounds, const std::optional<at::Tensor>& weight,
                              double eta) {
  check_main(x, "x");
  if (present(weight)) check_like(*weight, "weight", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vsam_ext::segment_sumsq", [&] {
    using T = scalar_t;
    const SumsqF<T> f{x.data_ptr<T>(), ptr_or_null<T>(weight), static_cast<acc_t<T>>(eta)};
    const bool vec_ok = aligned16(f.x) && (f.w == nullptr || aligned16(f.w));
    out = launch_segments<T>(f, vec_ok, bounds, x, "segment_sumsq");
  });
  return out;
}

at::Tensor segment_gram_cuda(const at::Tensor& a, const at::Tensor& b, c10::IntArrayRef bounds) {
  check_main(a, "a");
  check_like(b, "b", a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "vsam_ext::segment_gram", [&] {
    using T = scalar_t;
    const GramF<T> f{a.data_ptr<T>(), b.data_ptr<T>()};
    out = launch_segments<T>(f, aligned16(f.a) && aligned16(f.b), bounds, a, "segment_gram");
  });
  return out;
}

// `alpha`/`beta` of segment_axpby: contiguous, on `ref`'s device, in ref's maths dtype (float32;
// float64 for double buffers), one value per segment.
void check_per_segment(const at::Tensor& c, const char* name, const at::Tensor& ref, int64_t nseg) {
  const auto want = ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "vsam_ext::segment_axpby", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const AxpbyF<T> f{y.data_ptr<T>(), x.data_ptr<T>(), alpha.data_ptr<A>(), beta.data_ptr<A>(), A(0), A(0)};
    out = launch_segments<T>(f, aligned16(f.y) && aligned16(f.x), bounds, y, "segment_axpby");
  });
  return out;
}

// ===============================================================================================
// the SAM passes: perturb, restore_psf_stats, reuse
// ===============================================================================================
// One element-wise kernel each (elementwise_kernel in cuda_utils.cuh), maths in acc_t (fp32;
// fp64 for double buffers).
//
//   perturb:            backup <- p;  keep <- g (when given);
//                       p <- T(w + s * g)              (SAM)
//                       p <- T(w + ((s * g) * t) * t)  (ASAM, adaptive; t = |w| + eta)
//                       with w = acc(p), s = *scale read on the device.
//   restore_psf_stats:  p <- backup;  with psf: PSF = T(acc(g_sam) - acc(psf)) -> psf and the
//                       pair (sum g^2 over the old psf, sum PSF^2 over the new psf) on
//                       [stat_start, n) in acc_t; without psf: a plain device copy, no statistics.
//   reuse:              grad <- T(acc(grad) + coeff * acc(psf)).

template <typename T>
struct PerturbF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr bool kStats = false;
  T* param;
  const T* grad;
  T* backup;
  T* keep;              // nullptr: the gradient is not kept
  const acc* scale_ptr; // in the maths dtype (check_scale)
  bool adaptive;
  acc eta;              // ASAM's T = |w| + eta
  acc scale;            // *scale_ptr, read once per thread by load_device_scalars

  __host__ __device__ __forceinline__ void load_device_scalars() { scale = *scale_ptr; }

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc&, acc&) const {
    T p[N], g[N], out[N];
    load<N>(p, param + i);
    load<N>(g, grad + i);
    store<N>(backup + i, p);
    if (keep != nullptr) store<N>(keep + i, g);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) {
      const acc w = static_cast<acc>(p[j]);
      acc step = static_cast<acc>(g[j]) * scale;
      if (adaptive) {
        const acc t = dev_abs(w) + eta;
        step = step * t * t;
      }
      out[j] = static_cast<T>(w + step);
    }
    store<N>(param + i, out);
  }
};

template <typename T>
struct RestorePsfF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr bool kStats = true;
  T* param;
  const T* backup;
  const T* grad_sam;
  T* psf;
  int64_t stat_start;

  __host__ __device__ __forceinline__ void load_device_scalars() {}

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc& s0, acc& s1) const {
    T b[N], gs[N];
    load<N>(b, backup + i);
    load<N>(gs, grad_sam + i);
    store<N>(param + i, b);
    psf_and_stats<N>(gs, psf, i, stat_start, s0, s1);
  }
};

template <typename T>
struct ReuseF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr bool kStats = false;
  T* grad;
  const T* psf;
  acc coeff;

  __host__ __device__ __forceinline__ void load_device_scalars() {}

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc&, acc&) const {
    T g[N], q[N], out[N];
    load<N>(g, grad + i);
    load<N>(q, psf + i);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) out[j] = static_cast<T>(static_cast<acc>(g[j]) + coeff * static_cast<acc>(q[j]));
    store<N>(grad + i, out);
  }
};

void perturb_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& backup,
                  bool adaptive, const std::optional<at::Tensor>& grad_keep, double eta) {
  check_main(param, "param");
  check_like(grad, "grad", param, "param");
  check_like(backup, "backup", param, "param");
  if (present(grad_keep)) check_like(*grad_keep, "grad_keep", param, "param");
  check_scale(scale, param);
  const int64_t n = param.numel();
  const c10::cuda::CUDAGuard guard(param.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "vsam_ext::perturb", [&] {
    using T = scalar_t;
    PerturbF<T> f{param.data_ptr<T>(), grad.data_ptr<T>(), backup.data_ptr<T>(), ptr_or_null<T>(grad_keep),
                  scale.data_ptr<acc_t<T>>(), adaptive, static_cast<acc_t<T>>(eta), acc_t<T>(0)};
    const bool vec_ok = aligned16(f.param) && aligned16(f.grad) && aligned16(f.backup) &&
                        (f.keep == nullptr || aligned16(f.keep));
    launch_elementwise<T>(f, n, vec_ok, param);
  });
}

at::Tensor restore_psf_stats_cuda(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad_sam,
                                  const std::optional<at::Tensor>& psf, int64_t stat_start) {
  check_main(param, "param");
  check_like(backup, "backup", param, "param");
  check_like(grad_sam, "grad_sam", param, "param");
  const auto float_opts = param.options().dtype(at::kFloat);
  const c10::cuda::CUDAGuard guard(param.device());
  if (!present(psf)) {
    param.copy_(backup);   // a device-to-device memcpy on the current stream
    return at::empty({0}, float_opts);
  }
  check_like(*psf, "psf", param, "param");
  const int64_t n = param.numel();
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "vsam_ext::restore_psf_stats", [&] {
    using T = scalar_t;
    RestorePsfF<T> f{param.data_ptr<T>(), backup.data_ptr<T>(), grad_sam.data_ptr<T>(), psf->data_ptr<T>(),
                     slice_index(stat_start, n)};
    const bool vec_ok = aligned16(f.param) && aligned16(f.backup) && aligned16(f.grad_sam) && aligned16(f.psf);
    stats = launch_elementwise<T>(f, n, vec_ok, param);
  });
  return stats;
}

void reuse_cuda(const at::Tensor& grad, const at::Tensor& psf, double coeff) {
  check_main(grad, "grad");
  check_like(psf, "psf", grad, "grad");
  const int64_t n = grad.numel();
  const c10::cuda::CUDAGuard guard(grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "vsam_ext::reuse", [&] {
    using T = scalar_t;
    ReuseF<T> f{grad.data_ptr<T>(), psf.data_ptr<T>(), static_cast<acc_t<T>>(coeff)};
    launch_elementwise<T>(f, n, aligned16(f.grad) && aligned16(f.psf), grad);
  });
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
//                statistics (sum g_old^2, sum PSF^2) over [stat_start, n) -> 2 values in acc_t
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

// What the final gradient reads (and, in kRestorePsf, writes: psf).
template <typename T>
struct StepIn {
  T* param;            // read unless restoring (then backup is read); written by the step
  const T* grad;       // read only
  T* psf;              // kReuse: read; kRestorePsf: read (g) and written (PSF)
  const T* backup;     // kRestore*: read
  acc_t<T> coeff;      // kReuse
  int64_t stat_start;  // kRestorePsf, already a valid index in [0, n]
  bool maximize;
};

// w (the weights the step starts from) and d (the final gradient) for the N elements at i.
template <Mode M, int N, typename T, typename A>
__host__ __device__ __forceinline__ void final_grad(const StepIn<T>& in, int64_t i, A (&w)[N], A (&d)[N], A& s0,
                                                    A& s1) {
  constexpr bool kRestoring = M == Mode::kRestore || M == Mode::kRestorePsf;
  T g[N], wr[N];
  load<N>(g, in.grad + i);
  load<N>(wr, (kRestoring ? in.backup : in.param) + i);
  VSAM_UNROLL
  for (int j = 0; j < N; ++j) {
    w[j] = static_cast<A>(wr[j]);
    d[j] = static_cast<A>(g[j]);
  }
  if constexpr (M == Mode::kReuse) {
    T q[N];
    load<N>(q, in.psf + i);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) d[j] = d[j] + in.coeff * static_cast<A>(q[j]);
  }
  if constexpr (M == Mode::kRestorePsf) psf_and_stats<N>(g, in.psf, i, in.stat_start, s0, s1);
  if (in.maximize) {
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) d[j] = -d[j];
  }
}

template <typename T, Mode M>
struct SgdF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr bool kStats = M == Mode::kRestorePsf;
  StepIn<T> in;
  T* buf;              // momentum buffer; nullptr when momentum == 0
  acc lr, weight_decay, momentum, one_minus_dampening;
  bool has_weight_decay, has_momentum, nesterov, first;

  __host__ __device__ __forceinline__ void load_device_scalars() {}

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc& s0, acc& s1) const {
    acc w[N], d[N];
    final_grad<M, N>(in, i, w, d, s0, s1);
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
        load<N>(bt, buf + i);
        VSAM_UNROLL
        for (int j = 0; j < N; ++j) b[j] = momentum * static_cast<acc>(bt[j]) + one_minus_dampening * d[j];
      }
      VSAM_UNROLL
      for (int j = 0; j < N; ++j) {
        bt[j] = static_cast<T>(b[j]);
        d[j] = nesterov ? d[j] + momentum * b[j] : b[j];
      }
      store<N>(buf + i, bt);
    }
    T out[N];
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) out[j] = static_cast<T>(w[j] - lr * d[j]);
    store<N>(in.param + i, out);
  }
};

template <typename T, Mode M>
struct AdamWF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  static constexpr bool kStats = M == Mode::kRestorePsf;
  StepIn<T> in;
  T* exp_avg;
  T* exp_avg_sq;
  acc decay;             // 1 - lr * weight_decay
  acc one_minus_beta1, beta2, one_minus_beta2, eps;
  acc step_size;         // lr / (1 - beta1^step)
  acc bias_correction2_sqrt;   // sqrt(1 - beta2^step)

  __host__ __device__ __forceinline__ void load_device_scalars() {}

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc& s0, acc& s1) const {
    acc w[N], d[N];
    final_grad<M, N>(in, i, w, d, s0, s1);
    T mt[N], vt[N], out[N];
    load<N>(mt, exp_avg + i);
    load<N>(vt, exp_avg_sq + i);
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
    store<N>(exp_avg + i, mt);
    store<N>(exp_avg_sq + i, vt);
    store<N>(in.param + i, out);
  }
};

// The functors, from the ops' arguments (host scalars in double, as the reference computes them
// in Python, then rounded once to acc_t).
template <typename T, Mode M>
SgdF<T, M> make_sgd(const StepIn<T>& in, T* buf, double lr, double weight_decay, double momentum, double dampening,
                    bool nesterov, bool first) {
  using A = acc_t<T>;
  return SgdF<T, M>{in, buf, static_cast<A>(lr), static_cast<A>(weight_decay), static_cast<A>(momentum),
                    static_cast<A>(1.0 - dampening), weight_decay != 0.0, momentum != 0.0, nesterov, first};
}

template <typename T, Mode M>
AdamWF<T, M> make_adamw(const StepIn<T>& in, T* exp_avg, T* exp_avg_sq, double lr, double beta1, double beta2,
                        double eps, double weight_decay, int64_t step) {
  using A = acc_t<T>;
  const double step_size = lr / (1.0 - std::pow(beta1, static_cast<double>(step)));
  const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  return AdamWF<T, M>{in, exp_avg, exp_avg_sq, static_cast<A>(1.0 - lr * weight_decay),
                      static_cast<A>(1.0 - beta1), static_cast<A>(beta2), static_cast<A>(1.0 - beta2),
                      static_cast<A>(eps), static_cast<A>(step_size), static_cast<A>(bias_correction2_sqrt)};
}

// Checks the buffers of the final gradient; returns the mode.
Mode check_final_grad(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& psf,
                      const std::optional<at::Tensor>& backup, double coeff) {
  check_main(param, "param");
  check_like(grad, "grad", param, "param");
  if (present(psf)) check_like(*psf, "psf", param, "param");
  if (present(backup)) check_like(*backup, "backup", param, "param");
  return pick_mode(present(psf), present(backup), coeff);
}

template <typename T>
StepIn<T> step_in(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& psf,
                  const std::optional<at::Tensor>& backup, double coeff, int64_t stat_start, bool maximize) {
  return StepIn<T>{param.data_ptr<T>(), grad.data_ptr<T>(), ptr_or_null<T>(psf), ptr_or_null<T>(backup),
                   static_cast<acc_t<T>>(coeff), slice_index(stat_start, param.numel()), maximize};
}

template <typename T>
bool step_in_aligned(const StepIn<T>& in) {
  return aligned16(in.param) && aligned16(in.grad) && (in.psf == nullptr || aligned16(in.psf)) &&
         (in.backup == nullptr || aligned16(in.backup));
}

at::Tensor no_stats_if_undefined(at::Tensor stats, const at::Tensor& param) {
  return stats.defined() ? stats : at::empty({0}, param.options().dtype(at::kFloat));
}

at::Tensor sgd_step_cuda(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
                         const std::optional<at::Tensor>& psf, const std::optional<at::Tensor>& backup, double coeff,
                         int64_t stat_start, double lr, double weight_decay, double momentum, double dampening,
                         bool nesterov, bool maximize, bool first) {
  const Mode mode = check_final_grad(param, grad, psf, backup, coeff);
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) {
    TORCH_CHECK(present(momentum_buffer), "vsam_ext: sgd_step: momentum_buffer is required when momentum != 0");
    check_like(*momentum_buffer, "momentum_buffer", param, "param");
  }
  const int64_t n = param.numel();
  const c10::cuda::CUDAGuard guard(param.device());
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "vsam_ext::sgd_step", [&] {
    using T = scalar_t;
    const StepIn<T> in = step_in<T>(param, grad, psf, backup, coeff, stat_start, maximize);
    T* buf = has_momentum ? momentum_buffer->data_ptr<T>() : nullptr;
    const bool vec_ok = step_in_aligned(in) && (buf == nullptr || aligned16(buf));
    stats = with_mode(mode, [&](auto mode_c) {
      constexpr Mode M = decltype(mode_c)::value;
      const auto f = make_sgd<T, M>(in, buf, lr, weight_decay, momentum, dampening, nesterov, first);
      return launch_elementwise<T>(f, n, vec_ok, param);
    });
  });
  return no_stats_if_undefined(stats, param);
}

at::Tensor adamw_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& psf,
                           const std::optional<at::Tensor>& backup, double coeff, int64_t stat_start, double lr,
                           double beta1, double beta2, double eps, double weight_decay, int64_t step, bool maximize) {
  const Mode mode = check_final_grad(param, grad, psf, backup, coeff);
  check_like(exp_avg, "exp_avg", param, "param");
  check_like(exp_avg_sq, "exp_avg_sq", param, "param");
  TORCH_CHECK(step >= 1, "vsam_ext: adamw_step: step must be >= 1 (the count after this step's increment), got ",
              step);
  const int64_t n = param.numel();
  const c10::cuda::CUDAGuard guard(param.device());
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "vsam_ext::adamw_step", [&] {
    using T = scalar_t;
    const StepIn<T> in = step_in<T>(param, grad, psf, backup, coeff, stat_start, maximize);
    T* m = exp_avg.data_ptr<T>();
    T* v = exp_avg_sq.data_ptr<T>();
    const bool vec_ok = step_in_aligned(in) && aligned16(m) && aligned16(v);
    stats = with_mode(mode, [&](auto mode_c) {
      constexpr Mode M = decltype(mode_c)::value;
      const auto f = make_adamw<T, M>(in, m, v, lr, beta1, beta2, eps, weight_decay, step);
      return launch_elementwise<T>(f, n, vec_ok, param);
    });
  });
  return no_stats_if_undefined(stats, param);
}

}  // namespace
}  // namespace gpu
}  // namespace vsam_ext

TORCH_LIBRARY_IMPL(vsam_ext, CUDA, m) {
  m.impl("segment_sumsq", &vsam_ext::gpu::segment_sumsq_cuda);
  m.impl("segment_gram", &vsam_ext::gpu::segment_gram_cuda);
  m.impl("segment_axpby", &vsam_ext::gpu::segment_axpby_cuda);
  m.impl("perturb", &vsam_ext::gpu::perturb_cuda);
  m.impl("restore_psf_stats", &vsam_ext::gpu::restore_psf_stats_cuda);
  m.impl("reuse", &vsam_ext::gpu::reuse_cuda);
  m.impl("sgd_step", &vsam_ext::gpu::sgd_step_cuda);
  m.impl("adamw_step", &vsam_ext::gpu::adamw_step_cuda);
}
