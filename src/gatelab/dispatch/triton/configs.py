"""Block sizes for the triton kernels: a small table per GPU family.

``BLOCK_M`` (rows of one expert per program) is fixed per family and path because the host
builds the row-block table with it before launch; ``BLOCK_N``/``BLOCK_K``, ``num_warps`` and
``num_stages`` are what ``triton.autotune`` tries, once per problem size, on a real GPU;
the "default" entry is always among the candidates (it fits float32 tiles in shared
memory) and is the only config when autotuning is off.

The starting points follow what the ScatterMoE and vLLM fused_moe kernels ship for A100
(sm80) and H100 (sm90): 128-row tiles with 64-wide K steps, more pipeline stages where
shared memory allows (sm90 has 228 KB per SM, sm80 164 KB). They are candidates, not
measurements: the autotuner times them on the device and keeps the fastest. The GLU
up-projection keeps two accumulators, so its tiles stay at most 128 wide.
"""

from __future__ import annotations

import torch

FAMILIES = ("sm90", "sm80", "default")

# Rows per program: training-size batches tile each expert's rows by BLOCK_M; the decode
# path gives one program per (expert, output block) and walks that expert's few rows in
# steps of DECODE_BLOCK_M (16 is tl.dot's smallest tile).
BLOCK_M = {"sm90": 128, "sm80": 128, "default": 64}
DECODE_BLOCK_M = 16


def _c(n: int, k: int, warps: int, stages: int) -> dict:
    return {"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}


# kind -> family -> candidate configs. Kinds: "up" (gather + GEMM + GLU epilogue), "gemm"
# (gather/scatter GEMM: down projection, dX, d act), "wgrad" (per-expert X^T Y; BLOCK_N
# here is the tile over the second output dim and BLOCK_M over the first), "act"
# (elementwise activation backward), "decode" (few rows per expert: wide K steps, since
# the cost is streaming the weight once).
AUTOTUNE: dict[str, dict[str, list[dict]]] = {
    "up": {
        "sm90": [_c(128, 64, 8, 4), _c(64, 64, 4, 4), _c(128, 64, 8, 3), _c(64, 128, 4, 3)],
        "sm80": [_c(128, 32, 8, 4), _c(64, 64, 4, 4), _c(128, 64, 8, 3)],
        "default": [_c(64, 32, 4, 2)],
    },
    "gemm": {
        "sm90": [_c(128, 64, 8, 4), _c(256, 64, 8, 3), _c(128, 128, 8, 3), _c(64, 64, 4, 4)],
        "sm80": [_c(128, 32, 4, 4), _c(128, 64, 8, 3), _c(64, 64, 4, 4)],
        "default": [_c(64, 32, 4, 2)],
    },
    "wgrad": {
        "sm90": [
            {**_c(128, 64, 8, 4), "BLOCK_M": 128},
            {**_c(128, 32, 8, 4), "BLOCK_M": 128},
            {**_c(64, 64, 4, 4), "BLOCK_M": 64},
        ],
        "sm80": [{**_c(128, 32, 8, 3), "BLOCK_M": 128}, {**_c(64, 32, 4, 4), "BLOCK_M": 64}],
        "default": [{**_c(64, 32, 4, 2), "BLOCK_M": 64}],
    },
    "act": {
        "sm90": [{"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}],
        "sm80": [{"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}],
        "default": [{"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}],
    },
    "decode": {
        "sm90": [_c(64, 128, 4, 4), _c(128, 128, 8, 4), _c(32, 256, 4, 3), _c(64, 256, 4, 3)],
        "sm80": [_c(64, 128, 4, 3), _c(128, 64, 4, 4), _c(32, 256, 4, 3)],
        "default": [_c(64, 64, 4, 2)],
    },
}

# Under TRITON_INTERPRET=1 (CPU tests) one small config: the interpreter runs each program
# in numpy, so the smallest legal tiles keep tests fast and still exercise the masks.
INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def family(device: torch.device) -> str:
    """The autotune table's key for ``device``: "sm90" (Hopper and newer), "sm80" (Ampere,
    Ada) or "default"."""
    if device.type != "cuda":
        return "default"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    return "sm80" if major == 8 else "default"
