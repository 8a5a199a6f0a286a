// Emulated launches of the CUDA backend on the CPU: the parts of csrc/cuda_ops.cu and
// csrc/cuda_utils.cuh that are __host__ __device__ (the functors, for_range, locate,
// finalize_thread) and the launcher's host side (the Tables of for_each_fill, the words of a
// GlobalTable), run here with nvcc's host compiler and no GPU. Built and run by
// test_cuda_emulated.py (opt-in: about a minute of nvcc for torch's headers).
//
// What it checks (issue 15), each bit for bit:
//  1. for_range with the read-only reductions' batched loads (kRows, apply_rows) adds each
//     thread's elements in the order of the one-piece-at-a-time loop it replaced: every
//     thread's sums of SumsqF (with and without a weight) and GramF, fp32/fp64/fp16/bf16,
//     aligned (vectors) and not (scalars), spans with heads, tails, and fewer pieces than a
//     batch, are equal to a plain fold over the elements in the old order.
//  2. finalize_thread (8 loads, then their adds) adds each thread's partials in the old order.
//  3. A GlobalTable (one launch over any number of spans, the segment ops' path for more spans
//     than a kernel-argument Table holds) gives every block the same span, chunk, elements,
//     buffers, alignment flag, statistics start and result slot (partials index, segment range)
//     as the Tables of for_each_fill's launches.
//  4. Device scalars (vsam_ext/ops/scalars.py): ReuseF, SgdF and AdamWF with a `scalars` pointer
//     (the float64 values, read by bind) and other host values write the same bits, statistics
//     included, as the functors made from those values as host doubles, in every mode and dtype.
// Prints "emulated launch: ok (...)" and exits 0, or prints the first mismatches and exits 1.
#define VSAM_EXT_EMULATED_LAUNCH
#include "cuda_ops.cu"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace vg = vsam_ext::gpu;

namespace {

int failures = 0;

void fail(const char* what, long long a, long long b, long long c) {
  if (++failures <= 20) std::printf("MISMATCH %s (%lld, %lld, %lld)\n", what, a, b, c);
}

template <typename A>
bool same_bits(A x, A y) {
  return std::memcmp(&x, &y, sizeof(A)) == 0;
}

// The element order of one thread in the loop before issue 15: head scalars, then its vectors
// one by one (element by element within each), then tail scalars; or every element as a scalar.
std::vector<int64_t> old_order(int64_t s, int64_t e, int64_t tid, int64_t nthreads, bool vec_ok, int V) {
  std::vector<int64_t> idx;
  if (V > 1 && vec_ok) {
    const int64_t up = (s + V - 1) / V * V;
    const int64_t a = up < e ? up : e;
    const int64_t z = a + (e - a) / V * V;
    for (int64_t i = s + tid; i < a; i += nthreads) idx.push_back(i);
    for (int64_t i = a + tid * V; i < z; i += nthreads * V)
      for (int j = 0; j < V; ++j) idx.push_back(i + j);
    for (int64_t i = z + tid; i < e; i += nthreads) idx.push_back(i);
  } else {
    for (int64_t i = s + tid; i < e; i += nthreads) idx.push_back(i);
  }
  return idx;
}

template <typename T>
void check_for_range(std::mt19937_64& rng, const char* name) {
  using A = vg::acc_t<T>;
  constexpr int V = vg::kVec<T>;
  constexpr int64_t C = vg::kChunk<T>;
  const int64_t n = 3 * C + 123;
  // 16-byte aligned storage, as torch allocates it
  std::vector<T> xs(n + 16), ws(n + 16);
  std::normal_distribution<double> normal;
  for (auto& v : xs) v = static_cast<T>(normal(rng));
  for (auto& v : ws) v = static_cast<T>(normal(rng));
  T* x = reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(xs.data()) + 15) / 16 * 16);
  T* w = reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(ws.data()) + 15) / 16 * 16);
  const A eta = static_cast<A>(0.01);
  // spans: whole chunks, chunks with a head and a tail, short ones (fewer vectors than a batch)
  const int64_t spans[][2] = {{0, C}, {C, 2 * C}, {3, C}, {5, C - 7}, {0, 2 * C + 9}, {7, 7 + 4 * V * 256 - 3},
                              {0, 3 * V * 256}, {1, 2}, {0, 0}, {2 * C + 1, n}, {0, V * 256 * 4 + V}};
  const int64_t nthreads = vg::kThreads;
  for (const auto& sp : spans) {
    for (int vec_ok = 0; vec_ok < 2; ++vec_ok) {
      for (int weighted = 0; weighted < 2; ++weighted) {
        vg::SumsqF<T> f{{x, weighted ? w : nullptr}, eta};
        vg::GramF<T> g{};
        g.p = typename vg::GramF<T>::Ptrs{x, w};
        for (int64_t tid = 0; tid < nthreads; ++tid) {
          A got[1] = {A(0)};
          vg::for_range<V>(sp[0], sp[1], tid, nthreads, vec_ok != 0, f, got);
          A want = A(0);
          for (const int64_t i : old_order(sp[0], sp[1], tid, nthreads, vec_ok != 0, V)) {
            const A v = weighted ? (vg::dev_abs(static_cast<A>(w[i])) + eta) * static_cast<A>(x[i]) : static_cast<A>(x[i]);
            want += v * v;
          }
          if (!same_bits(got[0], want)) fail(name, sp[0], sp[1], tid);
          if (weighted) continue;
          A got3[3] = {A(0), A(0), A(0)};
          vg::for_range<V>(sp[0], sp[1], tid, nthreads, vec_ok != 0, g, got3);
          A want3[3] = {A(0), A(0), A(0)};
          for (const int64_t i : old_order(sp[0], sp[1], tid, nthreads, vec_ok != 0, V)) {
            const A u = static_cast<A>(x[i]), v = static_cast<A>(w[i]);
            want3[0] += u * u;
            want3[1] += u * v;
            want3[2] += v * v;
          }
          for (int q = 0; q < 3; ++q)
            if (!same_bits(got3[q], want3[q])) fail("gram", sp[0], sp[1], tid * 3 + q);
        }
      }
    }
  }
}

