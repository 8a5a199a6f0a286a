// The CPU kernels' launcher: the pieces an op's work is cut into, and the one at::parallel_for
// that runs them. Shared by the op front ends (cpu_ops.cpp, which builds a Plan per call) and
// the kernels of every instruction set (cpu_kernels_body.h), so the cut, and with it every
// partial sum, is the same whichever kernels run.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace vsam_cpu {

using at::Tensor;
using at::TensorList;
using OptList = std::optional<TensorList>;
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kNoStats = std::numeric_limits<int64_t>::max();

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline at::TensorOptions out_options(at::ScalarType maths) { return at::TensorOptions().dtype(maths); }

inline Tensor no_stats() { return at::empty({0}, at::TensorOptions().dtype(at::kFloat)); }

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
inline Plan flat_plan(int64_t n, int64_t stat_start = kNoStats) {
  Plan plan;
  plan.add(0, 0, n, 0, std::max<int64_t>(0, std::min(stat_start, n)));
  return plan;
}

// The flat segment ops: segment s is [bounds[s], bounds[s+1]) of the one buffer.
inline Plan segment_plan(at::IntArrayRef bounds, int64_t n) {
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
inline Plan list_plan(TensorList ts, int64_t stat_first = kNoStats) {
  Plan plan;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t) {
    const int64_t n = ts[t].numel();
    plan.add(t, 0, n, t, t >= stat_first ? 0 : n);
  }
  return plan;
}

}  // namespace vsam_cpu
