"""gatelab.models: the LM (dense, MoE, mixed), the classifiers, configs and the registry."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from gatelab.models import (
    LM,
    MODELS,
    ConfigError,
    LeNet5,
    LeNet5Config,
    LMConfig,
    MLPClassifier,
    MLPConfig,
    MoEConfig,
    apply_rope,
    build_model,
    c3_connections,
    dense_equivalent,
    rope_cache,
)
from gatelab.routing import ROUTERS

V, D = 32, 16


def tiny(**changes) -> LMConfig:
    """A small LM config: 2 layers, width 16, 4 experts top-2; ``changes`` named like
    MoEConfig's fields go to ``moe``."""
    base = dict(vocab_size=V, dim=D, num_layers=2, num_heads=2, max_seq_len=24, ffn_hidden_dim=32)
    moe = dict(num_experts=4, top_k=2, hidden_dim=16, dispatcher="loop")
    moe.update({k: changes.pop(k) for k in list(changes) if k in MoEConfig.keys()})
    return LMConfig(**{**base, **changes}, moe=moe)


def ids_for(batch=2, seq=12, vocab=V, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# -- LM: forward, loss, causality ---------------------------------------------------------


@pytest.mark.parametrize("moe_layers", ["none", "all", [1], "every_other"])
def test_lm_shapes_and_initial_loss(moe_layers):
    # A bigger vocabulary than `tiny` so the initial loss is near log(V) at width 16.
    model = LM(tiny(moe_layers=moe_layers, vocab_size=128, dim=32, hidden_dim=32))
    ids, targets = ids_for(3, 10, 128), ids_for(3, 10, 128, seed=1)
    out = model(ids, targets)
    assert out.logits.shape == (3, 10, 128)
    assert out.loss.shape == () and abs(out.loss.item() - math.log(128)) < 0.3
    assert out.aux_loss.shape == ()
    assert model(ids).loss is None
    n_moe = len(model.moe_layers())
    assert n_moe == len(model.config.moe_layer_indices())
    assert (out.aux_loss.item() > 0) == (n_moe > 0)


def test_moe_layers_are_named_in_layer_order():
    model = LM(tiny(num_layers=4, moe_layers="every_other"))
    assert list(model.moe_layers()) == ["blocks.1.ffn", "blocks.3.ffn"]
    assert list(LM(tiny(moe_layers=[-1, 0])).moe_layers()) == ["blocks.0.ffn", "blocks.1.ffn"]


@pytest.mark.parametrize("moe_layers", ["none", "all"])
def test_lm_is_causal(moe_layers):
    model = LM(tiny(moe_layers=moe_layers)).eval()
    ids = ids_for(2, 12)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_token_mask_averages_over_real_tokens():
    model = LM(tiny()).eval()
    ids, targets = ids_for(2, 12), ids_for(2, 12, seed=1)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False  # right padding in the second sequence
    padded = model(ids, targets, token_mask=mask).loss
    logits = model(ids).logits
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="none"
    )
    torch.testing.assert_close(padded, per_token[mask.flatten()].mean())
    ignored = targets.masked_fill(~mask, -100)
    torch.testing.assert_close(model(ids, ignored).loss, padded)
    # No real token at all: loss 0, not NaN.
    assert model(ids, targets, token_mask=torch.zeros_like(mask)).loss.item() == 0.0


# -- LM: weight tying, RoPE, init ---------------------------------------------------------