template <int K>
void check_finalize(std::mt19937_64& rng) {
  const int64_t total = 9000;
  std::vector<float> partials(K * total);
  std::normal_distribution<double> normal;
  for (auto& v : partials) v = static_cast<float>(normal(rng));
  const int64_t cases[][2] = {{0, total}, {0, 0}, {5, 1}, {100, 255}, {17, 2048}, {3, 2047}, {1, 2049}, {0, 4096}};
  for (const auto& c : cases) {
    for (int64_t tid = 0; tid < vg::kThreads; ++tid) {
      float got[K] = {};
      vg::finalize_thread<float, K>(partials.data(), total, c[0], c[1], tid, vg::kThreads, got);
      float want[K] = {};
      for (int64_t i = tid; i < c[1]; i += vg::kThreads)
        for (int q = 0; q < K; ++q) want[q] += partials[q * total + c[0] + i];
      for (int q = 0; q < K; ++q)
        if (!same_bits(got[q], want[q])) fail("finalize_thread", c[0], c[1], tid);
    }
  }
}

// for_each_fill's Tables against one GlobalTable over the same spans: every block locates the
// same work.
template <typename F>
void check_global_table(std::mt19937_64& rng, int64_t nspans) {
  using P = typename F::Ptrs;
  constexpr int64_t C = vg::chunk_elems(F::kV);
  std::vector<vg::Span> spans;
  std::uniform_int_distribution<int64_t> len(0, 3 * C), off(0, 40);
  int64_t at = 0;
  for (int64_t k = 0; k < nspans; ++k) {
    const int64_t begin = at + (k % 3 == 0 ? off(rng) : 0);
    const int64_t l = (k % 7 == 3) ? 0 : len(rng);
    const int64_t end = (k % 11 == 5) ? begin - 2 : begin + l;      // a reversed (empty) span too
    spans.push_back(vg::Span{k % 5, begin, end, begin + l / 2});
    at = begin + l;
  }
  // fake buffer addresses: list index t's buffers, some 16-byte aligned and some not
  const auto ptrs_of = [](int64_t t) {
    P q;
    std::uintptr_t u[sizeof(P) / sizeof(void*)];
    for (size_t i = 0; i < sizeof(P) / sizeof(void*); ++i) u[i] = 0x100000 * (t + 1) + 0x1000 * i + (t == 3 ? 4 : 0);
    std::memcpy(&q, u, sizeof(P));
    return q;
  };
  struct Launch {
    vg::Table<P> tab;
    int64_t blocks;
  };
  std::vector<Launch> launches;
  const int64_t total = vg::for_each_fill<F>(spans, ptrs_of, [&](const vg::Table<P>& tab, int64_t blocks) {
    launches.push_back(Launch{tab, blocks});
  });
  const vg::GlobalLayout L = vg::global_layout<P>(nspans);
  std::vector<int64_t> words(L.words);
  const int64_t blocks = vg::fill_global<F>(spans, ptrs_of, L, words.data());
  if (blocks != total) fail("global blocks", blocks, total, nspans);
  const vg::GlobalTable<P> gt = vg::global_table<P>(words.data(), L);
  for (const Launch& l : launches) {
    for (int64_t b = 0; b < l.blocks; ++b) {
      const vg::Where w1 = vg::locate<C>(l.tab, static_cast<int32_t>(b));
      const int64_t gb = l.tab.chunk0 + b;
      const vg::Where w2 = vg::locate<C>(gt, static_cast<int32_t>(gb));
      const int64_t k1 = l.tab.seg0 + w1.k;
      if (k1 != gt.seg0 + w2.k || w1.j != w2.j || w1.s != w2.s || w1.e != w2.e) fail("locate", nspans, gb, k1);
      if (std::memcmp(&l.tab.ptrs[w1.k], &gt.ptrs[w2.k], sizeof(P)) != 0) fail("ptrs", nspans, gb, k1);
      if (l.tab.vec_ok[w1.k] != gt.vec_ok[w2.k]) fail("vec_ok", nspans, gb, k1);
      if (l.tab.stat_from[w1.k] != gt.stat_from[w2.k]) fail("stat_from", nspans, gb, k1);
      // the result slots: partials[chunk0 + b], and a segment's range (first chunk, count)
      if (l.tab.chunk0 + l.tab.block0[w1.k] != gt.chunk0 + gt.block0[w2.k] ||
          l.tab.block0[w1.k + 1] - l.tab.block0[w1.k] != gt.block0[w2.k + 1] - gt.block0[w2.k])
        fail("ranges", nspans, gb, k1);
    }
  }
}

