"""gatelab as a transformers experts implementation: same logits and gradients as eager."""

from __future__ import annotations

import ast
import functools
import importlib
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

import hf_tiny  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface  # noqa: E402

import gatelab.hf  # noqa: E402
from gatelab.hf import experts as hf_experts  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
# The tiny random models of each family are the ones every HF test uses (tests/hf_tiny.py).
CONFIGS = {name: functools.partial(hf_tiny.config, name) for name in hf_tiny.FAMILIES}
VOCAB = hf_tiny.VOCAB


@pytest.fixture(autouse=True)
def _registered():
    gatelab.hf.register()


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]


def _build(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        CONFIGS[name](), experts_implementation="gatelab", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for module in _experts_modules(model):
            for pname, param in module.named_parameters():
                if pname.endswith("_bias"):  # GPT-OSS initialises its biases to zero
                    param.normal_(0.0, 0.1)
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:  # DeepSeek-V3's aux-loss-free bias, zero at init
                bias.copy_(torch.rand(bias.shape) * 0.5)
    return model


class _Spy:
    """Counts calls to the dispatcher the gatelab forward uses."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = hf_experts.grouped_dispatch

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(hf_experts, "grouped_dispatch", spy)


def _run(model, impl: str, ids: torch.Tensor):
    """Logits and gradients of a loss wrt every experts parameter, under ``impl``."""
    model.set_experts_implementation(impl)
    assert model.config._experts_implementation == impl
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    grads = {
        name: param.grad.clone()
        for name, param in model.named_parameters()
        if ".experts." in name or ".mlp.gate." in name or ".router." in name
    }
    return logits.detach(), grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_eager(name, monkeypatch):
    if name == "gpt_oss" and not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no GPT-OSS")
    model = _build(name)
    assert model.config._experts_implementation == "gatelab"
    experts = _experts_modules(model)
    assert experts, f"{name}: no HF experts module found"
    if name == "gpt_oss":
        assert experts[0].is_transposed and experts[0].has_bias
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))

    spy = _Spy(monkeypatch)
    ours, our_grads = _run(model, "gatelab", ids)
    assert spy.calls == len(experts), "the gatelab experts forward did not run in every MoE layer"
    ref, ref_grads = _run(model, "eager", ids)
    assert spy.calls == len(experts)

    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    assert our_grads.keys() == ref_grads.keys()
    assert any(".experts." in key for key in our_grads)
    for key in ref_grads:
        torch.testing.assert_close(our_grads[key], ref_grads[key], atol=ATOL, rtol=RTOL, msg=key)


def test_deepseek_bias_changes_routing():
    """The random e_score_correction_bias must steer the choice, or the DeepSeek test is weak."""
    model = _build("deepseek_v3")
    gate = model.model.layers[1].mlp.gate
    hidden = torch.randn(64, gate.hidden_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, _, with_bias = gate(hidden)
        gate.e_score_correction_bias.zero_()
        _, _, without_bias = gate(hidden)
    assert not torch.equal(with_bias.sort(dim=1).values, without_bias.sort(dim=1).values)


def test_save_pretrained_round_trip(tmp_path):
    model = _build("qwen2_moe")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, experts_implementation="gatelab", dtype=torch.float32
    ).eval()
    assert loaded.config._experts_implementation == "gatelab"
    with torch.no_grad():
        ours = loaded(ids).logits
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_register_is_idempotent():
    assert gatelab.hf.register() == "gatelab"
    before = dict(ExpertsInterface._global_mapping)
    gatelab.hf.register()
    assert ExpertsInterface._global_mapping == before
    assert ALL_EXPERTS_FUNCTIONS["gatelab"] is gatelab.hf.gatelab_experts_forward


def _mixtral_experts():
    torch.manual_seed(0)
    config = hf_tiny.config("mixtral")
    config.num_local_experts = 4  # the layout test below counts 4 experts
    config._experts_implementation = "gatelab"
    module = transformers.models.mixtral.modeling_mixtral.MixtralExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0.0, 0.2)
        module.down_proj.normal_(0.0, 0.2)
    return module


def test_sentinel_slots_are_empty():
    """HF's expert-parallel sentinel id (== num_experts) contributes nothing."""
    experts = _mixtral_experts()
    num = experts.num_experts
    x = torch.randn(6, 32)
    index = torch.stack([torch.randperm(num)[:2] for _ in range(6)])
    weights = torch.rand(6, 2)
    sentinel = torch.full((6, 1), num)
    # A third slot that only holds sentinels, with a nonzero weight, equals no third slot.
    with_sentinel = experts(
        x, torch.cat([index, sentinel], dim=1), torch.cat([weights, torch.rand(6, 1)], dim=1)
    )
    torch.testing.assert_close(with_sentinel, experts(x, index, weights), atol=ATOL, rtol=RTOL)
    # Sentinels scattered among real slots match eager, which skips the sentinel class.
    scattered = index.clone()
    scattered[[0, 3, 5], [1, 0, 1]] = num
    ours = experts(x, scattered, weights)
    experts.config._experts_implementation = "eager"
    torch.testing.assert_close(ours, experts(x, scattered, weights), atol=ATOL, rtol=RTOL)


def test_plain_experts_without_gate():
    """has_gate=False experts (up_proj + act_fn), as NemotronH uses."""
    modeling = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    config = transformers.NemotronHConfig(
        hidden_size=32, n_routed_experts=4, moe_intermediate_size=24, num_experts_per_tok=2
    )
    config._experts_implementation = "gatelab"
    torch.manual_seed(0)
    experts = modeling.NemotronHExperts(config)
    assert not experts.has_gate
    with torch.no_grad():
        experts.up_proj.normal_(0.0, 0.2)
        experts.down_proj.normal_(0.0, 0.2)
    x = torch.randn(10, 32)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    ours = experts(x, index, weights)
    config._experts_implementation = "eager"
    torch.testing.assert_close(ours, experts(x, index, weights), atol=ATOL, rtol=RTOL)


def test_expert_weights_layout():
    experts = _mixtral_experts()
    bank = gatelab.hf.expert_weights_from_hf(experts)
    assert bank.w_in is experts.gate_up_proj and bank.w_out is experts.down_proj
    assert bank.b_in is None and bank.b_out is None
    # A transposed layout ([E, in, out]) is viewed, not copied, in gatelab's [E, out, in].
    experts.is_transposed = True
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2))
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().transpose(1, 2))
    bank = gatelab.hf.expert_weights_from_hf(experts)
    assert bank.w_in.shape == (4, 96, 32) and bank.w_out.shape == (4, 32, 48)
    assert bank.w_in.data_ptr() == experts.gate_up_proj.data_ptr()


