// Shared pieces of the CUDA kernels of vsam_ext._C (cuda_ops.cu), in the style of NVIDIA apex's
// multi_tensor_apply: one launcher over lists of tensors plus one functor per op. A flat op is
// the same launcher over a list of one buffer (or over its segments), so every op's maths has
// one implementation, and a flat op and its *_list form give the same bits.
//
// * Every op is an element-wise pass over 1-D contiguous buffers of one dtype T. A functor's
//   `apply<N>(i, sums)` handles the N elements [i, i + N) of the buffers it is bound to: it
//   loads them from global memory into register arrays (one 16-byte load per buffer when
//   N == kVec<T>), does the maths in acc_t (fp32; fp64 for double buffers), stores the results
//   (16-byte stores) and adds to the thread's sums (`sums`: an array of F::kSums accumulators).
// * The work is a list of spans: elements [begin, end) of the buffers of one list index (one
//   tensor of each of the op's lists; a flat op's buffer, or one segment of it). Each span is
//   cut into fixed chunks: chunk c is the elements [c * C, (c + 1) * C) (C = kChunk<T>: 16 KiB
//   of each buffer, a whole number of vectors), so the chunks depend on the sizes and the dtype
//   only, never on the device. One block per chunk.
// * A launch (apex's "kernel-argument struct fill"): up to Table<P>::kMax spans go into a
//   struct passed by value as the kernel's argument (no host-to-device copy, no table in
//   global memory): per span its buffers' addresses (the functor's Ptrs), begin, end, the first
//   statistics element, whether every address is 16-byte aligned, and its first block. A block
//   finds its span by a binary search over the first blocks, binds the functor to the span's
//   addresses and runs its chunk. A list of more spans than fit takes one launch per fill; the
//   segment ops instead take one launch with the same fields in device memory (GlobalTable, one
//   non-blocking copy), since their results need every span and a launch of kMax segments is
//   only a wave or two of blocks.
// * `for_range` walks a chunk with a block-stride loop: vectors of kVec<T> elements where the
//   span's addresses are 16-byte aligned, and a guarded scalar path for the head and tail of a
//   span that do not fill a vector and for spans whose addresses are not aligned (a view with a
//   storage offset): then every element of the span goes through the scalar path.
// * Indices are int64_t throughout: buffers of more than 2^31 elements are fine.
// * Reductions are deterministic: each block writes its chunk's sums (in acc_t) to a partials
//   tensor, at the chunk's place in the order of all chunks of all launches; a second kernel
//   adds each result's partials in a fixed order (per segment for the segment ops: one block
//   each; the statistics pair over all chunks). No float atomics; the bits depend on the sizes
//   and the dtype only.
// * Device scalars (SAM's rho / (norm + eps), segment_axpby's alpha and beta) are read by
//   pointer inside the kernel: no host read, no synchronisation anywhere.
// * The element maths (load/store, for_range, the functors' bind and apply) is
//   __host__ __device__: it has no device-only part, so it can also be run on the CPU (an
//   emulated launch) to check it on a machine without a GPU. Only the kernels and block_sum are
//   device-only.
// * Bytes in flight: a block's chunk is kChunkVecs (4) vectors per thread. The element-wise ops
//   have two to six buffers, so a thread has that many 16-byte loads in flight in each step of
//   for_range; the reductions that only read (segment_sumsq: one buffer) issue a thread's four
//   vectors of each buffer before any add (kRows, apply_rows), else a thread would wait out four
//   round trips to memory one after the other with 16 bytes in flight (the SASS of the plain
//   loop: one LDG.E.128, its adds, the branch back).
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
#include <mutex>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

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
constexpr int kVecBytes = 16;      // one vector load/store: 4 floats, 2 doubles, 8 halves
constexpr int kChunkVecs = 4;      // a chunk: 4 vectors per thread of a block

// The type the maths is done in: fp32 for float, half and bfloat16; fp64 for double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename T> constexpr int kVec = kVecBytes / static_cast<int>(sizeof(T));

// Elements per chunk (one block's share of a span): 4096 floats, 8192 halves, 2048 doubles.
constexpr int64_t chunk_elems(int vec) { return static_cast<int64_t>(kThreads) * vec * kChunkVecs; }
template <typename T> constexpr int64_t kChunk = chunk_elems(kVec<T>);

// N elements of T, aligned to their full size: a 16-byte load/store when N == kVec<T>.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

