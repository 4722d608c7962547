"""Dense -> MoE upcycling, EvoMoE's expert diversify, and whole-LM upcycling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gatelab.convert import diversify_experts, upcycle_ffn, upcycle_lm
from gatelab.dispatch import get_dispatcher
from gatelab.experts import activation_name, read_dense_ffn
from gatelab.layers import GluMlp
from gatelab.models import LM, LMConfig
from gatelab.routing import EMPTY, DenseToSparseRouter

D, F, E = 12, 20, 5


def random_normalised_slots(tokens: int, num_experts: int, k: int, seed: int):
    """Random distinct experts with some EMPTY slots, weights summing to 1 per token."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.argsort(torch.rand(tokens, num_experts, generator=g), dim=1)[:, :k]
    empty = torch.rand(tokens, k, generator=g) < 0.4
    empty[:, 0] = False  # every token keeps at least one expert, so it can sum to 1
    experts = experts.masked_fill(empty, EMPTY)
    weights = torch.rand(tokens, k, generator=g, dtype=torch.float64).masked_fill(empty, 0.0)
    return experts, weights / weights.sum(1, keepdim=True)


def sequential_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(D, F), nn.GELU(approximate="tanh"), nn.Dropout(0.0), nn.Linear(F, D)
    )


FFNS = {"swiglu": lambda: GluMlp(D, F), "sequential": sequential_mlp}


@pytest.mark.parametrize("dispatcher", ["loop", "grouped"])
@pytest.mark.parametrize("kind", sorted(FFNS))
def test_copies_give_the_dense_output_for_any_normalised_routing(kind, dispatcher):
    ffn = FFNS[kind]().double()
    moe = upcycle_ffn(ffn, E, top_k=3)
    x = torch.randn(30, D, dtype=torch.float64)
    experts, weights = random_normalised_slots(30, E, 3, seed=1)
    out = get_dispatcher(dispatcher)(x, experts, weights, moe.experts.weights(), True)
    torch.testing.assert_close(out, ffn(x))


def test_the_layer_with_a_normalised_router_is_the_dense_ffn():
    ffn = GluMlp(D, F)
    moe = upcycle_ffn(ffn, E, top_k=2, router_kwargs={"normalize": True})
    x = torch.randn(3, 7, D)
    torch.testing.assert_close(moe(x), ffn(x), atol=1e-6, rtol=1e-5)
    # The dense-to-sparse gate's "dense" evaluation (softmax over all experts) sums to 1 too.
    dts = upcycle_ffn(
        ffn, E, top_k=E, router="dense_to_sparse", router_kwargs={"eval_mode": "dense"}
    ).eval()
    torch.testing.assert_close(dts(x), ffn(x), atol=1e-6, rtol=1e-5)


def test_shapes_and_router_init():
    moe = upcycle_ffn(sequential_mlp(), E, top_k=2, router_std=0.5)
    bank = moe.experts
    assert not bank.glu and bank.act == "gelu_tanh"
    assert bank.up_proj.shape == (E, F, D) and bank.down_proj.shape == (E, D, F)
    assert bank.up_proj_bias.shape == (E, F) and bank.down_proj_bias.shape == (E, D)
    assert moe.router.weight.shape == (E, D)
    assert moe.router.weight.std().item() == pytest.approx(0.5, rel=0.25)
    glu = upcycle_ffn(GluMlp(D, F), E, router_std=0.0)
    assert glu.experts.gate_up_proj.shape == (E, 2 * F, D) and glu.experts.glu
    assert (glu.router.weight == 0).all()
    torch.manual_seed(3)
    kept = upcycle_ffn(GluMlp(D, F), E, router_std=None).router.weight
    assert kept.abs().max() <= 1 / D**0.5 and kept.std() > 0.1  # the router's own U(±1/√D)


HF_MLPS = {
    "llama": ("LlamaConfig", "transformers.models.llama.modeling_llama", "LlamaMLP", "silu"),
    "qwen2": (
        "Qwen2Config",
        "transformers.models.qwen2.modeling_qwen2",
        "Qwen2MLP",
        "gelu_pytorch_tanh",
    ),
}


@pytest.mark.parametrize("family", sorted(HF_MLPS))
def test_hf_mlp_upcycle_equals_the_hf_mlp(family):
    transformers = pytest.importorskip("transformers")
    import importlib

    config_name, module, mlp_name, act = HF_MLPS[family]
    config = getattr(transformers, config_name)(
        hidden_size=16,
        intermediate_size=24,
        hidden_act=act,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    mlp = getattr(importlib.import_module(module), mlp_name)(config).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.3)
    moe = upcycle_ffn(mlp, 4, top_k=2, router_kwargs={"normalize": True}).double()
    assert moe.experts.act == ("silu" if act == "silu" else "gelu_tanh")
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), mlp(x))


