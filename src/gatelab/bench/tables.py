"""The printed tables of the benchmarks: ``gatelab bench moe``, ``gatelab bench train`` and
``gatelab bench generate`` print these next to the JSON they write, from the result dicts
alone."""

from __future__ import annotations

_LABELS = {
    "dense": "dense (k*F)",
    "gatelab_grouped": "gatelab grouped",
    "gatelab_triton": "gatelab triton",
    "gatelab_loop": "gatelab loop",
    "hf_eager": "HF eager",
    "hf_grouped_mm": "HF grouped_mm",
    "gemm_bound": "GEMM bound",
    "dense_compiled": "dense compiled",
    "gatelab_grouped_compiled": "grouped compiled",
    "hf_grouped_mm_compiled": "HF gmm compiled",
}


def contended_label(settings: dict) -> str:
    """``contended: N busy process(es)`` (``contended: 0`` for an idle run)."""
    count = settings.get("contended", 0)
    if not count:
        return "contended: 0"
    return f"contended: {count} busy process{'es' if count != 1 else ''}"


def format_moe_table(result: dict) -> str:
    """The result as a plain-text table: one block per shape, one row per variant, then the
    summary (when the result has one)."""
    env, settings = result["environment"], result["settings"]
    lines = [
        f"gatelab bench moe | {env['device_name']} | {settings['device']} {settings['dtype']} | "
        f"{env['threads']} threads | torch {env['torch']} | "
        f"transformers {env['transformers'] or '-'} | load average "
        f"{env.get('load_average_1m')} -> {env.get('load_average_1m_at_end')} | "
        f"{contended_label(settings)}",
        f"median of {settings['repeats']} after {settings['warmup']} warm-up; "
        "ratio = dense time / variant time (higher is better)",
    ]
    bandwidth = result.get("copy_bandwidth")
    if bandwidth:
        lines.append(
            f"copy bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s "
            "(2 x bytes / time of a copy); roofline = weight bytes / bandwidth / forward time"
        )
    header = (
        f"  {'variant':<17}{'fwd ms':>10}{'fwd+bwd ms':>12}{'ratio fwd':>11}"
        f"{'ratio f+b':>11}{'roofline':>10}"
    )
    for shape in result["shapes"]:
        check, note = shape["hf_check"], ""
        if check is not None:
            diff = "non-finite" if check["max_abs_diff"] is None else f"{check['max_abs_diff']:.2e}"
            note = f" | vs HF eager max|diff| {diff} {'ok' if check['ok'] else 'MISMATCH'}"
        roof = shape["roofline"]
        if roof is not None:
            note += f" | {roof['distinct_experts']} experts touched"
        title = (
            f"{shape['name']}: T={shape['tokens']} D={shape['dim']} F={shape['hidden_dim']} "
            f"E={shape['num_experts']} k={shape['top_k']}{note}"
        )
        lines += ["", title, header]
        for name, entry in shape["variants"].items():
            if entry["skipped"] is not None:
                lines.append(f"  {_LABELS[name]:<17}  skipped: {entry['skipped']}")
                continue
            roofline = entry.get("roofline_fwd")
            row = (
                f"  {_LABELS[name]:<17}{entry['fwd_s'] * 1e3:>10.2f}"
                f"{entry['fwd_bwd_s'] * 1e3:>12.2f}{entry['ratio_fwd']:>11.2f}"
                f"{entry['ratio_fwd_bwd']:>11.2f}"
            )
            lines.append(row if roofline is None else f"{row}{roofline:>10.2f}")
    if result.get("summary"):
        lines += ["", format_moe_summary(result["summary"], settings)]
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def _ratio_block(title: str, shapes: list[str], rows: dict[str, dict | None]) -> list[str]:
    """One block of the summary: a row per variant, a column per shape, then geomean and
    min over the shapes the variant was timed on ("-": skipped)."""
    widths = [max(8, len(name) + 2) for name in shapes]
    header = f"  {'variant':<17}" + "".join(
        f"{name:>{w}}" for name, w in zip(shapes, widths, strict=True)
    )
    lines = [title, f"{header}{'geomean':>9}{'min':>7}"]
    for variant, stats in rows.items():
        if stats is None:
            continue
        cells = "".join(_cell(v, w) for v, w in zip(stats["values"], widths, strict=True))
        partial = stats["timed_shapes"] < len(shapes)
        note = f"  (over {stats['timed_shapes']} of {len(shapes)})" if partial else ""
        lines.append(
            f"  {_LABELS.get(variant, variant):<17}{cells}{stats['geomean']:>9.2f}"
            f"{stats['min']:>7.2f}{note}"
        )
    return lines


