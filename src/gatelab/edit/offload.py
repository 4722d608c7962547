"""Run an MoE model with its routed experts off the compute device, an LRU expert cache and
pre-gate-driven prefetching (the system side of Pre-gated MoE).

After "Pre-gated MoE: An Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert
Inference" (Hwang et al., ISCA 2024, arXiv 2308.12066): expert weights live in host memory;
while block l runs, the experts its pre-gate chose for block l+1 are copied to the compute
device by a background thread, so migration overlaps compute. The baselines the paper
compares against are (a) every expert resident on the device and (b) on-demand loading
(its "MoE-OnDemand"): fetch a layer's experts when its router has chosen them.

How it works here (:class:`OffloadedExperts`):

- :meth:`offload` writes every MoE block's routed experts to one safetensors file per layer
  (``layer{L}.safetensors``, tensors ``{e}.w_in``, ``{e}.w_out``, ``{e}.b_in``, ``{e}.b_out``)
  and frees the model's own expert parameters (replaced by empty tensors; :meth:`restore`
  loads them back). The host tier is the memory-mapped file (``safetensors.safe_open``);
  when the compute device is a GPU, every expert is read once into **pinned** host memory
  instead, so host -> device copies are asynchronous DMA.
- The device tier is an LRU cache of at most ``capacity`` experts (over all layers). A
  layer's working set is pinned while it computes; if one layer needs more experts than the
  capacity, the cache grows for that step (the peak records it).
- The block's expert computation is replaced (gatelab ``MoE``: its dispatcher; HF: the
  experts module's forward) by one that gathers the chosen experts from the cache (loading
  misses on demand), stacks them into a compact bank, renumbers the routing to it and runs
  the same dispatcher on it. Each expert's arithmetic is unchanged, so outputs equal the
  resident model's exactly (tested) when the model runs gatelab's dispatch (gatelab models;
  HF models loaded with ``experts_implementation="gatelab"``) under one CPU strategy (the
  load-dependent choice between phase-wise and split can change the last bit; pin it with
  ``gatelab.dispatch.cpu_threads.forced_strategy`` to compare runs bit for bit).
- With ``pregates``, a forward pre-hook on block l asks the pre-gate for each token's top
  ``prefetch_k`` experts of the next MoE layer and queues the most-voted ones (at most the
  capacity) on a single prefetch thread, which reads them from the host tier into the cache.
  When block l+1 needs an expert still in flight, it waits for that load.

Statistics (:attr:`stats`): expert requests, cache hits, hits on prefetched experts, misses
(on-demand loads), bytes loaded, peak resident expert bytes, and the pre-gate hit rate (the
share of requested experts the pre-gate had queued). Departure: the paper measures a
GPU with CPU memory behind PCIe; on a CPU-only machine both tiers are host RAM, so the
"transfer" is a copy from the page cache and the numbers say what the bookkeeping costs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..dispatch import get_dispatcher, grouped_dispatch
from ..experts import ExpertWeights
from ..inspect.access import MoEBlock, find_moe_blocks
from ..layers import MoE
from ..routing import EMPTY
from .pregate import PreGates

_PARTS = ("w_in", "w_out", "b_in", "b_out")


@dataclass
class OffloadStats:
    requests: int = 0
    hits: int = 0
    prefetch_hits: int = 0
    misses: int = 0
    predicted: int = 0
    predicted_requests: int = 0
    loaded_bytes: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    wait_seconds: float = 0.0
    per_layer: dict[int, list[int]] = field(default_factory=dict)

    @property
    def pregate_hit_rate(self) -> float | None:
        """Share of requested experts (of pre-gated layers) the pre-gate had queued."""
        return self.predicted / self.predicted_requests if self.predicted_requests else None

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "per_layer"}
        return {**out, "pregate_hit_rate": self.pregate_hit_rate}


def _bank_parts(weights: ExpertWeights, e: int, transposed: bool) -> dict[str, Tensor]:
    """Expert ``e``'s tensors in the module's own storage layout ([in, out] when the module
    stores its experts transposed), so that the compact bank built from them has the
    resident bank's strides and its matmuls give bit-identical results."""
    w_in, w_out = weights.w_in[e], weights.w_out[e]
    if transposed:
        w_in, w_out = w_in.t(), w_out.t()
    parts = {"w_in": w_in, "w_out": w_out}
    if weights.b_in is not None:
        parts["b_in"] = weights.b_in[e]
    if weights.b_out is not None:
        parts["b_out"] = weights.b_out[e]
    return {k: v.detach().contiguous() for k, v in parts.items()}


