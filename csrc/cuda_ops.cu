// The CUDA kernels of vsam_ext._C: TORCH_LIBRARY_IMPL(vsam_ext, CUDA) for the six ops of
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
// segment_sumsq
// ===============================================================================================
// Per-segment sums of squares (the multi-tensor L2 norm), deterministic.
//
//   out[k] = sum_{i in [b_k, b_{k+1})} v_i^2,  v_i = x_i, or |w_i| * x_i when weight is given,
//
// in acc_t (fp32; fp64 for double), returned as fp32. Segments follow Python slicing of
// `x[bounds[k]:bounds[k+1]]` (as the reference does): an empty or reversed range gives 0.
//
// Plan (host): every non-empty segment gets a number of blocks roughly proportional to its
// length (at least one, at most one per kMinChunk elements, about kBlocksPerSm * SMs in all),
// each block a contiguous chunk of its segment. The table of chunks (2 int64 per block) and
// the first block of each segment (nseg + 1 int64) go to the device in one non-blocking copy
// from pinned memory. Pass 1: block b sums the squares of its chunk into partials[b]. Pass 2:
// block k adds partials[first[k] : first[k+1]] in a fixed order into out[k].

constexpr int64_t kMinChunk = 8192;   // elements: a block gets at least this much of a segment

template <typename T>
struct SumsqF {
  using acc = acc_t<T>;
  static constexpr int kV = kVec<T>;
  const T* x;
  const T* w;   // nullptr: no weight

  template <int N>
  __host__ __device__ __forceinline__ void apply(int64_t i, acc& s0, acc& /*unused*/) const {
    T xr[N];
    load<N>(xr, x + i);
    if (w != nullptr) {
      T wr[N];
      load<N>(wr, w + i);
      VSAM_UNROLL
      for (int j = 0; j < N; ++j) {
        const acc v = dev_abs(static_cast<acc>(wr[j])) * static_cast<acc>(xr[j]);
        s0 += v * v;
      }
    } else {
      VSAM_UNROLL
      for (int j = 0; j < N; ++j) {
        const acc v = static_cast<acc>(xr[j]);
        s0 += v * v;
      }
    }
  }
};

// Block b: the chunk [chunks[2b], chunks[2b+1]) -> partials[b].
template <typename T>
__global__ void __launch_bounds__(kThreads) segment_sumsq_kernel(SumsqF<T> f, const int64_t* chunks, bool vec_ok,
                                                                 acc_t<T>* partials) {
  using A = acc_t<T>;
  const int64_t s = chunks[2 * static_cast<int64_t>(blockIdx.x)];
  const int64_t e = chunks[2 * static_cast<int64_t>(blockIdx.x) + 1];
  A s0 = A(0), s1 = A(0);
  for_range<SumsqF<T>::kV>(s, e, threadIdx.x, blockDim.x, vec_ok, f, s0, s1);
  block_sum2(s0, s1);
  if (threadIdx.x == 0) partials[blockIdx.x] = s0;
}

// Block k: out[k] = sum partials[first[k] : first[k+1]] (0 for a segment without blocks).
template <typename A>
__global__ void __launch_bounds__(kThreads) segment_finalize_kernel(const A* partials, const int64_t* first,
                                                                    float* out) {
  const int64_t a = first[blockIdx.x], b = first[blockIdx.x + 1];
  A s = A(0), unused = A(0);
  for (int64_t k = a + threadIdx.x; k < b; k += blockDim.x) s += partials[k];
  block_sum2(s, unused);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<float>(s);
}

// The host plan for n > 0: `chunks` gets (start, end) per block, `first` the block range of
// segment k, [first[k], first[k+1]) (nseg + 1 entries). A non-empty segment of len elements
// gets max(1, min(ceil(len / kMinChunk), ceil(len / n * target))) blocks, each a contiguous
// chunk; interior chunk boundaries are multiples of 16 elements, so a chunk's vectors are
// aligned when the buffer is. Empty (or reversed) segments get no block.
void plan_segments(c10::IntArrayRef bounds, int64_t n, int64_t target, std::vector<int64_t>& chunks,
                   std::vector<int64_t>& first) {
  const int64_t nseg = bounds.size() > 1 ? static_cast<int64_t>(bounds.size()) - 1 : 0;
  chunks.clear();
  chunks.reserve(2 * static_cast<size_t>(target + nseg));
  first.assign(nseg + 1, 0);
  for (int64_t k = 0; k < nseg; ++k) {
    first[k] = static_cast<int64_t>(chunks.size() / 2);
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
      chunks.push_back(start);
      chunks.push_back(cut);
      start = cut;
    }
    chunks.push_back(start);
    chunks.push_back(e);
  }
  first[nseg] = static_cast<int64_t>(chunks.size() / 2);
}

