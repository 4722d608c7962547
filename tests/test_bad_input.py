"""Bad input fails early with a message that names the argument (and how to fix it)."""

from __future__ import annotations

import pytest
import torch

from gatelab import ExpertBank, ExpertWeights, MoE
from gatelab.dispatch import get_dispatcher
from gatelab.experts import EXPERT_BANKS
from gatelab.layers import SharedExpert
from gatelab.routing import (
    ROUTERS,
    ExpertChoiceRouter,
    SigmoidRouter,
    TopKRouter,
    expert_capacity,
)

LEARNED = [name for name in ROUTERS.names() if name != "hash"]


# -- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTERS.names())
@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one(router, top_k):
    with pytest.raises(ValueError, match=f"top_k must be a positive int, got {top_k}"):
        MoE(8, 16, 4, top_k, router=router)


@pytest.mark.parametrize("router", ROUTERS.names())
def test_top_k_above_num_experts(router):
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4; use top_k <= num_experts"):
        MoE(8, 16, 4, 5, router=router)


@pytest.mark.parametrize("name,value", [("dim", 0), ("num_experts", 0), ("top_k", 1.5)])
def test_router_sizes_must_be_positive_ints(name, value):
    sizes = {"dim": 8, "num_experts": 4, "top_k": 2, name: value}
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        TopKRouter(**sizes)


@pytest.mark.parametrize("name", ["num_experts", "dim", "hidden_dim"])
def test_bank_sizes_must_be_positive_ints(name):
    sizes = {"num_experts": 4, "dim": 8, "hidden_dim": 16, name: 0}
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        ExpertBank(**sizes)


def test_sigmoid_group_arguments():
    with pytest.raises(ValueError, match="n_group=3 must divide num_experts=8"):
        SigmoidRouter(8, 8, 2, n_group=3)
    with pytest.raises(ValueError, match="topk_group=5 must lie in 1..n_group=4"):
        SigmoidRouter(8, 8, 2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="at least 2 experts per group"):
        SigmoidRouter(8, 8, 2, n_group=8, topk_group=2)
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 experts .* raise topk_group"):
        SigmoidRouter(8, 8, 3, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="bias_update_rate must be >= 0"):
        SigmoidRouter(8, 8, 2, bias_update_rate=-0.1)


def test_jitter_must_be_non_negative():
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        TopKRouter(8, 4, 2, jitter=-0.5)


# -- the input ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 9), (8, 1)])
def test_input_width_must_be_dim(shape):
    with pytest.raises(ValueError, match=r"MoE input must be \[..., dim=8\], got shape"):
        MoE(8, 16, 4, 2)(torch.randn(shape))