// Global memory <-> register array. For N > 1 the address must be aligned to sizeof(T) * N
// (for_range guarantees it); the registers stay a plain array, separate from the Pack type.
// On the device a Pack access is one 16-byte load/store (the float4 idiom); in the host pass
// (an emulated launch) the bytes are copied instead: reading T objects through a Pack lvalue
// breaks C++'s aliasing rules, and g++ -O3 then miscompiled an emulated bf16 segment_gram.
template <int N, typename T>
__host__ __device__ __forceinline__ void load(T (&r)[N], const T* src) {
  if constexpr (N == 1) {
    r[0] = *src;
  } else {
#ifdef __CUDA_ARCH__
    const Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(src);
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) r[j] = p.v[j];
#else
    std::memcpy(static_cast<void*>(r), static_cast<const void*>(src), sizeof(T) * N);
#endif
  }
}

template <int N, typename T>
__host__ __device__ __forceinline__ void store(T* dst, const T (&r)[N]) {
  if constexpr (N == 1) {
    *dst = r[0];
  } else {
#ifdef __CUDA_ARCH__
    Pack<T, N> p;
    VSAM_UNROLL
    for (int j = 0; j < N; ++j) p.v[j] = r[j];
    *reinterpret_cast<Pack<T, N>*>(dst) = p;
#else
    std::memcpy(static_cast<void*>(dst), static_cast<const void*>(r), sizeof(T) * N);
#endif
  }
}

template <typename A> __host__ __device__ __forceinline__ A dev_sqrt(A x);
template <> __host__ __device__ __forceinline__ float dev_sqrt<float>(float x) { return sqrtf(x); }
template <> __host__ __device__ __forceinline__ double dev_sqrt<double>(double x) { return sqrt(x); }

template <typename A> __host__ __device__ __forceinline__ A dev_abs(A x);
template <> __host__ __device__ __forceinline__ float dev_abs<float>(float x) { return fabsf(x); }
template <> __host__ __device__ __forceinline__ double dev_abs<double>(double x) { return fabs(x); }

// Rows per batch of a functor: F::kRows when it has one (a read-only functor with
// apply_rows<W, R>), else 1 (C++17 detection: older torch builds extensions with -std=c++17).
template <typename F, typename = void>
struct RowsOf {
  static constexpr int value = 1;
};
template <typename F>
struct RowsOf<F, std::void_t<decltype(F::kRows)>> {
  static constexpr int value = F::kRows;
};

// Calls f.apply<W>(i, sums) for the elements of [s, e): thread `tid` of `nthreads` takes every
// nthreads-th piece. With vec_ok (all of the functor's pointers 16-byte aligned) the pieces in
// [round_up(s, V), round_down(e, V)) are whole vectors (W = V); the head before and the tail
// after are single elements (W = 1). Without vec_ok, every element is a W = 1 piece.
//
// A functor with kRows = R > 1 (the reductions that only read: SumsqF, GramF) gets a thread's
// pieces R at a time, f.apply_rows<W, R>(i, stride, sums) for the pieces i, i + stride, ...,
// i + (R - 1) stride: it issues the R loads of each buffer before it adds anything, so a thread
// has R 16-byte loads per buffer in flight instead of one (the loop below is not unrolled by
// the compiler: one load, its adds, the branch back). The adds are the same, in the same
// order (piece by piece, element by element), as R calls of apply<W>, so the sums have the
// same bits; the pieces left over (fewer than R) go one by one.
template <int V, typename F, typename S>
__host__ __device__ __forceinline__ void for_range(int64_t s, int64_t e, int64_t tid, int64_t nthreads, bool vec_ok,
                                                   const F& f, S& sums) {
  constexpr int R = RowsOf<F>::value;
  if (V > 1 && vec_ok) {
    const int64_t up = (s + V - 1) / V * V;
    const int64_t a = up < e ? up : e;                              // first index of a vector
    const int64_t z = a + (e - a) / V * V;                          // end of the last vector
    VSAM_NO_UNROLL
    for (int64_t i = s + tid; i < a; i += nthreads) f.template apply<1>(i, sums);
    const int64_t stride = nthreads * V;
    int64_t i = a + tid * V;
    if constexpr (R > 1) {
      VSAM_NO_UNROLL
      for (; i + (R - 1) * stride < z; i += R * stride) f.template apply_rows<V, R>(i, stride, sums);
    }
    for (; i < z; i += stride) f.template apply<V>(i, sums);
    VSAM_NO_UNROLL
    for (int64_t i = z + tid; i < e; i += nthreads) f.template apply<1>(i, sums);
  } else {
    int64_t i = s + tid;
    if constexpr (R > 1) {
      VSAM_NO_UNROLL
      for (; i + (R - 1) * nthreads < e; i += R * nthreads) f.template apply_rows<1, R>(i, nthreads, sums);
    }
    for (; i < e; i += nthreads) f.template apply<1>(i, sums);
  }
}

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