@pytest.mark.parametrize("flag", ["has_post_expert_norm", "_is_expert_parallel"])
def test_unsupported_layouts_raise(flag):
    experts = _mixtral_experts()
    setattr(experts, flag, True)
    with pytest.raises(NotImplementedError, match="grouped_mm") as info:
        experts(torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert "MixtralExperts" in str(info.value)


def test_import_error_without_transformers(monkeypatch):
    for mod in [m for m in sys.modules if m == "gatelab.hf" or m.startswith("gatelab.hf.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(
        ImportError, match=r"gatelab.hf needs transformers>=5: pip install 'gatelab\[hf\]'"
    ):
        importlib.import_module("gatelab.hf")


def _imported_modules(path: pathlib.Path, root: pathlib.Path):
    """Absolute names of the modules a file of the gatelab package imports."""
    package = ["gatelab", *path.relative_to(root).with_suffix("").parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def test_core_never_imports_hf():
    root = pathlib.Path(gatelab.hf.__file__).resolve().parents[1]
    offenders = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if root / "hf" not in path.parents
        and any(
            name == "gatelab.hf" or name.startswith("gatelab.hf.")
            for name in _imported_modules(path, root)
        )
    )
    assert not offenders, f"core modules import gatelab.hf: {offenders}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("mixtral", "GLU('silu')"), ("deepseek_v3", "GLU('silu')"), ("gpt_oss", None)],
)
def test_activation_choice(name, expected):
    """HF's default gate with a known hidden_act takes gatelab's hand-written GLU; a custom
    gate (GPT-OSS's clamped, interleaved one) stays the module's own callable."""
    model = _build(name)
    for module in _experts_modules(model):
        activate = gatelab.hf.expert_weights_from_hf(module).activate
        if expected is None:
            assert activate == module._apply_gate
        else:
            assert repr(activate) == expected


def _experts_vs_eager(module, dim: int, num_experts: int):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, dim, generator=gen)
    index = torch.argsort(torch.rand(9, num_experts, generator=gen), dim=1)[:, :2]
    weights = torch.rand(9, 2, generator=gen)
    outs = []
    for impl in ("eager", "gatelab"):
        module.config._experts_implementation = impl
        outs.append(module(hidden, index, weights))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not hasattr(transformers, "AriaTextConfig"), reason="no Aria")
