"""Handwriting distortions (gatelab.data.distort), the local expert + gate
(gatelab.adapt.local_expert) and the local-expert experiment."""

from __future__ import annotations

import pytest
import torch

from gatelab import experiments
from gatelab.adapt.local_expert import LocalExpertMoE, train_local_expert
from gatelab.data.distort import HandwritingStyle, distort, random_style, upsample
from gatelab.models import LeNet5, LeNet5Config, MLPClassifier, MLPConfig


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


def _line(size=16):
    img = torch.zeros(1, 1, size, size)
    img[..., 2:-2, size // 2] = 1.0  # a vertical stroke
    return img


def _column_centroid(img, rows):
    part = img[0, 0, rows]
    cols = torch.arange(part.shape[-1], dtype=torch.float32)
    return float((part * cols).sum() / part.sum())


def test_identity_style_leaves_images_unchanged():
    x = _images()
    torch.testing.assert_close(distort(x, HandwritingStyle()), x, atol=1e-5, rtol=0)


def test_slant_leans_the_top_to_the_right_and_stroke_changes_the_ink():
    img = _line()
    slanted = distort(img, HandwritingStyle(slant=0.4))
    top, bottom = slice(2, 5), slice(11, 14)
    assert _column_centroid(slanted, top) > _column_centroid(slanted, bottom) + 1.0
    assert distort(img, HandwritingStyle(stroke=0.8)).sum() > img.sum()
    x = upsample(_images(size=8), 16)
    assert distort(x, HandwritingStyle(stroke=-0.8)).sum() < x.sum()


def test_user_field_is_fixed_and_jitter_follows_the_seed():
    x = _images(3)
    style = HandwritingStyle(elastic_alpha=1.5, jitter=0.0, seed=4)
    same = torch.cat([x[:1], x[:1]])
    out = distort(same, style, seed=0)
    torch.testing.assert_close(out[0], out[1])  # one field per user, every image
    assert not torch.allclose(distort(x, style), distort(x, HandwritingStyle(elastic_alpha=1.5)))
    jittered = HandwritingStyle(elastic_alpha=1.5, jitter=0.5, seed=4)
    torch.testing.assert_close(distort(x, jittered, seed=1), distort(x, jittered, seed=1))
    assert not torch.allclose(distort(x, jittered, seed=1), distort(x, jittered, seed=2))
    out = distort(x, random_style(3))
    assert out.shape == x.shape and bool((out >= 0).all() and (out <= 1).all())
    assert random_style(3) == random_style(3) != random_style(4)


def test_distortion_bad_inputs():
    with pytest.raises(ValueError, match="stroke"):
        HandwritingStyle(stroke=1.5)
    with pytest.raises(ValueError, match="elastic_sigma"):
        HandwritingStyle(elastic_sigma=0.0)
    with pytest.raises(ValueError, match="slant"):
        HandwritingStyle(slant=float("nan"))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        distort(torch.rand(4, 8, 8), HandwritingStyle())


def _ge():
    torch.manual_seed(0)
    return LeNet5(LeNet5Config(image_size=16)).eval()


@pytest.mark.parametrize("source", ["pixels", "global"])
def test_hard_routing_at_eval_and_mixture_in_training(source):
    moe = LocalExpertMoE(_ge(), source=source)
    x = _images(8)
    out = moe(x)
    assert out.logits.shape == (8, 10) and out.p_local.shape == (8,)
    expected = torch.where(out.route_local[:, None], out.local_logits, out.global_logits)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.route_local, out.p_local > 0.5)
    moe.train()
    mix = moe(x)
    torch.testing.assert_close(mix.logits.exp().sum(-1), torch.ones(8))
    p = mix.p_local[:, None]
    expected = p * mix.local_logits.softmax(-1) + (1 - p) * mix.global_logits.softmax(-1)
    torch.testing.assert_close(mix.logits.exp(), expected)


def test_training_leaves_the_global_expert_bit_identical():
    ge = _ge()
    frozen = {k: v.clone() for k, v in ge.state_dict().items()}
    moe = LocalExpertMoE(ge, source="pixels", hidden_dim=8, gate_hidden_dim=2)
    local = {k: v.clone() for k, v in moe.local_expert.state_dict().items()}
    gate = {k: v.clone() for k, v in moe.gate.state_dict().items()}
    ux, uy = _images(10), torch.arange(10)
    gx, gy = _images(10, seed=1), torch.arange(10)
    losses = train_local_expert(moe, ux, uy, gx, gy, steps=5, gate_steps=5, batch_size=4)
    assert set(losses) == {"local_loss", "gate_loss"}
    for k, v in ge.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(not p.requires_grad for p in ge.parameters())
    assert any(not torch.equal(v, local[k]) for k, v in moe.local_expert.state_dict().items())
    assert any(not torch.equal(v, gate[k]) for k, v in moe.gate.state_dict().items())
    assert not moe.training
    # The size overhead: LE (64*8 + 8 + 8*10 + 10) + GN (64*2 + 2 + 2 + 1) over the GE.
    assert moe.added_parameters() == 610 + 133
    assert moe.added_share() == pytest.approx(743 / ge.num_active_parameters())


def test_local_expert_bad_configurations():
    ge = _ge()
    with pytest.raises(TypeError, match="LeNet5"):
        LocalExpertMoE(MLPClassifier(MLPConfig()))
    with pytest.raises(ValueError, match="source"):
        LocalExpertMoE(ge, source="features")
    with pytest.raises(ValueError, match="hidden_dim"):
        LocalExpertMoE(ge, hidden_dim=-1)
    with pytest.raises(ValueError, match="pool_size"):
        LocalExpertMoE(ge, pool_size=17)
    moe = LocalExpertMoE(ge)
    empty = torch.zeros(0, 1, 16, 16)
    with pytest.raises(ValueError, match="at least one user sample"):
        train_local_expert(
            moe, empty, torch.zeros(0, dtype=torch.long), empty, torch.zeros(0, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="LeNet5 expects images"):
        moe(torch.rand(2, 1, 8, 8))


def test_experiment_smoke(tmp_path):
    result = experiments.get("local-expert").run("smoke", out_dir=tmp_path)
    assert set(result["summary"]) == {"before", "pixels", "global", "finetune"}
    share = result["summary"]["pixels"]["share"]
    assert share == pytest.approx(1475 / result["global_parameters"])
    assert "| pixels |" in result["table"]