def test_head_is_tied_to_the_embedding():
    model = LM(tiny())
    assert model.lm_head_weight is model.embed.weight
    assert [k for k in model.state_dict() if "embed" in k or "head" in k] == ["embed.weight"]
    ids = torch.zeros(1, 4, dtype=torch.long)  # only token 0 enters the model
    before = model(ids).logits[..., 5].clone()
    with torch.no_grad():
        model.embed.weight[5] += 1.0  # row 5 reaches the logits only through the head
    assert not torch.allclose(model(ids).logits[..., 5], before)
    # The head's gradient lands in the embedding: row 5 gets one without being an input.
    model(ids, torch.full((1, 4), 5)).loss.backward()
    assert model.embed.weight.grad[5].abs().sum() > 0


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoFormer's rotation written with complex numbers: channel pair (i, i + d/2) is the
    complex number x_i + j x_{i+d/2}, multiplied by exp(j * m * theta^(-2i/d))."""
    d = x.shape[-1]
    half = d // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    angles = positions.double()[:, None] * freqs
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(angles), angles
    )
    return torch.cat([z.real, z.imag], dim=-1).float()


def test_rope_matches_the_complex_reference():
    cos, sin = rope_cache(8, 20, theta=100.0)
    x = torch.randn(3, 20, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin), rope_reference(x, torch.arange(20), 100.0))


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_cache(16, 64)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        at = torch.zeros(64, 16)
        qm = apply_rope(at.index_copy(0, torch.tensor([m]), q[None]), cos, sin)[m]
        kn = apply_rope(at.index_copy(0, torch.tensor([n]), k[None]), cos, sin)[n]
        return qm @ kn

    for m, n in [(3, 1), (10, 10), (5, 9)]:
        for shift in (1, 17, 40):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_init_follows_gpt2():
    cfg = tiny(num_layers=8, dim=64, num_heads=4, hidden_dim=64, ffn_hidden_dim=64)
    model = LM(cfg.replace(moe_layers=[1], moe=cfg.moe.replace(shared_hidden_dim=64)))
    resid = 0.02 / math.sqrt(2 * 8)
    stds = {name: p.std().item() for name, p in model.named_parameters()}
    assert stds["embed.weight"] == pytest.approx(0.02, rel=0.1)
    assert stds["blocks.0.attn.qkv_proj.weight"] == pytest.approx(0.02, rel=0.1)
    for name in (
        "blocks.0.attn.o_proj.weight",
        "blocks.0.ffn.down_proj.weight",
        "blocks.1.ffn.experts.down_proj",
        "blocks.1.ffn.shared_experts.ffn.down_proj.weight",
    ):
        assert stds[name] == pytest.approx(resid, rel=0.1), name
    assert torch.all(model.blocks[0].attn_norm.weight == 1)


# -- Parameter counts ---------------------------------------------------------------------


def test_parameter_counts_by_hand():
    # vocab 11, D 8, 2 layers (layer 1 MoE: 4 experts of width 6, top-2, shared width 3).
    cfg = LMConfig(
        vocab_size=11,
        dim=8,
        num_layers=2,
        num_heads=2,
        ffn_hidden_dim=15,
        moe_layers=[1],
        moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=6, shared_hidden_dim=3),
    )
    d, e, f, s = 8, 4, 6, 3
    embed, final_norm = 11 * d, d
    attn_and_norms = 4 * d * d + 2 * d  # q, k, v, o projections, two RMSNorms
    dense_ffn = 3 * d * 15  # gate_up [2*15, 8] + down [8, 15]
    router, bank, shared = e * d, e * 3 * d * f, 3 * d * s
    total = embed + final_norm + 2 * attn_and_norms + dense_ffn + router + bank + shared
    assert total == 1680
    model = LM(cfg)
    assert model.num_parameters() == total
    assert model.num_parameters(include_embedding=False) == total - embed
    active = total - bank + 2 * (bank // e)
    assert active == 1392
    assert model.num_active_parameters() == active
    assert model.num_active_parameters(include_embedding=False) == active - embed
    dense = LM(dense_equivalent(cfg))
    assert dense.num_parameters() == dense.num_active_parameters() == 1360
    # Equal active parameters up to the router: exactly E * D per MoE layer.
    assert model.num_active_parameters() - dense.num_active_parameters() == router


@pytest.mark.parametrize(
    "router, per_layer_router",
    [("topk", 4 * D), ("sigmoid", 4 * D), ("topk_softmax", 4 * D + 4), ("hash", 0)],
)
def test_dense_equivalent_matches_active_parameters_up_to_routers(router, per_layer_router):
    top_k = 1 if router == "hash" else 2
    cfg = tiny(num_layers=3, router=router, top_k=top_k, shared_hidden_dim=8)
    dense_cfg = dense_equivalent(cfg)
    assert dense_cfg.moe_layer_indices() == []
    assert dense_cfg.ffn_hidden_dim == top_k * 16 + 8
    moe, dense = LM(cfg), LM(dense_cfg)
    diff = moe.num_active_parameters() - dense.num_active_parameters()
    assert diff == 3 * per_layer_router
    assert moe.num_parameters() > dense.num_parameters()


def test_dense_equivalent_of_a_mixed_config_needs_one_width():
    with pytest.raises(ConfigError, match="ffn_hidden_dim=32"):
        dense_equivalent(tiny(moe_layers=[0], ffn_hidden_dim=64))
    cfg = tiny(moe_layers=[0], ffn_hidden_dim=32)  # 2 * 16 = 32: fits
    assert dense_equivalent(cfg).ffn_hidden_dim == 32
    assert dense_equivalent(dense_equivalent(cfg)) == dense_equivalent(cfg)


# -- Aux losses and training --------------------------------------------------------------


def test_aux_loss_is_differentiable_and_only_in_training():
    model = LM(tiny(loss_weights={"balance": 0.1, "z": 0.01}))
    out = model(ids_for(), ids_for(seed=1))
    assert set(out.aux_losses) == {"balance", "z"}
    assert out.aux_loss.requires_grad and out.aux_loss.item() > 0
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values()))
    torch.testing.assert_close(out.total_loss, out.loss + out.aux_loss)
    out.aux_loss.backward()
    for moe in model.moe_layers().values():
        assert moe.router.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids_for(), ids_for(seed=1)).aux_loss.item() == 0.0
    assert LM(tiny(loss_weights={})).train()(ids_for()).aux_loss.item() == 0.0


@pytest.mark.parametrize("moe_layers", ["none", "all"])
def test_a_few_steps_overfit_a_repeated_sequence(moe_layers):
    torch.manual_seed(0)
    model = LM(tiny(moe_layers=moe_layers, dim=32, ffn_hidden_dim=64, hidden_dim=32))
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    seq = pattern.repeat(2)[None].expand(4, -1)
    ids, targets = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(60):
        out = model(ids, targets)
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.parametrize("router", ROUTERS.names())
def test_lm_runs_with_every_router(router):
    kwargs = {"key": "position"} if router == "hash" else {}
    cfg = tiny(router=router, router_kwargs=kwargs, top_k=1 if router == "hash" else 2)
    model = LM(cfg)
    out = model(ids_for(), ids_for(seed=1))
    assert out.logits.shape == (2, 12, V) and torch.isfinite(out.total_loss)
    out.total_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_hash_routing_by_token_gets_the_ids():
    model = LM(tiny(router="hash", top_k=1, router_kwargs={"key": "token"})).eval()
    ids = ids_for()
    model(ids)
    from gatelab.routing.routers import hash_ids

    routing = model.moe_layers()["blocks.0.ffn"].last_routing
    assert torch.equal(routing.experts[:, 0], hash_ids(ids.flatten()) % 4)


# -- Input validation ---------------------------------------------------------------------


def test_lm_rejects_bad_inputs():
    model = LM(tiny())
    with pytest.raises(ValueError, match="vocab_size=32"):
        model(torch.tensor([[0, 32]]))
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="LMConfig"):
        LM({"dim": 8})


# -- Configs ------------------------------------------------------------------------------


def test_unknown_keys_name_the_nearest_valid_one():
    with pytest.raises(ConfigError, match="'num_layer'.*did you mean 'num_layers'"):
        LMConfig.from_dict({"num_layer": 2})
    with pytest.raises(ConfigError, match="did you mean 'hidden_dims'"):
        MLPConfig.from_dict({"hiden_dims": [8]})
    with pytest.raises(ConfigError, match="did you mean 'image_size'"):
        LeNet5Config.from_dict({"img_size": 8})
    with pytest.raises(ConfigError, match="valid keys are: vocab_size, dim"):
        LMConfig.from_dict({"zzz": 1})
    with pytest.raises(ConfigError, match="did you mean 'moe_layers'"):
        tiny().replace(moe_layer="all")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("dim", "256", "LMConfig.dim: expected an int, got str '256'"),
        ("dim", True, "LMConfig.dim: expected an int, got bool True"),
        ("dropout", "0.1", "LMConfig.dropout: expected a finite number"),
        ("moe_layers", [1, "2"], "LMConfig.moe_layers: expected one of 'all', 'none', "),
        ("moe_layers", "evry_other", "expected one of 'all', 'none', 'every_other' or a list"),
        (
            "moe.loss_weights",
            {"balance": "high"},
            "LMConfig.moe.loss_weights: expected a table of finite numbers",
        ),
        (
            "moe.capacity_factor",
            "1.0",
            "LMConfig.moe.capacity_factor: expected a finite number or ",
        ),
        ("moe", 3, "LMConfig.moe: expected a table (MoEConfig), got int 3"),
    ],
)
def test_wrong_types_name_the_key_and_the_type(key, value, expected):
    section, _, name = key.rpartition(".")
    with pytest.raises(ConfigError) as info:
        LMConfig.from_dict({section: {name: value}} if section else {key: value})
    assert expected in str(info.value)


def test_invalid_values_name_the_key():
    cases = [
        ({"moe": {"router": "topkk"}}, "LMConfig.moe.router: unknown value 'topkk'; did you "),
        ({"moe": {"dispatcher": "groupd"}}, "did you mean 'grouped'?"),
        ({"moe": {"router_kwargs": {"jiter": 0.1}}}, "did you mean 'jitter'?"),
        ({"moe": {"loss_weights": {"balanse": 0.1}}}, "did you mean 'balance'?"),
        ({"moe": {"top_k": 9}}, "LMConfig.moe.top_k=9 exceeds num_experts=8"),
        ({"moe": {"topk": 1}}, "unknown key 'topk' in LMConfig.moe; did you mean 'top_k'?"),
        ({"dim": 24, "num_heads": 8}, "even width"),
        ({"moe_layers": [4]}, "layer 4 is out of range for 4 layers"),
        ({"moe": {"capacity_factor": 0}}, "leave it out for dropless"),
        ({"dropout": 1.0}, "LMConfig.dropout must lie in [0, 1)"),
        ({"num_layers": 0}, "LMConfig.num_layers must be > 0"),
    ]
    for table, message in cases:
        with pytest.raises(ConfigError) as info:
            LMConfig.from_dict(table)
        assert message in str(info.value), (table, str(info.value))
    with pytest.raises(ConfigError, match=r"hidden_dims\[0\]=32: hidden layer 0 is MoE"):
        MLPConfig(input_dim=64, hidden_dims=[32], moe_layers="all")


def test_configs_round_trip_and_read_toml():
    configs = [
        tiny(moe_layers=[0], capacity_factor=1.25, router="sigmoid", router_kwargs={"n_group": 2}),
        tiny(),
        MLPConfig(hidden_dims=[64, 64], moe_layers=[1], moe={"loss_weights": {"z": 0.5}}),
        LeNet5Config(image_size=8, act="relu", c3_table=False),
    ]
    for cfg in configs:
        table = cfg.to_dict()
        assert type(cfg).from_dict(table) == cfg
        assert all(isinstance(v, int | float | str | bool | list | dict) for v in table.values())
    assert "capacity_factor" not in tiny().to_dict()  # None: TOML has no null
    # An int where a float is expected is stored as a float (TOML writes 1 for 1.0).
    assert LMConfig.from_dict({"rope_theta": 500}).rope_theta == 500.0
    recipe = tomllib.loads(
        """
        [model]
        vocab_size = 64
        dim = 32
        num_heads = 2
        moe_layers = [1, 3]

        [model.moe]
        router = "topk"
        router_kwargs = { normalize = true }
        loss_weights = { balance = 0.01 }
        """
    )
    cfg = LMConfig.from_dict(recipe["model"])
    assert cfg.moe_layer_indices() == [1, 3] and cfg.moe.router_kwargs == {"normalize": True}
    assert LMConfig.from_dict(cfg.to_dict()) == cfg


def test_registry_builds_models_by_name():
    assert {"lenet5", "lm", "mlp"} <= set(MODELS.names())  # other models register too
    cfg, model = build_model("lm", tiny().to_dict())
    assert isinstance(model, LM) and cfg == tiny()
    cfg, model = build_model("mlp", {"input_dim": 64})
    assert isinstance(model, MLPClassifier)
    with pytest.raises(ValueError, match="unknown model 'gpt'; valid names are: lenet5, lm, "):
        build_model("gpt")
    with pytest.raises(ConfigError, match="did you mean 'num_classes'"):
        build_model("lenet5", {"num_class": 3})


# -- Classifiers --------------------------------------------------------------------------


@pytest.mark.parametrize("moe_layers", ["none", [1], "all"])
def test_mlp_classifier_shapes(moe_layers):
    hidden = [64, 64] if moe_layers == "all" else [32, 32]
    cfg = MLPConfig(input_dim=64, hidden_dims=hidden, num_classes=10, moe_layers=moe_layers)
    model = MLPClassifier(cfg)
    images, labels = torch.randn(5, 8, 8), torch.randint(0, 10, (5,))
    out = model(images, labels)
    assert out.logits.shape == (5, 10) and out.loss.shape == ()
    assert torch.equal(model(images.flatten(1)).logits, out.logits)
    out.total_loss.backward()
    assert len(model.moe_layers()) == len(cfg.moe_layer_indices())
    assert (out.aux_loss.item() > 0) == bool(cfg.moe_layer_indices())
    if moe_layers == [1]:
        # input 64 -> Linear 32 (2080) -> MoE at 32: router 8*32, 8 experts of 32->128->32
        # (with biases? no: 2*32*128 each) -> head 32->10 (330)
        bank = 8 * 2 * 32 * 128
        total = 64 * 32 + 32 + 8 * 32 + bank + 32 * 10 + 10
        assert model.num_parameters() == total
        assert model.num_active_parameters() == total - bank + 2 * bank // 8
    with pytest.raises(ValueError, match="input_dim"):
        model(torch.randn(5, 28, 28))


@pytest.mark.parametrize(
    "size, adapt, method, shape",
    [
        (8, "auto", "resize", (4, 8, 8)),
        (8, "pad", "pad", (4, 1, 8, 8)),
        (28, "auto", "pad", (4, 1, 28, 28)),
        (28, "resize", "resize", (4, 784)),
        (32, "auto", "pad", (4, 32, 32)),
    ],
)
def test_lenet5_shapes(size, adapt, method, shape):
    cfg = LeNet5Config(image_size=size, input_adapt=adapt)
    assert cfg.adapt_method() == method
    model = LeNet5(cfg)
    x = torch.randn(shape)
    assert model.adapt(model._as_images(x)).shape == (4, 1, 32, 32)
    out = model(x, torch.randint(0, 10, (4,)))
    assert out.logits.shape == (4, 10) and torch.isfinite(out.loss)
    out.loss.backward()


def test_lenet5_follows_the_paper():
    table = c3_connections()
    assert table.sum(dim=1).tolist() == [3] * 6 + [4] * 9 + [6]
    assert table[:, 0].tolist()[:6] == [True, False, False, False, True, True]
    model = LeNet5(LeNet5Config())
    # Used parameters, layer by layer, as counted in the paper (C3: 1,516), with a
    # Linear output (84 * 10 + 10) in place of the RBF layer.
    c1, s2, c3, s4, c5, f6, out = 156, 12, 1516, 32, 48120, 10164, 850
    assert model.num_active_parameters() == c1 + s2 + c3 + s4 + c5 + f6 + out
    assert model.num_parameters() == model.num_active_parameters() + (16 * 6 - 60) * 25
    # Masked connections stay zero-weight in effect: their gradient is zero.
    model(torch.randn(2, 28, 28), torch.tensor([1, 2])).loss.backward()
    assert torch.all(model.c3.weight.grad[~table] == 0)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="'pad' needs images of at most 32"):
        LeNet5Config(image_size=40, input_adapt="pad")


# -- The nested MoE config and the flat keys of earlier versions -------------------------

FLAT_LM = {
    "vocab_size": V,
    "dim": D,
    "num_layers": 2,
    "num_heads": 2,
    "max_seq_len": 24,
    "ffn_hidden_dim": 32,
    "moe_layers": [1],
    "num_experts": 4,
    "top_k": 1,
    "expert_hidden_dim": 8,
    "shared_expert_dim": 4,
    "router": "sigmoid",
    "loss_weights": {"balance": 0.1},
    "capacity_factor": 1.5,
}
NESTED_LM = {
    **{k: v for k, v in FLAT_LM.items() if k not in LMConfig._moved},
    "moe": {
        "num_experts": 4,
        "top_k": 1,
        "hidden_dim": 8,
        "shared_hidden_dim": 4,
        "router": "sigmoid",
        "loss_weights": {"balance": 0.1},
        "capacity_factor": 1.5,
    },
}


def test_flat_and_nested_moe_keys_build_the_same_model(capsys):
    with pytest.warns(
        DeprecationWarning, match="model.expert_hidden_dim is now model.moe.hidden_dim"
    ):
        flat = LMConfig.from_dict(FLAT_LM)  # an old recipe, or an old checkpoint's JSON config
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.moe.num_experts" in err
    nested = LMConfig.from_dict(NESTED_LM)
    assert capsys.readouterr().err == ""
    assert flat == nested
    table = flat.to_dict()  # written back nested: what new checkpoints store
    assert "num_experts" not in table and table["moe"]["hidden_dim"] == 8
    models = []
    for cfg in (flat, nested):
        torch.manual_seed(0)
        models.append(LM(cfg).train())
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = ids_for()
    out_a, out_b = (m(ids, ids) for m in models)
    assert torch.equal(out_a.logits, out_b.logits) and torch.equal(out_a.aux_loss, out_b.aux_loss)


def test_flat_moe_keys_in_python_and_mlp_config():
    with pytest.warns(DeprecationWarning, match="model.moe.num_experts"):
        cfg = LMConfig(num_experts=4, top_k=1)
    assert cfg.moe == MoEConfig(num_experts=4, top_k=1)
    with pytest.warns(DeprecationWarning, match="LMConfig.moe.top_k"):
        assert cfg.top_k == 1  # attribute reads of the old names
    with pytest.warns(DeprecationWarning):
        assert cfg.replace(num_experts=2, top_k=2).moe.num_experts == 2
    with pytest.warns(DeprecationWarning):
        changed = dataclasses.replace(cfg, shared_expert_dim=8)
    assert changed.moe.shared_hidden_dim == 8 and changed.moe.num_experts == 4
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cfg.nope  # noqa: B018
    # A table over the model's own defaults: the MLP keeps its narrow experts.
    mlp = MLPConfig.from_dict({"moe": {"num_experts": 4}})
    assert (mlp.moe.hidden_dim, mlp.moe.loss_weights) == (128, {"balance": 0.01})
    with pytest.warns(DeprecationWarning):
        old = MLPConfig.from_dict({"num_experts": 4, "expert_hidden_dim": 64})
    assert old.moe == mlp.moe.replace(hidden_dim=64)
    # A flat key written beside the table (a --set model.top_k=1 on a new recipe) wins.
    with pytest.warns(DeprecationWarning):
        both = LMConfig.from_dict({"moe": {"num_experts": 4, "top_k": 2}, "top_k": 1})
    assert both.moe.top_k == 1 and both.moe.num_experts == 4
    with pytest.raises(ConfigError, match="MLPConfig.moe.top_k=3 exceeds num_experts=2"):
        MLPConfig.from_dict({"moe": {"num_experts": 2, "top_k": 3}})


def test_flat_and_nested_mlp_classifier_are_identical():
    flat_table = {"hidden_dims": [32, 32], "moe_layers": [1], "num_experts": 4, "top_k": 2}
    nested_table = {"hidden_dims": [32, 32], "moe_layers": [1], "moe": {"num_experts": 4}}
    outputs = []
    for table in (flat_table, nested_table):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _, model = build_model("mlp", table)
        outputs.append(
            model.train()(torch.randn(6, 64, generator=torch.Generator().manual_seed(1)))
        )
    assert torch.equal(outputs[0].logits, outputs[1].logits)
    assert torch.equal(outputs[0].aux_loss, outputs[1].aux_loss)