def test_activation_is_recognised_by_value():
    assert activation_name(nn.SiLU()) == "silu"
    assert activation_name(torch.relu) == "relu"
    assert activation_name(nn.GELU()) == "gelu"
    with pytest.raises(ValueError, match="none of gatelab's expert activations"):
        activation_name(nn.Tanh())


def test_bad_ffns():
    with pytest.raises(TypeError, match="cannot read Conv1d as a dense FFN"):
        read_dense_ffn(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="must be Linear, activation, Linear"):
        read_dense_ffn(nn.Sequential(nn.Linear(D, F), nn.ReLU()))
    with pytest.raises(ValueError, match="none of gatelab's expert activations"):
        upcycle_ffn(nn.Sequential(nn.Linear(D, F), nn.Tanh(), nn.Linear(F, D)), E)
    with pytest.raises(ValueError, match="come from the dense FFN"):
        upcycle_ffn(GluMlp(D, F), E, act="relu")
    with pytest.raises(ValueError, match="router_std must be >= 0"):
        upcycle_ffn(GluMlp(D, F), E, router_std=-1.0)


# -- diversify -------------------------------------------------------------------------------


def test_diversify_masks_hidden_units_with_exact_shares():
    ffn = GluMlp(D, F)
    moe = upcycle_ffn(ffn, E)
    gate_up = moe.experts.gate_up_proj.detach().clone()
    mask = diversify_experts(moe, drop=0.25, seed=7)
    kept = round(0.75 * F)
    assert mask.shape == (E, F) and (mask.sum(1) == kept).all()
    down = moe.experts.down_proj.detach()
    want = ffn.down_proj.weight.detach() * mask.unsqueeze(1) * (F / kept)
    torch.testing.assert_close(down, want)
    assert torch.equal(moe.experts.gate_up_proj, gate_up)  # input weights stay
    assert len({tuple(m.tolist()) for m in mask}) == E  # the experts differ
    assert torch.equal(diversify_experts(upcycle_ffn(ffn, E), 0.25, seed=7), mask)  # seeded


def test_diversify_without_rescale_and_with_no_drop():
    ffn = GluMlp(D, F)
    moe = upcycle_ffn(ffn, E)
    diversify_experts(moe, drop=0.0)
    torch.testing.assert_close(moe.experts.down_proj, ffn.down_proj.weight.expand(E, D, F))
    mask = diversify_experts(moe.experts, drop=0.5, rescale=False)
    torch.testing.assert_close(
        moe.experts.down_proj, ffn.down_proj.weight * mask.unsqueeze(1).float()
    )
    with pytest.raises(ValueError, match=r"drop must lie in \[0, 1\)"):
        diversify_experts(moe, drop=1.0)


def test_diversified_experts_equal_the_trained_one_in_expectation():
    ffn = GluMlp(4, 8).double()
    many = 4000
    moe = upcycle_ffn(ffn, many)
    diversify_experts(moe, drop=0.5, seed=0)
    x = torch.randn(6, 4, dtype=torch.float64)
    weights = torch.full((6, many), 1.0 / many, dtype=torch.float64)
    experts = torch.arange(many).expand(6, many)
    mean = get_dispatcher("grouped")(x, experts, weights, moe.experts.weights(), True)
    want = ffn(x)
    # Each unit is kept with probability 1/2, so the mean of 4000 masks has error ~ 1.6%.
    assert ((mean - want).abs().max() / want.abs().max()).item() < 0.08
    single = get_dispatcher("loop")(x, experts[:, :1], weights[:, :1] * many, moe.experts.weights())
    assert ((single - want).abs().max() / want.abs().max()).item() > 0.1  # one expert differs


# -- whole LM --------------------------------------------------------------------------------


def dense_lm() -> LM:
    config = LMConfig(
        vocab_size=40,
        dim=16,
        num_layers=2,
        num_heads=2,
        max_seq_len=16,
        ffn_hidden_dim=24,
        moe_layers="none",
    )
    return LM(config)


