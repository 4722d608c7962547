"""``gatelab bench generate``: greedy ``model.generate()`` tokens/s of HF MoE models, with
transformers' experts implementations ``eager`` and ``grouped_mm`` and gatelab's, in one
process.

Each model is a small ``transformers`` MoE model built from its config with random weights
(seeded; :func:`model_config`): Mixtral (8 experts, top-2), Qwen3-MoE (64 fine experts,
top-8, every layer sparse) and DeepSeek-V3 (64 routed experts top-8 in 8 groups, one
shared expert, MLA attention, the first layer dense). One model object serves all three
implementations: ``model.set_experts_implementation(name)`` switches the experts' forward
between them, so they run with the very same weights (gatelab's is registered with
:func:`gatelab.hf.experts.register`).

How it is measured, so the numbers are comparable:
- the prompt is a fixed batch of ``batch_size`` x ``prompt_len`` random token ids (seeded,
  no special ids); ``generate`` runs greedy (``do_sample=False``) with the KV cache and
  ``min_new_tokens = max_new_tokens``, so every call makes exactly ``max_new_tokens``
  tokens per sequence (checked);
- the first call of each implementation is untimed: it warms up, and its tokens are
  compared with the first implementation's (``same_tokens``: random fp32 weights make
  greedy ties unlikely, so the three normally agree; a difference is reported, not an
  error); ``warmup - 1`` more untimed rounds follow;
- then ``repeats`` timed rounds, each calling every implementation once, the order
  alternating from round to round, so load from other processes on a shared machine falls
  on all alike; the implementation is switched outside the clock;
- tokens/s = batch_size * max_new_tokens / median time of one ``generate`` call (the
  prompt's prefill included); on CUDA the device is synchronised around each call.

An implementation transformers refuses for a model (or gatelab's, for experts it does not
support) is reported as skipped with the reason. ``--contended N`` times everything while N
busy processes (:func:`~gatelab.bench.common.busy_processes`) load the machine.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

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
from .tables import format_generate_table as format_table

SCHEMA = "gatelab.bench.generate/1"

MODELS = ("mixtral", "qwen3_moe", "deepseek_v3")
IMPLEMENTATIONS = ("eager", "grouped_mm", "gatelab")
"""The experts implementations timed, in this order; ratios are gatelab's tokens/s over
each other's."""

HIDDEN_SIZE = 512
NUM_LAYERS = 4
VOCAB_SIZE = 1024
NUM_HEADS = 8