// ===============================================================================================
// multi-tensor apply
// ===============================================================================================
// A functor F has
//   acc                 the maths type (acc_t<T>)
//   kV                  the vector width (kVec<T>)
//   kSums               how many sums each element adds to (0: none)
//   kPerSegment         the sums are per span (the segment ops: (nspans,) or (nspans, kSums)),
//                       else over all spans (the statistics pair: (kSums,))
//   Ptrs                a struct of the buffer pointers of one span, pointers only (nullptr:
//                       an absent buffer), in a member `p`
//   bind(q, stat_from, seg)   sets p = q and what else the span changes (the first statistics
//                       element; the segment's device scalars)
//   apply<N>(i, sums)   the N elements at i of the bound buffers
//   kRows, apply_rows<N, R>(i, stride, sums)   optional (read-only reductions): R pieces at once
//                       (see for_range)

// The kernel argument of one launch: up to kMax spans, about 3.5 KiB, so that it fits the
// classic 4 KiB limit on kernel arguments together with the functor (static_assert in launch).
constexpr size_t kTableBytes = 3584;

template <typename P>
struct Table {
  static_assert(sizeof(P) % sizeof(void*) == 0, "Ptrs must hold pointers only");
  static constexpr int kMax = static_cast<int>((kTableBytes - 64) / (sizeof(P) + 3 * sizeof(int64_t) +
                                                                    sizeof(int32_t) + sizeof(uint8_t)));
  P ptrs[kMax];               // the span's buffers
  int64_t begin[kMax];        // its elements [begin, end) of those buffers
  int64_t end[kMax];
  int64_t stat_from[kMax];    // the elements from stat_from on count towards the statistics
  int64_t seg0;               // the global index of span 0 of this launch (the segment ops)
  int64_t chunk0;             // the global index of this launch's first chunk (in partials)
  int32_t block0[kMax + 1];   // span k: this launch's blocks [block0[k], block0[k + 1])
  int32_t count;              // spans in this launch
  uint8_t vec_ok[kMax];       // every pointer of ptrs[k] is 16-byte aligned
};

// The same spans in global memory: one launch over any number of spans, for the segment ops
// (per-segment functors) when their spans do not fit one Table (flat ops of more than kMax
// segments, lists of more than kMax tensors; kMax is 78 for segment_sumsq). The arrays are one
// device copy of a pinned host buffer (launch_global). A block finds its span by the same
// binary search, in global memory: log2(spans) loads, the upper levels shared by every block
// and cached. Member names as in Table, so that locate and apply_kernel serve both.
template <typename P>
struct GlobalTable {
  const P* ptrs;
  const int64_t* begin;
  const int64_t* end;
  const int64_t* stat_from;
  int64_t seg0;               // 0: one launch
  int64_t chunk0;             // 0
  const int32_t* block0;      // count + 1 entries
  int32_t count;
  const uint8_t* vec_ok;
};

// Where block b of a launch works: span k of the table, its j-th chunk, the elements [s, e).
struct Where {
  int k;
  int64_t j, s, e;
};

