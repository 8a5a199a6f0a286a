// Shared pieces of the CUDA kernels of vsam_ext._C (cuda_ops.cu), in the style of NVIDIA apex's
// multi_tensor_apply: a small launcher plus one functor per op.
//
// * Every op is an element-wise pass over 1-D contiguous buffers of one dtype T. A functor's
//   `apply<N>(i, s0, s1)` handles the N elements [i, i + N): it loads them from global memory
//   into register arrays (one 16-byte load per buffer when N == kVec<T>), does the maths in
//   acc_t (fp32; fp64 for double buffers) and stores the results (16-byte stores).
// * `for_range` walks [s, e) with a grid- (or block-) stride loop: vector chunks of kVec<T>
//   elements where every pointer is 16-byte aligned, and a guarded scalar path for the head and
//   tail that do not fill a vector and for buffers that are not aligned (a view with a storage
//   offset): then every element goes through the scalar path.
// * Indices are int64_t throughout: buffers of more than 2^31 elements are fine.
// * Reductions are deterministic: each block writes its partial sums (in acc_t) to a scratch
//   tensor and a second, one-block-per-result kernel adds the partials in a fixed order. No
//   float atomics; the result depends only on the launch configuration, which depends only on
//   the size and the device.
// * Device scalars (SAM's rho / (norm + eps)) are read by pointer inside the kernel: no host
//   read, no synchronisation anywhere.
// * The element maths (load/store, for_range, the functors' apply) is __host__ __device__: it
//   has no device-only part, so it can also be run on the CPU (an emulated launch) to check it
//   on a machine without a GPU. Only the kernels and block_sum2 are device-only.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <type_traits>

// `#pragma unroll` in the device pass only: the host compiler would warn about it in the
// __host__ __device__ functions.
#ifdef __CUDA_ARCH__
#define VSAM_UNROLL _Pragma("unroll")
#define VSAM_NO_UNROLL _Pragma("unroll 1")
#else
#define VSAM_UNROLL
#define VSAM_NO_UNROLL
#endif

namespace vsam_ext {
namespace gpu {

constexpr int kThreads = 256;      // threads per block of every kernel (a multiple of 32)
constexpr int kBlocksPerSm = 8;    // grid-stride kernels: up to 8 blocks of 256 threads per SM
constexpr int kVecBytes = 16;      // one vector load/store: 4 floats, 2 doubles, 8 halves

// The type the maths is done in: fp32 for float, half and bfloat16; fp64 for double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename T> constexpr int kVec = kVecBytes / static_cast<int>(sizeof(T));

// N elements of T, aligned to their full size: a 16-byte load/store when N == kVec<T>.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

// Global memory <-> register array. For N > 1 the address must be aligned to sizeof(T) * N
// (for_range guarantees it); the registers stay a plain array, separate from the Pack type.
template <int N, typename T>
__host__ __device__ __forceinline__ void load(T (&r)[N], const T* src) {
  if constexpr (N == 1) {
    r[0] = *src;
  } else {
    const Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(src);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) r[j] = p.v[j];
  }
}

template <int N, typename T>
__host__ __device__ __forceinline__ void store(T* dst, const T (&r)[N]) {
  if constexpr (N == 1) {
    *dst = r[0];
  } else {
    Pack<T, N> p;
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) p.v[j] = r[j];
    *reinterpret_cast<Pack<T, N>*>(dst) = p;
  }
}

template <typename A> __host__ __device__ __forceinline__ A dev_sqrt(A x);
template <> __host__ __device__ __forceinline__ float dev_sqrt<float>(float x) { return sqrtf(x); }
template <> __host__ __device__ __forceinline__ double dev_sqrt<double>(double x) { return sqrt(x); }