def format_moe_summary(summary: dict, settings: dict) -> str:
    """The summary of ``gatelab bench moe``: ratios per variant over the training and the
    decode shapes, gatelab grouped against HF grouped_mm per shape, and (with --baseline)
    the contended/idle comparison."""
    lines = ["summary (ratio = dense time / variant time; geomean and min over the shapes)"]
    training, decode = summary["training"], summary["decode"]
    if training["shapes"]:
        lines += _ratio_block(
            "training shapes, forward+backward:",
            training["shapes"],
            training["variants"],
        )
        share = training.get("share_of_bound")
        if share is not None:
            lines += [""] + _ratio_block(
                "training shapes, GEMM bound time / gatelab grouped time:",
                training["shapes"],
                {"gatelab_grouped": share},
            )
    if decode["shapes"]:
        if training["shapes"]:
            lines.append("")
        lines += _ratio_block("decode shapes, forward:", decode["shapes"], decode["variants"])
        lines += [""] + _ratio_block(
            "decode shapes, roofline fraction of the forward:",
            decode["shapes"],
            {name: stats.get("roofline") for name, stats in decode["variants"].items()},
        )
    lines += [
        "",
        "gatelab grouped vs HF grouped_mm (fwd+bwd on training shapes, fwd on decode shapes):",
        f"  {'shape':<18}{'mode':>8}{'gatelab ms':>12}{'HF gmm ms':>11}{'HF/gatelab':>12}"
        f"{'beats HF':>10}",
    ]
    for row in summary["gatelab_vs_hf_grouped_mm"]:
        if row["skipped"] is not None:
            lines.append(f"  {row['shape']:<18}{row['mode']:>8}  skipped: {row['skipped']}")
            continue
        lines.append(
            f"  {row['shape']:<18}{row['mode']:>8}{row['gatelab_grouped_s'] * 1e3:>12.2f}"
            f"{row['hf_grouped_mm_s'] * 1e3:>11.2f}{row['speedup']:>12.2f}"
            f"{'yes' if row['beats'] else 'no':>10}"
        )
    contended = summary.get("contended_vs_idle")
    if contended:
        lines += ["", format_contended_vs_idle(contended)]
    return "\n".join(lines)


def format_contended_vs_idle(record: dict) -> str:
    """Per shape: gatelab grouped's MoE/dense time ratio contended over idle (issue 17)."""
    base = record["baseline"]
    target = record["target"]
    count = record["contended"]
    lines = [
        f"contended ({count} busy process{'es' if count != 1 else ''}) vs idle baseline "
        f"(run {base['started_at']}, load average {base['load_average_1m']}), gatelab grouped:",
        f"slowdown = MoE/dense time contended / idle = idle ratio / contended ratio "
        f"(target <= {target:.2f})",
        f"  {'shape':<18}{'mode':>8}{'idle ratio':>12}{'contended':>11}{'slowdown':>10}"
        f"{'within':>8}",
    ]
    for row in record["shapes"]:
        if row["skipped"] is not None:
            lines.append(f"  {row['shape']:<18}{row['mode']:>8}  skipped: {row['skipped']}")
            continue
        lines.append(
            f"  {row['shape']:<18}{row['mode']:>8}{row['idle_ratio']:>12.2f}"
            f"{row['contended_ratio']:>11.2f}{row['slowdown']:>10.2f}"
            f"{'yes' if row['within_target'] else 'NO':>8}"
        )
    if record["max_slowdown"] is not None:
        verdict = "met" if record["met"] else "NOT met"
        lines.append(
            f"max slowdown {record['max_slowdown']:.2f}: target (issue 17) <= {target:.2f} "
            f"{verdict}"
        )
    return "\n".join(lines)