def test_aria_experts_use_their_own_activation():
    """Aria's routed experts are SiLU whatever config.hidden_act says (issue 15, item 11)."""
    from transformers.models.aria.modeling_aria import AriaExperts

    config = transformers.AriaTextConfig(
        hidden_act="gelu",
        hidden_size=16,
        intermediate_size=8,
        moe_num_experts=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    module = AriaExperts(config)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.5)
    assert repr(gatelab.hf.expert_weights_from_hf(module).activate) == "GLU('silu')"
    _experts_vs_eager(module, module.config.hidden_size, 4)


@pytest.mark.parametrize(
    ("act_fn", "expected"),
    [
        (torch.nn.SiLU(), "silu"),
        (transformers.activations.SiLUActivation(), "silu"),
        (torch.nn.GELU(), "gelu"),
        (torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
        (transformers.activations.GELUActivation(), "gelu"),
        (transformers.activations.GELUTanh(), "gelu_tanh"),
        (torch.nn.ReLU(), "relu"),
        (torch.nn.functional.silu, "silu"),
        (transformers.activations.GELUActivation(use_gelu_python=True), None),
        (transformers.activations.NewGELUActivation(), None),
        (torch.nn.Tanh(), None),
    ],
)
def test_activation_read_from_act_fn(act_fn, expected):
    assert hf_experts._act_name(act_fn) == expected


def test_unknown_act_fn_runs_exactly_with_a_warning():
    """An act_fn gatelab has no kernel for runs as the module's own callable (exact)."""
    module = _mixtral_experts()
    module.act_fn = torch.nn.Tanh()
    hf_experts._WARNED.clear()
    with pytest.warns(UserWarning, match="Tanh has no gatelab kernel"):
        _experts_vs_eager(module, module.config.hidden_size, 4)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_plain_backward(name, reentrant):
    """transformers' activation checkpointing (both modes, with enable_input_require_grads as
    PEFT uses it) through the gatelab experts gives the gradients of a plain backward
    (issue 15, item 10: the non-reentrant mode raised CheckpointError)."""
    model = _build(name).train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.is_activation_checkpointing
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=1e-4, msg=key)


def test_gatelab_forward_refuses_bad_ids_and_dtypes():
    """The HF path calls the dispatcher directly (no Routing checks): negative ids other
    than -1 and a hidden-state dtype other than the experts' end in a one-line ValueError.
    Ids >= num_experts stay HF's expert-parallel sentinel (empty slots)."""
    module = _mixtral_experts()
    hidden, weights = torch.randn(3, module.config.hidden_size), torch.rand(3, 2)
    with pytest.raises(ValueError, match="valid ids are 0..3"):
        gatelab.hf.gatelab_experts_forward(module, hidden, torch.tensor([[0, -5]] * 3), weights)
    with pytest.raises(ValueError, match="torch.float16 but the expert weights are torch.float32"):
        gatelab.hf.gatelab_experts_forward(
            module, hidden.half(), torch.tensor([[0, 1]] * 3), weights
        )
