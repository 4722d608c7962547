"""Gated-SwinRMT's windowed Manhattan-decay retention and its two gates."""

from __future__ import annotations

import math

import pytest
import torch

from gatelab.layers.retention import GatedRetention, axis_bias, head_log_decay, shift_regions


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _reference_window(q, k, v, log_gamma, valid):
    """Width pass then height pass over one window, one head, one token at a time.

    q, k, v [w, w, d] (y, x, channel); valid(a, b) says whether tokens a and b may meet."""
    w, d = q.shape[0], q.shape[-1]
    row = torch.zeros_like(v)
    for y in range(w):
        for x in range(w):
            s = [
                q[y, x] @ k[y, m] / math.sqrt(d) + abs(x - m) * log_gamma
                if valid((y, x), (y, m))
                else -math.inf
                for m in range(w)
            ]
            a = torch.softmax(torch.stack([torch.as_tensor(t, dtype=q.dtype) for t in s]), 0)
            row[y, x] = (a[:, None] * v[y]).sum(0)
    out = torch.zeros_like(v)
    for y in range(w):
        for x in range(w):
            s = [
                q[y, x] @ k[n, x] / math.sqrt(d) + abs(y - n) * log_gamma
                if valid((y, x), (n, x))
                else -math.inf
                for n in range(w)
            ]
            a = torch.softmax(torch.stack([torch.as_tensor(t, dtype=q.dtype) for t in s]), 0)
            out[y, x] = (a[:, None] * row[:, x]).sum(0)
    return out


@pytest.mark.parametrize("shift", [0, 1])
def test_retention_matches_a_token_by_token_reference(shift):
    torch.manual_seed(3)
    dim, heads, w, size = 4, 2, 2, 4
    layer = GatedRetention(dim, heads, w, shift=shift, lce_kernel=0).double()
    x = torch.randn(1, size, size, dim, dtype=torch.float64)
    q, k = layer.qk(x).chunk(2, dim=-1)
    v = layer.v(x) * torch.nn.functional.silu(layer.v_gate(x))
    got = layer._retention(q, k, v)
    # reference: roll, run each window and head, roll back
    q, k, v = (torch.roll(t, (-shift, -shift), dims=(1, 2)) for t in (q, k, v))
    regions = shift_regions(size, size, w, shift)
    ref = torch.zeros_like(v)
    hd = dim // heads
    for wy in range(0, size, w):
        for wx in range(0, size, w):
            win = (slice(wy, wy + w), slice(wx, wx + w))
            reg = regions[win]

            def valid(a, b, reg=reg):
                return bool(reg[a] == reg[b])

            for h in range(heads):
                c = slice(h * hd, (h + 1) * hd)
                ref[0, win[0], win[1], c] = _reference_window(
                    q[0, win[0], win[1], c],
                    k[0, win[0], win[1], c],
                    v[0, win[0], win[1], c],
                    float(layer.log_gamma[h]),
                    valid,
                )
    ref = torch.roll(ref, (shift, shift), dims=(1, 2))
    assert torch.allclose(got, ref, atol=1e-10)


def test_decay_is_manhattan_distance():
    """With q = k = 0 the two passes weight token m for token n by gamma^(|dx| + |dy|)."""
    layer = GatedRetention(3, 1, 4, output_gate=False, value_gate=False, lce_kernel=0)
    layer = layer.double()
    with torch.no_grad():
        layer.qk.weight.zero_()
        layer.qk.bias.zero_()
        for lin in (layer.v, layer.out):
            lin.weight.copy_(torch.eye(3))
            lin.bias.zero_()
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64)
    gamma = float(layer.log_gamma[0].exp())
    pos = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    weights = gamma ** (pos[:, None] - pos[None]).abs().sum(-1).double()
    weights = weights / weights.sum(1, keepdim=True)
    ref = (weights @ x.reshape(2, 16, 3)).reshape(2, 4, 4, 3)
    assert torch.allclose(layer(x), ref)
    assert torch.allclose(
        axis_bias(3, torch.tensor([math.log(gamma)])).exp()[0, 0],
        torch.tensor([1.0, gamma, gamma**2]).float(),
    )


def test_head_decay_follows_rmt():
    gamma = head_log_decay(4).exp()
    assert torch.allclose(gamma, 1 - 2 ** (-2 - torch.arange(4.0)))


def test_windows_do_not_mix_without_shift():
    layer = GatedRetention(8, 2, 4, lce_kernel=0)
    x = torch.randn(1, 8, 8, 8)
    y = layer(x)
    bumped = x.clone()
    bumped[0, 0, 0] += 1.0  # a token of the top-left window
    diff = (layer(bumped) - y).abs().amax(-1)[0]
    assert diff[:4, :4].max() > 0 and diff[4:].max() == 0 and diff[:, 4:].max() == 0


def test_shifted_windows_do_not_wrap_around():
    layer = GatedRetention(8, 2, 4, shift=2, lce_kernel=0)
    x = torch.randn(1, 8, 8, 8)
    y = layer(x)
    bumped = x.clone()
    bumped[0, 7, 7] += 1.0  # the roll puts it in a window with the top-left corner
    diff = (layer(bumped) - y).abs().amax(-1)[0]
    assert diff[0, 0] == 0 and diff[6:, 6:].max() > 0


@pytest.mark.parametrize("output_gate", [False, True])
@pytest.mark.parametrize("value_gate", [False, True])
def test_parameter_counts_and_gradients(output_gate, value_gate):
    dim, lce = 8, 3
    layer = GatedRetention(
        dim, 2, 2, output_gate=output_gate, value_gate=value_gate, lce_kernel=lce
    )
    gates = int(output_gate) + int(value_gate)
    expected = 4 * dim * dim + 4 * dim + gates * (dim * dim + dim) + lce * lce * dim + dim
    assert _count(layer) == expected
    x = torch.randn(2, 4, 6, dim)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_output_gate_is_applied_before_the_output_projection():
    layer = GatedRetention(4, 1, 2, value_gate=False).double()
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.fill_(-50.0)  # sigmoid ~ 0: only W_O's bias is left
    x = torch.randn(1, 2, 2, 4, dtype=torch.float64)
    assert torch.allclose(layer(x), layer.out.bias.expand(1, 2, 2, 4), atol=1e-12)


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="dim=10 must be a multiple of num_heads=4"):
        GatedRetention(10, 4, 2)
    with pytest.raises(ValueError, match="0 <= shift < window_size"):
        GatedRetention(8, 2, 2, shift=2)
    with pytest.raises(ValueError, match="lce_kernel must be 0"):
        GatedRetention(8, 2, 2, lce_kernel=2)
    layer = GatedRetention(8, 2, 3)
    with pytest.raises(ValueError, match="window_size=3 must divide the grid 4x6"):
        layer(torch.randn(1, 4, 6, 8))
    with pytest.raises(ValueError, match=r"expects \[batch, height, width, dim=8\]"):
        layer(torch.randn(1, 6, 8))


def test_gated_retention_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("gated-retention").run("smoke", seed=0, out_dir=tmp_path)
    variants = [r["variant"] for r in result["rows"]]
    assert variants == ["ungated", "G1 output gate", "SwiGLU value", "both gates"]
    params = [r["params"] for r in result["rows"]]
    assert params[0] < params[1] == params[2] < params[3]
