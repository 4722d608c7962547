"""From a recipe to a run: build the model, the data, the evaluation and the trainer.

A recipe has four parts::

    name = "moe-lm"              # optional; the file name by default
    description = "..."          # optional
    [model]  kind = "lm" | "mlp" | "lenet5", then that model's config keys
    [data]   kind = "corpus" | "digits", then the keys of DATA_KEYS[kind]
    [train]  the keys of gatelab.train.TrainConfig (run_dir defaults to runs/<name>)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DOMAINS, EvalBatches, LMBatches, TensorBatches, load_corpus, load_digits
from ..data.shard import shard_data
from ..data.text import ByteTokenizer
from ..models import MODELS
from ..models.config import Config, ConfigError, check_positive
from ..train import TrainConfig, Trainer, TrainResult
from ..train.evaluate import bits_per_byte
from . import RecipeError, apply_override, check_keys, load_recipe, nearest

RECIPE_KEYS = ["name", "description", "model", "data", "train"]


@dataclass(frozen=True)
class CorpusData(Config):
    """``[data] kind = "corpus"``: the prose/code byte corpus, windows of ``seq_len``."""

    _where = "data"
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 0
    val_fraction: float = 0.1  # > 0: the evaluation reads this held-out part
    eval_batches: int = 8  # validation batches per domain the evaluation scores

    def validate(self) -> None:
        check_positive(self, "seq_len", "batch_size", "val_fraction", "eval_batches")
        check_positive(self, "seed", allow_zero=True)
        if self.val_fraction >= 1:
            raise ConfigError(f"data.val_fraction must be < 1, got {self.val_fraction}")


@dataclass(frozen=True)
class DigitsData(Config):
    """``[data] kind = "digits"``: scikit-learn's 8x8 digits, rotated by ``rotation`` degrees."""

    _where = "data"
    batch_size: int = 64
    seed: int = 0
    rotation: float = 0.0

    def validate(self) -> None:
        check_positive(self, "batch_size")
        check_positive(self, "seed", allow_zero=True)


DATA_CONFIGS: dict[str, type[Config]] = {"corpus": CorpusData, "digits": DigitsData}
# Data keys and their defaults, per data kind.
DATA_KEYS: dict[str, dict[str, Any]] = {k: c().to_dict() for k, c in DATA_CONFIGS.items()}


@dataclass
class Run:
    """Everything a recipe builds; ``trainer()`` makes the Trainer.

    ``eval_sets`` (corpus data only): the validation batches ``eval_fn`` scores, per domain,
    built once, so a caller can score or profile the very same batches.
    """

    recipe: dict[str, Any]
    model: nn.Module
    data: Any
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    forward: Callable[[nn.Module, Any], Any] | None
    train_config: TrainConfig
    eval_sets: dict[str, list] | None = field(default=None, repr=False)

    def trainer(self, evaluate: bool = True) -> Trainer:
        """The Trainer of this run; ``evaluate=False`` leaves out ``eval_fn`` (the caller
        evaluates itself)."""
        run_config = {k: v for k, v in self.recipe.items() if k != "train"}
        return Trainer(
            self.model,
            self.data,
            self.train_config,
            eval_fn=self.eval_fn if evaluate else None,
            config=run_config,
            forward=self.forward,
        )


@dataclass(frozen=True)
class RunSpec:
    """A recipe checked in full (every key, type and value) with nothing built yet."""

    name: str
    model_kind: str
    model: Config
    data_kind: str
    data: Config
    train: TrainConfig


def check_recipe(recipe: dict[str, Any]) -> RunSpec:
    """Every config of ``recipe`` built and validated ([model] and its nested tables,
    [data], [train]) without building the model or loading data: the cheap check a run
    passes before anything is allocated."""
    check_keys(recipe, RECIPE_KEYS, "the recipe")
    name = recipe.get("name", "run")
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"name: expected a non-empty string, got {name!r}")
    if not isinstance(recipe.get("description", ""), str):
        raise RecipeError(f"description: expected a string, got {recipe['description']!r}")
    model_table = dict(_table(recipe, "model"))
    model_kind = _kind(model_table, "model", "lm", MODELS.names())
    model_config = MODELS.get(model_kind)[0].from_dict(model_table)
    data_table = dict(_table(recipe, "data"))
    data_kind = _kind(data_table, "data", "corpus", list(DATA_CONFIGS))
    check_keys(data_table, list(DATA_KEYS[data_kind]), f"[data] (kind {data_kind!r})")
    data_config = DATA_CONFIGS[data_kind](**data_table)
    train = _train_config(recipe, name)
    return RunSpec(name, model_kind, model_config, data_kind, data_config, train)


