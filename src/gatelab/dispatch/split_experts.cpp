// The split strategy's expert loop in C++ (gatelab/dispatch/native.py builds and loads it).
//
// One call runs a whole forward or backward pass over all experts: the workers are torch's
// OpenMP threads (one parallel region, a worker per intra-op thread), each taking the
// next expert from a shared counter, largest first, and running that expert's ops
// single-threaded (ATen and MKL do not open nested parallel regions). The ops are the ones
// grouped._split_forward / _split_backward and experts/activation.py call from Python,
// in the same order on the same views, so the bits are the same; what goes away is the
// Python per op and the GIL between the workers.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <exception>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// The activations of gatelab.experts.activation._KERNELS, by index.
enum Activation : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

void act_forward(const Tensor& x, Tensor out, int64_t kind) {
  switch (kind) {
    case kSilu: at::silu_out(out, x); break;
    case kGelu: at::gelu_out(out, x, "none"); break;
    case kGeluTanh: at::gelu_out(out, x, "tanh"); break;
    case kRelu: at::clamp_min_out(out, x, 0); break;
    default: TORCH_CHECK(false, "gatelab split_experts: unknown activation ", kind);
  }
}

void act_backward(const Tensor& grad, const Tensor& x, Tensor out, int64_t kind) {
  switch (kind) {
    case kSilu: at::silu_backward_out(out, grad, x); break;
    case kGelu: at::gelu_backward_out(out, grad, x, "none"); break;
    case kGeluTanh: at::gelu_backward_out(out, grad, x, "tanh"); break;
    case kRelu: at::threshold_backward_out(out, grad, x, 0); break;
    default: TORCH_CHECK(false, "gatelab split_experts: unknown activation ", kind);
  }
}

// Rows start..start+count of the expert-sorted [N, ...] buffers: one expert's rows.
struct Rows {
  int64_t start, count;
  Tensor operator()(const Tensor& t) const { return t.narrow(0, start, count); }
};

