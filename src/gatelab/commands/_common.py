"""What the command modules share: argument types, the one user-error funnel, the
``--force`` flag (its checks: :mod:`gatelab.commands._outputs`), checkpoint lookup, model
opening and prompt sets.

The user-error funnel (:func:`run_guarded`, called by ``cli.main``): a ``ValueError`` (which
includes ``RecipeError`` and ``ConfigError``), a user-caused ``OSError`` (a missing file, a
directory where a file was expected and back, an existing file, no permission), a
``CheckpointError`` or a ``TrainError`` ends as one line ``gatelab COMMAND: error: MESSAGE``
on stderr and exit status 2: the message names the argument and the fix. Any other
exception is a bug and keeps its traceback. ``GATELAB_TRACEBACK=1`` in the environment
re-raises user errors too, to debug them.

Models are given as either an HF directory (``save_pretrained`` output, loaded with gatelab's
experts implementation) or a gatelab checkpoint (a run directory of ``gatelab train``, its
``checkpoints/`` directory or one checkpoint's JSON); :func:`open_model` is the one loader,
usable from Python too.

Prompt sets are given as ``NAME=FILE``: a ``.json`` file holding a list of strings or of
token-id lists, or any other file read as UTF-8 text and cut into windows of ``--seq-len``
tokens (at most ``--max-prompts``). Text needs a tokenizer: a gatelab byte LM has one; an HF
directory needs its tokenizer files (otherwise give token ids in JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train import TrainError
from ..train.checkpoint import CheckpointError

# -- argument types -------------------------------------------------------------------------


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``low``, with a message naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` (int or float) > 0; floats must be finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a{'n integer' if kind is int else ' number'}, got {text!r}"
            ) from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def shape_arg(text: str):
    """An argparse type: a benchmark shape ``[NAME=]T,D,F,E,k`` (see ``bench.shapes``)."""
    from ..bench.shapes import parse_shape

    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def float_between(low: float = -math.inf, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite float in [``low``, ``high``], with a message naming them."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            bounds = [
                f">= {low}" if low > -math.inf else "",
                f"<= {high}" if high < math.inf else "",
            ]
            raise argparse.ArgumentTypeError(
                f"must be a finite number {' and '.join(b for b in bounds if b)}, got {text}".strip()
            )
        return value

    parse.__name__ = f"number in [{low}, {high}]"
    return parse


# -- the user-error funnel ------------------------------------------------------------------

TRACEBACK_ENV = "GATELAB_TRACEBACK"

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # RecipeError and ConfigError are ValueErrors
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
    CheckpointError,
    TrainError,
)
"""What a user can cause (bad arguments, recipes, files, checkpoints, run directories)."""


def command_name(args: argparse.Namespace) -> str:
    """``bench train`` for a sub-benchmark, else the command: the ``COMMAND`` of the message."""
    benchmark = getattr(args, "benchmark", None)
    return f"{args.command} {benchmark}" if benchmark else args.command


def run_guarded(run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``run(args)``; a user error becomes one line on stderr and status 2 (see module doc)."""
    try:
        return run(args) or 0
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        # A config error (ValueError) is the same on every torchrun rank: said once.
        if is_main_process() or not isinstance(error, ValueError):
            print(f"gatelab {command_name(args)}: error: {message}", file=sys.stderr)
        return 2


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints the result."""
    return os.environ.get("RANK", "0") == "0"


# -- outputs --------------------------------------------------------------------------------
# The checks live in commands._outputs; the flag is defined here, once.

FORCE_HELP = "replace an earlier output of this command at the output path (never an input)"


def add_force_argument(parser: argparse.ArgumentParser, help: str = FORCE_HELP) -> None:
    """``--force``: the one flag of every command that writes."""
    parser.add_argument("--force", action="store_true", help=help)


# -- checkpoints and models ------------------------------------------------------------------


def checkpoint_meta(where: str | Path, missing: str | None = None) -> tuple[Path, dict]:
    """(path, metadata) of a ``gatelab train`` checkpoint given as its JSON, its directory or
    its run directory. ``missing``: the message when a directory holds no checkpoint.

    Checked before anything is built: every field of the JSON, the tensors file's hash,
    and the model its recipe describes (built on the meta device: no memory) against the
    names and shapes in the tensors file's header, so a JSON edited to another model size
    fails here, and a file of another kind is named as what it is."""
    from ..train.checkpoint import check_model_fits, latest_checkpoint, read_checkpoint_header
    from ..train.checkpoint_meta import describe_directory
    from ..train.dcp import latest_dcp_checkpoint

    path = Path(where)
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = latest_checkpoint(directory)
        if found is None and latest_dcp_checkpoint(directory) is not None:
            raise FileNotFoundError(
                f"{where} holds only distributed (DCP) checkpoints of a --mesh run; "
                f"convert the latest first: gatelab convert {where}"
            )
        if found is None:
            raise FileNotFoundError(missing or describe_directory(path))
        path = found
    meta, header = read_checkpoint_header(path)
    if not (meta.get("config") or {}).get("run"):
        raise FileNotFoundError(f"{path} was not written by `gatelab train` (it holds no recipe)")
    model = checkpoint_model(meta, device="meta")
    if model is not None:
        check_model_fits(meta, header, model)
    return Path(meta["_path"]), meta


def checkpoint_model(meta: dict, device: str | None = None) -> nn.Module | None:
    """The model the recipe stored in a checkpoint describes (weights not loaded); on
    ``device="meta"`` it takes no memory (None when a model cannot be built there)."""
    from ..models import MODELS
    from ..recipes.run import check_recipe
    from ..train.checkpoint import CheckpointError

    try:
        spec = check_recipe(dict(meta["config"]["run"]))
    except ValueError as error:
        raise CheckpointError(
            f"checkpoint {meta['_path']}: the recipe stored in it (config.run) is not valid: "
            f"{error}"
        ) from None
    build = MODELS.get(spec.model_kind)[1]
    if device != "meta":
        return build(spec.model)
    try:
        with torch.device("meta"):
            return build(spec.model)
    except (RuntimeError, NotImplementedError):  # a model whose init needs real tensors
        return None


def add_checkpoint_parser(subparsers, name: str, help: str, description: str) -> None:
    """A command that reads one ``gatelab train`` checkpoint (``gatelab eval``, ``info``)."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("checkpoint", help="a checkpoint .json, a checkpoints/ dir or a run dir")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_state(module: nn.Module, path: Path) -> None:
    """``module``'s state dict as safetensors (tensors made contiguous)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


@dataclass
class OpenedModel:
    """A model ready for inspection and editing, with what its commands need."""

    model: nn.Module
    kind: str  # "hf", "gatelab" or "module"
    source: str
    tokenize: Callable[[str], torch.Tensor] | None
    meta: dict[str, Any]  # gatelab: the checkpoint's metadata; hf: {"path": ...}


def open_model(source: str | Path | nn.Module) -> OpenedModel:
    """Load an HF MoE directory or a gatelab checkpoint (or wrap a model object)."""
    if isinstance(source, nn.Module):
        return OpenedModel(source, "module", type(source).__name__, None, {})
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{source} does not exist; give an HF model directory or a "
            "gatelab run directory / checkpoint"
        )
    if path.is_file() and path.suffix != ".json":
        from ..train.checkpoint_meta import identify

        raise ValueError(
            f"{source} is "
            + (
                identify(path)
                or f"a {path.suffix or 'suffix-less'} file; give an HF model directory, a "
                "gatelab run directory or a checkpoint .json"
            )
        )
    if (path / "config.json").is_file():
        return _open_hf(path)
    return _open_gatelab(path)


def _open_hf(path: Path) -> OpenedModel:
    import importlib

    hf_access = importlib.import_module("gatelab.hf.access")
    try:
        model = hf_access.load_pretrained(path)
    except OSError as error:  # transformers: no weights, unreadable files
        if isinstance(error, USER_ERRORS):
            raise
        raise ValueError(f"{path}: transformers cannot load it ({error})") from None
    tokenize = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)

        def tokenize(text: str) -> torch.Tensor:
            return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

    return OpenedModel(model, "hf", str(path), tokenize, {"path": str(path)})


def _open_gatelab(path: Path) -> OpenedModel:
    from ..data.text import ByteTokenizer
    from ..train.checkpoint import load_checkpoint

    path, meta = checkpoint_meta(
        path,
        missing=f"{path} holds no gatelab checkpoint and no HF config.json; give an HF model "
        "directory, a gatelab run directory or a checkpoint .json",
    )
    kind = meta["config"]["run"].get("model", {}).get("kind", "lm")
    if kind != "lm":  # the editing commands feed token prompts and read next-token logits
        raise ValueError(
            f"{path} holds a {kind!r} model; this command reads token prompts and needs a "
            "language model (kind 'lm'): use `gatelab eval` or `gatelab info` for this one"
        )
    model = checkpoint_model(meta)
    load_checkpoint(path, model, rng=False)
    model.eval()
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    tokenize = ByteTokenizer().encode if vocab >= ByteTokenizer.vocab_size else None
    return OpenedModel(model, "gatelab", str(path), tokenize, meta)


# -- prompt sets ----------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, sets: bool = True) -> None:
    """The arguments every model-editing command takes: the model, --out, the prompt sizes
    and (``sets``) the repeatable ``--set NAME=FILE``."""
    parser.add_argument("model", help="an HF model directory or a gatelab run dir / checkpoint")
    parser.add_argument(
        "--out", required=True, help="output folder (written whole, refused if it exists)"
    )
    add_force_argument(parser)
    parser.add_argument(
        "--seq-len",
        type=int_at_least(1),
        default=None,
        help="window length for text files (default: 128 or the model's context if shorter)",
    )
    parser.add_argument(
        "--max-prompts", type=int_at_least(1), default=64, help="prompts per set at most"
    )
    if sets:
        parser.add_argument(
            "--set",
            dest="sets",
            action="append",
            default=[],
            metavar="NAME=FILE",
            help="a named prompt set (repeatable): .json list of strings/id lists, or text",
        )


def read_prompt_set(
    spec: str, opened: OpenedModel, seq_len: int | None = None, max_prompts: int = 64
) -> tuple[str, list[torch.Tensor]]:
    """``NAME=FILE`` -> (name, prompts as token-id tensors); see the module doc."""
    from ..inspect.prompts import context_length

    if "=" not in spec:
        raise ValueError(f"a prompt set is NAME=FILE, got {spec!r}")
    name, file = spec.split("=", 1)
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {name!r}: {file} is not a file")
    limit = context_length(opened.model) or 512
    if seq_len is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {limit}")
    seq_len = seq_len or min(128, limit)
    try:
        text = path.read_text(encoding="utf-8")
        items = json.loads(text) if path.suffix == ".json" else text
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        kind = "JSON" if path.suffix == ".json" else "UTF-8 text"
        raise ValueError(f"prompt set {name!r}: {file} is not {kind} ({error})") from None
    if path.suffix == ".json":
        if not isinstance(items, list):
            raise ValueError(f"prompt set {name!r}: {file} must hold a JSON list")
        prompts = [_as_ids(item, opened, f"{name!r} ({file})") for item in items[:max_prompts]]
        return name, prompts
    ids = _as_ids(text, opened, f"{name!r} ({file})")
    count = min(max_prompts, max(ids.numel() // seq_len, 1 if ids.numel() else 0))
    if count and ids.numel() >= seq_len:
        starts = torch.linspace(0, ids.numel() - seq_len, count).long()
        prompts = [ids[s : s + seq_len] for s in starts.tolist()]
    else:
        prompts = [ids] if ids.numel() else []
    return name, prompts


def _as_ids(item, opened: OpenedModel, name: str) -> torch.Tensor:
    """One prompt as token ids; ``name`` is the set's name and file, for the messages."""
    if isinstance(item, str):
        if opened.tokenize is None:
            raise ValueError(
                f"prompt set {name} holds text but {opened.source} has no tokenizer; give "
                "token ids (a JSON list of int lists) or save the tokenizer with the model"
            )
        return opened.tokenize(item).long()
    if not isinstance(item, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in item
    ):
        raise ValueError(
            f"prompt set {name}: each prompt must be a string or a list of integer token "
            f"ids, got {json.dumps(item)[:60]}"
        )
    return torch.tensor(item, dtype=torch.long)


