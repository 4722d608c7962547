"""``gatelab bench train``: training throughput of the MoE LM against its dense equivalent.

Two language models are built in one process: the MoE LM (by default the demo's reference
model: 4 layers, width 256, 4 heads, 8 SwiGLU experts of width 512, top-2, byte vocabulary
of 257) and ``dense_equivalent`` of it, the dense LM whose FFNs have the width of the
``top_k`` experts a token passes through, so both have the same active parameters (up to
the routers). Each is timed on full training steps, exactly what the trainer does per step
without gradient accumulation::

    out = model(inputs, targets)
    (out.loss + out.aux_loss).backward()        # aux_loss: the MoE's weighted aux losses
    clip_grad_norm_(parameters, 1.0)
    optimizer.step()                            # AdamW, the trainer's parameter groups
    optimizer.zero_grad(set_to_none=True)

The result is tokens/s = batch_size * seq_len / median step time, for each model, and the
ratio moe/dense (issue 3's target: >= 0.8 on the CPU).

How it is measured, so the numbers are comparable:
- both models start from the same seed and see the same batches, step for step: real
  windows of the two-domain corpus's train split (``--data corpus``, the default) or
  uniformly random token ids (``--data random``); the batches are cut and moved to the
  device before the clock starts;
- the warm-up steps (which also create AdamW's moment buffers) run round-robin before the
  timed steps, and the timed steps are round-robin too: each round times one step of each
  model, the order alternating from round to round, so load from other processes on a
  shared machine, and cache left warm by the model that ran just before, fall on both alike;
- each number is the median of ``repeats`` timed steps (``time.perf_counter``); on CUDA the
  device is synchronised before the clock starts and before it stops.

``--contended N`` runs the warm-up and timed steps while N busy processes
(:func:`~gatelab.bench.common.busy_processes`) load the machine: run once without and once
with it to see how much a busy neighbour costs each model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch

from ..models.config import ConfigError
from ..models.lm import LM, LMConfig, dense_equivalent
from .common import (
    CONTENTION_METHOD,
    busy_processes,
    device_sync,
    environment,
    load_average,
    log_stderr,
    median,
    resolve_device,
    timeit,
    utc_now,
)
from .tables import format_train_table as format_table

SCHEMA = "gatelab.bench.train/1"

TARGET_RATIO = 0.8
"""Issue 3's target: the MoE LM trains at >= 0.8 of the dense LM's tokens/s on the CPU."""

MODELS = ("moe", "dense")
DATA_SOURCES = ("corpus", "random")

VOCAB_SIZE = 257  # ByteTokenizer.vocab_size: 256 bytes and the EOS id

DEFAULT_SIZES: dict[tuple[str, bool], tuple[int, int]] = {
    # (device type, quick) -> (batch_size, seq_len)
    ("cpu", False): (8, 256),
    ("cpu", True): (4, 128),
    ("cuda", False): (32, 256),
    ("cuda", True): (8, 256),
}
DEFAULT_STEPS: dict[tuple[str, bool], tuple[int, int]] = {
    # (device type, quick) -> (warmup, repeats)
    ("cpu", False): (2, 10),
    ("cpu", True): (1, 3),
    ("cuda", False): (5, 20),
    ("cuda", True): (3, 10),
}


def reference_config() -> LMConfig:
    """The demo's MoE LM: LMConfig's defaults (4 layers, D=256, 4 heads, E=8 experts of
    width 512, top-2, topk router, balance + z losses) with the byte vocabulary (257)."""
    return LMConfig(vocab_size=VOCAB_SIZE)


# -- settings ---------------------------------------------------------------------------


@dataclass
class TrainBenchSettings:
    """How to run. None fills in by device and ``quick``: batch size and sequence length
    (CPU: 8 x 256, 4 x 128 with --quick), warm-up and repeats (CPU: 2 and 10, 1 and 3 with
    --quick); router and dispatcher (None: the model config's). The clipping norm, lr,
    weight decay and betas are the trainer's defaults. ``contended``: busy processes that
    load the machine while timing (0: none)."""

    device: str = "cpu"
    batch_size: int | None = None
    seq_len: int | None = None
    warmup: int | None = None
    repeats: int | None = None
    quick: bool = False
    data: str = "corpus"
    router: str | None = None
    dispatcher: str | None = None
    seed: int = 0
    grad_clip: float = 1.0
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    contended: int = 0

    def resolved(self) -> TrainBenchSettings:
        """A copy with every None filled in and every value validated (ValueError)."""
        device = resolve_device(self.device)
        key = (device, self.quick)
        batch_size, seq_len = DEFAULT_SIZES[key]
        warmup, repeats = DEFAULT_STEPS[key]
        resolved = replace(
            self,
            device=device,
            batch_size=batch_size if self.batch_size is None else self.batch_size,
            seq_len=seq_len if self.seq_len is None else self.seq_len,
            warmup=warmup if self.warmup is None else self.warmup,
            repeats=repeats if self.repeats is None else self.repeats,
            betas=tuple(self.betas),
        )
        bounds = {"batch_size": 1, "seq_len": 1, "warmup": 0, "repeats": 1, "contended": 0}
        for name, low in bounds.items():
            value = getattr(resolved, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if resolved.data not in DATA_SOURCES:
            raise ValueError(
                f"unknown data source {resolved.data!r}; valid: {', '.join(DATA_SOURCES)}"
            )
        if not resolved.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {resolved.grad_clip}")
        return resolved


def moe_config(settings: TrainBenchSettings, config: LMConfig | None = None) -> LMConfig:
    """The MoE LM's config: ``config`` (default: :func:`reference_config`) with the settings'
    router and dispatcher and a RoPE table long enough for ``seq_len``; validated, so a bad
    router or dispatcher name is a ConfigError (a ValueError) that lists the valid ones."""
    config = config if config is not None else reference_config()
    if not isinstance(config, LMConfig):
        raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
    changes: dict = {}
    moe_changes: dict = {}
    if settings.router is not None and settings.router != config.moe.router:
        # Another router's keyword arguments need not fit this one: start from its defaults.
        moe_changes.update(router=settings.router, router_kwargs={})
    if settings.dispatcher is not None:
        moe_changes["dispatcher"] = settings.dispatcher
    if moe_changes:
        changes["moe"] = config.moe.replace(**moe_changes)
    if settings.seq_len is not None and settings.seq_len > config.max_seq_len:
        changes["max_seq_len"] = settings.seq_len
    config = config.replace(**changes) if changes else config
    if not config.moe_layer_indices():
        raise ConfigError(
            "the benchmark compares an MoE LM with its dense equivalent, but this config "
            'has no MoE layer (moe_layers="none"); use moe_layers="all"'
        )
    if config.vocab_size < VOCAB_SIZE and settings.data == "corpus":
        raise ConfigError(
            f"--data corpus needs vocab_size >= {VOCAB_SIZE} (bytes and EOS), got "
            f"{config.vocab_size}; use --data random or a larger vocabulary"
        )
    return config


# -- data -------------------------------------------------------------------------------


def make_batches(
    settings: TrainBenchSettings, vocab_size: int, count: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """``count`` (inputs, targets) pairs [batch_size, seq_len] on the device, and a
    description of where they came from for the JSON."""
    b, s = settings.batch_size, settings.seq_len
    if settings.data == "corpus":
        from ..data.text import LMBatches, load_corpus

        corpus = load_corpus(seed=settings.seed)
        batches = LMBatches(corpus, "train", seq_len=s, batch_size=b, seed=settings.seed)
        pairs = [(batch.inputs, batch.targets) for batch in _take(batches, count)]
        info = {
            "source": "corpus",
            "description": "windows of the train split of gatelab's two-domain byte corpus "
            "(pydoc topics + stdlib source; gatelab.data.text.load_corpus, LMBatches)",
            "train_tokens": int(corpus.stream("train")[0].numel()),
            "corpus_seed": settings.seed,
        }
    else:
        gen = torch.Generator().manual_seed(settings.seed)
        pairs = []
        for _ in range(count):
            tokens = torch.randint(vocab_size, (b, s + 1), generator=gen)
            pairs.append((tokens[:, :-1], tokens[:, 1:]))
        info = {
            "source": "random",
            "description": f"uniformly random token ids in [0, {vocab_size})",
        }
    device = torch.device(settings.device)
    pairs = [(x.to(device).contiguous(), y.to(device).contiguous()) for x, y in pairs]
    return pairs, {**info, "distinct_batches": count, "same_batches_for_both_models": True}


def _take(it: Iterator, count: int) -> list:
    return [next(it) for _ in range(count)]


# -- the measured training step --------------------------------------------------------------


def build_model(config: LMConfig, settings: TrainBenchSettings) -> LM:
    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        model = LM(config)
    return model.train()


def make_step(
    model: LM,
    settings: TrainBenchSettings,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    losses: list[torch.Tensor],
) -> Callable[[], None]:
    """A closure that runs one full training step on the next batch (cycling) and records
    the step's loss (detached, read after the clock)."""
    from ..routing import attach_bias_update
    from ..train.trainer import param_groups

    optimizer = torch.optim.AdamW(
        param_groups(model, settings.weight_decay), lr=settings.lr, betas=settings.betas
    )
    attach_bias_update(optimizer, model)  # as the trainer does; a no-op for unbiased routers
    params = [p for group in optimizer.param_groups for p in group["params"]]
    position = [0]

    def step() -> None:
        inputs, targets = batches[position[0] % len(batches)]
        position[0] += 1
        out = model(inputs, targets)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())

    return step