// Calls fn(e, rows of e) for each expert of ``order`` (largest first; ``counts`` gives
// every expert's rows), each worker taking the next until none are left or one worker
// has failed; the first error is rethrown in the caller. The workers are an OpenMP region
// of torch's own libgomp (as cpu_threads.openmp_team opens from Python), not
// at::parallel_for: that header template would run ATen's lazy thread-count set-up in
// this library's copy, which re-applies a process-wide default to the calling thread.
template <typename Fn>
void for_each_expert(
    c10::IntArrayRef counts, c10::IntArrayRef order, int64_t workers, const Fn& fn) {
  std::vector<int64_t> starts(counts.size());
  for (size_t e = 1; e < counts.size(); ++e) starts[e] = starts[e - 1] + counts[e - 1];
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  auto drain = [&]() {
    at::NoGradGuard no_grad;
    try {
      for (size_t i = next++; i < order.size() && !failed; i = next++) {
        const int64_t e = order[i];
        fn(e, Rows{starts[e], counts[e]});
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  if (workers <= 1) {
    drain();
  } else {
#pragma omp parallel num_threads(workers)
    drain();
  }
  if (error) std::rethrow_exception(error);
}

void split_forward(
    const Tensor& x, const Tensor& tokens, c10::IntArrayRef counts, c10::IntArrayRef order,
    const Tensor& w_in, const Tensor& w_out, const OptTensor& b_in, const OptTensor& b_out,
    const Tensor& scale, const Tensor& xs, const Tensor& hidden, const Tensor& act,
    const Tensor& kept, const Tensor& y, int64_t activation, bool glu, int64_t workers) {
  const int64_t ffn = w_out.size(2);
  for_each_expert(counts, order, workers, [&](int64_t e, const Rows& rows) {
    Tensor xs_e = rows(xs), hidden_e = rows(hidden), act_e = rows(act), kept_e = rows(kept);
    Tensor y_e = rows(y), scale_e = rows(scale);
    at::index_select_out(xs_e, x, 0, rows(tokens));
    at::mm_out(hidden_e, xs_e, w_in[e].t());
    if (b_in.has_value()) hidden_e.add_((*b_in)[e]);
    if (glu) {  // act(gate) * up, hidden laid out [gate | up]
      act_forward(hidden_e.narrow(1, 0, ffn), kept_e, activation);
      at::mul_out(act_e, kept_e, hidden_e.narrow(1, ffn, ffn)).mul_(scale_e);
    } else {
      act_forward(hidden_e, kept_e, activation);
      at::mul_out(act_e, kept_e, scale_e);
    }
    at::mm_out(y_e, act_e, w_out[e].t());
    if (b_out.has_value()) y_e.addcmul_(scale_e, (*b_out)[e]);
  });
}

Tensor segment_sum(const Tensor& rows, const Tensor& count) {
  return at::segment_reduce(rows, "sum", count, {}, {}, 0, /*unsafe=*/true)[0];
}

void split_backward(
    const Tensor& grad_out, const Tensor& tokens, c10::IntArrayRef counts,
    c10::IntArrayRef order, const Tensor& counts_tensor, const Tensor& xs,
    const Tensor& hidden, const Tensor& act, const Tensor& kept, const Tensor& scale,
    const Tensor& w_in, const Tensor& w_out, const OptTensor& b_out, const Tensor& gy,
    const Tensor& g_act, const Tensor& g_hidden, const Tensor& g_scale,
    const OptTensor& g_w_in, const OptTensor& g_w_out, const OptTensor& g_b_in,
    const OptTensor& g_b_out, bool need_x, int64_t activation, bool glu, int64_t workers) {
  const int64_t ffn = w_out.size(2);
  for_each_expert(counts, order, workers, [&](int64_t e, const Rows& rows) {
    Tensor gy_e = rows(gy), xs_e = rows(xs), hidden_e = rows(hidden), act_e = rows(act);
    Tensor kept_e = rows(kept), scale_e = rows(scale), g_act_e = rows(g_act);
    Tensor g_hidden_e = rows(g_hidden), count_e = counts_tensor.narrow(0, e, 1);
    at::index_select_out(gy_e, grad_out, 0, rows(tokens));
    if (g_w_out.has_value()) {
      Tensor out = (*g_w_out)[e];
      at::mm_out(out, gy_e.t(), act_e);
    }
    if (g_b_out.has_value()) (*g_b_out)[e].copy_(segment_sum(gy_e * scale_e, count_e));
    at::mm_out(g_act_e, gy_e, w_out[e]);
    Tensor g_scale_e;
    if (glu) {
      Tensor gate = hidden_e.narrow(1, 0, ffn), up = hidden_e.narrow(1, ffn, ffn);
      Tensor grad_gate = g_hidden_e.narrow(1, 0, ffn), grad_up = g_hidden_e.narrow(1, ffn, ffn);
      at::mul_out(grad_up, g_act_e, kept_e);
      g_scale_e = at::mul_out(grad_gate, grad_up, up).sum(1);
      grad_up.mul_(scale_e);
      act_backward(g_act_e.mul_(scale_e).mul_(up), gate, grad_gate, activation);
    } else {
      g_scale_e = at::mul_out(g_hidden_e, kept_e, g_act_e).sum(1);
      act_backward(g_act_e.mul_(scale_e), hidden_e, g_hidden_e, activation);
    }
    Tensor g_scale_rows = rows(g_scale);
    g_scale_rows.copy_(g_scale_e);
    if (b_out.has_value()) g_scale_rows.add_((gy_e * (*b_out)[e]).sum(1));
    if (g_w_in.has_value()) {
      Tensor out = (*g_w_in)[e];
      at::mm_out(out, g_hidden_e.t(), xs_e);
    }
    if (g_b_in.has_value()) (*g_b_in)[e].copy_(segment_sum(g_hidden_e, count_e));
    if (need_x) at::mm_out(gy_e, g_hidden_e, w_in[e]);
  });
}

}  // namespace

TORCH_LIBRARY(gatelab_split, m) {
  m.def(
      "forward(Tensor x, Tensor tokens, int[] counts, int[] order, Tensor w_in, Tensor w_out, "
      "Tensor? b_in, Tensor? b_out, Tensor scale, Tensor(a!) xs, Tensor(b!) hidden, "
      "Tensor(c!) act, Tensor(d!) kept, Tensor(e!) y, int activation, bool glu, "
      "int workers) -> ()");
  m.def(
      "backward(Tensor grad_out, Tensor tokens, int[] counts, int[] order, "
      "Tensor counts_tensor, Tensor xs, Tensor hidden, Tensor act, Tensor kept, "
      "Tensor scale, Tensor w_in, Tensor w_out, Tensor? b_out, Tensor(a!) gy, "
      "Tensor(b!) g_act, Tensor(c!) g_hidden, Tensor(d!) g_scale, Tensor(e!)? g_w_in, "
      "Tensor(f!)? g_w_out, Tensor(g!)? g_b_in, Tensor(h!)? g_b_out, bool need_x, "
      "int activation, bool glu, int workers) -> ()");
}

TORCH_LIBRARY_IMPL(gatelab_split, CPU, m) {
  m.impl("forward", &split_forward);
  m.impl("backward", &split_backward);
}