// Buffers of n elements of T from 16-byte aligned storage (as torch allocates), random values.
template <typename T>
struct Buf {
  std::vector<T> store;
  T* p;
  Buf(std::mt19937_64& rng, int64_t n, bool positive) : store(n + 16) {
    std::normal_distribution<double> normal;
    for (auto& v : store) v = static_cast<T>(positive ? std::fabs(normal(rng)) : normal(rng));
    p = reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(store.data()) + 15) / 16 * 16);
  }
  Buf(const Buf& o) : store(o.store), p(store.data() + (o.p - o.store.data())) {}
  bool same(const Buf& o, int64_t n) const { return std::memcmp(p, o.p, n * sizeof(T)) == 0; }
};

// f bound to q and run over [0, n) by every thread of a block, as a launch of one span: the
// block's sums (added over the threads in order).
template <typename F>
std::vector<typename F::acc> run_span(F f, const typename F::Ptrs& q, int64_t n, int64_t stat_from) {
  using A = typename F::acc;
  constexpr int K = F::kSums > 0 ? F::kSums : 1;
  f.bind(q, stat_from, 0);
  std::vector<A> out(K, A(0));
  for (int64_t tid = 0; tid < vg::kThreads; ++tid) {
    A s[K];
    for (int k = 0; k < K; ++k) s[k] = A(0);
    vg::for_range<F::kV>(0, n, tid, vg::kThreads, true, f, s);
    for (int k = 0; k < K; ++k) out[k] += s[k];
  }
  return out;
}

template <typename A>
bool same_sums(const std::vector<A>& x, const std::vector<A>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(A)) == 0;
}

// The values of the scalars tensors (vsam_ext.ops.scalars), not exact in fp32, and wrong host
// values for the functors that read them: the results must be those of the tensor's values.
constexpr double kCoeff = 0.37, kLr = 0.051, kWd = 0.013, kBeta1 = 0.9, kBeta2 = 0.999;
constexpr int64_t kStep = 7;
constexpr double kWrong = 5.5;