def test_scalar_input():
    with pytest.raises(ValueError, match=r"\[..., dim=8\]"):
        MoE(8, 16, 4, 2)(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_input(dtype):
    with pytest.raises(TypeError, match=f"real floating tensor, got {dtype}.*embed token ids"):
        MoE(8, 16, 4, 2)(torch.ones(3, 8, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_input(dtype):
    with pytest.raises(TypeError, match=f"real floating tensor, got {dtype}"):
        MoE(8, 16, 4, 2)(torch.ones(3, 8, dtype=dtype))


def test_non_tensor_input():
    with pytest.raises(TypeError, match="MoE expects a tensor, got list"):
        MoE(8, 16, 4, 2)([[0.0] * 8])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("router", LEARNED)
def test_non_finite_logits_raise(router, bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(FloatingPointError, match="NaN or inf logits.*nan_policy='ignore'"):
        MoE(8, 16, 4, 2, router=router)(x)


@pytest.mark.parametrize("router", LEARNED)
def test_nan_policy_ignore_routes_anyway(router):
    moe = MoE(8, 16, 4, 2, router=router, router_kwargs={"nan_policy": "ignore"})
    x = torch.randn(4, 8)
    x[2, 3] = float("nan")
    out = moe(x)
    assert out.shape == (4, 8)
    assert moe.last_routing.logits[2].isnan().any()
    assert torch.isfinite(out[[0, 1, 3]]).all()  # only the bad token is affected


def test_nan_policy_must_be_known():
    with pytest.raises(ValueError, match="nan_policy must be one of .*'raise', 'ignore'"):
        TopKRouter(8, 4, 2, nan_policy="zero")


# -- expert banks --------------------------------------------------------------------------


def test_bank_for_another_dim():
    with pytest.raises(
        ValueError, match="expert bank has num_experts=4, dim=6, hidden_dim=16; the layer has"
    ):
        MoE(8, 16, 4, 2, experts=ExpertBank(4, 6, 16))


def test_bank_with_other_num_experts():
    with pytest.raises(ValueError, match="expert bank has num_experts=3, dim=8"):
        MoE(8, 16, 4, 2, experts=ExpertBank(3, 8, 16))


def test_router_for_another_layer():
    with pytest.raises(ValueError, match="router is for dim=6, num_experts=4"):
        MoE(8, 16, 4, 2, router=TopKRouter(6, 4, 2))
    with pytest.raises(ValueError, match="router_kwargs apply only to a router given by name"):
        MoE(8, 16, 4, 2, router=TopKRouter(8, 4, 2), router_kwargs={"normalize": True})


def weights(e=4, h=32, d=8, f=16, b_in=None, b_out=None, w_out=None):
    return ExpertWeights(
        torch.zeros(e, h, d),
        torch.zeros(e, d, f) if w_out is None else w_out,
        b_in,
        b_out,
        torch.relu,
    )


def test_expert_weights_inconsistent_shapes():
    with pytest.raises(
        ValueError, match=r"down_proj \(4, 9, 16\) does not match .* \[4, 8, hidden_dim\]"
    ):
        weights(w_out=torch.zeros(4, 9, 16)).check()
    with pytest.raises(ValueError, match=r"down_proj \(3, 8, 16\) does not match"):
        weights(w_out=torch.zeros(3, 8, 16)).check()
    with pytest.raises(ValueError, match="expert weights must be 3-D"):
        weights(w_out=torch.zeros(8, 16)).check()
    with pytest.raises(ValueError, match=r"b_in has shape \(4, 16\), expected \[4, 32\]"):
        weights(b_in=torch.zeros(4, 16)).check()
    with pytest.raises(ValueError, match=r"b_out has shape \(8,\), expected \[4, 8\]"):
        weights(b_out=torch.zeros(8)).check()
    assert weights(b_in=torch.zeros(4, 32), b_out=torch.zeros(4, 8)).check() is not None


def test_moe_checks_a_custom_bank():
    class Broken(torch.nn.Module):
        def weights(self):
            return weights(w_out=torch.zeros(4, 9, 16))

    with pytest.raises(ValueError, match="down_proj .* does not match"):
        MoE(8, 16, 4, 2, experts=Broken())


# -- names ---------------------------------------------------------------------------------


def test_unknown_router_lists_valid_names():
    with pytest.raises(ValueError, match="unknown router 'top2'; valid names are: ") as info:
        MoE(8, 16, 4, 2, router="top2")
    for name in ROUTERS.names():
        assert name in str(info.value)


def test_unknown_dispatcher_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown dispatcher 'fast'; valid names are: auto, grouped, loop"
    ):
        MoE(8, 16, 4, 2, dispatcher="fast")
    with pytest.raises(ValueError, match="valid names are: auto, grouped, loop"):
        get_dispatcher("fast")


def test_unknown_expert_bank_lists_valid_names():
    with pytest.raises(ValueError, match="unknown expert bank 'moe'; valid names are: ") as info:
        MoE(8, 16, 4, 2, experts="moe")
    for name in EXPERT_BANKS.names():
        assert name in str(info.value)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="unknown act 'swish'; valid names are: .*silu"):
        MoE(8, 16, 4, 2, act="swish")
    with pytest.raises(ValueError, match="unknown act 'tanh'"):
        SharedExpert(8, 16, act="tanh")


def test_unknown_loss_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown loss 'entropy'; valid names are: balance, importance, load, z"
    ):
        MoE(8, 16, 4, 2, loss_weights={"entropy": 0.1})
    with pytest.raises(ValueError, match="loss weight balance=-1.0 must be a finite number >= 0"):
        MoE(8, 16, 4, 2, loss_weights={"balance": -1.0})


# -- capacity ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, -1.0])
def test_capacity_factor_must_be_positive(bad):
    with pytest.raises(ValueError, match=f"capacity_factor must be > 0.*got {bad}"):
        MoE(8, 16, 4, 2, capacity_factor=bad)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_capacity(8, 2, 4, bad)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        ExpertChoiceRouter(8, 4, 2, capacity_factor=bad)


# -- what is not an error --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8), (0, 3, 8), (2, 0, 8)])
def test_empty_batches_are_normal(shape):
    out = MoE(8, 16, 4, 2)(torch.randn(shape))
    assert out.shape == shape