def test_upcycled_lm_computes_the_dense_lm():
    lm = dense_lm().eval()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    moe_lm = upcycle_lm(
        lm, 4, top_k=2, router_kwargs={"normalize": True}, loss_weights={"balance": 0.01}
    ).eval()
    cfg = moe_lm.config
    assert cfg.moe_layer_indices() == [0, 1] and cfg.expert_hidden_dim == 24
    assert cfg.num_experts == 4 and cfg.top_k == 2 and cfg.loss_weights == {"balance": 0.01}
    ids = torch.randint(0, 40, (2, 10))
    torch.testing.assert_close(moe_lm(ids).logits, lm(ids).logits, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())  # untouched
    LM(cfg).load_state_dict(moe_lm.state_dict())  # the config rebuilds it (checkpoints)


def test_evomoe_pipeline_trains():
    lm = dense_lm()
    kwargs = {"tau_max": 2.0, "tau_min": 0.5, "decay_steps": 4, "hard_from": 6}
    moe_lm = upcycle_lm(
        lm, 4, top_k=4, router="dense_to_sparse", router_kwargs=kwargs, diversify=0.5
    )
    router = moe_lm.blocks[0].ffn.router
    assert isinstance(router, DenseToSparseRouter) and router.hard_from == 6
    down = [b.ffn.experts.down_proj for b in moe_lm.blocks]
    assert all((d == 0).any() for d in down)  # masked units
    assert not torch.equal(down[0][0], down[0][1])
    ids = torch.randint(0, 40, (2, 10))
    out = moe_lm.train()(ids, ids)
    out.total_loss.backward()
    assert torch.isfinite(out.total_loss) and router.weight.grad.abs().sum() > 0


def test_upcycle_lm_needs_a_dense_lm():
    with pytest.raises(TypeError, match="upcycle_lm takes a gatelab LM"):
        upcycle_lm(GluMlp(D, F), 4)
    moe_lm = upcycle_lm(dense_lm(), 2)
    with pytest.raises(ValueError, match="all dense"):
        upcycle_lm(moe_lm, 2)


def test_evomoe_experiment_smoke(tmp_path):
    from gatelab.experiments import get

    result = get("evomoe").run("smoke", seed=0, out_dir=tmp_path)
    rows = result["results"]
    assert set(rows) == {"switch", "top2", "evomoe"} and "| evomoe |" in result["table"]
    assert rows["switch"][0]["experts_per_token"] == 1.0
    assert rows["top2"][0]["experts_per_token"] == 2.0
    # Dense steps count 1, DTS steps up to 4, hard top-1 steps 1: strictly between.
    assert 1.0 < rows["evomoe"][0]["experts_per_token"] < 4.0
    for arm in rows.values():
        assert all(v > 0 for v in arm[0]["bpb"].values())
    assert (tmp_path / "evomoe-0" / "metrics.jsonl").exists()
    from gatelab.experiments.evomoe import SCALES, train_arm

    ablation = train_arm("dts", SCALES["smoke"], 0, tmp_path)
    assert 1.0 < ablation["experts_per_token"] <= 4.0 and ablation["bpb"]["code"] > 0


def test_optimizer_state_carries_over():
    from gatelab.convert import upcycle_optimizer_state

    lm = dense_lm()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    ids = torch.randint(0, 40, (2, 10))
    for _ in range(2):
        opt.zero_grad()
        lm(ids, ids).loss.backward()
        opt.step()
    moe_lm = upcycle_lm(lm, 3, top_k=2)
    moe_opt = torch.optim.AdamW(moe_lm.parameters(), lr=1e-3)
    carried = upcycle_optimizer_state(lm, opt, moe_lm, moe_opt)
    assert carried == len(list(lm.parameters()))  # every dense tensor has a home
    attn = moe_opt.state[moe_lm.blocks[0].attn.qkv_proj.weight]
    torch.testing.assert_close(
        attn["exp_avg"], opt.state[lm.blocks[0].attn.qkv_proj.weight]["exp_avg"]
    )
    bank = moe_opt.state[moe_lm.blocks[1].ffn.experts.down_proj]
    dense = opt.state[lm.blocks[1].ffn.down_proj.weight]
    assert bank["exp_avg_sq"].shape == (3, 16, 24) and int(bank["step"]) == 2
    for e in range(3):
        torch.testing.assert_close(bank["exp_avg_sq"][e], dense["exp_avg_sq"])
    assert moe_lm.blocks[0].ffn.router.weight not in moe_opt.state
    moe_opt.zero_grad()
    moe_lm(ids, ids).total_loss.backward()
    moe_opt.step()  # the carried state is usable
    assert int(moe_opt.state[moe_lm.blocks[0].ffn.router.weight]["step"]) == 1
