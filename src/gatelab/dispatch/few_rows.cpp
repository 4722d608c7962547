// Few-row expert products in C++ (gatelab/dispatch/native.py builds and loads it).
//
// At decode an expert gets 1 to a few rows, and out = x @ W.T is a pass over W's bytes:
// the time is reading W from memory. MKL's forms read W from memory at 5-28 GB/s there on
// 2 cores at 1-6 rows (benchmarks/cpu_notes.py, note 3), short of the memory's bandwidth.
// Here each W row is read once, dotted with every x row while it sits in L1, and the rows
// of W of all the listed experts are shared between torch's OpenMP threads in one
// parallel region (one barrier per projection, not one per expert).
//
// Every output element is one dot product computed by one thread in a fixed order (see
// row_dots), so the bits do not depend on the thread count.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace {

using at::Tensor;

// The helpers of block() must be inlined into each of its clones: called, they would run
// the default (SSE) build from the AVX2 clone.
#if defined(__GNUC__)
#define GATELAB_INLINE __attribute__((always_inline)) inline
#else
#define GATELAB_INLINE inline
#endif

// A 32-byte SIMD vector of T that loads from any address (GCC/Clang vector extensions;
// on x86 the AVX2 clone below runs it as one register, the default build as two SSE ones).
template <typename T>
using Vec __attribute__((vector_size(32), aligned(alignof(T)))) = T;

// One row of W against XR rows of x: out[r] = dot(w, x[r]). The row is read once, front
// to back (one stream per thread keeps the hardware prefetcher ahead), U vectors a step,
// each x row with U independent accumulators: one alone would wait on its own FMA latency,
// and U * XR of them keep both FMA pipes busy where W sits in cache. Each sum runs in one
// order for given XR and U: the accumulators in turn, the lanes in turn, then the tail.
template <typename T, int XR, int U>
GATELAB_INLINE void row_dots(const T* w, int64_t in, const T* const* x, T* out,
                             int64_t out_stride) {
  using V = Vec<T>;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  V acc[XR][U] = {};
  int64_t i = 0;
  for (; i + U * lanes <= in; i += U * lanes) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const V wv = *reinterpret_cast<const V*>(w + i + u * lanes);
#pragma GCC unroll 4
      for (int r = 0; r < XR; ++r) {
        acc[r][u] += wv * *reinterpret_cast<const V*>(x[r] + i + u * lanes);
      }
    }
  }
  for (; i + lanes <= in; i += lanes) {  // whole vectors short of a full step
    const V wv = *reinterpret_cast<const V*>(w + i);
#pragma GCC unroll 4
    for (int r = 0; r < XR; ++r) acc[r][0] += wv * *reinterpret_cast<const V*>(x[r] + i);
  }
  for (int r = 0; r < XR; ++r) {
    V total = acc[r][0];
    for (int u = 1; u < U; ++u) total += acc[r][u];
    T sum = 0;
    for (int64_t l = 0; l < lanes; ++l) sum += total[l];
    for (int64_t t = i; t < in; ++t) sum += w[t] * x[r][t];
    out[r * out_stride] = sum;
  }
}

// One block of W's rows [begin, end) against ``rows`` rows of x, up to four x rows per
// pass over a W row (at most eight accumulators; the row stays in L1 for the next four).
template <typename T>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void block(const T* w, int64_t in, const T* x, int64_t x_stride, int64_t rows, T* out,
           int64_t out_stride, int64_t begin, int64_t end) {
  const T* xr[4];
  for (int64_t o = begin; o < end; ++o) {
    const T* wo = w + o * in;
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      for (int64_t r = 0; r < 4 && r0 + r < rows; ++r) xr[r] = x + (r0 + r) * x_stride;
      T* dst = out + r0 * out_stride + o;
      switch (std::min<int64_t>(4, rows - r0)) {
        case 4: row_dots<T, 4, 2>(wo, in, xr, dst, out_stride); break;
        case 3: row_dots<T, 3, 2>(wo, in, xr, dst, out_stride); break;
        case 2: row_dots<T, 2, 4>(wo, in, xr, dst, out_stride); break;
        default: row_dots<T, 1, 4>(wo, in, xr, dst, out_stride); break;
      }
    }
  }
}

