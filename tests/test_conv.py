"""Zoology's gated convolutions: causal short and FFT long convolutions, BaseConv."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab.layers.conv import BaseConv, LongConv, ShortConv, causal_conv, fft_causal_conv


def _loop_conv(u, kernel):
    """y[b, t, d] = sum_{j <= t} k[d, j] u[b, t - j, d], one term at a time."""
    out = torch.zeros_like(u)
    for t in range(u.shape[1]):
        for j in range(min(t + 1, kernel.shape[1])):
            out[:, t] += kernel[:, j] * u[:, t - j]
    return out


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 24),
    dim=st.integers(1, 5),
    taps=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_direct_and_fft_convolutions_equal_the_loop(batch, seq, dim, taps, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, seq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(dim, taps, generator=gen, dtype=torch.float64)
    ref = _loop_conv(u, k)
    assert torch.allclose(causal_conv(u, k), ref, atol=1e-10)
    assert torch.allclose(fft_causal_conv(u, k), ref, atol=1e-9)


def test_fft_conv_keeps_dtype_and_matches_in_float32():
    u = torch.randn(2, 100, 8)
    k = torch.randn(8, 100) / 10
    y = fft_causal_conv(u, k)
    assert y.dtype == torch.float32
    assert torch.allclose(y, causal_conv(u, k), atol=1e-4)
    assert fft_causal_conv(u.bfloat16(), k).dtype == torch.bfloat16


@pytest.mark.parametrize("kernel_size", [3, -1])
def test_base_conv_is_causal(kernel_size):
    layer = BaseConv(8, max_seq_len=32, kernel_size=kernel_size).double()
    u = torch.randn(2, 32, 8, dtype=torch.float64)
    y = layer(u)
    for t in (0, 5, 17, 31):
        bumped = u.clone()
        bumped[:, t] += torch.randn(2, 8, dtype=torch.float64)
        diff = (layer(bumped) - y).abs().amax(dim=(0, 2))
        # no earlier output moves (the FFT path leaks round-off only, ~1e-16)
        assert t == 0 or diff[:t].max() < 1e-12
        assert diff[t] > 1e-3  # the position itself does


@pytest.mark.parametrize("kernel_size", [3, -1])
def test_base_conv_shapes_parameters_and_gradients(kernel_size):
    dim, seq = 6, 20
    layer = BaseConv(dim, max_seq_len=seq, kernel_size=kernel_size)
    conv = dim * 3 + dim if kernel_size == 3 else dim * seq
    assert sum(p.numel() for p in layer.parameters()) == dim * dim + dim + conv
    u = torch.randn(3, 11, dim)
    y = layer(u)
    assert y.shape == u.shape and y.dtype == u.dtype
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if kernel_size == -1:  # filter taps past the sequence length get no gradient
        assert layer.conv.filter.grad[:, 11:].abs().sum() == 0


def test_base_conv_formula():
    layer = BaseConv(4, kernel_size=2, act=True).double()
    u = torch.randn(1, 6, 4, dtype=torch.float64)
    conv = _loop_conv(u, layer.conv.weight) + layer.conv.bias
    ref = torch.nn.functional.silu(conv) * torch.nn.functional.silu(layer.projection(u)) + u
    assert torch.allclose(layer(u), ref)
    long = LongConv(4, 6).double()
    assert torch.allclose(long(u), _loop_conv(u, long.filter) + u)


def test_short_conv_parameter_count():
    assert sum(p.numel() for p in ShortConv(5, 4).parameters()) == 5 * 4 + 5


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="needs max_seq_len"):
        BaseConv(4, kernel_size=-1)
    with pytest.raises(ValueError, match="kernel_size must be >= 1 or -1"):
        BaseConv(4, kernel_size=0)
    with pytest.raises(ValueError, match=r"expects \[batch, seq, dim=4\]"):
        BaseConv(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        BaseConv(4, max_seq_len=8, kernel_size=-1)(torch.randn(1, 9, 4))


def test_zero_length_sequence_is_fine():
    for k in (3, -1):
        layer = BaseConv(4, max_seq_len=8, kernel_size=k)
        assert layer(torch.randn(2, 0, 4)).shape == (2, 0, 4)


def test_mqar_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("mqar").run("smoke", seed=0, out_dir=tmp_path)
    assert len(result["rows"]) == 2 and "| 32 | 2 | 16 |" in result["table"]
    for row in result["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0