DEFAULT_STEPS: dict[bool, tuple[int, int, int]] = {
    # quick -> (max_new_tokens, warmup, repeats)
    False: (48, 1, 5),
    True: (16, 1, 3),
}


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def model_config(
    name: str,
    hidden_size: int = HIDDEN_SIZE,
    num_layers: int = NUM_LAYERS,
    vocab_size: int = VOCAB_SIZE,
    max_positions: int = 256,
):
    """The ``transformers`` config of model ``name`` (see ``MODELS``) at ``hidden_size``.

    At the default width 512 and 4 layers (8 heads of 64):

    - ``mixtral``: intermediate 1024 (2 x hidden), 8 experts, top-2, 2 KV heads;
    - ``qwen3_moe``: moe_intermediate 128 (hidden / 4), 64 experts, top-8, normalised top-k
      weights (``norm_topk_prob=True``, as the released Qwen3 MoE models), every layer
      sparse (``decoder_sparse_step=1``, ``mlp_only_layers=[]``), 2 KV heads;
    - ``deepseek_v3``: moe_intermediate 256 (hidden / 2), 64 routed experts top-8 in 8
      groups of which 4 are kept, one shared expert, the first layer dense (intermediate
      1024), MLA with q_lora_rank 128, kv_lora_rank 64, qk_nope/qk_rope head dims 32/32,
      v_head_dim 64 (all scaled with the width).

    ``hidden_size`` must be a multiple of 16 (the heads and DeepSeek's MLA dims scale with it).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if not isinstance(hidden_size, int) or hidden_size < 16 or hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16 (>= 16), got {hidden_size!r}")
    import transformers

    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": False,
    }
    if name == "mixtral":
        return transformers.MixtralConfig(
            **common,
            intermediate_size=2 * hidden_size,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            head_dim=hidden_size // NUM_HEADS,
            router_jitter_noise=0.0,
        )
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=hidden_size // 4,
            num_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            num_key_value_heads=2,
            head_dim=hidden_size // NUM_HEADS,
        )
    return transformers.DeepseekV3Config(
        **common,
        num_key_value_heads=NUM_HEADS,
        intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size // 2,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        q_lora_rank=hidden_size // 4,
        kv_lora_rank=hidden_size // 8,
        qk_rope_head_dim=hidden_size // 16,
        qk_nope_head_dim=hidden_size // 16,
        v_head_dim=hidden_size // 8,
    )


# -- settings ---------------------------------------------------------------------------


@dataclass
class GenerateBenchSettings:
    """How to run. None fills in by ``quick``: ``models`` (all of ``MODELS``),
    ``max_new_tokens`` (48; 16 with --quick), ``warmup`` (1; untimed calls per
    implementation, the first of which checks the tokens) and ``repeats`` (5; 3 with
    --quick). ``contended``: busy processes that load the machine while timing."""

    device: str = "cpu"
    models: tuple[str, ...] | None = None
    max_new_tokens: int | None = None
    prompt_len: int = 16
    batch_size: int = 1
    warmup: int | None = None
    repeats: int | None = None
    quick: bool = False
    seed: int = 0
    contended: int = 0

    def resolved(self) -> GenerateBenchSettings:
        """A copy with every None filled in and every value validated (ValueError)."""
        device = resolve_device(self.device)
        new_tokens, warmup, repeats = DEFAULT_STEPS[bool(self.quick)]
        models = tuple(self.models) if self.models else MODELS
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise ValueError(
                f"unknown model(s) {', '.join(map(repr, unknown))}; valid: {', '.join(MODELS)}"
            )
        if len(set(models)) != len(models):
            raise ValueError(f"models must not repeat, got {', '.join(models)}")
        resolved = replace(
            self,
            device=device,
            models=models,
            max_new_tokens=new_tokens if self.max_new_tokens is None else self.max_new_tokens,
            warmup=warmup if self.warmup is None else self.warmup,
            repeats=repeats if self.repeats is None else self.repeats,
        )
        bounds = {
            "max_new_tokens": (1, ""),
            "prompt_len": (1, ""),
            "batch_size": (1, ""),
            "warmup": (1, " (the first untimed call also checks the tokens)"),
            "repeats": (1, ""),
            "contended": (0, " (busy processes; 0: none)"),
        }
        for name, (low, why) in bounds.items():
            value = getattr(resolved, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}{why}, got {value!r}")
        return resolved

    @property
    def max_positions(self) -> int:
        """Positions the models need: the prompt and every new token (at least 256)."""
        return max(256, self.prompt_len + self.max_new_tokens)


# -- building and calling ----------------------------------------------------------------------


def build_model(config, settings: GenerateBenchSettings) -> torch.nn.Module:
    """The causal LM of ``config`` with random weights drawn from ``settings.seed``, in
    float32 and eval mode, on the device."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(settings.device).eval()


def make_prompt(settings: GenerateBenchSettings, vocab_size: int) -> torch.Tensor:
    """``batch_size`` x ``prompt_len`` random ids from ``[3, vocab_size)`` (no BOS/EOS/pad)."""
    gen = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(3, vocab_size, (settings.batch_size, settings.prompt_len), generator=gen)
    return ids.to(settings.device)


def generation_config(config, settings: GenerateBenchSettings):
    """Greedy, KV cache, exactly ``max_new_tokens`` new tokens: ``min_new_tokens`` equal to
    ``max_new_tokens`` keeps the EOS id from ending a sequence early, and the pad id is the
    EOS id (0 where the config has none)."""
    from transformers import GenerationConfig

    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else 0,
    )


def _generate_call(model, prompt: torch.Tensor, gen_config, out: list) -> Callable[[], None]:
    """A closure that runs one ``generate`` and keeps its output in ``out[0]``."""
    mask = torch.ones_like(prompt)

    def call() -> None:
        out[:] = [
            model.generate(input_ids=prompt, attention_mask=mask, generation_config=gen_config)
        ]

    return call