def format_train_table(result: dict) -> str:
    """The result as a plain-text table: one row per model, then the ratio and the target."""
    env, settings = result["environment"], result["settings"]
    moe, dense = result["models"]["moe"], result["models"]["dense"]
    mc = moe["config"]
    mm = mc["moe"]
    lines = [
        f"gatelab bench train | {env['device_name']} | {settings['device']} "
        f"{settings['dtype']} | {env['threads']} threads | torch {env['torch']} | "
        f"load average {env.get('load_average_1m')} -> {env.get('load_average_1m_at_end')} | "
        f"{contended_label(settings)}",
        f"MoE LM: {mc['num_layers']} layers, dim {mc['dim']}, {mc['num_heads']} heads, "
        f"{mm['num_experts']} experts top-{mm['top_k']} (expert hidden {mm['hidden_dim']}), "
        f"vocab {mc['vocab_size']}, router {mm['router']}, dispatcher {mm['dispatcher']}; "
        f"dense: FFN hidden {dense['config']['ffn_hidden_dim']} (dense_equivalent)",
        f"batch {settings['batch_size']} x seq {settings['seq_len']} = "
        f"{settings['tokens_per_step']} tokens/step, {result['data']['source']} data; "
        f"full training step (fwd, loss + aux, bwd, clip, AdamW, zero_grad); median of "
        f"{settings['repeats']} after {settings['warmup']} warm-up, round-robin",
        "",
        f"  {'model':<8}{'step ms':>10}{'tokens/s':>12}{'active params':>16}{'total params':>15}",
    ]
    for name in result["models"]:  # moe, dense
        entry = result["models"][name]
        lines.append(
            f"  {name:<8}{entry['step_s'] * 1e3:>10.1f}{entry['tokens_per_s']:>12.0f}"
            f"{entry['active_parameters']:>16,}{entry['parameters']:>15,}"
        )
    ratio, target = result["ratio_tokens_per_s"], result["target"]
    lines += ["", f"ratio moe/dense tokens/s: {ratio:.2f}"]
    verdict = "met" if target["met"] else "NOT met"
    where = (
        ""
        if settings["device"] == target["applies_to"]
        else f" (the target is for {target['applies_to']}; this run is on {settings['device']})"
    )
    lines.append(
        f"target (issue 3): MoE >= {target['ratio']:.2f} x dense tokens/s on "
        f"{target['applies_to']}: {verdict}{where}"
    )
    return "\n".join(lines)


def format_generate_table(result: dict) -> str:
    """The result as a plain-text table: one row per model, tokens/s per implementation and
    gatelab's ratios, then each model's sizes and any skipped implementation."""
    env, settings = result["environment"], result["settings"]
    impls = settings["implementations"]
    lines = [
        f"gatelab bench generate | {env['device_name']} | {settings['device']} "
        f"{settings['dtype']} | {env['threads']} threads | torch {env['torch']} | "
        f"transformers {env['transformers'] or '-'} | load average "
        f"{env.get('load_average_1m')} -> {env.get('load_average_1m_at_end')} | "
        f"{contended_label(settings)}",
        f"greedy model.generate(), KV cache: batch {settings['batch_size']} x prompt "
        f"{settings['prompt_len']}, {settings['max_new_tokens']} new tokens per sequence; "
        f"random weights (seed {settings['seed']}); median of {settings['repeats']} after "
        f"{settings['warmup']} warm-up, implementations round-robin",
        "tokens/s = batch x new tokens / median generate time (prefill included); "
        "ratio = gatelab tokens/s / other's (higher is better)",
        "",
        f"  {'model':<13}"
        + "".join(f"{impl + ' tok/s':>18}" for impl in impls)
        + f"{'gatelab/grouped_mm':>20}{'gatelab/eager':>15}{'same tokens':>13}",
    ]
    notes = []
    for name, entry in result["models"].items():
        cells = ""
        for impl in impls:
            timed = entry["implementations"][impl]
            if timed["skipped"] is not None:
                cells += f"{'skipped':>18}"
                notes.append(f"  {name}: {impl} skipped: {timed['skipped']}")
            else:
                cells += f"{timed['tokens_per_s']:>18.1f}"
        ratios = entry["ratios"]
        same = {True: "yes", False: "NO", None: "-"}[entry["same_tokens"]]
        lines.append(
            f"  {name:<13}{cells}{_ratio_text(ratios['gatelab_vs_grouped_mm']):>20}"
            f"{_ratio_text(ratios['gatelab_vs_eager']):>15}{same:>13}"
        )
        if entry["same_tokens"] is False:
            mismatches = {
                impl: timed["first_mismatch"]
                for impl, timed in entry["implementations"].items()
                if timed["skipped"] is None and not timed["same_tokens"]
            }
            notes.append(
                f"  {name}: tokens differ from {entry['reference']}'s at new-token position "
                + ", ".join(f"{pos} ({impl})" for impl, pos in mismatches.items())
            )
    lines.append("")
    for name, entry in result["models"].items():
        c = entry["config"]
        shared = f" + {c['shared_experts']} shared" if c.get("shared_experts") else ""
        lines.append(
            f"  {name}: {c['num_hidden_layers']} layers ({c['moe_layers']} MoE), hidden "
            f"{c['hidden_size']}, {c['num_experts']} experts{shared} top-{c['top_k']} "
            f"(expert hidden {c['expert_hidden']}), vocab {c['vocab_size']}, "
            f"{entry['parameters'] / 1e6:.1f} M parameters"
        )
    return "\n".join(lines + notes)


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