// The last span k with block0[k] <= b (a binary search, the same in every thread of a block),
// and the chunk: chunk c of the buffers is [c * C, (c + 1) * C), a span's j-th chunk is chunk
// begin / C + j, clipped to the span.
template <int64_t C, typename Tab>
__host__ __device__ __forceinline__ Where locate(const Tab& tab, int32_t b) {
  int lo = 0, hi = tab.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.block0[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t j = b - tab.block0[lo];
  const int64_t begin = tab.begin[lo], end = tab.end[lo];
  const int64_t c = (begin / C + j) * C;
  return Where{lo, j, begin > c ? begin : c, end < c + C ? end : c + C};
}

// Block b of a launch: the chunk of its span, with the functor bound to the span's buffers. The
// chunk's sums go to partials[q * total + chunk0 + b]. For the segment ops, a span's first block
// also writes the span's chunk range (first global chunk, count) to ranges[2 * seg] and
// ranges[2 * seg + 1] (seg = seg0 + k). Tab: Table<Ptrs> (a kernel argument) or
// GlobalTable<Ptrs>; a block does the same work, and writes the same sums to the same places,
// with either.
template <typename F, typename Tab>
__global__ void __launch_bounds__(kThreads) apply_kernel(F f, const Tab tab, typename F::acc* partials, int64_t total,
                                                         int64_t* ranges) {
  using A = typename F::acc;
  constexpr int K = F::kSums > 0 ? F::kSums : 1;
  const int32_t b = static_cast<int32_t>(blockIdx.x);
  const Where w = locate<chunk_elems(F::kV)>(tab, b);
  f.bind(tab.ptrs[w.k], tab.stat_from[w.k], tab.seg0 + w.k);
  A sums[K];
  VSAM_UNROLL
  for (int q = 0; q < K; ++q) sums[q] = A(0);
  for_range<F::kV>(w.s, w.e, threadIdx.x, blockDim.x, tab.vec_ok[w.k] != 0, f, sums);
  if constexpr (F::kSums > 0) {
    block_sum<K>(sums);
    if (threadIdx.x == 0) {
      const int64_t g = tab.chunk0 + b;
      VSAM_UNROLL
      for (int q = 0; q < K; ++q) partials[q * total + g] = sums[q];
      if constexpr (F::kPerSegment) {
        if (w.j == 0) {
          const int64_t seg = tab.seg0 + w.k;
          ranges[2 * seg] = tab.chunk0 + tab.block0[w.k];
          ranges[2 * seg + 1] = tab.block0[w.k + 1] - tab.block0[w.k];
        }
      }
    }
  }
}

// Block r: out[r * K + q] = the sum of partials[q * total + first ... first + count), in a fixed
// order (each thread a fixed strided subset in order, then block_sum), with (first, count) =
// ranges[2 r], ranges[2 r + 1], or (0, total) when ranges is nullptr (one result over all).
// A thread loads kFinalRows of its partials before it adds them, in the same order as one by
// one: a 64 M-element buffer has 16 K chunks, 64 per thread of the one block of a one-segment
// sum, and a load-add loop would wait out 64 round trips to L2 one after the other.
constexpr int kFinalRows = 8;

// Thread `tid` of `nthreads`: s[q] += partials[q * total + first + i] for i = tid, tid +
// nthreads, ... < count, in that order (host and device: an emulated launch can check it).
template <typename A, int K>
__host__ __device__ __forceinline__ void finalize_thread(const A* partials, int64_t total, int64_t first,
                                                         int64_t count, int64_t tid, int64_t nthreads, A (&s)[K]) {
  int64_t i = tid;
  VSAM_NO_UNROLL
  for (; i + (kFinalRows - 1) * nthreads < count; i += kFinalRows * nthreads) {
    A v[kFinalRows][K];
    VSAM_UNROLL
    for (int r = 0; r < kFinalRows; ++r) {
      VSAM_UNROLL
      for (int q = 0; q < K; ++q) v[r][q] = partials[q * total + first + i + r * nthreads];
    }
    VSAM_UNROLL
    for (int r = 0; r < kFinalRows; ++r) {
      VSAM_UNROLL
      for (int q = 0; q < K; ++q) s[q] += v[r][q];
    }
  }
  for (; i < count; i += nthreads) {
    VSAM_UNROLL
    for (int q = 0; q < K; ++q) s[q] += partials[q * total + first + i];
  }
}

template <typename A, int K>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const A* partials, int64_t total, const int64_t* ranges,
                                                            A* out) {
  const int64_t first = ranges != nullptr ? ranges[2 * static_cast<int64_t>(blockIdx.x)] : 0;
  const int64_t count = ranges != nullptr ? ranges[2 * static_cast<int64_t>(blockIdx.x) + 1] : total;
  A s[K];
  VSAM_UNROLL
  for (int q = 0; q < K; ++q) s[q] = A(0);
  finalize_thread<A, K>(partials, total, first, count, threadIdx.x, blockDim.x, s);
  block_sum<K>(s);
  if (threadIdx.x == 0) {
    VSAM_UNROLL
    for (int q = 0; q < K; ++q) out[static_cast<int64_t>(blockIdx.x) * K + q] = s[q];
  }
}

// ---- host side --------------------------------------------------------------------------

// One span of the work: elements [begin, end) of the buffers of list index t; the elements from
// stat_from on count towards the statistics. end <= begin: an empty span.
struct Span {
  int64_t t, begin, end, stat_from;
};

// Every pointer of a Ptrs struct 16-byte aligned (nullptr is).
template <typename P>
inline bool all_aligned(const P& p) {
  std::uintptr_t u[sizeof(P) / sizeof(void*)];
  std::memcpy(u, &p, sizeof(P));
  std::uintptr_t any = 0;
  for (const std::uintptr_t x : u) any |= x;
  return any % kVecBytes == 0;
}

inline at::ScalarType acc_dtype(bool fp64) { return fp64 ? at::kDouble : at::kFloat; }

// Blocks of a span: one per chunk it touches; an empty span gets none, but one (that sums to 0)
// for a per-segment functor, whose every span is a result.
template <typename F>
inline int64_t blocks_of(const Span& sp) {
  constexpr int64_t C = chunk_elems(F::kV);
  if (sp.end <= sp.begin) return F::kPerSegment ? 1 : 0;
  return (sp.end + C - 1) / C - sp.begin / C;
}