class OffloadedExperts:
    """A model whose routed experts live in safetensors files, served through an LRU cache.

    Args:
        model: a gatelab model or an HF MoE model (module doc for what runs exactly).
        directory: where the per-layer safetensors files are written.
        capacity: experts the cache may hold (over all layers); >= 1.
        pregates: trained :class:`~gatelab.edit.pregate.PreGates` to drive prefetching, or
            None for on-demand loading only.
        prefetch_k: per-token guesses the pre-gate votes with (default: the next top_k).
        device: the compute device (default: the model's).
    """

    def __init__(
        self,
        model: nn.Module,
        directory: str | Path,
        capacity: int,
        pregates: PreGates | None = None,
        prefetch_k: int | None = None,
        device: str | torch.device | None = None,
    ):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(
                f"capacity must be an int >= 1 (experts kept on the device), got {capacity!r}"
            )
        if prefetch_k is not None and prefetch_k < 1:
            raise ValueError(f"prefetch_k must be >= 1, got {prefetch_k}")
        self.model, self.directory, self.capacity = model, Path(directory), capacity
        self.blocks = {b.layer: b for b in find_moe_blocks(model)}
        if pregates is not None:
            unknown = set(pregates.next_layer) - set(self.blocks)
            if unknown:
                raise ValueError(
                    f"pregates name layers {sorted(unknown)} the model has no MoE block for"
                )
        self.pregates, self.prefetch_k = pregates, prefetch_k
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.stats = OffloadStats()
        self._cache: OrderedDict[tuple[int, int], dict[str, Tensor]] = OrderedDict()
        self._pending: dict[tuple[int, int], Future] = {}  # in flight on the prefetch thread
        self._prefetched: set[tuple[int, int]] = set()  # brought in by prefetch, not yet used
        self._queued: dict[int, set[int]] = {}
        self._pinned: set[tuple[int, int]] = set()
        self._lock = threading.RLock()
        self._files: dict[int, object] = {}
        self._host: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._activate: dict[int, object] = {}
        self._transposed: dict[int, bool] = {}
        self._saved: dict[int, dict[str, object]] = {}
        self._hooks: list = []
        self._pool: ThreadPoolExecutor | None = None
        self._stream = None

    # -- setup and teardown ------------------------------------------------------------------

    def offload(self) -> OffloadedExperts:
        """Write the experts out, free them in the model, install the runtime."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        if self._saved:
            raise RuntimeError("already offloaded; call restore() first")
        for block in self.blocks.values():  # raise on an unknown layout before changing anything
            for name in dict(block.experts.named_parameters(recurse=False)):
                _layout(block, name)
        self.directory.mkdir(parents=True, exist_ok=True)
        for layer, block in self.blocks.items():
            weights = block.expert_weights()
            self._activate[layer] = weights.activate
            self._transposed[layer] = bool(getattr(block.experts, "is_transposed", False))
            path = self.directory / f"layer{layer}.safetensors"
            tensors = {
                f"{e}.{k}": v.cpu()
                for e in range(block.num_experts)
                for k, v in _bank_parts(weights, e, self._transposed[layer]).items()
            }
            save_file(tensors, str(path))
            self._files[layer] = safe_open(str(path), framework="pt", device="cpu")
            self._install(block)
        if self.device.type == "cuda":  # host tier = pinned copies, for async DMA
            for layer, e in [
                (la, e) for la, b in self.blocks.items() for e in range(b.num_experts)
            ]:
                self._host[(layer, e)] = {
                    k: v.pin_memory() for k, v in self._read(layer, e).items()
                }
        if self.pregates is not None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatelab-prefetch")
            for layer in self.pregates.next_layer:
                hook = self.blocks[layer].module.register_forward_pre_hook(
                    self._prefetch_hook(layer), with_kwargs=True
                )
                self._hooks.append(hook)
        return self

    def restore(self) -> nn.Module:
        """Put the experts back into the model (from the files) and remove the runtime."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for layer, saved in self._saved.items():
            block = self.blocks[layer]
            for name, value in saved.items():
                if name == "__forward__":
                    if value is None:
                        del block.experts.forward
                    else:
                        block.experts.forward = value
                elif name == "__dispatcher__":
                    block.module.dispatcher = value
                elif name == "__weights__":
                    del block.experts.weights
                else:
                    param = _get_param(block.experts, name)
                    param.data = self._file_tensor(layer, name, value).to(param.device, param.dtype)
        self._saved = {}
        with self._lock:
            self._cache.clear()
            self.stats.resident_bytes = 0
        return self.model

    def __enter__(self):
        return self.offload()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _install(self, block: MoEBlock) -> None:
        params = dict(block.experts.named_parameters(recurse=False))
        # every layout first (a parameter we cannot rebuild raises before anything is freed)
        saved: dict[str, object] = {
            n: (tuple(p.shape), _layout(block, n)) for n, p in params.items()
        }
        for param in params.values():  # free the resident parameters
            param.data = param.data.new_empty(0)
        layer = block.layer
        if isinstance(block.module, MoE):
            saved["__dispatcher__"] = block.module.dispatcher
            dispatch = block.module.dispatcher
            dispatch = dispatch if callable(dispatch) else get_dispatcher(dispatch)
            block.module.dispatcher = self._gatelab_dispatch(layer, dispatch)
            block.experts.weights = lambda: None  # the dispatcher ignores the bank
            saved["__weights__"] = True
        else:
            saved["__forward__"] = block.experts.__dict__.get("forward")
            block.experts.forward = self._hf_forward(layer, block.num_experts)
        self._saved[layer] = saved

    def _file_tensor(self, layer: int, name: str, saved) -> Tensor:
        """Rebuild an experts parameter [E, ...] from the per-expert tensors in the file."""
        shape, part = saved
        return torch.stack([self._read(layer, e)[part] for e in range(shape[0])])

    # -- the tiers ---------------------------------------------------------------------------

    def _read(self, layer: int, e: int) -> dict[str, Tensor]:
        f = self._files[layer]
        return {k: f.get_tensor(f"{e}.{k}") for k in _PARTS if f"{e}.{k}" in f.keys()}

    def _load(self, key: tuple[int, int]) -> dict[str, Tensor]:
        """Host tier -> compute device (runs on the prefetch thread or inline)."""
        host = self._host.get(key) or self._read(*key)
        if self.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)  # copies off the compute stream
            stream = self._stream
            with torch.cuda.stream(stream):
                out = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            stream.synchronize()
        else:
            out = {k: v.clone() if key in self._host else v for k, v in host.items()}
        with self._lock:
            self.stats.loaded_bytes += sum(v.numel() * v.element_size() for v in out.values())
        return out

    def _insert(self, key, tensors) -> None:
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = tensors
            self.stats.resident_bytes += _nbytes(tensors)
            self._evict()
            self.stats.peak_resident_bytes = max(
                self.stats.peak_resident_bytes, self.stats.resident_bytes
            )

    def _evict(self) -> None:
        for key in list(self._cache):
            if len(self._cache) <= self.capacity:
                return
            if key not in self._pinned:
                self.stats.resident_bytes -= _nbytes(self._cache.pop(key))
                self._prefetched.discard(key)

    def _get(self, layer: int, ids: list[int]) -> list[dict[str, Tensor]]:
        """The tensors of experts ``ids`` of ``layer``, pinned until :meth:`_release`."""
        out, queued = [], self._queued.pop(layer, None)
        for e in ids:
            key = (layer, e)
            with self._lock:
                self.stats.requests += 1
                self._pinned.add(key)
                if queued is not None:
                    self.stats.predicted_requests += 1
                    self.stats.predicted += int(e in queued)
                future = self._pending.get(key)
            if future is not None:  # in flight on the prefetch thread: wait for it
                start = time.perf_counter()
                future.result()
                self.stats.wait_seconds += time.perf_counter() - start
            with self._lock:
                tensors = self._cache.get(key)
                if tensors is not None:
                    self._cache.move_to_end(key)
                    self.stats.hits += 1
                    if key in self._prefetched:
                        self.stats.prefetch_hits += 1
                        self._prefetched.discard(key)
            if tensors is None:
                self.stats.misses += 1
                tensors = self._load(key)
                self._insert(key, tensors)
            out.append(tensors)
        return out

    def _release(self, layer: int, ids: list[int]) -> None:
        with self._lock:
            for e in ids:
                self._pinned.discard((layer, e))
            self._evict()

    # -- prefetch ----------------------------------------------------------------------------

    def _prefetch_hook(self, layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            nxt = self.pregates.next_layer[layer]
            k = self.prefetch_k or self.blocks[nxt].top_k
            with torch.no_grad():
                guess = self.pregates.predict(layer, x.reshape(-1, x.shape[-1]), k)
            votes = torch.bincount(guess.reshape(-1).cpu(), minlength=self.blocks[nxt].num_experts)
            order = [int(e) for e in votes.argsort(descending=True) if votes[e] > 0]
            chosen = order[: self.capacity]
            self._queued[nxt] = set(chosen)
            for e in chosen:
                self._submit((nxt, e))

        return hook

    def _submit(self, key) -> None:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)  # keep it: it is about to be used
            elif key not in self._pending:
                self._pending[key] = self._pool.submit(self._prefetch, key)

    def _prefetch(self, key) -> None:
        tensors = self._load(key)
        with self._lock:
            self._insert(key, tensors)
            self._prefetched.add(key)
            self._pending.pop(key, None)

    def wait(self) -> None:
        """Wait for every queued prefetch."""
        for future in list(self._pending.values()):
            future.result()

    # -- the replaced expert computation ------------------------------------------------------

    def _compact(self, layer: int, experts: Tensor) -> tuple[ExpertWeights, Tensor, list[int]]:
        ids = sorted(int(e) for e in experts[experts >= 0].unique())
        parts = self._get(layer, ids)
        if ids:
            stacked = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
            if self._transposed[layer]:  # stored [in, out]: the bank wants [out, in] views
                stacked["w_in"] = stacked["w_in"].transpose(1, 2)
                stacked["w_out"] = stacked["w_out"].transpose(1, 2)
        else:  # no token routed here: an empty bank is a normal case
            stacked = {
                "w_in": experts.new_zeros(0, 0, 0, dtype=torch.float32),
                "w_out": experts.new_zeros(0, 0, 0, dtype=torch.float32),
            }
        bank = ExpertWeights(
            stacked["w_in"],
            stacked["w_out"],
            stacked.get("b_in"),
            stacked.get("b_out"),
            self._activate[layer],
        )
        lookup = torch.full((self.blocks[layer].num_experts + 1,), EMPTY, dtype=torch.long)
        lookup[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
        renumbered = lookup.to(experts.device)[torch.where(experts >= 0, experts, -1)]
        return bank, renumbered, ids

    def _gatelab_dispatch(self, layer: int, dispatch):
        def run(x, experts, weights, bank, deterministic):
            compact, renumbered, ids = self._compact(layer, experts)
            try:
                if not ids:
                    return x.new_zeros(x.shape)
                return dispatch(x, renumbered, weights, compact, deterministic)
            finally:
                self._release(layer, ids)

        return run

    def _hf_forward(self, layer: int, num_experts: int):
        def forward(hidden_states, top_k_index, top_k_weights):
            off = (top_k_index >= num_experts) | (top_k_index < 0)
            experts = top_k_index.long().masked_fill(off, EMPTY)
            weights = top_k_weights.masked_fill(off, 0.0)
            compact, renumbered, ids = self._compact(layer, experts)
            try:
                if not ids:
                    return hidden_states.new_zeros(hidden_states.shape)
                out = grouped_dispatch(
                    hidden_states, renumbered, weights, compact, deterministic=True
                )
                return out.to(hidden_states.dtype)
            finally:
                self._release(layer, ids)

        return forward


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _get_param(module: nn.Module, name: str) -> nn.Parameter:
    return getattr(module, name)


def _layout(block: MoEBlock, name: str) -> str:
    """Which per-expert part (w_in, w_out, b_in, b_out) a parameter of the experts module is."""
    parts = {
        "gate_up_proj": "w_in",
        "up_proj": "w_in",
        "down_proj": "w_out",
        "gate_up_proj_bias": "b_in",
        "up_proj_bias": "b_in",
        "down_proj_bias": "b_out",
    }
    if name not in parts:
        raise ValueError(
            f"layer {block.layer}: cannot offload the experts parameter {name!r} of "
            f"{type(block.experts).__name__}; offloading knows gate_up_proj/up_proj, down_proj "
            "and their biases"
        )
    return parts[name]


def resident_expert_bytes(model) -> int:
    """Bytes of every routed expert's parameters of ``model`` (the all-resident baseline)."""
    return sum(
        _nbytes(dict(b.experts.named_parameters(recurse=False))) for b in find_moe_blocks(model)
    )


__all__ = [
    "OffloadStats",
    "OffloadedExperts",
    "resident_expert_bytes",
]
