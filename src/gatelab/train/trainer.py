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

import copy
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..inspect import RoutingMonitor
from ..routing import attach_bias_update, step_schedules
from ..routing.aux_free import biased_routers
from .checkpoint import (
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from .config import ResumableIterator, TrainConfig, TrainError, TrainResult
from .dcp import load_dcp, resume_point, save_dcp
from .metrics import Progress
from .protocols import call_model, count_tokens, losses, moe_aux_loss, param_groups, to_device
from .rundir import RunLogs, prepare_run_dir, truncate_logs
from .schedule import WarmupCosine
from .sharded import gather_expert_banks, shard_expert_banks
from .stopping import REASONS, StopRequests

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


class _DataExhausted(Exception):
    pass


def _clear_router_counts(model: nn.Module) -> None:
    """Zero the per-step token counts of aux-free-biased routers (non-persistent buffers, zero
    at every step boundary), after a rolled-back step or a load, so the next bias update sees
    only the next step's tokens, as in an uninterrupted run."""
    for router in biased_routers(model):
        router.tokens_seen.zero_()


class Trainer:
    """Train ``model`` on ``data``; see the module docstring for the protocols.

    Files in ``cfg.run_dir``: ``metrics.jsonl`` (``kind`` "train": step, loss, aux, lr,
    grad_norm, tokens, tokens_per_s, elapsed_s; ``kind`` "eval": step and the eval metrics),
    ``routing.jsonl`` (per MoE layer: load per expert and balance statistics over the steps
    since the previous line), TensorBoard event files with the same numbers as scalars (see
    ``TrainConfig.tensorboard``) and ``checkpoints/``.

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
        self.eval_fn, self.forward = eval_fn, forward or call_model
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
        self._stop = StopRequests(self._say)  # Ctrl-C and the time budget
        self._logs: RunLogs | None = None
        self._monitor: RoutingMonitor | None = None
        self._progress: Progress | None = None
        self._last_path: Path | None = None

    # -- the loop ------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``cfg.steps``, or until the time budget, Ctrl-C or the end of the data.

        ``resume=True`` continues from the latest checkpoint in ``run_dir`` (or starts fresh
        when there is none); without it, a run_dir that already holds a run is an error, so
        nothing is overwritten by accident. Every way of stopping saves a checkpoint.
        """
        self._begin(resume)
        stopped = "completed"
        try:
            with self._stop.sigint():
                while self.step < self.cfg.steps:
                    reason = self._stop_reason() or self._step_or_roll_back()
                    if reason is not None:
                        stopped = reason
                        break
                    self._log_step()
                    self._maybe_evaluate()
                    self._maybe_log_routing()
                    self._maybe_save()
                # Still inside the SIGINT guard: a Ctrl-C now does not cut the final save short.
                self._finish()
        finally:
            self._close()
        result = TrainResult(
            step=self.step,
            stopped=stopped,
            checkpoint=self._last_path or latest_checkpoint(self.checkpoint_dir),
            elapsed_s=self._elapsed(),
            loss=self._last.get("loss"),
            eval=self._last_eval,
        )
        self._report(result)
        return result

    def _begin(self, resume: bool) -> None:
        """Check run_dir, restore or seed, open the logs, hook the telemetry, start the bar."""
        cfg = self.cfg
        prepare_run_dir(self.run_dir, resume)
        if self.parallel is not None:  # every rank has checked run_dir before rank 0 writes
            self.parallel.barrier()
        if resume:
            self._resume()
        else:
            self._seed()
        self._device = next(self.model.parameters(), torch.zeros(())).device
        self._batches = self.data if hasattr(self.data, "__next__") else iter(self.data)
        self._last_path = None
        self._last: dict[str, float] = {}
        self._last_eval: dict[str, float] | None = None
        has_routing = any(hasattr(m, "last_routing") for m in self.model.modules())
        self._monitor = (
            RoutingMonitor().attach(self._core) if cfg.routing_every and has_routing else None
        )
        self._routing_from = self.step
        self._logs = RunLogs(
            self.run_dir,
            main=self._is_main,
            routing=self._monitor is not None,
            tensorboard=cfg.tensorboard,
            start_step=self.step if resume else 0,
        )
        self._progress = Progress(
            cfg.steps, initial=self.step, enabled=cfg.progress if self._is_main else False
        )
        self._stop.start()  # the time budget counts from here (opening the logs is not training)
        self._window = (time.perf_counter(), 0)  # tokens/s over the steps since the last log

    @property
    def _final(self) -> bool:
        return self.step == self.cfg.steps

    def _step_or_roll_back(self) -> str | None:
        """One training step; None when it was taken. Ctrl-C inside the step or the end of the
        data undoes it (data position, RNG, router counts) and returns why it stopped."""
        snapshot = (copy.deepcopy(self.data.state_dict()), get_rng_state())
        try:
            self._last = self._train_step()
        except (KeyboardInterrupt, _DataExhausted) as e:
            if self._updating:  # parameters half-updated: nothing consistent to save
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self.data.load_state_dict(snapshot[0])
            set_rng_state(snapshot[1])
            _clear_router_counts(self.model)
            return "interrupted" if isinstance(e, KeyboardInterrupt) else "data_exhausted"
        return None

    def _log_step(self) -> None:
        """Update the bar every step; write a train record every ``log_every`` steps."""
        window_t, window_tokens = self._window
        window_tokens += self._last["tokens_step"]
        tokens_per_s = window_tokens / max(time.perf_counter() - window_t, 1e-9)
        self._progress.update(self.step, self._last["loss"], tokens_per_s)
        self._window = (window_t, window_tokens)
        if self.step % self.cfg.log_every == 0 or self._final:
            record = {"kind": "train", "step": self.step, **self._last}
            record.pop("tokens_step")
            record.update(tokens=self.tokens, tokens_per_s=tokens_per_s, elapsed_s=self._elapsed())
            self._logs.write(record)
            self._window = (time.perf_counter(), 0)

    def _maybe_evaluate(self) -> None:
        every = self.cfg.eval_every
        if self.eval_fn is not None and (self._final or (every and self.step % every == 0)):
            self._last_eval = self.evaluate()
            self._logs.write({"kind": "eval", "step": self.step, **self._last_eval})

    def _maybe_log_routing(self) -> None:
        every = self.cfg.routing_every
        if self._monitor is not None and (self._final or self.step % every == 0):
            self._log_routing()

    def _maybe_save(self) -> None:
        every = self.cfg.save_every
        if every and self.step % every == 0:
            self.save()

    def _finish(self) -> None:
        """Log the telemetry not yet written and save the last step (unless just saved)."""
        if self._monitor is not None and self.step > self._routing_from:
            self._log_routing()
        if self._last_saved != self.step:
            self.save()

    def _close(self) -> None:
        self._progress.close()
        if self._monitor is not None:
            self._monitor.remove()
        self._logs.close()
        self._progress = self._logs = None

    # -- resume --------------------------------------------------------------------------

    def _resume(self) -> None:
        sharded = getattr(self.parallel, "sharded_checkpoints", False)
        path = resume_point(self.checkpoint_dir, sharded)
        if path is None:
            self._say(f"no checkpoint in {self.checkpoint_dir}: starting from step 0")
            self._seed()
        else:
            load = partial(load_dcp, parallel=self.parallel) if sharded else load_checkpoint
            ckpt = load(
                path,
                self._core,
                self.optimizer,
                self.scheduler,
                config=self.config,
                data=self.data,
                **({} if sharded else {"transform": self._reshard()}),
            )
            _clear_router_counts(self.model)
            self.step = ckpt.step
            self.tokens = int(ckpt.extra.get("tokens", 0))
            self._elapsed_before = float(ckpt.extra.get("elapsed_s", 0.0))
            self._last_saved = ckpt.step
            self._say(f"resumed from {path} at step {ckpt.step}")
        if self._is_main:
            truncate_logs(self.run_dir, self.step)

    def _reshard(self):
        return partial(shard_expert_banks, self.parallel) if self.parallel else None

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

    def _stop_reason(self) -> str | None:
        """Why to stop now ("interrupted", "time_budget") or None; distributed, the ranks
        agree, so none waits in a collective for a rank that stopped."""
        code = self._stop.code(self.cfg.time_budget_s)
        if self.parallel is not None:
            code = self.parallel.agree(code)
        return REASONS[code]

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._stop.t0)

    # -- one step ------------------------------------------------------------------------

    def _next_batch(self) -> Any:
        try:
            return next(self._batches)
        except StopIteration:
            raise _DataExhausted from None

    def _train_step(self) -> dict[str, float]:
        """Forward/backward over ``grad_accum`` micro-batches, clip, update; the record to log."""
        model = self.model
        model.train()
        # Schedules (router temperature, k, capacity) are functions of the steps taken, which
        # the checkpoint stores, so a resumed run sets the same values.
        step_schedules(model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_value, aux_value, tokens = self._backward()
        grad_norm = self._clip()
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

    def _backward(self) -> tuple[float, float, int]:
        """The micro-batches' backward passes; their mean loss and aux loss (over all ranks
        when distributed) and the tokens they held."""
        accum = self.cfg.grad_accum
        loss_sum = aux_sum = None
        tokens = 0
        for _ in range(accum):
            batch = self._next_batch()
            if getattr(self.data, "sharded", False):  # this rank's rows only (equal shares)
                tokens += self.tokens_in(batch) * self.parallel.world
            else:
                tokens += self.tokens_in(batch)
                if self.parallel is not None:  # every rank reads the global batch, keeps its rows
                    batch = self.parallel.shard_batch(batch)
            loss, aux = losses(self.forward(self.model, to_device(batch, self._device)))
            total = loss if aux is None else loss + aux
            (total / accum).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            if aux is not None:
                aux_sum = aux.detach() if aux_sum is None else aux_sum + aux.detach()
        loss_value = float(loss_sum) / accum
        aux_value = float(aux_sum) / accum if aux_sum is not None else 0.0
        if self.parallel is not None:
            self.parallel.finish_backward(self.model)
            loss_value, aux_value = self.parallel.mean([loss_value, aux_value])
        return loss_value, aux_value, tokens

    def _clip(self) -> float:
        """Clip the gradients to ``grad_clip`` (when > 0); the global norm before clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        if self.parallel is not None:
            return float(self.parallel.clip_grad_norm_(self.model, params, max_norm))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

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
        if self.parallel is not None:  # every rank's tokens
            self._monitor.reduce(self.parallel.sum_over_ranks)
        summary = self._monitor.summary()
        if summary:
            self._logs.write_routing(
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
        if self._logs is not None:
            self._logs.sync()
        if getattr(self.parallel, "sharded_checkpoints", False):  # each rank its shards (DCP)
            extra = {"tokens": self.tokens, "elapsed_s": self._elapsed()}
            args = (self.optimizer, self.scheduler, self.data.state_dict(), self.config, extra)
            path = save_dcp(
                self.checkpoint_dir,
                self.step,
                self._core,
                *args,
                self.parallel,
                self.cfg.keep_checkpoints,
            )
            self._last_saved, self._last_path = self.step, path
            return path
        whole = (None, None)
        if self.parallel is not None:
            whole = gather_expert_banks(self.parallel, self._core, self.optimizer)
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