def _switch(model, name: str) -> str | None:
    """Switch the model's experts to ``name``; the reason when transformers refuses it."""
    try:
        model.set_experts_implementation(name)
    except (ValueError, NotImplementedError, RuntimeError, KeyError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def bench_model(
    name: str, config, settings: GenerateBenchSettings, log: Callable[[str], None]
) -> dict:
    """Every implementation on one model: the token check, then the round-robin timing."""
    model = build_model(config, settings)
    prompt = make_prompt(settings, config.vocab_size)
    gen_config = generation_config(config, settings)
    sync = device_sync(settings.device)
    out: list = []
    call = _generate_call(model, prompt, gen_config, out)
    expected = settings.prompt_len + settings.max_new_tokens

    skipped: dict[str, str] = {}
    first_ids: dict[str, torch.Tensor] = {}
    for impl in IMPLEMENTATIONS:  # the first, untimed call of each: warm-up and token check
        reason = _switch(model, impl)
        if reason is None:
            try:
                call()
            except NotImplementedError as error:  # gatelab's: experts it does not support
                reason = f"NotImplementedError: {error}"
        if reason is not None:
            skipped[impl] = reason
            log(f"  {name}: {impl} skipped ({reason})")
            continue
        ids = out[0]
        if ids.shape != (settings.batch_size, expected):
            raise RuntimeError(
                f"{name} with experts_implementation={impl!r} generated {tuple(ids.shape)} "
                f"ids, expected {(settings.batch_size, expected)}: generation stopped early"
            )
        first_ids[impl] = ids[:, settings.prompt_len :].cpu()
    timed = [impl for impl in IMPLEMENTATIONS if impl not in skipped]
    log(f"  {name}: timing {', '.join(timed)} round-robin")
    times = measure_round_robin(model, timed, call, settings.warmup - 1, settings.repeats, sync)

    tokens = settings.batch_size * settings.max_new_tokens
    reference = timed[0] if timed else None
    implementations = {}
    for impl in IMPLEMENTATIONS:
        if impl in skipped:
            implementations[impl] = {"skipped": skipped[impl]}
            continue
        seconds = median(times[impl])
        implementations[impl] = {
            "skipped": None,
            "generate_s": seconds,
            "generate_min_s": min(times[impl]),
            "times_s": times[impl],
            "tokens_per_s": tokens / seconds,
            **_agreement(first_ids[impl], first_ids[reference]),
        }
    same = None if len(timed) < 2 else all(implementations[i]["same_tokens"] for i in timed)
    return {
        "model_type": config.model_type,
        "config_class": type(config).__name__,
        "config": _config_summary(config, model),
        "config_diff": config.to_diff_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "new_tokens_per_call": tokens,
        "reference": reference,
        "same_tokens": same,
        "implementations": implementations,
        "ratios": {
            f"gatelab_vs_{other}": _ratio(implementations, "gatelab", other)
            for other in ("grouped_mm", "eager")
        },
    }


def measure_round_robin(
    model,
    implementations: Sequence[str],
    call: Callable[[], None],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None,
) -> dict[str, list[float]]:
    """``warmup`` untimed then ``repeats`` timed rounds; each round switches to and calls
    every implementation once, in order in even rounds and reversed in odd ones (the
    timed rounds count from 0 again). The switch happens outside the clock."""
    names = list(implementations)
    for round_ in range(warmup):
        for name in names if round_ % 2 == 0 else names[::-1]:
            model.set_experts_implementation(name)
            call()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name] += timeit(
                call,
                0,
                1,
                setup=lambda name=name: model.set_experts_implementation(name),
                sync=sync,
            )
    return times


def _agreement(ids: torch.Tensor, reference: torch.Tensor) -> dict:
    """Whether ``ids`` equal the reference's generated ids, and the first new-token position
    where any sequence differs (None when equal)."""
    differs = (ids != reference).any(dim=0).nonzero()
    return {
        "same_tokens": bool(differs.numel() == 0),
        "first_mismatch": int(differs[0, 0]) if differs.numel() else None,
    }


def _ratio(implementations: dict, ours: str, other: str) -> float | None:
    a, b = implementations.get(ours), implementations.get(other)
    if a is None or b is None or a["skipped"] is not None or b["skipped"] is not None:
        return None  # not run, or skipped
    return a["tokens_per_s"] / b["tokens_per_s"]