template <typename T, vg::Mode M>
void check_scalars_mode(std::mt19937_64& rng, const char* name) {
  constexpr bool kRestoring = M == vg::Mode::kRestore || M == vg::Mode::kRestorePsf;
  const int64_t n = 1003, stat_from = 5;
  const Buf<T> param(rng, n, false), grad(rng, n, false), psf(rng, n, false), backup(rng, n, false),
      mom(rng, n, false), m(rng, n, false), v(rng, n, true);
  // SGD: momentum with dampening and nesterov, weight decay, maximize; and plain
  for (int cfg = 0; cfg < 3; ++cfg) {
    const double wd = cfg == 0 ? 0.0 : 1e-2, momentum = cfg == 0 ? 0.0 : 0.9, damp = cfg == 2 ? 0.1 : 0.0;
    const bool nesterov = cfg == 1, maximize = cfg == 2, first = cfg == 1;
    const double sc[2] = {kCoeff, kLr};
    const auto host = vg::make_sgd<T, M>(kCoeff, maximize, kLr, wd, momentum, damp, nesterov, first, nullptr);
    const auto dev = vg::make_sgd<T, M>(kWrong, maximize, kWrong, wd, momentum, damp, nesterov, first, sc);
    Buf<T> p1(param), q1(psf), b1(mom), p2(param), q2(psf), b2(mom);
    using F = std::decay_t<decltype(host)>;
    const auto s1 = run_span(host, typename F::Ptrs{{p1.p, grad.p, q1.p, kRestoring ? backup.p : nullptr},
                                                    momentum != 0.0 ? b1.p : nullptr}, n, stat_from);
    const auto s2 = run_span(dev, typename F::Ptrs{{p2.p, grad.p, q2.p, kRestoring ? backup.p : nullptr},
                                                   momentum != 0.0 ? b2.p : nullptr}, n, stat_from);
    if (!p1.same(p2, n) || !q1.same(q2, n) || !b1.same(b2, n) || !same_sums(s1, s2))
      fail(name, static_cast<long long>(M), cfg, 1);
  }
  // AdamW: weight decay or none, maximize, steps 1 and 7
  for (int cfg = 0; cfg < 2; ++cfg) {
    const double wd = cfg == 0 ? kWd : 0.0;
    const int64_t step = cfg == 0 ? kStep : 1;
    const bool maximize = cfg == 1;
    const double sc[4] = {kCoeff, 1.0 - kLr * wd, kLr / (1.0 - std::pow(kBeta1, static_cast<double>(step))),
                          std::sqrt(1.0 - std::pow(kBeta2, static_cast<double>(step)))};
    const auto host = vg::make_adamw<T, M>(kCoeff, maximize, kLr, kBeta1, kBeta2, 1e-8, wd, step, nullptr);
    const auto dev = vg::make_adamw<T, M>(kWrong, maximize, kWrong, kBeta1, kBeta2, 1e-8, 0.5, step + 3, sc);
    Buf<T> p1(param), q1(psf), m1(m), v1(v), p2(param), q2(psf), m2(m), v2(v);
    using F = std::decay_t<decltype(host)>;
    const auto s1 = run_span(host, typename F::Ptrs{{p1.p, grad.p, q1.p, kRestoring ? backup.p : nullptr}, m1.p, v1.p},
                             n, stat_from);
    const auto s2 = run_span(dev, typename F::Ptrs{{p2.p, grad.p, q2.p, kRestoring ? backup.p : nullptr}, m2.p, v2.p},
                             n, stat_from);
    if (!p1.same(p2, n) || !q1.same(q2, n) || !m1.same(m2, n) || !v1.same(v2, n) || !same_sums(s1, s2))
      fail(name, static_cast<long long>(M), cfg, 2);
  }
}

template <typename T>
void check_scalars(std::mt19937_64& rng, const char* name) {
  using A = vg::acc_t<T>;
  check_scalars_mode<T, vg::Mode::kPlain>(rng, name);
  check_scalars_mode<T, vg::Mode::kReuse>(rng, name);
  check_scalars_mode<T, vg::Mode::kRestore>(rng, name);
  check_scalars_mode<T, vg::Mode::kRestorePsf>(rng, name);
  const int64_t n = 1003;
  const Buf<T> grad(rng, n, false), psf(rng, n, false);
  const double sc[1] = {kCoeff};
  Buf<T> g1(grad), g2(grad);
  run_span(vg::ReuseF<T>{{}, static_cast<A>(kCoeff), nullptr}, {g1.p, psf.p}, n, 0);
  run_span(vg::ReuseF<T>{{}, static_cast<A>(kWrong), sc}, {g2.p, psf.p}, n, 0);
  if (!g1.same(g2, n)) fail(name, 0, 0, 3);
}

}  // namespace

int main() {
  std::mt19937_64 rng(15);
  check_for_range<float>(rng, "sumsq fp32");
  check_for_range<double>(rng, "sumsq fp64");
  check_for_range<c10::Half>(rng, "sumsq fp16");
  check_for_range<c10::BFloat16>(rng, "sumsq bf16");
  check_finalize<1>(rng);
  check_finalize<3>(rng);
  int64_t checked = 0;
  for (const int64_t nspans : {1, 2, 77, 78, 79, 156, 161, 300, 1024}) {
    check_global_table<vg::SumsqF<float>>(rng, nspans);
    check_global_table<vg::GramF<double>>(rng, nspans);
    check_global_table<vg::AxpbyF<c10::Half>>(rng, nspans);
    checked += nspans;
  }
  check_scalars<float>(rng, "scalars fp32");
  check_scalars<double>(rng, "scalars fp64");
  check_scalars<c10::Half>(rng, "scalars fp16");
  check_scalars<c10::BFloat16>(rng, "scalars bf16");
  if (failures) {
    std::printf("emulated launch: %d mismatches\n", failures);
    return 1;
  }
  std::printf("emulated launch: ok (for_range x 4 dtypes, finalize_thread, GlobalTable vs Table over %lld spans, "
              "device scalars of reuse/sgd_step/adamw_step x 4 modes x 4 dtypes)\n",
              static_cast<long long>(checked));
  return 0;
}