// Calls f.apply<W>(i, acc...) for the elements of [s, e) (acc: the thread's accumulators, passed
// through: (s0, s1) for the element-wise functors, one array for the segment functors): thread
// `tid` of `nthreads` takes every nthreads-th chunk. With vec_ok (all of the functor's pointers
// 16-byte aligned) the chunks in [round_up(s, V), round_down(e, V)) are whole vectors (W = V);
// the head before and the tail after are single elements (W = 1). Without vec_ok, every
// element is a W = 1 chunk.
template <int V, typename F, typename... A>
__host__ __device__ __forceinline__ void for_range(int64_t s, int64_t e, int64_t tid, int64_t nthreads,
                                                   bool vec_ok, const F& f, A&... acc) {
  if (V > 1 && vec_ok) {
    const int64_t up = (s + V - 1) / V * V;
    const int64_t a = up < e ? up : e;                              // first index of a vector
    const int64_t z = a + (e - a) / V * V;                          // end of the last vector
    VSAM_NO_UNROLL
    for (int64_t i = s + tid; i < a; i += nthreads) f.template apply<1>(i, acc...);
    for (int64_t i = a + tid * V; i < z; i += nthreads * V) f.template apply<V>(i, acc...);
    VSAM_NO_UNROLL
    for (int64_t i = z + tid; i < e; i += nthreads) f.template apply<1>(i, acc...);
  } else {
    for (int64_t i = s + tid; i < e; i += nthreads) f.template apply<1>(i, acc...);
  }
}

