// The split strategy's expert loop in C++, the slots' counting sort and a small inference
// call's phase-wise forward (gatelab/dispatch/native.py builds and loads them, with
// few_rows.cpp).
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

#include <algorithm>
#include <atomic>
#include <exception>
#include <vector>

namespace gatelab_native {
// few_rows.cpp: out[start:start+count] = x[start:start+count] @ w[e].T per listed expert.
void rows_linear(const at::Tensor& x, const at::Tensor& w, c10::IntArrayRef experts,
                 c10::IntArrayRef starts, c10::IntArrayRef counts, const at::Tensor& out,
                 int64_t workers);
}  // namespace gatelab_native

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

// out's rows = x's rows @ w[e].T: few_rows.cpp's kernel up to ``few_rows`` rows (what
// grouped._rows_linear runs there, so the bits match), else a GEMM.
void expert_linear(const Tensor& x, const Tensor& w, int64_t e, const Rows& rows,
                   const Tensor& out, int64_t few_rows) {
  if (rows.count <= few_rows) {
    gatelab_native::rows_linear(x, w, {e}, {rows.start}, {rows.count}, out, 1);
  } else {
    Tensor out_e = rows(out);
    at::mm_out(out_e, rows(x), w[e].t());
  }
}

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
    // Nothing computed here escapes but into the caller's buffers, so the workers skip
    // autograd's kernels altogether (InferenceMode; NoGradGuard still ran them): about
    // 0.2-0.3 us less per op, on the ~40 ops of an expert's forward and backward.
    c10::InferenceMode inference;
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
    const Tensor& kept, const Tensor& y, int64_t activation, bool glu, int64_t few_rows,
    int64_t workers) {
  const int64_t ffn = w_out.size(2);
  for_each_expert(counts, order, workers, [&](int64_t e, const Rows& rows) {
    Tensor xs_e = rows(xs), hidden_e = rows(hidden), act_e = rows(act), kept_e = rows(kept);
    Tensor y_e = rows(y), scale_e = rows(scale);
    at::index_select_out(xs_e, x, 0, rows(tokens));
    expert_linear(xs, w_in, e, rows, hidden, few_rows);
    if (b_in.has_value()) hidden_e.add_((*b_in)[e]);
    if (glu) {  // act(gate) * up, hidden laid out [gate | up]
      act_forward(hidden_e.narrow(1, 0, ffn), kept_e, activation);
      at::mul_out(act_e, kept_e, hidden_e.narrow(1, ffn, ffn)).mul_(scale_e);
    } else {
      act_forward(hidden_e, kept_e, activation);
      at::mul_out(act_e, kept_e, scale_e);
    }
    expert_linear(act, w_out, e, rows, y, few_rows);
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

// Split's matrix products alone, nothing between them (``gatelab bench moe``'s GEMM
// bound): forward hidden = xs @ w_in[e].T and y = act @ w_out[e].T (expert_linear, as
// split_forward runs them), backward the four GEMMs of split_backward: g_act = gy @
// w_out[e], g_w_out[e] = gy.T @ act, g_w_in[e] = g_hidden.T @ xs, g_xs = g_hidden @ w_in[e].
void gemms_only(
    const Tensor& xs, const Tensor& act, const Tensor& gy, const Tensor& g_hidden,
    const Tensor& w_in, const Tensor& w_out, c10::IntArrayRef counts, c10::IntArrayRef order,
    const Tensor& hidden, const Tensor& y, const Tensor& g_act, const Tensor& g_xs,
    const Tensor& g_w_in, const Tensor& g_w_out, bool backward, int64_t few_rows,
    int64_t workers) {
  for_each_expert(counts, order, workers, [&](int64_t e, const Rows& rows) {
    if (!backward) {
      expert_linear(xs, w_in, e, rows, hidden, few_rows);
      expert_linear(act, w_out, e, rows, y, few_rows);
      return;
    }
    Tensor gy_e = rows(gy), g_hidden_e = rows(g_hidden), g_act_e = rows(g_act);
    Tensor g_xs_e = rows(g_xs), g_w_out_e = g_w_out[e], g_w_in_e = g_w_in[e];
    at::mm_out(g_act_e, gy_e, w_out[e]);
    at::mm_out(g_w_out_e, gy_e.t(), rows(act));
    at::mm_out(g_w_in_e, g_hidden_e.t(), rows(xs));
    at::mm_out(g_xs_e, g_hidden_e, w_in[e]);
  });
}

// One projection phase-wise over all experts, as grouped.grouped_linear runs it on CPU:
// experts of 1 to ``few_rows`` rows in one few-row kernel call on ``workers`` threads,
// larger ones one multi-threaded GEMM each (MKL's batched call gives these bits too).
void linear_phase(const Tensor& x, const Tensor& w, const std::vector<int64_t>& counts,
                  const Tensor& out, int64_t few_rows, int64_t workers) {
  std::vector<int64_t> few, few_starts, few_counts;
  int64_t start = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    const int64_t count = counts[e];
    if (count > 0 && count <= few_rows) {
      few.push_back(e);
      few_starts.push_back(start);
      few_counts.push_back(count);
    } else if (count > 0) {
      Tensor out_e = out.narrow(0, start, count);
      at::mm_out(out_e, x.narrow(0, start, count), w[e].t());
    }
    start += count;
  }
  if (!few.empty()) gatelab_native::rows_linear(x, w, few, few_starts, few_counts, out, workers);
}

// grouped.sort_slots on the host: a stable counting sort of the T*K slots of experts
// [T, K] by expert, empty slots (ids outside 0..E-1, key E) last. The same six tensors:
// slots, their tokens and (clamped) experts [T*K], counts [E], int32 end offsets [E] and
// which rows are routed; ``target`` is each row's token, T for a padding row (combine's
// dropped row). ``all`` = false leaves out counts, offsets and valid (small_forward
// needs the host counts alone: a decode step's every tensor op shows).
struct SortedSlots {
  Tensor slots, tokens, experts, counts, offsets, valid, target;
  std::vector<int64_t> host_counts;  // [E]
};

SortedSlots sort_slots_host(const Tensor& experts, int64_t num_experts, bool all) {
  const int64_t tokens = experts.size(0), k = experts.size(1), slots = tokens * k;
  const Tensor ids = experts.to(at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(num_experts + 1, 0), next(num_experts + 1, 0);
  std::vector<int64_t> key(slots);
  for (int64_t i = 0; i < slots; ++i) {
    key[i] = (id[i] >= 0 && id[i] < num_experts) ? id[i] : num_experts;
    ++counts[key[i]];
  }
  for (int64_t e = 1; e <= num_experts; ++e) next[e] = next[e - 1] + counts[e - 1];
  const auto long_opts = ids.options();
  SortedSlots out;
  out.slots = at::empty({slots}, long_opts);
  out.tokens = at::empty({slots}, long_opts);
  out.target = at::empty({slots}, long_opts);
  out.experts = at::empty({slots}, long_opts);
  out.valid = at::empty({all ? slots : 0}, long_opts.dtype(at::kBool));
  int64_t* slot_p = out.slots.mutable_data_ptr<int64_t>();
  int64_t* token_p = out.tokens.mutable_data_ptr<int64_t>();
  int64_t* target_p = out.target.mutable_data_ptr<int64_t>();
  int64_t* expert_p = out.experts.mutable_data_ptr<int64_t>();
  bool* valid_p = out.valid.mutable_data_ptr<bool>();
  const int64_t top = std::max<int64_t>(num_experts - 1, 0);
  for (int64_t i = 0; i < slots; ++i) {
    const int64_t row = next[key[i]]++;
    const bool routed = key[i] < num_experts;
    slot_p[row] = i;
    token_p[row] = i / k;
    target_p[row] = routed ? i / k : tokens;
    expert_p[row] = std::min(key[i], top);
    if (all) valid_p[row] = routed;
  }
  counts.pop_back();
  if (all) {
    out.counts = at::tensor(counts, long_opts);
    out.offsets = out.counts.cumsum(0).to(at::kInt);
  }
  out.host_counts = std::move(counts);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sort_slots(
    const Tensor& experts, int64_t num_experts) {
  TORCH_CHECK(experts.dim() == 2 && experts.scalar_type() == at::kLong,
              "gatelab sort_slots: experts must be [T, K] int64");
  SortedSlots s = sort_slots_host(experts, num_experts, true);
  return {s.slots, s.tokens, s.experts, s.counts, s.offsets, s.valid};
}

// A small inference call (a decode step) whole: sort_slots_host, then
// grouped._phases_forward and combine, the same ops on the same buffers in the same order
// (so the same bits as the Python path; tested), without ~40 Python-level torch calls.
// experts, weights [T, K]; ids outside 0..E-1 are empty slots (padding rows, dropped).
Tensor small_forward(
    const Tensor& x, const Tensor& experts, const Tensor& weights, const Tensor& w_in,
    const Tensor& w_out, const OptTensor& b_in, const OptTensor& b_out, int64_t activation,
    bool glu, int64_t few_rows, int64_t workers) {
  const int64_t tokens = experts.size(0), slots = experts.numel();
  const int64_t ffn = w_out.size(2);
  SortedSlots sorted = sort_slots_host(experts, w_in.size(0), false);
  const Tensor &order = sorted.slots, &rows_token = sorted.tokens, &target = sorted.target;
  const Tensor& row_expert = sorted.experts;
  const std::vector<int64_t>& counts = sorted.host_counts;
  const auto opts = w_in.options();
  Tensor xs = at::index_select(x.to(w_in.scalar_type()), 0, rows_token);
  Tensor scale = weights.reshape(-1).index_select(0, order).to(w_in.scalar_type()).unsqueeze(1);
  Tensor hidden = at::empty({slots, w_in.size(1)}, opts);
  linear_phase(xs, w_in, counts, hidden, few_rows, workers);
  if (b_in.has_value()) hidden.add_(b_in->index_select(0, row_expert));
  Tensor act = at::empty({slots, ffn}, opts), kept = at::empty({slots, ffn}, opts);
  if (glu) {
    act_forward(hidden.narrow(1, 0, ffn), kept, activation);
    at::mul_out(act, kept, hidden.narrow(1, ffn, ffn)).mul_(scale);
  } else {
    act_forward(hidden, kept, activation);
    at::mul_out(act, kept, scale);
  }
  Tensor y = at::empty({slots, w_out.size(1)}, opts);
  linear_phase(act, w_out, counts, y, few_rows, workers);
  if (b_out.has_value()) y.addcmul_(scale, b_out->index_select(0, row_expert));
  Tensor out = at::zeros({tokens + 1, y.size(1)}, opts).index_add_(0, target, y);
  return out.narrow(0, 0, tokens).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(gatelab_split, m) {
  m.def(
      "forward(Tensor x, Tensor tokens, int[] counts, int[] order, Tensor w_in, Tensor w_out, "
      "Tensor? b_in, Tensor? b_out, Tensor scale, Tensor(a!) xs, Tensor(b!) hidden, "
      "Tensor(c!) act, Tensor(d!) kept, Tensor(e!) y, int activation, bool glu, "
      "int few_rows, int workers) -> ()");
  m.def(
      "backward(Tensor grad_out, Tensor tokens, int[] counts, int[] order, "
      "Tensor counts_tensor, Tensor xs, Tensor hidden, Tensor act, Tensor kept, "
      "Tensor scale, Tensor w_in, Tensor w_out, Tensor? b_out, Tensor(a!) gy, "
      "Tensor(b!) g_act, Tensor(c!) g_hidden, Tensor(d!) g_scale, Tensor(e!)? g_w_in, "
      "Tensor(f!)? g_w_out, Tensor(g!)? g_b_in, Tensor(h!)? g_b_out, bool need_x, "
      "int activation, bool glu, int workers) -> ()");
  m.def(
      "sort_slots(Tensor experts, int num_experts) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  m.def(
      "gemms_only(Tensor xs, Tensor act, Tensor gy, Tensor g_hidden, Tensor w_in, "
      "Tensor w_out, int[] counts, int[] order, Tensor(a!) hidden, Tensor(b!) y, "
      "Tensor(c!) g_act, Tensor(d!) g_xs, Tensor(e!) g_w_in, Tensor(f!) g_w_out, "
      "bool backward, int few_rows, int workers) -> ()");
  m.def(
      "small_forward(Tensor x, Tensor experts, Tensor weights, Tensor w_in, Tensor w_out, "
      "Tensor? b_in, Tensor? b_out, int activation, bool glu, int few_rows, int workers) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(gatelab_split, CPU, m) {
  m.impl("forward", &split_forward);
  m.impl("backward", &split_backward);
  m.impl("sort_slots", &sort_slots);
  m.impl("gemms_only", &gemms_only);
  m.impl("small_forward", &small_forward);
}
