"""The training loop: AdamW + warm-up/cosine, clipping, accumulation, eval, logs, checkpoints.

The trainer knows its inputs only through small protocols, so any model and data fit:

- ``model(batch)`` (or ``forward(model, batch)``) returns the loss: a scalar tensor, a dict with
  ``"loss"``, or an object with ``.loss``; an ``aux_loss`` next to it (already weighted, as
  gatelab's MoE layers give it) is added to what is optimised and logged separately. A dict
  batch is passed as keywords, a tuple or list as positional arguments, anything else as is.
- ``data`` is an iterator of batches with ``state_dict()`` (JSON-able values and tensors: the
  position of the next batch) and ``load_state_dict(state)``.
- ``eval_fn(model)`` returns a float or a dict of floats; it runs under ``no_grad`` in eval
  mode, and the global RNG states are restored after it, so evaluating never changes the
  training trajectory.

Resume is exact on CPU: a checkpoint holds everything the next step reads (parameters, AdamW
moments, schedule position, RNG states, data position), so a run stopped at any step and
resumed logs bitwise the same losses as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from ..inspect import RoutingMonitor
from ..routing import attach_bias_update, step_schedules
from .checkpoint import (
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
    set_rng_state,
)
from .metrics import JsonlLog, Progress, read_jsonl, truncate_jsonl
from .schedule import WarmupCosine

__all__ = [
    "ResumableIterator",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Trainer",
    "count_tokens",
    "moe_aux_loss",
    "param_groups",
    "train",
]


class TrainError(RuntimeError):
    """The run cannot start or continue; the message says what to change."""


@runtime_checkable
class ResumableIterator(Protocol):
    """What the trainer needs from its data: batches and a position it can save and restore."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainConfig:
    """Training hyperparameters and run options (maps one-to-one onto a recipe's [train]).

    Keys in :attr:`RUN_ONLY` may change between a run and its resume (they do not change the
    trajectory); any other change makes resume fail with the differing keys named.
    """

    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off (the norm is still logged)
    grad_accum: int = 1  # micro-batches per optimizer step
    aux_free_bias: bool = True  # run the aux-loss-free router bias update after each step
    seed: int = 0  # seeds torch, numpy and random at the start of a fresh run
    run_dir: str = "runs/train"
    eval_every: int = 0  # 0: evaluate only at the end (when an eval_fn is given)
    save_every: int = 0  # 0: save only when the run ends or stops
    keep_checkpoints: int = 2
    log_every: int = 1
    routing_every: int = 10  # 0: no routing telemetry
    time_budget_s: float | None = None  # wall-clock limit for this invocation
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    verbose: bool = True  # one-line messages (resume, stop, save) on stderr

    RUN_ONLY = (
        "run_dir",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "routing_every",
        "time_budget_s",
        "progress",
        "verbose",
    )

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        checks = [
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (
                len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                "betas must be two values in [0, 1)",
            ),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0: off)"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (
                min(self.eval_every, self.save_every, self.routing_every) >= 0,
                "*_every must be >= 0",
            ),
            (self.time_budget_s is None or self.time_budget_s >= 0, "time_budget_s must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

    def fingerprinted(self) -> dict[str, Any]:
        """The fields that shape the trajectory (all but :attr:`RUN_ONLY`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUN_ONLY}


@dataclass
class TrainResult:
    """How a :meth:`Trainer.fit` call ended."""

    step: int
    stopped: str  # "completed", "time_budget", "interrupted" or "data_exhausted"
    checkpoint: Path | None
    elapsed_s: float
    loss: float | None = None
    eval: dict[str, float] | None = None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on weight matrices and expert banks only.

    No decay on biases (names ending in ``bias``, which includes expert-bank biases), on
    vectors and scalars (norm gains, gates) or on ``nn.Embedding`` weights (a tied output
    projection shares the embedding's parameter and so is not decayed either): shrinking
    these toward 0 regularises nothing useful and hurts rare tokens (as in GPT-2/nanoGPT,
    OLMo). Router weights are matrices and are decayed.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith("bias") or id(p) in embeddings:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def moe_aux_loss(model: nn.Module) -> Tensor:
    """The sum of ``aux_loss`` over a model's MoE layers after a forward (0 when none); a model
    may return it as its ``aux_loss``."""
    losses = [m.aux_loss for m in model.modules() if hasattr(m, "aux_losses")]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.reshape(()) for loss in losses]).sum()


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("input_ids", "tokens", "idx", "x", "inputs"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        values = list(batch.values())
    elif isinstance(batch, list | tuple):
        values = list(batch)
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def count_tokens(batch: Any) -> int:
    """Tokens in a batch for tokens/s: all elements of the first integer tensor (token ids);
    for float inputs, the number of samples (its first dimension)."""
    t = _first_tensor(batch)
    if t is None:
        return 0
    if t.is_floating_point() or t.is_complex():
        return int(t.shape[0]) if t.dim() else 1
    return t.numel()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def _losses(out: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, Tensor):
        loss, aux = out, None
    elif isinstance(out, Mapping):
        loss, aux = out.get("loss"), out.get("aux_loss")
    else:
        loss, aux = getattr(out, "loss", None), getattr(out, "aux_loss", None)
    if not isinstance(loss, Tensor):
        raise TypeError(
            "the model's forward must return the loss: a scalar tensor, a dict with 'loss' or "
            f"an object with .loss (got {type(out).__name__}); do training batches carry targets?"
        )
    if loss.dim() != 0:
        raise ValueError(
            f"the loss must be a scalar (a mean over the batch), got shape {tuple(loss.shape)}"
        )
    return loss, aux


class _DataExhausted(Exception):
    pass


class _NoLog:
    """The logs of ranks other than 0 in a distributed run: rank 0 writes them."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _clear_router_counts(model: nn.Module) -> None:
    """Zero the per-step token counts of aux-free-biased routers (non-persistent buffers, zero
    at every step boundary), after a rolled-back step or a load, so the next bias update sees
    only the next step's tokens, as in an uninterrupted run."""
    for module in model.modules():
        counts = getattr(module, "tokens_seen", None)
        if callable(getattr(module, "update_bias", None)) and isinstance(counts, Tensor):
            counts.zero_()


class Trainer:
    """Train ``model`` on ``data``; see the module docstring for the protocols.

    Files in ``cfg.run_dir``: ``metrics.jsonl`` (``kind`` "train": step, loss, aux, lr,
    grad_norm, tokens, tokens_per_s, elapsed_s; ``kind`` "eval": step and the eval metrics),
    ``routing.jsonl`` (per MoE layer: load per expert and balance statistics over the steps
    since the previous line) and ``checkpoints/``.

    Args:
        model: the module to train (on the device it is on; batches are moved there).
        data: a :class:`ResumableIterator`.
        cfg: a :class:`TrainConfig`.
        eval_fn: optional ``eval_fn(model) -> float | dict[str, float]``.
        config: the rest of the run's config (model, data...), JSON-able; stored in every
            checkpoint and compared on resume.
        forward: optional ``forward(model, batch) -> output`` replacing the default call.
        tokens_in: optional ``tokens_in(batch) -> int`` replacing :func:`count_tokens`.
    """

    def __init__(
        self,
        model: nn.Module,
        data: ResumableIterator,
        cfg: TrainConfig | None = None,
        eval_fn: Callable[[nn.Module], Any] | None = None,
        config: dict | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        tokens_in: Callable[[Any], int] | None = None,
    ):
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(data, method, None)):
                raise TypeError(
                    f"data must be a resumable iterator with state_dict() and load_state_dict(); "
                    f"{type(data).__name__} has no {method}()"
                )
        self.model, self.data = model, data
        # Under gatelab.parallelize: the module inside DDP (checkpoints and telemetry use
        # its names) and the state that shards batches and syncs gradients.
        from ..parallel import parallel_state, unwrap

        self._core, self.parallel = unwrap(model), parallel_state(model)
        self._is_main = self.parallel is None or self.parallel.is_main
        self.cfg = cfg or TrainConfig()
        self.eval_fn, self.forward = eval_fn, forward or _call_model
        self.tokens_in = tokens_in or count_tokens
        self.config = {"train": self.cfg.fingerprinted(), "run": config or {}}
        self.run_dir = Path(self.cfg.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        c = self.cfg
        self.optimizer = torch.optim.AdamW(
            param_groups(model, c.weight_decay), lr=c.lr, betas=c.betas, eps=c.eps
        )
        self.scheduler = WarmupCosine(self.optimizer, c.warmup_steps, c.steps, c.min_lr_ratio)
        self._bias_hook = attach_bias_update(self.optimizer, model) if c.aux_free_bias else None
        self.step = 0
        self.tokens = 0
        self._elapsed_before = 0.0  # training time of earlier invocations (from the checkpoint)
        self._last_saved: int | None = None
        self._updating = False
        self._stop_requested = False
        self._metrics: JsonlLog | None = None
        self._routing_log: JsonlLog | None = None
        self._monitor: RoutingMonitor | None = None
        self._progress: Progress | None = None
        self._t0 = time.perf_counter()
        self._last_path: Path | None = None

    # -- run directory -----------------------------------------------------------------------

    def _prepare_run_dir(self, resume: bool) -> None:
        """Fail before any training when run_dir cannot be written or already holds a run."""
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.checkpoint_dir):
                pass
        except OSError as e:
            raise TrainError(
                f"run directory {self.run_dir} is not writable ({e.strerror or e}); choose "
                "another run_dir or fix its permissions"
            ) from e
        if not resume:
            existing = latest_checkpoint(self.checkpoint_dir)
            if existing is not None or read_jsonl(self.run_dir / "metrics.jsonl"):
                raise TrainError(
                    f"run directory {self.run_dir} already holds a run"
                    + (f" (checkpoint {existing.name})" if existing else "")
                    + "; pass resume=True to continue it, or choose another run_dir"
                )
        remove_stale_temporaries(self.checkpoint_dir)

    def _resume(self) -> None:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            self._say(f"no checkpoint in {self.checkpoint_dir}: starting from step 0")
            self._seed()
        else:
            ckpt = load_checkpoint(
                path,
                self._core,
                self.optimizer,
                self.scheduler,
                config=self.config,
                data=self.data,
                transform=self.parallel.reshard if self.parallel else None,
            )
            _clear_router_counts(self.model)
            self.step = ckpt.step
            self.tokens = int(ckpt.extra.get("tokens", 0))
            self._elapsed_before = float(ckpt.extra.get("elapsed_s", 0.0))
            self._last_saved = ckpt.step
            self._say(f"resumed from {path} at step {ckpt.step}")
        for name in ("metrics.jsonl", "routing.jsonl") if self._is_main else ():
            truncate_jsonl(self.run_dir / name, self.step)

    def _seed(self) -> None:
        seed = self.cfg.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    # -- messages and stopping -----------------------------------------------------------

    def _say(self, message: str) -> None:
        if not self.cfg.verbose or not self._is_main:
            return
        progress = getattr(self, "_progress", None)
        if progress is not None:
            progress.write(message)
        else:
            print(message, file=sys.stderr)

    @contextlib.contextmanager
    def _sigint_stops(self):
        """Ctrl-C asks the loop to stop after the current step (then it saves); a second
        Ctrl-C interrupts the step itself, which is then rolled back before saving."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self._say("Ctrl-C: stopping after this step and saving (press again to stop now)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)

    # -- one step ------------------------------------------------------------------------

    def _next_batch(self) -> Any:
        try:
            return next(self._batches)
        except StopIteration:
            raise _DataExhausted from None

    def _train_step(self) -> dict[str, float]:
        """Forward/backward over ``grad_accum`` micro-batches, clip, update; the record to log."""
        cfg, model = self.cfg, self.model
        model.train()
        # Schedules (router temperature, k, capacity) are functions of the steps taken, which
        # the checkpoint stores, so a resumed run sets the same values.
        step_schedules(model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = aux_sum = None
        tokens = 0
        for _ in range(cfg.grad_accum):
            batch = self._next_batch()
            tokens += self.tokens_in(batch)
            if self.parallel is not None:  # every rank reads the global batch, keeps its rows
                batch = self.parallel.shard_batch(batch)
            loss, aux = _losses(self.forward(model, _to_device(batch, self._device)))
            total = loss if aux is None else loss + aux
            (total / cfg.grad_accum).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            if aux is not None:
                aux_sum = aux.detach() if aux_sum is None else aux_sum + aux.detach()
        loss_value = float(loss_sum) / cfg.grad_accum
        aux_value = float(aux_sum) / cfg.grad_accum if aux_sum is not None else 0.0
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if self.parallel is not None:
            self.parallel.finish_backward(model)
            loss_value, aux_value = self.parallel.mean([loss_value, aux_value])
            grad_norm = float(self.parallel.clip_grad_norm_(model, params, max_norm))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise FloatingPointError(
                f"step {self.step + 1}: loss {loss_value}, gradient norm {grad_norm}; the update "
                "was skipped. Lower lr, raise warmup_steps or set grad_clip; the last checkpoint "
                "is intact"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self._updating = True
        if self.parallel is not None:
            self.parallel.before_optimizer_step(model)  # global aux-free router counts
        self.optimizer.step()  # the aux-loss-free bias hook runs here
        self.scheduler.step()
        self._updating = False
        self.step += 1
        self.tokens += tokens
        return {
            "loss": loss_value,
            "aux": aux_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_step": tokens,
        }

    # -- eval, routing, save -------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` in eval mode without gradients, leaving the RNG states as they were."""
        if self.eval_fn is None:
            return {}
        rng = get_rng_state()
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.remove()  # eval forwards are not training telemetry
        self.model.eval()
        try:
            with torch.no_grad():
                result = self.eval_fn(self.model)
        finally:
            self.model.train()
            set_rng_state(rng)
            if monitor is not None:
                monitor.attach(self._core)
        if isinstance(result, Mapping):
            return {str(k): float(v) for k, v in result.items()}
        return {"eval_loss": float(result)}

    def _log_routing(self) -> None:
        if self.parallel is not None:
            self.parallel.reduce_monitor(self._monitor)
        summary = self._monitor.summary()
        if summary:
            self._routing_log.write(
                {"step": self.step, "from_step": self._routing_from, "layers": summary}
            )
        self._monitor.reset()
        self._routing_from = self.step

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (logs are synced first) and prune old ones.

        Distributed: every rank gathers the expert shards, rank 0 writes one whole
        checkpoint (loadable under any expert-parallel size) and returns its path, the
        others None; all ranks wait until it is written.
        """
        for log in (self._metrics, self._routing_log):
            if log is not None:
                log.sync()
        whole = (None, None)
        if self.parallel is not None:
            whole = self.parallel.full_state(self.model, self.optimizer)
        path = None
        if self._is_main:
            path = save_checkpoint(
                self.checkpoint_dir,
                self.step,
                self._core,
                self.optimizer,
                self.scheduler,
                data_state=self.data.state_dict(),
                config=self.config,
                extra={"tokens": self.tokens, "elapsed_s": self._elapsed()},
                model_state=whole[0],
                optimizer_state=whole[1],
            )
            prune_checkpoints(self.checkpoint_dir, self.cfg.keep_checkpoints)
        if self.parallel is not None:
            self.parallel.barrier()
        self._last_saved = self.step
        self._last_path = path
        return path

    def _stop_reason(self) -> str | None:
        """Why to stop now ("interrupted", "time_budget") or None; distributed, the ranks
        agree, so none waits in a collective for a rank that stopped."""
        cfg = self.cfg
        code = int(
            cfg.time_budget_s is not None and time.perf_counter() - self._t0 >= cfg.time_budget_s
        )
        code = 2 if self._stop_requested else code
        if self.parallel is not None:
            code = self.parallel.agree(code)
        return (None, "time_budget", "interrupted")[code]

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._t0)

    # -- the loop ------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``cfg.steps``, or until the time budget, Ctrl-C or the end of the data.

        ``resume=True`` continues from the latest checkpoint in ``run_dir`` (or starts fresh
        when there is none); without it, a run_dir that already holds a run is an error, so
        nothing is overwritten by accident. Every way of stopping saves a checkpoint.
        """
        cfg = self.cfg
        self._prepare_run_dir(resume)
        if self.parallel is not None:  # every rank has checked run_dir before rank 0 writes
            self.parallel.barrier()
        if resume:
            self._resume()
        else:
            self._seed()
        self._device = next(self.model.parameters(), torch.zeros(())).device
        self._batches = self.data if hasattr(self.data, "__next__") else iter(self.data)
        self._t0 = time.perf_counter()
        self._last_path = None
        self._stop_requested = False
        has_routing = any(hasattr(m, "last_routing") for m in self.model.modules())
        self._monitor = (
            RoutingMonitor().attach(self._core) if cfg.routing_every and has_routing else None
        )
        self._routing_from = self.step
        log = JsonlLog if self._is_main else _NoLog  # rank 0 writes the logs
        self._metrics = log(self.run_dir / "metrics.jsonl")
        self._routing_log = log(self.run_dir / "routing.jsonl") if self._monitor else None
        self._progress = Progress(
            cfg.steps, initial=self.step, enabled=cfg.progress if self._is_main else False
        )
        last: dict[str, float] = {}
        last_eval: dict[str, float] | None = None
        window_t, window_tokens = time.perf_counter(), 0
        stopped = "completed"
        try:
            with self._sigint_stops():
                while self.step < cfg.steps:
                    reason = self._stop_reason()
                    if reason is not None:
                        stopped = reason
                        break
                    snapshot = (copy.deepcopy(self.data.state_dict()), get_rng_state())
                    try:
                        last = self._train_step()
                    except (KeyboardInterrupt, _DataExhausted) as e:
                        if self._updating:  # parameters half-updated: nothing consistent to save
                            raise
                        self.optimizer.zero_grad(set_to_none=True)
                        self.data.load_state_dict(snapshot[0])
                        set_rng_state(snapshot[1])
                        _clear_router_counts(self.model)
                        stopped = (
                            "interrupted" if isinstance(e, KeyboardInterrupt) else "data_exhausted"
                        )
                        break
                    window_tokens += last["tokens_step"]
                    tokens_per_s = window_tokens / max(time.perf_counter() - window_t, 1e-9)
                    self._progress.update(self.step, last["loss"], tokens_per_s)
                    final = self.step == cfg.steps
                    if self.step % cfg.log_every == 0 or final:
                        record = {"kind": "train", "step": self.step, **last}
                        record.pop("tokens_step")
                        record.update(
                            tokens=self.tokens, tokens_per_s=tokens_per_s, elapsed_s=self._elapsed()
                        )
                        self._metrics.write(record)
                        window_t, window_tokens = time.perf_counter(), 0
                    if self.eval_fn is not None and (
                        final or (cfg.eval_every and self.step % cfg.eval_every == 0)
                    ):
                        last_eval = self.evaluate()
                        self._metrics.write({"kind": "eval", "step": self.step, **last_eval})
                    if self._monitor is not None and (final or self.step % cfg.routing_every == 0):
                        self._log_routing()
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                # Still inside the SIGINT guard: a Ctrl-C now does not cut the final save short.
                if self._monitor is not None and self.step > self._routing_from:
                    self._log_routing()
                if self._last_saved != self.step:
                    self.save()
        finally:
            self._progress.close()
            if self._monitor is not None:
                self._monitor.remove()
            self._metrics.close()
            if self._routing_log is not None:
                self._routing_log.close()
            self._progress = None
        result = TrainResult(
            step=self.step,
            stopped=stopped,
            checkpoint=self._last_path or latest_checkpoint(self.checkpoint_dir),
            elapsed_s=self._elapsed(),
            loss=last.get("loss"),
            eval=last_eval,
        )
        self._report(result)
        return result

    def _report(self, result: TrainResult) -> None:
        why = {
            "completed": "finished",
            "time_budget": f"stopped by the time budget ({self.cfg.time_budget_s:g} s)"
            if self.cfg.time_budget_s is not None
            else "stopped by the time budget",
            "interrupted": "interrupted",
            "data_exhausted": "stopped: the data ran out",
        }[result.stopped]
        loss = f", loss {result.loss:.4f}" if result.loss is not None else ""
        again = "" if result.stopped == "completed" else "; resume=True continues it"
        self._say(
            f"{why} at step {result.step}/{self.cfg.steps}{loss}; checkpoint {result.checkpoint}{again}"
        )


def train(
    model: nn.Module,
    data: ResumableIterator,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    **kwargs: Any,
) -> TrainResult:
    """``Trainer(model, data, cfg, **kwargs).fit(resume)`` in one call."""
    return Trainer(model, data, cfg, **kwargs).fit(resume=resume)