// Sum over the block of each thread's K values v, in a fixed order (warp shuffles, then one warp
// over the warps' sums): the same inputs give the same bits. The result is in thread 0.
// Every thread of the block must call it. blockDim.x must be a multiple of 32 (<= 1024).
template <int K, typename A>
__device__ __forceinline__ void block_sum(A (&v)[K]) {
  __shared__ A sv[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  VSAM_UNROLL
  for (int o = 16; o > 0; o >>= 1) {
    VSAM_UNROLL
    for (int k = 0; k < K; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  }
  if (lane == 0) {
    VSAM_UNROLL
    for (int k = 0; k < K; ++k) sv[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
    VSAM_UNROLL
    for (int k = 0; k < K; ++k) v[k] = lane < nwarps ? sv[k][lane] : A(0);
    VSAM_UNROLL
    for (int o = 16; o > 0; o >>= 1) {
      VSAM_UNROLL
      for (int k = 0; k < K; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    }
  }
  __syncthreads();   // sv may be reused by a following call
}

// block_sum of the pair (a, b).
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  A v[2] = {a, b};
  block_sum<2>(v);
  a = v[0];
  b = v[1];
}

template <typename A> __host__ __device__ __forceinline__ A dev_abs(A x);
template <> __host__ __device__ __forceinline__ float dev_abs<float>(float x) { return fabsf(x); }
template <> __host__ __device__ __forceinline__ double dev_abs<double>(double x) { return fabs(x); }

// vSAM's PSF update for the N elements at i: psf holds the first gradient g; it becomes
// PSF = g_sam - g (rounded to T), and for the elements at or after stat_start the sums
// s0 += g^2 (the old, stored values) and s1 += PSF^2 (the new, stored values) grow.
template <int N, typename T, typename A>
__host__ __device__ __forceinline__ void psf_and_stats(const T (&g_sam)[N], T* psf, int64_t i, int64_t stat_start,
                                                       A& s0, A& s1) {
  T q[N], r[N];
  load<N>(q, psf + i);
  VSAM_UNROLL
  for (int j = 0; j < N; ++j) {
    const A old = static_cast<A>(q[j]);
    r[j] = static_cast<T>(static_cast<A>(g_sam[j]) - old);
    if (i + j >= stat_start) {
      const A now = static_cast<A>(r[j]);
      s0 += old * old;
      s1 += now * now;
    }
  }
  store<N>(psf + i, r);
}

// The element-wise kernel: one grid-stride pass of functor F over [0, n). When F::kStats,
// each thread accumulates two sums (s0, s1) and block b writes them to partials[b] and
// partials[gridDim.x + b]; finalize_pair_kernel then adds the partials.
template <typename F>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(F f, int64_t n, bool vec_ok,
                                                               typename F::acc* partials) {
  using A = typename F::acc;
  f.load_device_scalars();
  A s0 = A(0), s1 = A(0);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for_range<F::kV>(0, n, tid, nthreads, vec_ok, f, s0, s1);
  if constexpr (F::kStats) {
    block_sum2(s0, s1);
    if (threadIdx.x == 0) {
      partials[blockIdx.x] = s0;
      partials[gridDim.x + blockIdx.x] = s1;
    }
  }
}

// out[0] = sum partials[0 : nblocks], out[1] = sum partials[nblocks : 2 nblocks], in A.
// One block; each thread adds a fixed strided subset in order, then block_sum2.
template <typename A>
__global__ void __launch_bounds__(kThreads) finalize_pair_kernel(const A* partials, int64_t nblocks,
                                                                 A* out) {
  A a = A(0), b = A(0);
  for (int64_t k = threadIdx.x; k < nblocks; k += blockDim.x) {
    a += partials[k];
    b += partials[nblocks + k];
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = b;
  }
}

// ---- host side --------------------------------------------------------------------------

inline int sm_count(int device) {
  static std::atomic<int> cache[64];   // zero-initialised (static storage)
  if (device >= 0 && device < 64) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  sms = std::max(sms, 1);
  if (device >= 0 && device < 64) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// Blocks for a grid-stride pass over n elements: enough to cover n with one vector per
// thread, at most kBlocksPerSm per SM (the loop takes the rest), at least 1.
template <typename T>
inline int grid_for(int64_t n, int sms) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kVec<T>;
  const int64_t want = (n + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSm;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0;
}

// The buffer checks shared by every op: `t` (named `name`) is a defined, contiguous CUDA tensor
// on `ref`'s device, with `ref`'s dtype and number of elements.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.defined(), "vsam_ext: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "vsam_ext: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "vsam_ext: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "vsam_ext: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "vsam_ext: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == ref.numel(), "vsam_ext: ", name, " has ", t.numel(), " elements but ", ref_name,
              " has ", ref.numel());
}

// The first buffer of an op: a contiguous CUDA tensor of a supported dtype.
inline void check_main(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "vsam_ext: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "vsam_ext: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "vsam_ext: ", name, " must be contiguous");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "vsam_ext: ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

// The maths dtype of a buffer: float64 for double buffers, else float32.
inline at::ScalarType maths_dtype(const at::Tensor& ref) {
  return ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// `scale`: a 1-element (typically 0-d) tensor in `ref`'s maths dtype on `ref`'s device, read by
// the kernel.
inline void check_scale(const at::Tensor& scale, const at::Tensor& ref) {
  TORCH_CHECK(scale.defined(), "vsam_ext: scale is undefined");
  TORCH_CHECK(scale.is_cuda() && scale.device() == ref.device(), "vsam_ext: scale must be on param's device ",
              ref.device(), " (a device tensor, never read on the host), got one on ", scale.device());
  TORCH_CHECK(scale.scalar_type() == maths_dtype(ref), "vsam_ext: perturb: scale must be ", maths_dtype(ref),
              " (the maths dtype of a ", ref.scalar_type(), " buffer), got ", scale.scalar_type());
  TORCH_CHECK(scale.numel() == 1, "vsam_ext: scale must have exactly one element (0-d), got ", scale.numel());
}

// An index as Python's slicing reads it (the reference slices `x[a:b]`, `psf[stat_start:]`):
// negative counts from the end, and the result is clamped to [0, n].
inline int64_t slice_index(int64_t k, int64_t n) {
  if (k < 0) k += n;
  return k < 0 ? 0 : (k > n ? n : k);
}

// The element pointer of an optional buffer (nullptr when absent).
template <typename T>
inline T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Launches elementwise_kernel<F> over n elements on the current stream. When F::kStats it
// returns the pair of sums in F::acc (a new tensor of 2 elements), else an undefined tensor.
// vec_ok: every pointer of the functor is 16-byte aligned. The caller holds a CUDAGuard.
template <typename T, typename F>
at::Tensor launch_elementwise(const F& f, int64_t n, bool vec_ok, const at::Tensor& like) {
  using A = typename F::acc;
  const auto acc_opts = like.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  if (n == 0) return F::kStats ? at::zeros({2}, acc_opts) : at::Tensor();
  const int device = like.get_device();
  const int grid = grid_for<T>(n, sm_count(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if constexpr (F::kStats) {
    at::Tensor partials = at::empty({2 * static_cast<int64_t>(grid)}, acc_opts);
    at::Tensor out = at::empty({2}, acc_opts);
    elementwise_kernel<F><<<grid, kThreads, 0, stream>>>(f, n, vec_ok, partials.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_pair_kernel<A><<<1, kThreads, 0, stream>>>(partials.data_ptr<A>(), grid, out.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  } else {
    elementwise_kernel<F><<<grid, kThreads, 0, stream>>>(f, n, vec_ok, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return at::Tensor();
  }
}

}  // namespace gpu
}  // namespace vsam_ext