def prompt_sets(
    args: argparse.Namespace, opened: OpenedModel, specs: list[str] | None = None
) -> dict[str, list[torch.Tensor]]:
    """``specs`` (default ``args.sets``) read with ``args.seq_len`` and ``args.max_prompts``."""
    specs = args.sets if specs is None else specs
    names = [s.partition("=")[0] for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--set names must differ; {', '.join(map(repr, repeated))} is repeated")
    return dict(read_prompt_set(s, opened, args.seq_len, args.max_prompts) for s in specs)


def all_prompts(sets: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    """The prompts of every set, in order."""
    return [p for prompts in sets.values() for p in prompts]


def read_prompts(
    args: argparse.Namespace, opened: OpenedModel, specs: list[str]
) -> list[torch.Tensor]:
    """The prompts of every ``NAME=FILE`` in ``specs``, in order (a repeated name repeats)."""
    return [p for s in specs for p in read_prompt_set(s, opened, args.seq_len, args.max_prompts)[1]]


def parse_experts(text: str) -> dict[int, list[int]]:
    """``"3:0,5;7:2"`` -> {3: [0, 5], 7: [2]}."""
    out: dict[int, list[int]] = {}
    try:
        for part in filter(None, (p.strip() for p in text.split(";"))):
            layer, ids = part.split(":")
            out.setdefault(int(layer), []).extend(int(e) for e in ids.split(",") if e.strip())
    except ValueError:
        raise ValueError(
            f"experts must look like LAYER:E,E;LAYER:E (e.g. '0:1,3;2:5'), got {text!r}"
        ) from None
    return out