constexpr int64_t kMaxGrid = int64_t(1) << 30;   // blocks per launch (gridDim.x < 2^31)

// The kernel arguments of the launches over `spans` (span k's buffers: ptrs_of(spans[k].t)):
// fills a Table with up to kMax spans and calls run(table, blocks) for each, in order. Returns
// the number of chunks (blocks) of all launches.
template <typename F, typename PtrsOf, typename Run>
int64_t for_each_fill(const std::vector<Span>& spans, const PtrsOf& ptrs_of, const Run& run) {
  using Tab = Table<typename F::Ptrs>;
  Tab tab{};
  int64_t chunk0 = 0;         // global index of the next launch's first chunk
  int64_t blocks = 0;         // blocks of the table being filled
  const auto flush = [&] {
    if (tab.count == 0) return;
    tab.block0[tab.count] = static_cast<int32_t>(blocks);
    tab.chunk0 = chunk0;
    run(static_cast<const Tab&>(tab), blocks);
    chunk0 += blocks;
    blocks = 0;
    tab.count = 0;
  };
  for (size_t k = 0; k < spans.size(); ++k) {
    const Span& sp = spans[k];
    const int64_t nb = blocks_of<F>(sp);
    if (nb == 0) continue;
    if (tab.count == Tab::kMax || blocks + nb > kMaxGrid) flush();
    if (tab.count == 0) tab.seg0 = static_cast<int64_t>(k);   // no span of a per-segment functor is skipped
    const int i = tab.count++;
    tab.ptrs[i] = ptrs_of(sp.t);
    tab.begin[i] = sp.begin;
    tab.end[i] = sp.end > sp.begin ? sp.end : sp.begin;
    tab.stat_from[i] = sp.stat_from;
    tab.vec_ok[i] = all_aligned(tab.ptrs[i]) ? 1 : 0;
    tab.block0[i] = static_cast<int32_t>(blocks);
    blocks += nb;
  }
  flush();
  return chunk0;
}

// A GlobalTable's fields in one buffer of 8-byte words (n spans, pointer structs of `ptr_words`
// words each):
//   begin [n] | end [n] | stat_from [n] | ptrs [n * ptr_words] | block0 (int32) [n + 1] | vec_ok (bytes) [n]
struct GlobalLayout {
  int64_t n, o_end, o_stat, o_ptrs, o_block0, o_vec, words;
  GlobalLayout(int64_t spans, int64_t ptr_words)
      : n(spans), o_end(spans), o_stat(2 * spans), o_ptrs(3 * spans), o_block0(o_ptrs + spans * ptr_words),
        o_vec(o_block0 + (spans + 2) / 2), words(o_vec + (spans + 7) / 8) {}
};

template <typename P>
inline GlobalLayout global_layout(int64_t spans) {
  static_assert(sizeof(P) % sizeof(int64_t) == 0 && alignof(P) <= alignof(int64_t), "Ptrs must hold pointers only");
  return GlobalLayout(spans, static_cast<int64_t>(sizeof(P) / sizeof(int64_t)));
}

// Writes the fields of `spans` (span k's buffers: ptrs_of(spans[k].t)) into h (L.words words, on
// the host) as for_each_fill would put them in its Tables, blocks numbered from 0 over all
// spans. Returns the number of blocks.
template <typename F, typename PtrsOf>
int64_t fill_global(const std::vector<Span>& spans, const PtrsOf& ptrs_of, const GlobalLayout& L, int64_t* h) {
  using P = typename F::Ptrs;
  int32_t* h_block0 = reinterpret_cast<int32_t*>(h + L.o_block0);
  uint8_t* h_vec = reinterpret_cast<uint8_t*>(h + L.o_vec);
  int64_t blocks = 0;
  for (int64_t k = 0; k < L.n; ++k) {
    const Span& sp = spans[k];
    const P q = ptrs_of(sp.t);
    std::memcpy(h + L.o_ptrs + k * static_cast<int64_t>(sizeof(P) / sizeof(int64_t)), &q, sizeof(P));
    h[k] = sp.begin;
    h[L.o_end + k] = sp.end > sp.begin ? sp.end : sp.begin;
    h[L.o_stat + k] = sp.stat_from;
    h_vec[k] = all_aligned(q) ? 1 : 0;
    h_block0[k] = static_cast<int32_t>(blocks);
    blocks += blocks_of<F>(sp);
  }
  h_block0[L.n] = static_cast<int32_t>(blocks);
  return blocks;
}

// The GlobalTable over a copy of those words at d (device memory for a launch; the host buffer
// itself for an emulated one).
template <typename P>
inline GlobalTable<P> global_table(const int64_t* d, const GlobalLayout& L) {
  return GlobalTable<P>{reinterpret_cast<const P*>(d + L.o_ptrs), d, d + L.o_end, d + L.o_stat, 0, 0,
                        reinterpret_cast<const int32_t*>(d + L.o_block0), static_cast<int32_t>(L.n),
                        reinterpret_cast<const uint8_t*>(d + L.o_vec)};
}