at::Tensor segment_sumsq_cuda(const at::Tensor& x, c10::IntArrayRef bounds, const std::optional<at::Tensor>& weight) {
  check_main(x, "x");
  if (present(weight)) check_like(*weight, "weight", x, "x");
  const int64_t n = x.numel();
  const int64_t nseg = bounds.size() > 1 ? static_cast<int64_t>(bounds.size()) - 1 : 0;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto float_opts = x.options().dtype(at::kFloat);
  if (nseg == 0 || n == 0) return at::zeros({nseg}, float_opts);

  // The plan: chunk boundaries per segment, then each segment's first block.
  const int device = x.get_device();
  std::vector<int64_t> chunks, first;
  plan_segments(bounds, n, static_cast<int64_t>(sm_count(device)) * kBlocksPerSm, chunks, first);
  const int64_t nblocks = static_cast<int64_t>(chunks.size() / 2);
  if (nblocks == 0) return at::zeros({nseg}, float_opts);   // every segment is empty
  TORCH_CHECK(nblocks <= INT32_MAX && nseg <= INT32_MAX, "vsam_ext: segment_sumsq: too many segments (", nseg, ")");

  // One pinned host table -> the device, without blocking the host. The caching host
  // allocator records the copy on the stream, so the pinned block is not reused before it ran.
  const int64_t table_len = 2 * nblocks + nseg + 1;
  at::Tensor host = at::empty({table_len}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(chunks.begin(), chunks.end(), h);
  std::copy(first.begin(), first.end(), h + 2 * nblocks);
  at::Tensor table = at::empty({table_len}, x.options().dtype(at::kLong));
  table.copy_(host, /*non_blocking=*/true);
  const int64_t* d_chunks = table.data_ptr<int64_t>();
  const int64_t* d_first = d_chunks + 2 * nblocks;

  at::Tensor out = at::empty({nseg}, float_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vsam_ext::segment_sumsq", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* w = present(weight) ? weight->data_ptr<T>() : nullptr;
    const bool vec_ok = aligned16(x.data_ptr()) && (w == nullptr || aligned16(w));
    at::Tensor partials = at::empty({nblocks}, x.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat));
    segment_sumsq_kernel<T><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
        SumsqF<T>{x.data_ptr<T>(), w}, d_chunks, vec_ok, partials.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    segment_finalize_kernel<A><<<static_cast<unsigned>(nseg), kThreads, 0, stream>>>(
        partials.data_ptr<A>(), d_first, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
//                       p <- T(w + ((s * g) * w) * w)  (ASAM, adaptive)
//                       with w = acc(p), s = *scale read on the device.
//   restore_psf_stats:  p <- backup;  with psf: PSF = T(acc(g_sam) - acc(psf)) -> psf and the
//                       pair (sum g^2 over the old psf, sum PSF^2 over the new psf) on
//                       [stat_start, n); without psf: a plain device copy, no statistics.
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
  const float* scale_ptr;
  bool adaptive;
  acc scale;            // *scale_ptr, read once per thread by load_device_scalars

  __host__ __device__ __forceinline__ void load_device_scalars() { scale = static_cast<acc>(*scale_ptr); }

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
      if (adaptive) step = step * w * w;
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
                  bool adaptive, const std::optional<at::Tensor>& grad_keep) {
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
                  scale.data_ptr<float>(), adaptive, acc_t<T>(0)};
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
//                statistics (sum g_old^2, sum PSF^2) over [stat_start, n) -> a 2-float tensor
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
  m.impl("perturb", &vsam_ext::gpu::perturb_cuda);
  m.impl("restore_psf_stats", &vsam_ext::gpu::restore_psf_stats_cuda);
  m.impl("reuse", &vsam_ext::gpu::reuse_cuda);
  m.impl("sgd_step", &vsam_ext::gpu::sgd_step_cuda);
  m.impl("adamw_step", &vsam_ext::gpu::adamw_step_cuda);
}