def _kind(table: dict[str, Any], section: str, default: str, kinds: list[str]) -> str:
    """``table``'s ``kind`` (removed from it), checked against ``kinds``."""
    kind = table.pop("kind", default)
    if not isinstance(kind, str) or kind not in kinds:
        raise RecipeError(
            f"{section}.kind: unknown kind {kind!r}{nearest(str(kind), kinds)}; "
            f"valid kinds: {', '.join(kinds)}"
        )
    return kind


def build_run(recipe: dict[str, Any] | str | Path, overrides: Sequence[str] | None = None) -> Run:
    """Build the model, data and evaluation a recipe describes (nothing is trained).

    ``recipe``: a loaded recipe (dict, left unchanged: the overrides apply to a copy), a
    shipped recipe's name (``"moe-lm"``) or a path to a TOML file. ``overrides``:
    ``section.key=value`` strings, as ``gatelab train --set`` takes them. Every config is
    checked (:func:`check_recipe`) before anything is built.
    """
    if isinstance(recipe, dict):
        recipe = copy.deepcopy(recipe)
        for override in overrides or []:
            apply_override(recipe, override)
    else:
        recipe = load_recipe(recipe, list(overrides or []))
    spec = check_recipe(recipe)
    model = MODELS.get(spec.model_kind)[1](spec.model)
    build = _corpus_data if spec.data_kind == "corpus" else _digits_data
    data, eval_fn, forward, eval_sets = build(model, spec.data.to_dict())
    return Run(recipe, model, data, eval_fn, forward, spec.train, eval_sets)


