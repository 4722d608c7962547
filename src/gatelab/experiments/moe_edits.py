"""Profile, steer and prune a trained two-domain MoE LM (MoTE, GateBreaker, EASY-EP claims).

On the MoE LM of :mod:`gatelab.experiments._trained_lm` (the moe-lm recipe's model, narrowed,
trained on domain-balanced prose/code batches), through the same calls that work on HF
models:

1. profile (MoTE's fTRI, GateBreaker's gate-level profile): routing frequency per layer x
   expert on prose and on code windows of the training split; the separation is the total
   variation distance between the two domains' distributions of routed slots per layer;
2. steer (MoTE): switch off the ``n_off`` experts with the highest code-minus-prose
   contrast (over all layers), against ``random_draws`` random sets of as many experts in
   the same layers (so a random draw cannot hurt more just by taking both of a token's
   experts in one layer), and measure bits per byte on held-out prose and code; the mirror
   (top prose experts off) and the reroute mode (tokens take their next choice) too;
3. prune (EASY-EP): from ``demos`` code windows of the training split, keep half (and
   three quarters) of the experts in every layer by EASY-EP's importance (token weight
   from the residual stream, as the reference computes it), by the same importance with
   the token weight from the normalised FFN input (``easy_ep_ffn_input``, the reading
   gatelab used before issue 15) and by routed-slot frequency; the pruned models are
   built physically and checked against the masked original.

Claims tested (direction, not the papers' numbers, which are for 600B-parameter models):
MoTE's switching off the top behaviour experts changes the behaviour far more than random
experts; EASY-EP's keeping half the experts matches the full model in the demonstrated
domain and beats frequency-based selection.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..edit.prune import expert_importance, prune_model, restrict_experts, select_experts
from ..edit.steer import steer_experts
from ..inspect.access import find_moe_blocks
from ..inspect.plots import plot_profile
from ..inspect.profile import profile_routing
from ..inspect.prompts import next_token_loss
from ._trained_lm import domain_windows, trained_moe_lm

NAME = "moe-edits"
DESCRIPTION = (
    "profile prose vs code experts, switch off the top code experts vs random ones, "
    "prune to half the experts with code demos (EASY-EP vs frequency)"
)

SCALES = {
    "smoke": {"profile": 4, "eval": 4, "demos": 4, "demo_sets": 2, "n_off": 2, "random_draws": 2},
    "full": {
        "profile": 48,
        "eval": 64,
        "demos": 16,
        "demo_sets": 4,
        "n_off": 4,
        "random_draws": 20,
    },
}


def _bpb(model, windows) -> float:
    return next_token_loss(model, windows) / math.log(2)


def _losses(model, evals) -> dict[str, float]:
    return {domain: _bpb(model, w) for domain, w in evals.items()}


def _separation(profile, blocks) -> list[float]:
    """Per layer: total variation between the prose and code distributions of slots."""
    out = []
    for i in range(len(blocks)):
        p = profile.maps["prose"]["frequency"][i]
        c = profile.maps["code"]["frequency"][i]
        out.append(0.5 * float((p / p.sum() - c / c.sum()).abs().sum()))
    return out


def run(scale: str = "full", seed: int = 0, out_dir: str | Path = "runs/experiments/moe-edits"):
    cfg = SCALES[scale]
    out = Path(out_dir)
    lm = trained_moe_lm(scale, seed, out)
    model, seq = lm.model, lm.seq_len
    blocks = find_moe_blocks(model)
    profile_sets = {
        d: domain_windows(d, seq - 1, cfg["profile"], "train", seed) for d in ("prose", "code")
    }
    evals = {d: domain_windows(d, seq - 1, cfg["eval"], "val", seed) for d in ("prose", "code")}

    # 1. profile
    profile = profile_routing(model, profile_sets)
    profile.save_json(out / "profile.json")
    plot_profile(profile, out / "profile.png")
    separation = _separation(profile, blocks)
    # noise floor: the same distance between code of the training and the held-out split
    floor_profile = profile_routing(model, {"prose": profile_sets["code"], "code": evals["code"]})
    floor = _separation(floor_profile, blocks)
    # 2. steer, 3. prune
    steer = _steer(model, evals, profile, cfg, blocks[0].num_experts, seed)
    prune = _prune(model, evals, cfg, seq, seed, blocks[0].num_experts)
    table = _table(steer, prune, cfg, blocks, separation, floor)
    return {
        "table": table,
        "trained": {"run_dir": str(lm.run_dir), "train_seconds": lm.train_seconds},
        "separation": separation,
        "separation_floor": floor,
        "base": steer["base"],
        "top_experts": steer["top"],
        "steered": {f"{d}-{mode}": v for (d, mode), v in steer["steered"].items()},
        "random_off": steer["random_off"],
        "pruned": {f"{m}-{k}": v for (m, k), v in prune["losses"].items()},
        "kept": prune["kept"],
        "half_pruned_code_by_demo_set": prune["per_set"],
        "pruned_vs_masked_max_abs": prune["check"],
        "parameters": {str(k): v for k, v in prune["params"].items()},
        "profile_png": str(out / "profile.png"),
    }


def _steer(model, evals, profile, cfg: dict, num_experts: int, seed: int) -> dict:
    """Top code (and, as a mirror, top prose) experts off vs random experts off."""
    base = _losses(model, evals)
    top = {d: profile.top_experts(d, cfg["n_off"]) for d in ("code", "prose")}
    steered = {}
    for d, mode in (("code", "drop"), ("prose", "drop"), ("code", "reroute")):
        with steer_experts(model, off=_by_layer(top[d]), mode=mode):
            steered[(d, mode)] = _losses(model, evals)
    # control: the same number of experts in the same layers, drawn at random
    gen = torch.Generator().manual_seed(seed)
    random_off = []
    for _ in range(cfg["random_draws"]):
        spec = {
            layer: torch.randperm(num_experts, generator=gen)[: len(ids)].tolist()
            for layer, ids in _by_layer(top["code"]).items()
        }
        with steer_experts(model, off=spec):
            random_off.append(_losses(model, evals))
    rand = {d: [r[d] - base[d] for r in random_off] for d in evals}
    return {"base": base, "top": top, "steered": steered, "random_off": random_off, "rand": rand}


# the selection methods compared: name -> expert_importance keyword arguments
PRUNE_METHODS = {
    "easy_ep": {"method": "easy_ep"},
    "easy_ep_ffn_input": {"method": "easy_ep", "contribution": "ffn_input"},
    "frequency": {"method": "frequency"},
}


def _prune(model, evals, cfg: dict, seq: int, seed: int, num_experts: int) -> dict:
    """Prune with code demonstrations: half the experts (and 3/4 as a second point)."""
    # disjoint demonstration sets, interleaved from one pool; the first one fills the table
    pool = domain_windows("code", seq - 1, cfg["demos"] * cfg["demo_sets"], "train", seed + 1)
    demo_sets = [pool[i :: cfg["demo_sets"]] for i in range(cfg["demo_sets"])]
    demos = demo_sets[0]
    importance = {m: expert_importance(model, demos, **kw) for m, kw in PRUNE_METHODS.items()}
    pruned_losses, kept, check, params = {}, {}, {}, {"full": _count(model)}
    for keep_n in (num_experts // 2, 3 * num_experts // 4):
        for method in PRUNE_METHODS:
            keep = select_experts(model, importance[method], keep_n)
            pruned = prune_model(model, keep)
            pruned_losses[(method, keep_n)] = _losses(pruned, evals)
            kept[f"{method}-{keep_n}"] = keep
            params[keep_n] = _count(pruned)
            probe = evals["code"][:2]
            with torch.no_grad(), restrict_experts(model, keep):
                masked = model(probe).logits
            with torch.no_grad():
                check[f"{method}-{keep_n}"] = float((pruned(probe).logits - masked).abs().max())
    # the half-pruned comparison again on every demonstration set (code bits per byte)
    per_set = {m: [] for m in PRUNE_METHODS}
    for demo in demo_sets:
        for method, kw in PRUNE_METHODS.items():
            keep = select_experts(model, expert_importance(model, demo, **kw), num_experts // 2)
            per_set[method].append(_bpb(prune_model(model, keep), evals["code"]))
    return {
        "losses": pruned_losses,
        "kept": kept,
        "check": check,
        "params": params,
        "per_set": per_set,
        "num_sets": len(demo_sets),
    }


def _table(steer: dict, prune: dict, cfg: dict, blocks, separation, floor) -> str:
    base, steered, rand, top = steer["base"], steer["steered"], steer["rand"], steer["top"]
    num_experts, top_k = blocks[0].num_experts, blocks[0].top_k

    def change(losses):
        return f"{losses['prose'] - base['prose']:+.4f} | {losses['code'] - base['code']:+.4f}"

    n = cfg["n_off"]
    rows = [
        "| measurement | prose | code |",
        "|---|---:|---:|",
        f"| full model, bits per byte | {base['prose']:.4f} | {base['code']:.4f} |",
        f"| top-{n} code experts off (drop), change | {change(steered[('code', 'drop')])} |",
        f"| {n} random experts off in the same layers, mean change ({cfg['random_draws']} "
        f"draws) | {_mean(rand['prose']):+.4f} | {_mean(rand['code']):+.4f} |",
        f"| random experts off, largest change | {max(rand['prose']):+.4f} | "
        f"{max(rand['code']):+.4f} |",
        f"| top-{n} prose experts off (drop), change | {change(steered[('prose', 'drop')])} |",
        f"| top-{n} code experts off (reroute), change | {change(steered[('code', 'reroute')])} |",
    ]
    for (method, keep_n), losses in prune["losses"].items():
        rows.append(
            f"| pruned to {keep_n}/{num_experts} by {method} (code demos), bits per byte | "
            f"{losses['prose']:.4f} | {losses['code']:.4f} |"
        )
    sep = ", ".join(
        f"layer {b.layer}: {s:.3f} (code vs code {f:.3f})"
        for b, s, f in zip(blocks, separation, floor, strict=True)
    )
    per_set, params, sets = prune["per_set"], prune["params"], prune["num_sets"]
    wins = sum(a < b for a, b in zip(per_set["easy_ep"], per_set["frequency"], strict=True))
    return "\n".join(rows) + (
        f"\n\nProfile separation (total variation between prose and code routed-slot "
        f"distributions): {sep}. Top code experts (layer, expert, contrast): "
        f"{[(a, b, round(c, 3)) for a, b, c in top['code']]}; top prose experts: "
        f"{[(a, b, round(c, 3)) for a, b, c in top['prose']]}. Parameters: full "
        f"{params['full']:,}, pruned to {num_experts // 2}: {params[num_experts // 2]:,}; "
        f"max |pruned - masked| logit over the pruned models: {max(prune['check'].values()):.2e}. "
        f"top_k={top_k}. Half-pruned code bits per byte over {sets} disjoint "
        f"demonstration sets: EASY-EP {_span(per_set['easy_ep'])}, EASY-EP with the "
        f"FFN-input weight {_span(per_set['easy_ep_ffn_input'])}, frequency "
        f"{_span(per_set['frequency'])}; EASY-EP lower than frequency in {wins} of {sets}."
    )


def _by_layer(top) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, e, _ in top:
        out.setdefault(layer, []).append(e)
    return out


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _span(values: list[float]) -> str:
    return f"mean {_mean(values):.4f} (range {min(values):.4f}-{max(values):.4f})"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
