"""Token-mixing blocks (gMLP, Mixer, RaftMLP, NiNformer, Activator, MAXIM's gated MLPs), the
mixing classifiers and the token-mixing experiment."""

from __future__ import annotations

import pytest
import torch

from gatelab.layers.maxim_mlp import (
    CrossGatingBlock,
    MaximGmlpLayer,
    MultiAxisGatedMLPBlock,
    SpatialGatingWeights,
    block_images,
    unblock_images,
)
from gatelab.layers.token_mixing import (
    ActivatorBlock,
    GMLPBlock,
    MixerBlock,
    NiNformerBlock,
    RaftLevel,
    SpatialGatingUnit,
)
from gatelab.models import MODELS, ConfigError, build_model
from gatelab.models.mixing import BLOCK_KINDS, MixingClassifier, MixingClassifierConfig

# -- parameter formulas (written from the papers' equations, not from the code) ------------


def ln(d):
    return 2 * d


def linear(a, b, bias=True):
    return a * b + (b if bias else 0)


def ffn(d, h, out=None):
    out = d if out is None else out
    return linear(d, h) + linear(h, out)


def sgu(dim, n):
    return ln(dim // 2) + n * n + n


def gmlp(d, h, n):
    return ln(d) + linear(d, h) + sgu(h, n) + linear(h // 2, d)


def mixer(d, h, n, th):
    return ln(d) + ffn(n, th) + ln(d) + ffn(d, h)


def raft(d, height, width, r, h, e):
    return 3 * ln(d) + ffn(r * height, e * r * height) + ffn(r * width, e * r * width) + ffn(d, h)


def ninformer(d, h, n):
    return ln(d) + linear(d, d) + mixer(d, h, n, h) + ffn(d, h)


def activator(d, h, with_ffn=True):
    unit = 2 * linear(d, h) + ln(h) + linear(h, d)
    return ln(d) + unit + (ffn(d, h) if with_ffn else 0)


def maxim_layer(d, n, h=None):
    h = 2 * d if h is None else h
    return ln(d) + linear(d, h) + sgu(h, n) + linear(h // 2, d)


def mab(d, nb, ng):
    return ln(d) + linear(d, 2 * d) + maxim_layer(d, ng) + maxim_layer(d, nb) + linear(2 * d, d)


def gating_weights(d, nb, ng):
    return ln(d) + linear(d, 2 * d) + ng * ng + ng + nb * nb + nb + linear(2 * d, d)


def cgb(d, xd, yd, nb, ng, upsample):
    up = yd * d * 4 + d if upsample else 0
    y_in = linear(d if upsample else yd, d)
    per_side = ln(d) + linear(d, d) + gating_weights(d, nb, ng) + linear(d, d)
    return up + linear(xd, d) + y_in + 2 * per_side


# -- builders: (module, input, expected parameter count) -----------------------------------

N, D = 16, 12  # a 4x4 token grid of width 12


def _tokens(n=N, d=D):
    return torch.randn(3, n, d)


CASES = {
    "gmlp": lambda: (GMLPBlock(D, 20, N), _tokens(), gmlp(D, 20, N)),
    "mixer": lambda: (
        MixerBlock(D, 24, N, token_hidden_dim=8),
        _tokens(),
        mixer(D, 24, N, 8),
    ),
    "raft": lambda: (
        RaftLevel(D, 4, 4, raft_size=3, hidden_dim=24),
        _tokens(),
        raft(D, 4, 4, 3, 24, 2),
    ),
    "raft_rect": lambda: (
        RaftLevel(D, 2, 8, raft_size=2, hidden_dim=24, token_expansion=3),
        _tokens(),
        raft(D, 2, 8, 2, 24, 3),
    ),
    "ninformer": lambda: (NiNformerBlock(D, 24, N), _tokens(), ninformer(D, 24, N)),
    "activator": lambda: (ActivatorBlock(D, 24), _tokens(), activator(D, 24)),
    "activator_geglu_only": lambda: (
        ActivatorBlock(D, 24, ffn=False),
        _tokens(),
        activator(D, 24, False),
    ),
    "maxim_block": lambda: (
        MaximGmlpLayer(D, (2, 4), "block"),
        torch.randn(2, 4, 8, D),
        maxim_layer(D, 8),
    ),
    "maxim_grid": lambda: (
        MaximGmlpLayer(D, 2, "grid"),
        torch.randn(2, 4, 8, D),
        maxim_layer(D, 4),
    ),
    "gating_weights": lambda: (
        SpatialGatingWeights(D, block_size=2, grid_size=4),
        torch.randn(2, 8, 12, D),
        gating_weights(D, 4, 16),
    ),
    "mab": lambda: (
        MultiAxisGatedMLPBlock(D, block_size=2, grid_size=4),
        torch.randn(2, 8, 12, D),
        mab(D, 4, 16),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_shape_and_dtype(name, dtype):
    block, x, _ = CASES[name]()
    block = block.to(dtype)
    y = block(x.to(dtype))
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_gradient_reaches_every_parameter(name):
    block, x, _ = CASES[name]()
    x.requires_grad_(True)
    (block(x) * torch.randn_like(x)).sum().backward()
    assert x.grad.abs().sum() > 0
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_parameter_count_matches_formula(name):
    block, _, expected = CASES[name]()
    assert sum(p.numel() for p in block.parameters()) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_handles_an_empty_batch(name):
    block, x, _ = CASES[name]()
    y = block(x[:0])
    assert y.shape == x[:0].shape


def test_cross_gating_block_shapes_grads_and_count():
    cg = CrossGatingBlock(8, 6, 10, block_size=2, grid_size=4, upsample_y=True)
    x, y = torch.randn(2, 8, 12, 6), torch.randn(2, 4, 6, 10, requires_grad=True)
    ox, oy = cg(x, y)
    assert ox.shape == oy.shape == (2, 8, 12, 8)
    (ox.sum() + oy.square().sum()).backward()
    for pname, p in cg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert sum(p.numel() for p in cg.parameters()) == cgb(8, 6, 10, 4, 16, True)
    plain = CrossGatingBlock(8, block_size=4, grid_size=4)
    assert sum(p.numel() for p in plain.parameters()) == cgb(8, 8, 8, 16, 16, False)
    with pytest.raises(ValueError, match="spatial size"):
        cg(x, torch.randn(2, 8, 12, 10))


# -- reference behaviour ---------------------------------------------------------------------


def test_spatial_gating_unit_matches_its_equation():
    unit = SpatialGatingUnit(6, 5)
    with torch.no_grad():
        unit.proj.weight.normal_()
        unit.proj.bias.normal_()
    x = torch.randn(2, 5, 6)
    z1, z2 = x[..., :3], x[..., 3:]
    z2 = torch.nn.functional.layer_norm(z2, (3,), unit.norm.weight, unit.norm.bias)
    spatial = torch.einsum("mn,bnc->bmc", unit.proj.weight, z2) + unit.proj.bias[:, None]
    torch.testing.assert_close(unit(x), z1 * spatial)


def test_spatial_gating_unit_starts_near_the_identity_gate():
    """Weight near zero and bias 1 (gMLP section 2.1): s(Z) ~ Z1 at initialisation."""
    unit = SpatialGatingUnit(8, 16)
    x = torch.randn(4, 16, 8)
    assert (unit(x) - x[..., :4]).abs().max() < 0.5 * x[..., :4].abs().max()
    assert torch.equal(unit.proj.bias, torch.ones(16))


def test_mixer_token_mixing_matches_the_transposed_mlp():
    block = MixerBlock(4, 8, 6, token_hidden_dim=5)
    x = torch.randn(2, 6, 4)
    u = block.token_norm(x).transpose(1, 2)  # [B, C, N]
    t = block.token_mlp
    u = x + t.down_proj(torch.nn.functional.gelu(t.up_proj(u))).transpose(1, 2)
    c = block.channel_mlp
    expected = u + c.down_proj(torch.nn.functional.gelu(c.up_proj(block.channel_norm(u))))
    torch.testing.assert_close(block(x), expected)


def _influence(fn, x, index):
    """Which outputs change when the input at ``index`` changes (bool over x[0]'s shape
    less the channel axis)."""
    x2 = x.clone()
    x2[index] += torch.randn_like(x2[index])  # random: LayerNorm would cancel a constant shift
    return (fn(x2) - fn(x)).abs().amax(dim=-1)[0] > 1e-6


@pytest.mark.parametrize("kind", ["gmlp", "mixer", "raft", "ninformer"])
def test_token_mixers_mix_tokens_and_activator_does_not(kind):
    block, x, _ = CASES[kind]()
    with torch.no_grad():
        for p in block.parameters():  # move off the near-identity start
            p.add_(0.1 * torch.randn_like(p))
    changed = _influence(block, x, (0, 5))
    assert changed.sum() > 1
    activator, x, _ = CASES["activator"]()
    assert _influence(activator, x, (0, 5)).nonzero().flatten().tolist() == [5]


def test_raft_vertical_mixing_stays_in_its_column():
    level = RaftLevel(D, 4, 4, raft_size=2)
    x = torch.randn(1, 16, D)

    def vertical(t):
        return level._mix(t, level.vertical_norm, level.vertical_mlp, vertical=True)

    def horizontal(t):
        return level._mix(t, level.horizontal_norm, level.horizontal_mlp, vertical=False)

    changed = _influence(vertical, x, (0, 6)).view(4, 4)  # token (row 1, column 2)
    assert changed[:, 2].all() and not changed[:, [0, 1, 3]].any()
    changed = _influence(horizontal, x, (0, 6)).view(4, 4)
    assert changed[1, :].all() and not changed[[0, 2, 3], :].any()


def test_raft_rafts_group_channels_strided_as_the_reference():
    """Channels split as (r c'): channel k belongs to raft group k % c'. Perturbing one
    channel of one token changes, after vertical mixing, only the channels of its group."""
    level = RaftLevel(6, 2, 2, raft_size=2)  # c' = 3: groups {0, 3}, {1, 4}, {2, 5}
    with torch.no_grad():
        level.vertical_norm.weight.fill_(1.0)
    x = torch.randn(1, 4, 6)

    def vertical_no_norm(t):  # LN couples all channels, so skip it to see the rafts
        y = t.view(1, 2, 2, 2, 3).permute(0, 4, 2, 3, 1)
        shape = y.shape
        y = level.vertical_mlp(y.reshape(*shape[:3], 4)).view(shape)
        return y.permute(0, 4, 2, 3, 1).reshape(t.shape)

    x2 = x.clone()
    x2[0, 0, 1] += 1.0
    delta = (vertical_no_norm(x2) - vertical_no_norm(x)).abs()[0]  # [tokens, channels]
    assert delta[:, [1, 4]].amax() > 0 and delta[:, [0, 2, 3, 5]].amax() == 0


def test_block_images_round_trip_and_layout():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).view(2, 4, 6, 3)
    b = block_images(x, (2, 3))
    assert b.shape == (2, 4, 6, 3)
    torch.testing.assert_close(b[0, 1, 0], x[0, 0, 3])  # cell (0, 1) starts at column 3
    torch.testing.assert_close(b[0, 2, 4], x[0, 3, 1])  # cell (1, 0), pixel (1, 1)
    torch.testing.assert_close(unblock_images(b, (2, 2), (2, 3)), x)


def test_maxim_block_branch_is_local_and_grid_branch_is_dilated():
    block = MaximGmlpLayer(4, 2, "block")
    grid = MaximGmlpLayer(4, 2, "grid")
    for layer in (block, grid):
        with torch.no_grad():
            layer.sgu.proj.weight.normal_()
    x = torch.randn(1, 4, 6, 4)
    changed = _influence(block, x, (0, 1, 2))  # pixel (1, 2) lies in the block rows 0-1, cols 2-3
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[0:2, 2:4] = True
    assert torch.equal(changed, expected)
    changed = _influence(grid, x, (0, 1, 2))  # grid 2x2 -> cells of 2x3; same offset (1, 2)
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[1::2, 2::3] = True
    assert torch.equal(changed, expected)


# -- bad configuration and input --------------------------------------------------------------


def test_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="divisible by raft_size"):
        RaftLevel(10, 4, 4, raft_size=3)
    with pytest.raises(ValueError, match="hidden_dim must be even"):
        GMLPBlock(8, 15, 4)
    with pytest.raises(ValueError, match="dim must be even"):
        SpatialGatingUnit(7, 4)
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        MixerBlock(8, 16, 0)
    with pytest.raises(ValueError, match="dropout"):
        NiNformerBlock(8, 16, 4, dropout=1.0)
    with pytest.raises(ValueError, match="unknown act"):
        ActivatorBlock(8, 16, act="swishy")
    with pytest.raises(ValueError, match="mode must be"):
        MaximGmlpLayer(8, 2, "diagonal")
    with pytest.raises(ValueError, match="block_size"):
        MultiAxisGatedMLPBlock(8, block_size=(2, 0))


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match=r"tokens \[batch, 16, 12\]"):
        GMLPBlock(D, 20, N)(torch.randn(2, 9, D))
    with pytest.raises(ValueError, match=r"tokens \[batch, 16, 12\]"):
        MixerBlock(D, 20, N)(torch.randn(2, N, 8))
    with pytest.raises(TypeError, match="float tensor"):
        ActivatorBlock(D, 20)(torch.ones(2, N, D, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiples of 4x4"):
        MultiAxisGatedMLPBlock(D, block_size=2, grid_size=4)(torch.randn(1, 8, 6, D))
    with pytest.raises(ValueError, match="channels-last"):
        MultiAxisGatedMLPBlock(D, 2, 2)(torch.randn(1, D, 8, 8))


# -- classifiers --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_mixing_classifier_every_block_kind(kind):
    config, model = build_model("mixing", {"block": kind, "dim": 16, "hidden_dim": 32, "depth": 2})
    assert isinstance(model, MixingClassifier) and config.block == kind
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    out = model(x, y)
    assert out.logits.shape == (5, 10) and out.loss.ndim == 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(model(x.flatten(1)).logits, model(x[:, 0]).logits)


def test_mixing_classifier_is_registered_and_validates():
    assert "mixing" in MODELS
    with pytest.raises(ConfigError, match="patch_size=3 does not divide image_size=8"):
        MixingClassifierConfig(patch_size=3)
    with pytest.raises(ConfigError, match="divisible by raft_size"):
        MixingClassifierConfig(block="raft", dim=30, raft_size=4)
    with pytest.raises(ConfigError, match="must be even"):
        MixingClassifierConfig(block="gmlp", hidden_dim=33)
    with pytest.raises(ConfigError, match="'ninformer'"):
        MixingClassifierConfig(block="ninformer_x")
    model = MixingClassifier(MixingClassifierConfig(image_size=8, patch_size=4))
    with pytest.raises(ValueError, match="image_size"):
        model(torch.rand(2, 1, 12, 12))


def test_token_mixing_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("token-mixing").run("smoke", out_dir=tmp_path)
    for kind in (*BLOCK_KINDS, "mlp"):
        assert f"| {kind} |" in result["table"]
        acc = result["results"][kind]["test_acc"][0]
        assert 0.0 <= acc <= 1.0


def test_patch_size_check_runs():
    from gatelab.experiments.token_mixing import patch_size_check

    result = patch_size_check(patches=(4, 8), epochs=1, target=3_000)
    assert sorted(result) == [4, 8] and all(0.0 <= a <= 1.0 for a in result.values())