// W bytes per work item. Each item is a fresh stream for the thread that takes it, and the
// prefetcher needs a run to get ahead: eight experts of 2 rows streamed from memory on 2
// threads read 39-49 GB/s in 256 KB items against 23-28 GB/s in 64 KB and 15-22 in 16 KB
// (three weight shapes); 512 KB and 1 MB were no better. Small enough that a descheduled
// thread leaves little undone.
constexpr int64_t kBlockBytes = 256 * 1024;

// out[start:start+count] = x[start:start+count] @ w[e].T for each listed (e, start, count).
template <typename T>
void run(const Tensor& x, const Tensor& w, c10::IntArrayRef experts, c10::IntArrayRef starts,
         c10::IntArrayRef counts, const Tensor& out, int64_t workers) {
  const int64_t out_dim = w.size(1), in = w.size(2);
  const int64_t per_block = std::max<int64_t>(1, kBlockBytes / (in * int64_t(sizeof(T))));
  const int64_t blocks = (out_dim + per_block - 1) / per_block;
  const int64_t items = int64_t(experts.size()) * blocks;
  const T* w_data = w.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  T* out_data = out.mutable_data_ptr<T>();
  const int64_t x_stride = x.stride(0), out_stride = out.stride(0);
  std::atomic<int64_t> next{0};
  auto drain = [&]() {
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t i = item / blocks, b = item % blocks;
      const int64_t begin = b * per_block, end = std::min(out_dim, begin + per_block);
      block<T>(w_data + experts[i] * out_dim * in, in, x_data + starts[i] * x_stride, x_stride,
               counts[i], out_data + starts[i] * out_stride, out_stride, begin, end);
    }
  };
  if (workers <= 1 || items <= 1) {
    drain();
  } else {
#pragma omp parallel num_threads(std::min(workers, items))
    drain();
  }
}

}  // namespace

namespace gatelab_native {

// Also called by split_experts.cpp, one expert at a time on one worker (workers = 1).
void rows_linear(const Tensor& x, const Tensor& w, c10::IntArrayRef experts,
                 c10::IntArrayRef starts, c10::IntArrayRef counts, const Tensor& out,
                 int64_t workers) {
  TORCH_CHECK(experts.size() == starts.size() && experts.size() == counts.size(),
              "gatelab rows_linear: experts, starts and counts differ in length");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "gatelab rows_linear: w must be [E, out, in], contiguous");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) == w.size(2),
              "gatelab rows_linear: x must be [N, in] with unit-stride rows");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && out.size(1) == w.size(1),
              "gatelab rows_linear: out must be [N, out] with unit-stride rows");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && out.scalar_type() == w.scalar_type(),
              "gatelab rows_linear: x, w and out must share one dtype");
  for (size_t i = 0; i < experts.size(); ++i) {
    TORCH_CHECK(experts[i] >= 0 && experts[i] < w.size(0) && starts[i] >= 0 && counts[i] >= 0 &&
                    starts[i] + counts[i] <= std::min(x.size(0), out.size(0)),
                "gatelab rows_linear: expert ", experts[i], " rows ", starts[i], "+", counts[i],
                " out of range");
  }
  switch (w.scalar_type()) {
    case at::kFloat: run<float>(x, w, experts, starts, counts, out, workers); break;
    case at::kDouble: run<double>(x, w, experts, starts, counts, out, workers); break;
    default: TORCH_CHECK(false, "gatelab rows_linear: float32 or float64 only, got ", w.scalar_type());
  }
}

}  // namespace gatelab_native

TORCH_LIBRARY(gatelab_rows, m) {
  m.def(
      "linear(Tensor x, Tensor w, int[] experts, int[] starts, int[] counts, Tensor(a!) out, "
      "int workers) -> ()");
}

TORCH_LIBRARY_IMPL(gatelab_rows, CPU, m) { m.impl("linear", &gatelab_native::rows_linear); }
