"""The measurements behind the notes in docs/benchmarks.md ("Where the time went").

    python benchmarks/cpu_notes.py

Prints, side by side in one process (median of 7 after 3 warm-up calls):
1. a 64-expert GEMM set into a fresh output (torch's grouped_mm) vs into a reused buffer;
2. a weight gradient into a fresh [E, H, D] tensor vs into a reused one;
3. 7 decode-sized experts (2 rows each) as x @ W.T vs W @ x.T.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def median_ms(fn, warmup: int = 3, repeats: int = 7) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def loop_mm(x, w_t, counts, out):
    start = 0
    for e, count in enumerate(counts):
        torch.mm(x[start : start + count], w_t[e], out=out[start : start + count])
        start += count
    return out


def main() -> None:
    torch.manual_seed(0)
    experts, rows, dim, width = 64, 512, 512, 512
    x = torch.randn(experts * rows, dim)
    w = torch.randn(experts, width, dim)
    counts = [rows] * experts
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    reused = torch.empty(experts * rows, width)
    fresh = median_ms(lambda: F.grouped_mm(x, w.transpose(1, 2), offs=offsets))
    kept = median_ms(lambda: loop_mm(x, w.transpose(1, 2), counts, reused))
    print(
        f"1. 64 x [512,512]x[512,512]: grouped_mm (new 64 MB output) {fresh:.1f} ms, "
        f"loop of mm into a reused buffer {kept:.1f} ms"
    )

    grad = torch.randn(experts * rows, width)
    grad_buffer = torch.empty(experts, width, dim)

    def weight_grad(out):
        start = 0
        for e, count in enumerate(counts):
            torch.mm(grad[start : start + count].t(), x[start : start + count], out=out[e])
            start += count

    fresh = median_ms(lambda: weight_grad(torch.empty(experts, width, dim)))
    kept = median_ms(lambda: weight_grad(grad_buffer))
    print(
        f"2. weight gradient [64, 512, 512]: new 64 MB tensor {fresh:.1f} ms, reused {kept:.1f} ms"
    )

    w = torch.randn(8, 2048, 512)
    x = torch.randn(2, 512)
    nt = median_ms(lambda: [x @ w[e].t() for e in range(7)])
    tn = median_ms(lambda: [(w[e] @ x.t()).t() for e in range(7)])
    print(f"3. 7 experts of 2048 x 512, 2 rows each: x @ W.T {nt:.2f} ms, W @ x.T {tn:.2f} ms")


if __name__ == "__main__":
    main()
