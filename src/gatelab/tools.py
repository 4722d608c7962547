"""The model-editing commands: ``gatelab profile``, ``localize``, ``steer``, ``prune``, ``skip``,
``pregate`` and ``transcoder``.

Each takes a model source, either an HF directory (``save_pretrained`` output, loaded with
gatelab's experts implementation) or a gatelab checkpoint (a run directory of ``gatelab
train``, its ``checkpoints/`` directory or one checkpoint's JSON), and writes JSON (and a
PNG or a model directory) under ``--out``. :func:`open_model` is the one loader, usable
from Python too.

Prompt sets are given as ``NAME=FILE``: a ``.json`` file holding a list of strings or of
token-id lists, or any other file read as UTF-8 text and cut into windows of
``--seq-len`` tokens (at most ``--max-prompts``). Text needs a tokenizer: a gatelab byte LM
has one; an HF directory needs its tokenizer files (otherwise give token ids in JSON).

This module sits at the top of the package (like ``demo.py``): it reads gatelab
checkpoints through ``train`` and ``recipes``, which ``inspect`` and ``edit`` must not.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapt.transcoder import evaluate_transcoder, train_transcoder
from .edit.offload import OffloadedExperts, resident_expert_bytes
from .edit.skip import (
    SkipEvaluator,
    SkipPoint,
    layer_importance,
    search_thresholds,
    slot_scores,
    threshold_grid,
)
from .inspect.access import context_length, find_moe_blocks, next_token_loss
from .inspect.readout import module_io
from .io import atomic_write


@dataclass
class OpenedModel:
    """A model ready for inspection and editing, with what its commands need."""

    model: nn.Module
    kind: str  # "hf" or "gatelab"
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
    if (path / "config.json").is_file():
        return _open_hf(path)
    return _open_gatelab(path)


def _open_hf(path: Path) -> OpenedModel:
    import importlib

    hf_access = importlib.import_module("gatelab.hf.access")
    model = hf_access.load_pretrained(path)
    tokenize = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)

        def tokenize(text: str) -> torch.Tensor:
            return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

    return OpenedModel(model, "hf", str(path), tokenize, {"path": str(path)})


def _open_gatelab(path: Path) -> OpenedModel:
    from .data.text import ByteTokenizer
    from .models import build_model
    from .train.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint

    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = latest_checkpoint(directory)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no gatelab checkpoint and no HF config.json; give an HF model "
                "directory, a gatelab run directory or a checkpoint .json"
            )
        path = found
    meta, _ = read_checkpoint(path)
    recipe = (meta.get("config") or {}).get("run")
    if not recipe:
        raise FileNotFoundError(f"{path} was not written by `gatelab train` (it holds no recipe)")
    table = dict(recipe.get("model", {}))
    _, model = build_model(table.pop("kind", "lm"), table)
    load_checkpoint(path, model, rng=False)
    model.eval()
    tokenizer = ByteTokenizer()
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    tokenize = tokenizer.encode if vocab >= ByteTokenizer.vocab_size else None
    return OpenedModel(model, "gatelab", str(path), tokenize, meta)


# -- prompt sets --------------------------------------------------------------------------------


def read_prompt_set(
    spec: str, opened: OpenedModel, seq_len: int | None = None, max_prompts: int = 64
) -> tuple[str, list[torch.Tensor]]:
    """``NAME=FILE`` -> (name, prompts as token-id tensors); see the module doc."""
    if "=" not in spec:
        raise ValueError(f"a prompt set is NAME=FILE, got {spec!r}")
    name, file = spec.split("=", 1)
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {name!r}: {file} is not a file")
    limit = context_length(opened.model) or 512
    seq_len = min(seq_len or 128, limit)
    if path.suffix == ".json":
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise ValueError(f"prompt set {name!r}: {file} must hold a JSON list")
        prompts = [_as_ids(item, opened, name) for item in items[:max_prompts]]
        return name, prompts
    ids = _as_ids(path.read_text(encoding="utf-8"), opened, name)
    count = min(max_prompts, max(ids.numel() // seq_len, 1 if ids.numel() else 0))
    if count and ids.numel() >= seq_len:
        starts = torch.linspace(0, ids.numel() - seq_len, count).long()
        prompts = [ids[s : s + seq_len] for s in starts.tolist()]
    else:
        prompts = [ids] if ids.numel() else []
    return name, prompts


def _as_ids(item, opened: OpenedModel, name: str) -> torch.Tensor:
    if isinstance(item, str):
        if opened.tokenize is None:
            raise ValueError(
                f"prompt set {name!r} holds text but {opened.source} has no tokenizer; give "
                "token ids (a JSON list of int lists) or save the tokenizer with the model"
            )
        return opened.tokenize(item).long()
    return torch.as_tensor(item, dtype=torch.long)


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())
    return path


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


# -- commands -----------------------------------------------------------------------------------


def add_model_arguments(parser, sets: bool = True) -> None:
    parser.add_argument("model", help="an HF model directory or a gatelab run dir / checkpoint")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seq-len", type=int, default=128, help="window length for text files")
    parser.add_argument("--max-prompts", type=int, default=64, help="prompts per set at most")
    if sets:
        parser.add_argument(
            "--set",
            dest="sets",
            action="append",
            default=[],
            metavar="NAME=FILE",
            help="a named prompt set (repeatable): .json list of strings/id lists, or text",
        )


def _sets(args, opened: OpenedModel) -> dict[str, list[torch.Tensor]]:
    return dict(read_prompt_set(s, opened, args.seq_len, args.max_prompts) for s in args.sets)


def cmd_profile(args) -> int:
    from .inspect.plots import plot_profile
    from .inspect.profile import profile_routing

    opened = open_model(args.model)
    sets = _sets(args, opened)
    if not sets:
        raise ValueError("give at least one prompt set with --set NAME=FILE")
    profile = profile_routing(opened.model, sets)
    out = Path(args.out)
    profile.save_json(out / "profile.json")
    plot_profile(profile, out / "profile.png", metric=args.metric)
    for name in profile.names if len(profile.names) > 1 else []:
        top = profile.top_experts(name, args.top, metric=args.metric)
        print(
            f"{name}: top experts (layer, expert, contrast) {[(a, b, round(c, 4)) for a, b, c in top]}"
        )  # noqa: E501
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0


def cmd_localize(args) -> int:
    from .inspect.localize import localize_neurons
    from .inspect.profile import profile_routing

    opened = open_model(args.model)
    target_name, target = read_prompt_set(args.target, opened, args.seq_len, args.max_prompts)
    other_name, other = read_prompt_set(args.other, opened, args.seq_len, args.max_prompts)
    if args.experts:
        experts = parse_experts(args.experts)
    else:  # the target set's top experts by contrast, per layer
        profile = profile_routing(opened.model, {target_name: target, other_name: other})
        experts = {}
        for layer, e, _ in profile.top_experts(target_name, args.top, per_layer=True):
            experts.setdefault(layer, []).append(e)
    report = localize_neurons(opened.model, target, other, experts, threshold=args.threshold)
    path = _write_json(
        Path(args.out) / "neurons.json",
        {"target": target_name, "other": other_name, "experts": experts, **report.to_dict()},
    )
    print(
        f"{len(report.neurons)} neurons with z > {args.threshold} in "
        f"{len(report.experts)} experts; wrote {path}"
    )
    return 0


def cmd_steer(args) -> int:
    from .edit.steer import clamp_neurons, steer_experts

    opened = open_model(args.model)
    sets = _sets(args, opened)
    if not sets:
        raise ValueError("give at least one prompt set with --set NAME=FILE to measure")
    off = parse_experts(args.off) if args.off else None
    on = parse_experts(args.on) if args.on else None
    neurons = []
    if args.clamp:
        data = json.loads(Path(args.clamp).read_text())
        neurons = data["neurons"] if isinstance(data, dict) else data
    base = {n: next_token_loss(opened.model, p, n) for n, p in sets.items()}
    handles = []
    try:
        if off or on:
            handles.append(
                steer_experts(opened.model, off=off, on=on, renormalize=args.renormalize)
            )
        if neurons:
            handles.append(clamp_neurons(opened.model, neurons))
        if not handles:
            raise ValueError("nothing to steer: give --off, --on and/or --clamp")
        steered = {n: next_token_loss(opened.model, p, n) for n, p in sets.items()}
    finally:
        for handle in reversed(handles):
            handle.remove()
    result = {
        "off": off,
        "on": on,
        "clamped_neurons": len(neurons),
        "renormalize": args.renormalize,
        "loss": {
            n: {"base": base[n], "steered": steered[n], "change": steered[n] - base[n]}
            for n in sets
        },
    }
    path = _write_json(Path(args.out) / "steer.json", result)
    for n in sets:
        print(f"{n}: loss {base[n]:.4f} -> {steered[n]:.4f} nats/token")
    print(f"wrote {path}")
    return 0


def cmd_prune(args) -> int:
    from .edit.prune import expert_importance, prune_model, restrict_experts, select_experts

    opened = open_model(args.model)
    _, demos = read_prompt_set(args.demos, opened, args.seq_len, args.max_prompts)
    importance = expert_importance(opened.model, demos, method=args.method)
    keep = select_experts(opened.model, importance, args.keep)
    sets = _sets(args, opened)
    losses: dict[str, dict[str, float]] = {n: {} for n in sets}
    for n, p in sets.items():
        losses[n]["full"] = next_token_loss(opened.model, p, n)
        with restrict_experts(opened.model, keep):
            losses[n]["masked"] = next_token_loss(opened.model, p, n)
    pruned = prune_model(opened.model, keep)
    for n, p in sets.items():
        losses[n]["pruned"] = next_token_loss(pruned, p, n)
    out = Path(args.out)
    model_dir = save_pruned(opened, pruned, out / "model")
    result = {
        "method": args.method,
        "keep": args.keep,
        "kept": keep,
        "importance": {layer: v.tolist() for layer, v in importance.items()},
        "parameters": {"full": _count(opened.model), "pruned": _count(pruned)},
        "loss": losses,
        "model_dir": str(model_dir),
    }
    path = _write_json(out / "prune.json", result)
    print(
        f"kept {args.keep} experts per layer ({args.method}); parameters "
        f"{result['parameters']['full']:,} -> {result['parameters']['pruned']:,}"
    )
    for n, values in losses.items():
        print(f"{n}: loss " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print(f"wrote {model_dir} and {path}")
    return 0


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_pruned(opened: OpenedModel, pruned: nn.Module, directory: Path) -> Path:
    """Save a pruned model the way its source was stored: ``save_pretrained`` for HF (the
    tokenizer files copied along), a gatelab checkpoint whose recipe has the new
    ``num_experts`` otherwise (``gatelab eval``/``info`` and :func:`open_model` read it)."""
    directory = Path(directory)
    if opened.kind == "hf":
        import shutil

        pruned.save_pretrained(directory)
        source = Path(opened.meta["path"])
        for f in source.glob("*"):
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, directory / f.name)
        return directory
    if opened.kind != "gatelab":
        raise ValueError("save_pruned needs a model opened from a directory")
    from .train.checkpoint import save_checkpoint

    config = copy.deepcopy(opened.meta["config"])
    config["run"].setdefault("model", {})["num_experts"] = find_moe_blocks(pruned)[0].num_experts
    save_checkpoint(
        directory / "checkpoints",
        opened.meta["step"],
        pruned,
        config=config,
        extra={"pruned_from": opened.source},
        rng=False,
    )
    return directory


# -- argument parsers (cli.py calls these from its _add_<command> functions) -------------------


def _guarded(command: str, fn):
    """Bad input (ValueError, a missing file, a model without MoE layers) -> the message
    and exit status 2, as the other gatelab commands do."""

    def run(args) -> int:
        try:
            return fn(args)
        except (ValueError, KeyError, FileNotFoundError) as error:
            import sys

            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"gatelab {command}: error: {message}", file=sys.stderr)
            return 2

    return run


def add_profile_parser(commands) -> None:
    p = commands.add_parser(
        "profile",
        help="per layer x expert routing frequency and gate weight by prompt set",
        description="Run named prompt sets through an MoE model (HF directory or gatelab "
        "checkpoint) and write profile.json (frequency, mean gate weight, each set's contrast "
        "with the others) and profile.png (heatmaps). MoTE's fTRI / GateBreaker's profile.",
    )
    add_model_arguments(p)
    p.add_argument("--metric", choices=("frequency", "mean_weight"), default="frequency")
    p.add_argument("--top", type=int, default=5, help="top experts to print per set")
    p.set_defaults(func=_guarded("profile", cmd_profile))


def add_localize_parser(commands) -> None:
    p = commands.add_parser(
        "localize",
        help="neurons inside experts that fire for one prompt set (z-score)",
        description="GateBreaker's localisation: per-neuron max activation over routed tokens, "
        "difference of means between --target and --other, z-score > --threshold; writes "
        "neurons.json (a list `gatelab steer --clamp` takes).",
    )
    add_model_arguments(p, sets=False)
    p.add_argument("--target", required=True, metavar="NAME=FILE")
    p.add_argument("--other", required=True, metavar="NAME=FILE")
    p.add_argument(
        "--experts",
        default=None,
        help="LAYER:E,E;LAYER:E (default: --top per layer by the target's routing contrast)",
    )
    p.add_argument("--top", type=int, default=2, help="experts per layer when --experts is unset")
    p.add_argument("--threshold", type=float, default=2.0, help="z-score threshold (default 2)")
    p.set_defaults(func=_guarded("localize", cmd_localize))


def add_steer_parser(commands) -> None:
    p = commands.add_parser(
        "steer",
        help="switch experts off / force them on / clamp neurons; loss per prompt set",
        description="MoTE's steering: apply the edits, measure next-token loss on each "
        "--set before and after, write steer.json. The model on disk is not changed.",
    )
    add_model_arguments(p)
    p.add_argument("--off", default=None, help="experts to switch off, LAYER:E,E;LAYER:E")
    p.add_argument("--on", default=None, help="experts to force on, LAYER:E,E;LAYER:E")
    p.add_argument("--clamp", default=None, help="neurons.json from `gatelab localize`")
    p.add_argument(
        "--renormalize",
        action="store_true",
        help="rescale each token's remaining weights to their previous sum",
    )
    p.set_defaults(func=_guarded("steer", cmd_steer))


def add_prune_parser(commands) -> None:
    p = commands.add_parser(
        "prune",
        help="keep N experts per layer chosen from demonstrations (EASY-EP)",
        description="Score experts on --demos (EASY-EP's output-aware importance x token "
        "contribution, or routed-slot frequency), keep --keep per layer, and write the "
        "physically smaller model to OUT/model (HF: save_pretrained; gatelab: a checkpoint) "
        "and prune.json (kept experts, importance, parameter counts, loss on each --set for "
        "the full, masked and pruned model).",
    )
    add_model_arguments(p)
    p.add_argument("--demos", required=True, metavar="NAME=FILE", help="in-domain demonstrations")
    p.add_argument("--keep", type=int, required=True, help="experts to keep per layer")
    p.add_argument("--method", choices=("easy_ep", "frequency"), default="easy_ep")
    p.set_defaults(func=_guarded("prune", cmd_prune))


# -- gatelab skip / pregate / transcoder --------------------------------------------------------
# (the methods live in edit.skip, edit.offload, edit.pregate and adapt.transcoder, which know
# nothing of the command line)


# -- gatelab skip -------------------------------------------------------------------------------


def add_skip_parser(commands) -> None:
    """``gatelab skip``: MoDES importance, the skip-ratio curve and threshold searches."""

    p = commands.add_parser(
        "skip",
        help="MoDES expert skipping: layer importance, skip ratio vs KL, thresholds",
        description="Compute MoDES's layer importance on the calibration --set(s), the skip "
        "ratio / KL / loss curve over one threshold, and the thresholds that reach each "
        "--target skip ratio (two sets: also one threshold per set, by the frontier search). "
        "Writes skip.json and skip.png. The model on disk is not changed.",
    )
    add_model_arguments(p)
    p.add_argument(
        "--target",
        type=float,
        action="append",
        default=[],
        help="target skip ratio in [0, 1] (repeatable; default 0.5)",
    )
    p.add_argument("--grid", type=int, default=12, help="thresholds per grid (default 12)")
    p.set_defaults(func=_guarded("skip", cmd_skip))


def cmd_skip(args) -> int:
    from pathlib import Path

    opened = open_model(args.model)
    sets = dict(read_prompt_set(s, opened, args.seq_len, args.max_prompts) for s in args.sets)
    if not sets or len(sets) > 2:
        raise ValueError(
            "give one or two calibration sets with --set NAME=FILE (two: one token kind each)"
        )
    names = list(sets)
    prompts = [p for n in names for p in sets[n]]
    kinds = [i for i, n in enumerate(names) for _ in sets[n]]
    model = opened.model
    alpha = layer_importance(model, prompts)
    scores = slot_scores(model, prompts, alpha, kinds)
    one_grid = threshold_grid(torch.cat(scores), args.grid)
    one = SkipEvaluator(model, prompts, alpha)
    curve = [one([t]) for t in one_grid]
    searches = []
    for target in args.target or [0.5]:
        modes = [("1 threshold", one, [one_grid])]
        if len(names) == 2:
            grids = [threshold_grid(s, args.grid) for s in scores]
            modes.append(("per set", SkipEvaluator(model, prompts, alpha, kinds), grids))
        for label, evaluator, grids in modes:
            best, _ = search_thresholds(evaluator, grids, target)
            searches.append(
                {"target": target, "search": label, "best": None if best is None else best.__dict__}
            )
    out = Path(args.out)
    path = _write_json(
        out / "skip.json",
        {"sets": names, "alpha": alpha, "curve": [p.__dict__ for p in curve], "searches": searches},
    )
    _plot_curve(curve, out / "skip.png")
    print("layer importance: " + ", ".join(f"{k}: {v:.3f}" for k, v in alpha.items()))
    for s in searches:
        b = s["best"]
        found = (
            "no threshold reaches it"
            if b is None
            else (
                f"thresholds {[round(t, 5) for t in b['thresholds']]}, ratio {b['ratio']:.3f}, "
                f"KL {b['kl']:.4f}, loss {b['loss']:.4f}"
            )
        )
        print(f"target {s['target']:.2f} ({s['search']}): {found}")
    print(f"wrote {path} and {out / 'skip.png'}")
    return 0


def _plot_curve(curve: list[SkipPoint], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p.ratio for p in curve], [p.kl for p in curve], "o-")
    ax.set_xlabel("skip ratio")
    ax.set_ylabel("KL to the full model (nats/token)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- gatelab pregate --------------------------------------------------------------------------


def add_pregate_parser(commands) -> None:
    """``gatelab pregate``: distil pre-gates, then compare offloaded inference modes."""

    p = commands.add_parser(
        "pregate",
        help="train pre-gates; offloaded inference: resident vs on demand vs prefetch",
        description="Distil one pre-gate per MoE layer from the next layer's router on the "
        "calibration --set(s), report its hit rate, then run the prompts with all experts "
        "resident, offloaded with on-demand loading and offloaded with pre-gate prefetch "
        "(experts in safetensors under OUT/experts, an LRU cache of --capacity experts): "
        "tokens/s, peak resident expert bytes, misses, and whether outputs equal the "
        "resident model's. Writes pregate.json and pregates.safetensors.",
    )
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=200, help="distillation steps (default 200)")
    p.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="experts in the cache (default: half of all routed experts)",
    )
    p.set_defaults(func=_guarded("pregate", cmd_pregate))


def cmd_pregate(args) -> int:
    from safetensors.torch import save_file

    from .edit.pregate import pregate_hit_rate, train_pregates

    opened = open_model(args.model)
    sets = dict(read_prompt_set(s, opened, args.seq_len, args.max_prompts) for s in args.sets)
    prompts = [p for ps in sets.values() for p in ps]
    if not prompts:
        raise ValueError("give at least one calibration set with --set NAME=FILE")
    model = opened.model
    total = sum(b.num_experts for b in find_moe_blocks(model))
    capacity = args.capacity if args.capacity is not None else max(1, total // 2)
    gates = train_pregates(model, prompts, steps=args.steps)
    hits = pregate_hit_rate(model, gates, prompts)
    out = Path(args.out)
    rows = _compare_modes(model, gates, prompts, capacity, out / "experts")
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in gates.state_dict().items()},
        str(out / "pregates.safetensors"),
    )
    path = _write_json(
        out / "pregate.json",
        {"sets": list(sets), "capacity": capacity, "hit_rate": hits, "modes": rows},
    )
    for layer, h in hits.items():
        print(
            f"pre-gate {layer} -> {gates.next_layer[layer]}: hit rate {h['hit_rate']:.3f} "
            f"(chance {h['chance']:.3f})"
        )
    for row in rows:
        print(
            f"{row['mode']}: {row['tokens_per_s']:.0f} tokens/s, peak resident experts "
            f"{row['peak_resident_bytes'] / 2**20:.2f} MB, equals resident: {row['exact']}"
        )
    print(f"wrote {path} and {out / 'pregates.safetensors'}")
    return 0


def _compare_modes(model, gates, prompts, capacity: int, directory: Path) -> list[dict]:
    from .inspect.access import prompt_batches

    batches = prompt_batches(model, prompts, "prompts")
    tokens = sum(b.numel() for b in batches)
    device = next(model.parameters()).device

    def timed():
        start = time.perf_counter()
        with torch.no_grad():
            logits = [model(b.to(device)).logits for b in batches]
        return time.perf_counter() - start, logits

    seconds, reference = timed()
    rows = [
        {
            "mode": "all resident",
            "tokens_per_s": tokens / seconds,
            "exact": True,
            "peak_resident_bytes": resident_expert_bytes(model),
        }
    ]
    for mode, pregates in (("on demand", None), ("pre-gate prefetch", gates)):
        with OffloadedExperts(model, directory, capacity, pregates=pregates) as off:
            seconds, logits = timed()
            off.wait()
        exact = all(torch.equal(a, b) for a, b in zip(logits, reference, strict=True))
        rows.append(
            {"mode": mode, "tokens_per_s": tokens / seconds, "exact": exact, **off.stats.as_dict()}
        )
    return rows


# -- gatelab transcoder ------------------------------------------------------------------------


def add_transcoder_parser(commands) -> None:
    """``gatelab transcoder``: train a transcoder for one layer and evaluate it."""

    p = commands.add_parser(
        "transcoder",
        help="train a sparse transcoder replacing one MoE/MLP layer",
        description="Train a transcoder (wide ReLU features, L1, unit-norm decoder rows) on "
        "the input/output of one layer over the --set prompts, and report L0, fraction of "
        "variance explained and loss recovered (against zero ablation) on --eval (default: "
        "the training prompts). Writes transcoder.json and transcoder.safetensors.",
    )
    add_model_arguments(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--layer", type=int, help="an MoE layer (its block)")
    where.add_argument("--module", help="any module by qualified name (e.g. blocks.1.ffn)")
    p.add_argument("--eval", dest="eval_sets", action="append", default=[], metavar="NAME=FILE")
    p.add_argument("--hidden-dim", type=int, default=None, help="features (default 8 x dim)")
    p.add_argument("--l1", type=float, default=1e-3, help="L1 coefficient (default 1e-3)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    p.set_defaults(func=_guarded("transcoder", cmd_transcoder))


def cmd_transcoder(args) -> int:
    from pathlib import Path

    from safetensors.torch import save_file

    from .inspect.access import select_blocks

    opened = open_model(args.model)
    model = opened.model

    def prompts_of(specs):
        sets = [read_prompt_set(s, opened, args.seq_len, args.max_prompts)[1] for s in specs]
        return [p for ps in sets for p in ps]

    train = prompts_of(args.sets)
    if not train:
        raise ValueError("give at least one training set with --set NAME=FILE")
    held = prompts_of(args.eval_sets) or train
    if args.module is not None:
        modules = dict(model.named_modules())
        if args.module not in modules:
            raise ValueError(
                f"--module {args.module!r} is not a module of the model; "
                "see gatelab info for the names"
            )
        module = modules[args.module]
    else:
        module = select_blocks(model, [args.layer])[0].module
    x, y = module_io(model, module, train)
    hidden = args.hidden_dim or 8 * x.shape[1]
    tc, history = train_transcoder(x, y, hidden, l1=args.l1, steps=args.steps)
    report = evaluate_transcoder(model, module, tc, held)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tc.state_dict().items()}, str(out / "transcoder.safetensors")
    )
    path = _write_json(
        out / "transcoder.json",
        {
            "layer": args.layer,
            "module": args.module,
            "hidden_dim": hidden,
            "l1": args.l1,
            "steps": args.steps,
            "train_tokens": x.shape[0],
            "final_loss": history.final_loss,
            **report,
        },
    )
    print(
        f"L0 {report['l0']:.1f} of {hidden}, FVE {report['fve']:.3f}, loss recovered "
        f"{report['loss_recovered']:.3f} (clean {report['loss_clean']:.4f}, zero-ablated "
        f"{report['loss_zero_ablated']:.4f}, transcoder {report['loss_transcoder']:.4f})"
    )
    print(f"wrote {path} and {out / 'transcoder.safetensors'}")
    return 0


def add_parsers(commands) -> None:
    """Register every command of this module on ``gatelab``'s sub-command parser."""
    for add in (
        add_profile_parser,
        add_localize_parser,
        add_steer_parser,
        add_prune_parser,
        add_skip_parser,
        add_pregate_parser,
        add_transcoder_parser,
    ):
        add(commands)


__all__ = [
    "OpenedModel",
    "add_parsers",
    "add_localize_parser",
    "add_profile_parser",
    "add_prune_parser",
    "add_steer_parser",
    "cmd_localize",
    "cmd_profile",
    "cmd_prune",
    "cmd_steer",
    "open_model",
    "parse_experts",
    "read_prompt_set",
    "save_pruned",
]
