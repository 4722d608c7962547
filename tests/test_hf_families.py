"""Every experts class the installed transformers routes through the experts interface,
gatelab against eager (issue 15, item 13): a new transformers release that adds a family or
changes a layout fails here, not silently in a user's model.

The classes are found by reading transformers' modeling sources for
``@use_experts_implementation`` (no list kept by hand). Each is built from its own config
class with tiny sizes and run standalone through the interface's call
``forward(hidden_states, top_k_index, top_k_weights)`` (two routes per token, or one route
per row with unit weight where that is all the eager forward takes): outputs and every
gradient must match the module's eager forward. A class that cannot be built tiny is
skipped with the reason; one gatelab does not support must fail with its one clear error.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import typing

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers import PreTrainedConfig  # noqa: E402

import gatelab.hf  # noqa: E402

# Families gatelab refuses, with the reason (kept in step with README's HF section).
UNSUPPORTED = {"has_post_expert_norm": "experts with a post-expert norm (has_post_expert_norm)"}
TINY = {"hidden": 16, "ffn": 8, "experts": 4}
_SIZE_KEYS = re.compile(r"(^|_)(intermediate|ffn|ff|expert_dim|moe_dim)")
_EXPERT_KEYS = re.compile(r"(num_local_experts|num_experts|n_routed_experts|moe_num_experts)$")


def _decorated_classes() -> list[tuple[str, str]]:
    root = pathlib.Path(transformers.__file__).parent / "models"
    found = []
    for path in sorted(root.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(
            r"@use_experts_implementation(?:\([^)]*\))?\s*\nclass (\w+)", text
        ):
            found.append((f"transformers.models.{path.parent.name}.{path.stem}", match.group(1)))
    return found


CLASSES = _decorated_classes()


def _config_candidates(module, cls) -> list[type]:
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    try:
        hinted = typing.get_type_hints(init, vars(module)).get("config")
    except Exception:  # noqa: BLE001 - unresolvable hints: fall back to the module's configs
        hinted = None
    configs = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, PreTrainedConfig) and v is not PreTrainedConfig
    ]
    configs.sort(key=lambda c: ("Text" not in c.__name__, c.__name__))
    return ([hinted] if hinted is not None else []) + configs


def _tiny(config_cls) -> PreTrainedConfig:
    config = config_cls()
    for key, value in list(vars(config).items()):
        if isinstance(value, bool) or not isinstance(value, (int, list, type(None))):
            continue  # sizes are ints, None (unset) or per-modality lists of ints
        if key in ("hidden_size", "moe_hidden_size"):
            setattr(config, key, TINY["hidden"])
        elif _SIZE_KEYS.search(key) and "size" in key:
            tiny = TINY["ffn"]
            setattr(config, key, [tiny] * len(value) if isinstance(value, list) else tiny)
        elif _EXPERT_KEYS.search(key):
            setattr(config, key, TINY["experts"])
    return config


def _build(module_name: str, class_name: str):
    """(experts module, hidden dim) of a tiny instance, or pytest.skip with the reason."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - an optional dependency of the family
        pytest.skip(f"{class_name}: cannot import {module_name}: {exc}")
    cls = getattr(module, class_name)
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    # Ernie-VL's experts take their width as an argument (one per modality in the config);
    # BailingHybrid's and Step3p7's their layer (it picks the layer's SwiGLU limit).
    names = init.__code__.co_varnames[: init.__code__.co_argcount]
    extra = {"intermediate_size": TINY["ffn"]} if "intermediate_size" in names else {}
    if "layer_idx" in names:
        extra["layer_idx"] = 0
    errors = []
    for config_cls in _config_candidates(module, cls):
        try:
            config = _tiny(config_cls)
            with torch.device("meta"):
                probe = cls(config, **extra)
        except Exception as exc:  # noqa: BLE001 - try the module's next config class
            errors.append(f"{config_cls.__name__}: {type(exc).__name__}")
            continue
        if sum(p.numel() for p in probe.parameters()) > 200_000:
            errors.append(f"{config_cls.__name__}: not tiny with the known size keys")
            continue
        torch.manual_seed(0)
        experts = cls(config, **extra).float()
        with torch.no_grad():
            for param in experts.parameters():
                param.copy_(torch.randn(param.shape) * 0.2)
        if hasattr(experts, "limit") and experts.limit is None:
            experts.limit = 0.3  # a SwiGLU clamp the default config leaves off: exercise it
        return experts
    pytest.skip(f"{class_name}: no config class builds it tiny ({'; '.join(errors)})")


def _run(experts, implementation: str, hidden, index, weights):
    experts.config._experts_implementation = implementation
    experts.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_()
    out = experts(hidden, index, weights)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in experts.named_parameters() if p.grad is not None}
    return out.detach(), hidden.grad, grads


@pytest.mark.parametrize(("module_name", "class_name"), CLASSES, ids=[c for _, c in CLASSES])
def test_experts_class_matches_eager(module_name, class_name):
    gatelab.hf.register()
    experts = _build(module_name, class_name)
    reason = next((why for flag, why in UNSUPPORTED.items() if getattr(experts, flag, False)), None)
    w_in = experts.gate_up_proj if experts.has_gate else experts.up_proj
    num_experts, dim = w_in.shape[0], w_in.shape[1 if experts.is_transposed else 2]
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, dim, generator=gen)
    index = torch.argsort(torch.rand(7, num_experts, generator=gen), dim=1)[:, :2]
    weights = torch.rand(7, 2, generator=gen)
    if reason is not None:
        with pytest.raises(NotImplementedError, match=re.escape(reason)):
            _run(experts, gatelab.hf.IMPLEMENTATION, hidden, index, weights)
        return
    try:
        ref = _run(experts, "eager", hidden, index, weights)
    except TypeError as exc:  # an eager forward that needs more than the interface's call
        pytest.skip(f"{class_name}: eager forward is not forward(hidden, index, weights): {exc}")
    except (IndexError, RuntimeError):
        # Projections whose eager forward takes one route per row and ignores the weight
        # (Ergo's, transformers 5.25: its experts module repeats each token once per route
        # and weights the routes itself, after a per-expert norm): call them as it does.
        index, weights = index[:, :1], torch.ones(7, 1)
        ref = _run(experts, "eager", hidden, index, weights)
    ours = _run(experts, gatelab.hf.IMPLEMENTATION, hidden, index, weights)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-4)
    assert ours[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(ours[2][name], ref[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_every_family_is_found():
    """The scan must find the families the other HF tests know, or it finds nothing."""
    names = {c for _, c in CLASSES}
    assert {"MixtralExperts", "Qwen3MoeExperts", "GptOssExperts", "AriaExperts"} <= names