def _config_summary(config, model) -> dict:
    """The sizes the table prints: width, layers, experts, top-k, expert width, vocab."""

    def first(*names):
        for attr in names:
            value = getattr(config, attr, None)
            if value is not None:
                return value
        return None

    moe_layers = sum(
        1 for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")
    )
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "moe_layers": moe_layers,
        "num_experts": first("num_local_experts", "num_experts", "n_routed_experts"),
        "top_k": config.num_experts_per_tok,
        "expert_hidden": first("moe_intermediate_size", "intermediate_size"),
        "shared_experts": getattr(config, "n_shared_experts", None),
        "vocab_size": config.vocab_size,
    }


# -- the benchmark ------------------------------------------------------------------------


def default_configs(settings: GenerateBenchSettings) -> dict:
    """The configs of ``settings.models`` at the default sizes (see :func:`model_config`)."""
    return {
        name: model_config(name, max_positions=settings.max_positions) for name in settings.models
    }


def run_generate_bench(
    settings: GenerateBenchSettings | None = None,
    configs: dict | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = log_stderr,
) -> dict:
    """Run the benchmark and return the JSON-ready result (see ``SCHEMA``).

    ``configs`` maps model names to ``transformers`` configs (default:
    :func:`default_configs`, the models of ``settings.models``).
    """
    if not transformers_available():
        raise ValueError("gatelab bench generate needs transformers; pip install 'gatelab[hf]'")
    settings = (settings or GenerateBenchSettings()).resolved()
    log = log or (lambda message: None)
    configs = configs if configs is not None else default_configs(settings)
    if not configs:
        raise ValueError("configs is empty; give at least one model")
    # Like the command layer (commands/_common.py), reach the HF layer by name: nothing
    # outside gatelab.hf imports it (tests/test_hf.py::test_core_never_imports_hf).
    register = importlib.import_module("gatelab.hf.experts").register
    if register() != "gatelab":
        raise RuntimeError("gatelab.hf.experts.register() did not register 'gatelab'")
    started, env_at_start = utc_now(), environment(settings.device)
    log(
        f"gatelab bench generate: {settings.device}, batch {settings.batch_size} x prompt "
        f"{settings.prompt_len}, {settings.max_new_tokens} new tokens, warmup "
        f"{settings.warmup}, repeats {settings.repeats}, models {', '.join(configs)}"
        + (f", {settings.contended} busy process(es)" if settings.contended else "")
    )
    results = {}
    with busy_processes(settings.contended):
        for name, config in configs.items():
            log(f"model {name}")
            results[name] = bench_model(name, config, settings, log)
    return {
        "schema": SCHEMA,
        "command": command,
        "started_at": started,
        "finished_at": utc_now(),
        "environment": {**env_at_start, "load_average_1m_at_end": load_average()},
        "contended": settings.contended,
        "settings": {
            **asdict(settings),
            "models": list(configs),
            "dtype": "float32",
            "implementations": list(IMPLEMENTATIONS),
            "generate": "model.generate(prompt, do_sample=False, use_cache=True, "
            "max_new_tokens=min_new_tokens=N); weights random (seeded), one model object "
            "per family, switched with set_experts_implementation",
            "timer": "time.perf_counter; median of repeats after warm-up; implementations "
            "round-robin, one call each per round, order alternating; the first untimed call "
            "of each checks the tokens"
            + ("; torch.cuda.synchronize around each call" if settings.device == "cuda" else ""),
            "tokens_per_s": "batch_size * max_new_tokens / median generate time (prefill included)",
            "ratio": "gatelab tokens/s / other implementation's tokens/s (> 1: gatelab faster)",
            "contention": CONTENTION_METHOD if settings.contended else None,
        },
        "models": results,
    }


__all__ = [
    "IMPLEMENTATIONS",
    "MODELS",
    "SCHEMA",
    "GenerateBenchSettings",
    "bench_model",
    "build_model",
    "default_configs",
    "format_table",
    "generation_config",
    "make_prompt",
    "measure_round_robin",
    "model_config",
    "run_generate_bench",
    "transformers_available",
]