def measure_round_robin(
    steps: dict[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None,
) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` timed calls per step function, after ``warmup``
    untimed calls of each. Every round runs each function once; the order alternates
    between rounds (forward in even rounds, reversed in odd ones)."""
    names = list(steps)
    for round_ in range(warmup):
        for name in names if round_ % 2 == 0 else names[::-1]:
            steps[name]()
    if sync is not None:
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name] += timeit(steps[name], 0, 1, sync=sync)
    return times


# -- the benchmark ------------------------------------------------------------------------


def run_train_bench(
    settings: TrainBenchSettings | None = None,
    config: LMConfig | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = log_stderr,
) -> dict:
    """Run the benchmark and return the JSON-ready result (see ``SCHEMA``).

    ``config`` is the MoE LM's config (default: :func:`reference_config`); the dense model
    is ``dense_equivalent`` of it.
    """
    settings = (settings or TrainBenchSettings()).resolved()
    log = log or (lambda message: None)
    configs = {"moe": moe_config(settings, config)}
    configs["dense"] = dense_equivalent(configs["moe"])
    started, env_at_start = utc_now(), environment(settings.device)
    tokens_per_step = settings.batch_size * settings.seq_len
    _log_start(settings, env_at_start, log)
    count = settings.warmup + settings.repeats
    batches, data_info = make_batches(settings, configs["moe"].vocab_size, count)
    models = {name: build_model(configs[name], settings) for name in MODELS}
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in MODELS}
    steps = {name: make_step(models[name], settings, batches, losses[name]) for name in MODELS}
    log(f"  timing {', '.join(MODELS)} round-robin ({tokens_per_step} tokens per step)")
    with busy_processes(settings.contended):
        times = measure_round_robin(
            steps, settings.warmup, settings.repeats, device_sync(settings.device)
        )
    results = {
        name: _model_record(models[name], configs[name], times[name], losses[name], tokens_per_step)
        for name in MODELS
    }
    ratio = results["moe"]["tokens_per_s"] / results["dense"]["tokens_per_s"]
    return {
        "schema": SCHEMA,
        "command": command,
        "started_at": started,
        "finished_at": utc_now(),
        "environment": {**env_at_start, "load_average_1m_at_end": load_average()},
        "contended": settings.contended,
        "settings": _settings_record(settings, tokens_per_step),
        "data": data_info,
        "models": results,
        "ratio_tokens_per_s": ratio,
        "target": {
            "ratio": TARGET_RATIO,
            "applies_to": "cpu",
            "source": "issue 3: MoE LM training tokens/s >= 0.8 of the dense LM's on the CPU",
            "met": ratio >= TARGET_RATIO,
        },
    }


def _log_start(settings: TrainBenchSettings, env: dict, log: Callable[[str], None]) -> None:
    """What is about to run, and a note when other processes load the machine."""
    log(
        f"gatelab bench train: {settings.device}, batch {settings.batch_size} x seq "
        f"{settings.seq_len} ({settings.data} data), warmup {settings.warmup}, "
        f"repeats {settings.repeats}"
        + (f", {settings.contended} busy process(es)" if settings.contended else "")
    )
    load = env.get("load_average_1m")
    if load is not None and load >= 1.0:
        log(
            f"  note: 1-minute load average {load} ({env['cpu_count']} CPUs): other "
            "processes are running, so the times may be noisy (both models alike)"
        )


def _model_record(
    model: LM,
    config: LMConfig,
    step_times: list[float],
    losses: list[torch.Tensor],
    tokens_per_step: int,
) -> dict:
    """One model's entry of the result: its sizes, its step times and its losses."""
    step_s = median(step_times)
    return {
        "config": _config_dict(config),
        "parameters": model.num_parameters(),
        "active_parameters": model.num_active_parameters(),
        "active_parameters_no_embedding": model.num_active_parameters(include_embedding=False),
        "moe_layers": len(model.moe_layers()),
        "step_s": step_s,
        "step_min_s": min(step_times),
        "step_times_s": step_times,
        "tokens_per_s": tokens_per_step / step_s,
        "losses": [_finite_or_none(float(v)) for v in losses],
    }


def _settings_record(settings: TrainBenchSettings, tokens_per_step: int) -> dict:
    """The settings as the result records them, with how the step and timer work."""
    return {
        **asdict(settings),
        "dtype": "float32",
        "tokens_per_step": tokens_per_step,
        "step": "model(inputs, targets); (loss + aux_loss).backward(); "
        "clip_grad_norm_(params, grad_clip); AdamW.step() (trainer's parameter groups, "
        "aux-free bias hook attached); zero_grad(set_to_none=True)",
        "timer": "time.perf_counter; median of repeats after warm-up; warm-up and timed "
        "steps round-robin, one step of each model per round, order alternating"
        + ("; torch.cuda.synchronize around each step" if settings.device == "cuda" else ""),
        "ratio": "moe tokens/s / dense tokens/s (= dense step time / moe step time)",
        "contention": CONTENTION_METHOD if settings.contended else None,
    }


def _config_dict(config: LMConfig) -> dict:
    return asdict(config)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def check_corpus_fits(settings: TrainBenchSettings) -> None:
    """A ValueError, before anything is timed, when seq_len is longer than the corpus allows."""
    from ..data.text import LMBatches, load_corpus

    LMBatches(load_corpus(seed=settings.seed), "train", seq_len=settings.seq_len, batch_size=1)


__all__ = [
    "DATA_SOURCES",
    "MODELS",
    "SCHEMA",
    "TARGET_RATIO",
    "TrainBenchSettings",
    "build_model",
    "check_corpus_fits",
    "format_table",
    "make_batches",
    "make_step",
    "measure_round_robin",
    "moe_config",
    "reference_config",
    "run_train_bench",
]