// Under CUDA graph capture the copy of a pinned host buffer becomes a graph node that reads the
// buffer at every replay, so the buffer must outlive the graph: it is kept for the process's life
// (a few KB per captured launch; captures are rare). Outside capture nothing is kept.
inline void keep_if_captured(const at::Tensor& host, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status == cudaStreamCaptureStatusNone) return;
  static std::mutex mutex;
  static std::vector<at::Tensor>* kept = new std::vector<at::Tensor>();   // never freed: graphs may replay at exit
  const std::lock_guard<std::mutex> lock(mutex);
  kept->push_back(host);
}

// One launch over all of `spans` with a GlobalTable (a per-segment functor whose spans do not fit
// one Table): the words in one pinned host buffer, copied to the device on `stream` without
// blocking the host (the caching host allocator keeps the buffer until the copy has run; the
// device copy is stream-ordered like every tensor of the op). Blocks, chunks, partials and
// ranges as in the launches of for_each_fill.
template <typename F, typename PtrsOf>
void launch_global(const F& f, const std::vector<Span>& spans, const PtrsOf& ptrs_of, const at::TensorOptions& opts,
                   typename F::acc* d_partials, int64_t total, int64_t* d_ranges, cudaStream_t stream) {
  using P = typename F::Ptrs;
  const GlobalLayout L = global_layout<P>(static_cast<int64_t>(spans.size()));
  at::Tensor host = at::empty({L.words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  const int64_t blocks = fill_global<F>(spans, ptrs_of, L, host.data_ptr<int64_t>());
  TORCH_INTERNAL_ASSERT(blocks == total && blocks < kMaxGrid);
  at::Tensor dev = at::empty({L.words}, opts.dtype(at::kLong));
  dev.copy_(host, /*non_blocking=*/true);
  keep_if_captured(host, stream);
  const GlobalTable<P> tab = global_table<P>(dev.data_ptr<int64_t>(), L);
  apply_kernel<F, GlobalTable<P>><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(f, tab, d_partials, total,
                                                                                       d_ranges);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs functor f over the spans on the current stream of `opts`' device: span k's buffers are
// ptrs_of(spans[k].t). Returns the sums in F::acc: (nspans,) or (nspans, kSums) for a
// per-segment functor (every span is a segment, an empty one sums to 0), (kSums,) for the
// statistics (over the elements from each span's stat_from on), an undefined tensor when the
// functor has no sums. The caller holds a CUDAGuard for the device and has checked every
// argument.
template <typename F, typename PtrsOf>
at::Tensor launch(const F& f, const std::vector<Span>& spans, const PtrsOf& ptrs_of, const at::TensorOptions& opts,
                  const char* op) {
  using A = typename F::acc;
  constexpr int K = F::kSums;
  static_assert(sizeof(F) + sizeof(Table<typename F::Ptrs>) + 2 * sizeof(void*) + sizeof(int64_t) <= 4096,
                "the kernel arguments exceed 4 KiB");
  const auto acc_opts = opts.dtype(acc_dtype(std::is_same_v<A, double>));
  const int64_t nspans = static_cast<int64_t>(spans.size());

  int64_t total = 0;          // chunks (blocks) of all launches
  bool any = false;           // some span is not empty
  for (const Span& sp : spans) {
    const int64_t nb = blocks_of<F>(sp);
    TORCH_CHECK(nb < kMaxGrid, "vsam_ext: ", op, ": a buffer of ", sp.end - sp.begin, " elements is too large");
    total += nb;
    any = any || sp.end > sp.begin;
  }
  if (!any) {
    if constexpr (K == 0) {
      return at::Tensor();
    } else if constexpr (!F::kPerSegment) {
      return at::zeros({K}, acc_opts);
    } else {
      return K == 1 ? at::zeros({nspans}, acc_opts) : at::zeros({nspans, K}, acc_opts);
    }
  }

  at::Tensor partials, ranges, out;
  A* d_partials = nullptr;
  int64_t* d_ranges = nullptr;
  if constexpr (K > 0) {
    partials = at::empty({K * total}, acc_opts);
    d_partials = partials.data_ptr<A>();
    if (F::kPerSegment) {
      TORCH_CHECK(nspans <= INT32_MAX, "vsam_ext: ", op, ": too many segments (", nspans, ")");
      ranges = at::empty({2 * nspans}, opts.dtype(at::kLong));
      d_ranges = ranges.data_ptr<int64_t>();
    }
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(opts.device().index()).stream();
  using Tab = Table<typename F::Ptrs>;
  bool launched = false;
  if constexpr (F::kPerSegment) {
    // The segment ops: one launch, not one per kMax spans. A launch of kMax segments is a wave or
    // two of blocks (78 segments of 64 K floats: 1248 blocks), so with one launch per table the
    // waves' tails and the gaps between launches cost more than one copy of a table (1024
    // segments: 14 launches).
    if (nspans > Tab::kMax && total < kMaxGrid) {
      launch_global(f, spans, ptrs_of, opts, d_partials, total, d_ranges, stream);
      launched = true;
    }
  }
  if (!launched) {
    for_each_fill<F>(spans, ptrs_of, [&](const Tab& tab, int64_t blocks) {
      apply_kernel<F, Tab><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(f, tab, d_partials, total,
                                                                                 d_ranges);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  if constexpr (K > 0) {
    if (F::kPerSegment) {
      out = K == 1 ? at::empty({nspans}, acc_opts) : at::empty({nspans, K}, acc_opts);
      finalize_kernel<A, K><<<static_cast<unsigned>(nspans), kThreads, 0, stream>>>(d_partials, total, d_ranges,
                                                                                    out.data_ptr<A>());
    } else {
      out = at::empty({K}, acc_opts);
      finalize_kernel<A, K><<<1, kThreads, 0, stream>>>(d_partials, total, nullptr, out.data_ptr<A>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// ---- spans ------------------------------------------------------------------------------

// An index as Python's slicing reads it (the reference slices `x[a:b]`, `psf[stat_start:]`):
// negative counts from the end, and the result is clamped to [0, n].
inline int64_t slice_index(int64_t k, int64_t n) {
  if (k < 0) k += n;
  return k < 0 ? 0 : (k > n ? n : k);
}

// A flat buffer of n elements: one span, the statistics over [stat_start, n) as Python slices.
inline std::vector<Span> flat_spans(int64_t n, int64_t stat_start = INT64_MAX) {
  return {Span{0, 0, n, slice_index(stat_start, n)}};
}

// The segments of a flat buffer: segment k is x[bounds[k]:bounds[k+1]] as Python slices it (as
// the reference does): an empty or reversed range is an empty span.
inline std::vector<Span> segment_spans(c10::IntArrayRef bounds, int64_t n) {
  std::vector<Span> spans;
  for (size_t k = 0; k + 1 < bounds.size(); ++k)
    spans.push_back(Span{0, slice_index(bounds[k], n), slice_index(bounds[k + 1], n), 0});
  return spans;
}

// A list: tensor t is span t (all its elements); the statistics over the tensors of index >=
// stat_first (every tensor when negative, none from the list's length on).
inline std::vector<Span> list_spans(at::TensorList ts, int64_t stat_first = INT64_MAX) {
  std::vector<Span> spans;
  spans.reserve(ts.size());
  for (size_t t = 0; t < ts.size(); ++t) {
    const int64_t n = ts[t].numel();
    spans.push_back(Span{static_cast<int64_t>(t), 0, n, static_cast<int64_t>(t) >= stat_first ? 0 : n});
  }
  return spans;
}

// ---- argument checks --------------------------------------------------------------------

using OptList = std::optional<at::TensorList>;

inline bool supported_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16;
}

// The buffer checks shared by every flat op: `t` (named `name`) is a defined, contiguous CUDA
// tensor on `ref`'s device, with `ref`'s dtype and number of elements.
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

// The first buffer of a flat op: a contiguous CUDA tensor of a supported dtype.
inline void check_main(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "vsam_ext: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "vsam_ext: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "vsam_ext: ", name, " must be contiguous");
  TORCH_CHECK(supported_dtype(t.scalar_type()), "vsam_ext: ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// The maths dtype of a buffer: float64 for double buffers, else float32.
inline at::ScalarType maths_dtype(const at::Tensor& ref) {
  return ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// `scale` of the flat perturb: a 1-element (typically 0-d) tensor in `ref`'s maths dtype on
// `ref`'s device, read by the kernel.
inline void check_scale(const at::Tensor& scale, const at::Tensor& ref) {
  TORCH_CHECK(scale.defined(), "vsam_ext: scale is undefined");
  TORCH_CHECK(scale.is_cuda() && scale.device() == ref.device(), "vsam_ext: scale must be on param's device ",
              ref.device(), " (a device tensor, never read on the host), got one on ", scale.device());
  TORCH_CHECK(scale.scalar_type() == maths_dtype(ref), "vsam_ext: perturb: scale must be ", maths_dtype(ref),
              " (the maths dtype of a ", ref.scalar_type(), " buffer), got ", scale.scalar_type());
  TORCH_CHECK(scale.numel() == 1, "vsam_ext: scale must have exactly one element (0-d), got ", scale.numel());
}

// The lists of a list op. The first list (`name`) sets the length, the device (that of its
// first tensor), the dtype (one for all lists) and each index's number of elements; every
// tensor is a defined, contiguous CUDA tensor of any shape. Every check runs before anything is
// written; the messages name the argument and the index.
class ListArgs {
 public:
  ListArgs(at::TensorList first, const char* name) : first_(first), name_(name) {
    for (size_t i = 0; i < first.size(); ++i) {
      check_tensor(first[i], name, i);
      TORCH_CHECK(supported_dtype(first[i].scalar_type()), "vsam_ext: ", name, "[", i,
                  "] must be float32, float64, float16 or bfloat16, got ", first[i].scalar_type());
    }
  }

  // Another list: as long as the first, each tensor like the first's tensor of the same index.
  void same(at::TensorList l, const char* name) const {
    TORCH_CHECK(l.size() == first_.size(), "vsam_ext: ", name, " has ", l.size(), " tensors but ", name_, " has ",
                first_.size());
    for (size_t i = 0; i < l.size(); ++i) {
      check_tensor(l[i], name, i);
      TORCH_CHECK(l[i].numel() == first_[i].numel(), "vsam_ext: ", name, "[", i, "] has ", l[i].numel(),
                  " elements but ", name_, "[", i, "] has ", first_[i].numel());
    }
  }
  void same(const OptList& l, const char* name) const {
    if (l.has_value()) same(*l, name);
  }

  // A tensor of coefficients (scale; alpha, beta): `count` values, contiguous, on the lists'
  // device (a device tensor, never read on the host), in their maths dtype (float32; float64
  // for float64 lists; either for empty lists).
  void coefficients(const at::Tensor& c, int64_t count, const char* name) const {
    TORCH_CHECK(c.defined(), "vsam_ext: ", name, " is undefined");
    TORCH_CHECK(c.is_cuda(), "vsam_ext: ", name, " must be a CUDA tensor (a device tensor, never read on the host), "
                "got one on ", c.device());
    if (empty()) {
      TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble, "vsam_ext: ", name,
                  " must be float32 or float64, got ", c.scalar_type());
    } else {
      TORCH_CHECK(c.device() == device(), "vsam_ext: ", name, " is on ", c.device(), " but ", name_, "[0] is on ",
                  device());
      TORCH_CHECK(c.scalar_type() == maths(), "vsam_ext: ", name, " must be ", maths(), " (the maths dtype of ",
                  dtype(), " tensors), got ", c.scalar_type());
    }
    TORCH_CHECK(c.is_contiguous(), "vsam_ext: ", name, " must be contiguous");
    TORCH_CHECK(c.numel() == count, "vsam_ext: ", name, " must hold ", count, " value(s)",
                count == 1 ? "" : " (one per tensor)", ", got ", c.numel());
  }

  bool empty() const { return first_.empty(); }
  int64_t size() const { return static_cast<int64_t>(first_.size()); }
  c10::Device device() const { return first_[0].device(); }
  at::ScalarType dtype() const { return first_[0].scalar_type(); }
  at::ScalarType maths() const { return dtype() == at::kDouble ? at::kDouble : at::kFloat; }
  at::TensorOptions options() const { return first_[0].options(); }

 private:
  void check_tensor(const at::Tensor& t, const char* name, size_t i) const {
    TORCH_CHECK(t.defined(), "vsam_ext: ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.is_cuda(), "vsam_ext: ", name, "[", i, "] must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == first_[0].device(), "vsam_ext: ", name, "[", i, "] is on ", t.device(), " but ", name_,
                "[0] is on ", first_[0].device());
    TORCH_CHECK(t.scalar_type() == first_[0].scalar_type(), "vsam_ext: ", name, "[", i, "] has dtype ",
                t.scalar_type(), " but ", name_, "[0] has dtype ", first_[0].scalar_type());
    TORCH_CHECK(t.is_contiguous(), "vsam_ext: ", name, "[", i, "] must be contiguous (any shape), got one of shape ",
                t.sizes(), " and strides ", t.strides());
  }

  at::TensorList first_;
  const char* name_;
};

// A flat op's optional buffer as an optional list of one (viewing the caller's tensor).
inline OptList one_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? OptList(at::TensorList(*t)) : OptList();
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The element pointer of tensor t of an optional list (nullptr when the list is absent).
template <typename T>
inline T* at_or_null(const OptList& l, int64_t t) {
  return l.has_value() ? (*l)[t].data_ptr<T>() : nullptr;
}

}  // namespace gpu
}  // namespace vsam_ext