def _table(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    table = recipe.get(name, {})
    if not isinstance(table, dict):
        raise RecipeError(f"[{name}] must be a table, got {type(table).__name__}")
    return table


def _train_config(recipe: dict[str, Any], name: str) -> TrainConfig:
    """[train] as a TrainConfig; ``run_dir`` defaults to ``runs/<name>``."""
    table = dict(_table(recipe, "train"))
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    check_keys(table, fields, "[train]")
    table.setdefault("run_dir", f"runs/{name}")
    try:
        return TrainConfig(**table)
    except ConfigError as error:  # names the key: "train.steps: expected an int, ..."
        raise RecipeError(str(error)) from None
    except (TypeError, ValueError) as error:
        raise RecipeError(f"[train]: {error}") from None


def _corpus_data(model: nn.Module, options: dict[str, Any]):
    vocab = ByteTokenizer.vocab_size
    if getattr(getattr(model, "config", None), "vocab_size", vocab) < vocab:
        raise RecipeError(
            f"[model] vocab_size={model.config.vocab_size} is smaller than the byte corpus's "
            f"{vocab} token ids (256 bytes + EOS); set vocab_size = {vocab}"
        )
    corpus = load_corpus(seed=options["seed"], val_fraction=options["val_fraction"])
    data = LMBatches(
        corpus,
        "train",
        seq_len=options["seq_len"],
        batch_size=options["batch_size"],
        seed=options["seed"],
    )

    # The first eval_batches batches of each domain's validation stream (deterministic).
    eval_sets = {
        domain: list(
            EvalBatches(
                corpus,
                "val",
                seq_len=options["seq_len"],
                batch_size=options["batch_size"],
                domain=domain,
                max_batches=options["eval_batches"],
            )
        )
        for domain in DOMAINS
    }
    empty = [domain for domain, batches in eval_sets.items() if not batches]
    if empty:  # an evaluation over nothing reports NaN bits per byte
        raise RecipeError(
            f"[data] leaves no validation text for {', '.join(empty)} "
            f"(val_fraction={options['val_fraction']}): raise data.val_fraction"
        )

    def eval_fn(model: nn.Module) -> dict[str, float]:
        batches = (batch for domain in DOMAINS for batch in eval_sets[domain])
        per_domain = bits_per_byte(model, batches)
        return {f"bpb_{domain}": numbers["bits_per_byte"] for domain, numbers in per_domain.items()}

    return data, eval_fn, lambda m, batch: m(batch.inputs, batch.targets), eval_sets


def _digits_data(model: nn.Module, options: dict[str, Any]):
    from ..data import rotate

    splits = load_digits(seed=options["seed"])

    def images(split: str):
        x = splits[split].images
        return rotate(x, options["rotation"]) if options["rotation"] else x

    data = TensorBatches(
        images("train"),
        splits["train"].labels,
        batch_size=options["batch_size"],
        seed=options["seed"],
    )
    val_x, val_y = images("val"), splits["val"].labels

    def eval_fn(model: nn.Module) -> dict[str, float]:
        out = model(val_x, val_y)
        return {
            "val_loss": float(out.loss),
            "val_accuracy": float((out.logits.argmax(-1) == val_y).float().mean()),
        }

    return data, eval_fn, None, None


def run_recipe(
    name_or_path: str,
    overrides: list[str] | None = None,
    resume: bool = False,
    ep: int | None = None,
    mesh: str | None = None,
    mixed_precision: str | None = None,
    global_routing: bool = False,
) -> TrainResult:
    """``gatelab train``: load a recipe, build its run and train it.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) the run is distributed: the model goes
    through ``gatelab.parallelize`` with expert-parallel size ``ep`` (None: 1, data
    parallel only), or, with ``mesh`` (``"dp_shard=2,ep=2"``), FSDP2 + expert parallelism
    on that device mesh (``mixed_precision="bf16"``: FSDP2 bf16 parameters and reductions,
    GPUs only). ``global_routing``: capacity and expert choice decide on the global batch.
    Either without torchrun is an error that says how to launch.
    """
    import torch.distributed as dist

    from ..parallel import init_distributed, parallelize

    recipe = load_recipe(name_or_path, overrides)
    spec = check_recipe(recipe)  # every config, before a process group or a model exists
    _check_batch_split(spec.data.batch_size)
    ours = not dist.is_initialized()  # a group the caller made is the caller's to destroy
    distributed = init_distributed()
    if mesh is not None and ep is not None:
        raise RecipeError("--mesh and --ep together: put the expert-parallel size in the mesh")
    if mixed_precision is not None and mesh is None:
        raise RecipeError("--mixed-precision needs --mesh (FSDP2's mixed precision)")
    if not distributed and mesh is not None:
        raise RecipeError(
            f"--mesh {mesh} needs torchrun: launch with torchrun --nproc_per_node=N "
            f"-m gatelab train {name_or_path} --mesh {mesh}"
        )
    if not distributed and ep not in (None, 1):
        raise RecipeError(
            f"--ep {ep} needs {ep} or a multiple of {ep} processes: launch with "
            f"torchrun --nproc_per_node={ep} -m gatelab train {name_or_path} --ep {ep}"
        )
    try:
        # The model's initial weights come from [train] seed too, so a run is repeatable and
        # a distributed run starts where the single-process run does.
        torch.manual_seed(int(_table(recipe, "train").get("seed", 0)))
        run = build_run(recipe)
        if distributed:
            if dist.get_backend() == "nccl":  # NCCL moves device tensors: one GPU per rank
                run.model.to(torch.device("cuda", torch.cuda.current_device()))
            try:
                if mesh is not None:
                    run.model = parallelize(
                        run.model,
                        mesh=mesh,
                        mp_policy=mixed_precision,
                        global_routing=global_routing,
                    )
                else:
                    run.model = parallelize(run.model, ep=ep or 1, global_routing=global_routing)
            except ValueError as error:
                raise RecipeError(
                    f"--mesh {mesh}: {error}" if mesh else f"--ep {ep}: {error}"
                ) from None
            # Each rank reads only its rows of every batch (gatelab.data.shard).
            run.data = shard_data(run.data, dist.get_rank(), dist.get_world_size())
        return run.trainer().fit(resume=resume)
    finally:
        if distributed and ours:
            dist.destroy_process_group()


def _check_batch_split(batch_size: int) -> None:
    """Under torchrun each rank trains on 1/W of every batch: refuse a batch_size W does
    not divide before any rank starts work (every rank raises the same error; the CLI
    prints it once, on rank 0)."""
    import torch.distributed as dist

    if dist.is_initialized():
        world = dist.get_world_size()
    else:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
        except ValueError:
            world = 1  # not torchrun's variable: init_distributed reports it
    if world > 1 and batch_size % world:
        raise RecipeError(
            f"data.batch_size={batch_size} cannot be split evenly over {world} processes; "
            f"make it a multiple of {world} (e.g. {-(-batch_size // world) * world})"
        )
