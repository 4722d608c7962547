"""The Scaling-MLPs recipe (Lion, crops, mixup, label smoothing) and its experiment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gatelab import experiments
from gatelab.experiments.scaling_mlps import (
    CIFAR_ENV,
    Lion,
    Recipe,
    accuracy,
    cifar10_data,
    mixup,
    random_resized_crop,
    train_mlp,
)
from gatelab.layers import BottleneckMLP


def test_lion_matches_its_update_rule():
    p = torch.nn.Parameter(torch.randn(5))
    start = p.detach().clone()
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    grads = [torch.randn(5), torch.randn(5)]
    m = torch.zeros(5)
    expected = start.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), expected)
    with pytest.raises(ValueError, match="lr"):
        Lion([p], lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        Lion([p], betas=(0.9, 1.0))


def test_full_crop_is_the_identity_and_flip_mirrors():
    x = torch.rand(6, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = random_resized_crop(x, (1.0, 1.0), gen, ratio=(1.0, 1.0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    out = random_resized_crop(x, (1.0, 1.0), gen, ratio=(1.0, 1.0), flip=True)
    for a, b in zip(out, x, strict=True):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)
    cropped = random_resized_crop(x, (0.3, 0.5), gen)
    assert cropped.shape == x.shape and not torch.allclose(cropped, x)


def test_mixup_mixes_inputs_and_targets_alike():
    x, t = torch.randn(10, 4), torch.eye(10)
    gen = torch.Generator().manual_seed(0)
    mx, mt = mixup(x, t, 1.0, gen)
    torch.testing.assert_close(mx, x)
    torch.testing.assert_close(mt, t)
    mx, mt = mixup(x, t, 0.3, torch.Generator().manual_seed(1))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mx, 0.3 * x + 0.7 * x[perm])
    torch.testing.assert_close(mt.sum(-1), torch.ones(10))
    with pytest.raises(ValueError, match="lam"):
        mixup(x, t, 1.5, gen)


def test_recipe_validation_and_plain():
    with pytest.raises(ValueError, match="label_smoothing"):
        Recipe(label_smoothing=1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        Recipe(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="mixup_alpha"):
        Recipe(mixup_alpha=-1.0)
    plain = Recipe(flip=True).plain()
    assert (plain.label_smoothing, plain.mixup_alpha, plain.crop_scale, plain.flip) == (
        0.0,
        0.0,
        None,
        False,
    )


def test_recipe_trains_a_bottleneck_mlp():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = torch.randn(256, 1, 4, 4, generator=g) * 0.5 + (2 * y - 1).float().view(-1, 1, 1, 1)
    torch.manual_seed(0)
    model = BottleneckMLP(16, 16, 1, 10)
    train_mlp(model, x, y, Recipe(steps=60, batch_size=32, lr=3e-3, crop_scale=(0.8, 1.0)), 0)
    assert accuracy(model, x, y) > 0.9


def _write_cifar(folder, n=12):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, size=(n, 1 + 3072), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, size=n)
        (folder / name).write_bytes(records.tobytes())


def test_cifar_path_runs_on_files_the_user_has(tmp_path, monkeypatch):
    _write_cifar(tmp_path)
    data = cifar10_data(tmp_path)
    assert data["train_x"].shape == (60, 3, 32, 32) and data["test_x"].shape == (12, 3, 32, 32)
    torch.testing.assert_close(
        data["train_x"].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0
    )
    monkeypatch.setenv(CIFAR_ENV, str(tmp_path))
    result = experiments.get("scaling-mlps").run("smoke", out_dir=tmp_path / "out")
    assert len(result["cifar10"]) == 1 and result["cifar10"][0]["parameters"] > 3072 * 16
    assert "CIFAR-10 (from" in result["table"]


def test_experiment_smoke_without_cifar(tmp_path, monkeypatch):
    monkeypatch.delenv(CIFAR_ENV, raising=False)
    result = experiments.get("scaling-mlps").run("smoke", out_dir=tmp_path)
    assert "cifar10" not in result and "not run" in result["table"]
    assert 0.0 <= result["digits"][0]["recipe"] <= 1.0
