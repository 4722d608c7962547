"""Transcoders (gatelab.inspect.transcoder) and unembedding read-outs (gatelab.inspect.readout)."""

from __future__ import annotations

import pytest
import torch

from gatelab.edit import find_moe_blocks
from gatelab.inspect.readout import (
    expert_neurons,
    module_io,
    read_neurons,
    read_vectors,
    readout_accuracy,
    unembedding,
)
from gatelab.inspect.transcoder import (
    Transcoder,
    evaluate_transcoder,
    replaced,
    train_transcoder,
    transcoder_loss,
)
from gatelab.models import LM, LMConfig


def _lm():
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=32,
        moe_layers=[1],
        num_experts=4,
        top_k=2,
        expert_hidden_dim=24,
    )
    model = LM(config).eval()
    with torch.no_grad():
        for block in find_moe_blocks(model):
            block.experts.down_proj.normal_(0.0, 0.3)
    return model


def _prompts(n=3, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (4, seq), generator=g) for _ in range(n)]


def test_transcoder_shapes_and_unit_norm_decoder():
    tc = Transcoder(8, 40, 6)
    y, f = tc(torch.randn(3, 5, 8))
    assert y.shape == (3, 5, 6) and f.shape == (3, 5, 40) and bool((f >= 0).all())
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(40))
    loss, _ = transcoder_loss(y, torch.randn(3, 5, 6), f, l1=0.1)
    loss.backward()
    tc.remove_parallel_grad()  # what is left of the gradient is orthogonal to every row
    torch.testing.assert_close(
        (tc.W_dec.grad * tc.W_dec).sum(1), torch.zeros(40), atol=1e-6, rtol=0
    )


def test_transcoder_learns_a_sparse_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    feats = torch.relu(x @ torch.randn(8, 16, generator=g) - 1.0)  # sparse ground-truth features
    y = feats @ torch.randn(16, 8, generator=g)
    tc, history = train_transcoder(x, y, hidden_dim=64, l1=1e-3, steps=400, lr=3e-3, batch_size=512)
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(64))
    with torch.no_grad():
        y_hat, f = tc(x)
    fve = 1 - ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert fve > 0.9 and history.steps == 400
    assert float((f > 0).float().sum(-1).mean()) < 64  # sparse: not every feature fires


def test_transcoder_on_an_moe_layer_and_zero_ablation():
    model, prompts = _lm(), _prompts()
    module = find_moe_blocks(model)[0].module
    x, y = module_io(model, module, prompts)
    assert x.shape == y.shape == (3 * 4 * 16, 32)
    tc, _ = train_transcoder(x, y, hidden_dim=128, l1=1e-4, steps=300, lr=3e-3)
    report = evaluate_transcoder(model, module, tc, prompts)
    assert report["fve"] > 0.5 and report["l0"] > 0
    assert report["loss_zero_ablated"] != report["loss_clean"]
    with torch.no_grad():
        _, f = tc(x)
    assert report["l0"] == pytest.approx(float((f > 0).float().sum(-1).mean()))
    # zero ablation equals a model whose MoE layer outputs zeros
    ids = prompts[0]
    with replaced(module, None), torch.no_grad():
        ablated = model(ids).logits
    handle = module.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        expected = model(ids).logits
    handle.remove()
    torch.testing.assert_close(ablated, expected)


def test_readout_reference_and_neurons():
    model = _lm()
    w_u, gain = unembedding(model)
    assert w_u is model.embed.weight.detach() or torch.equal(w_u, model.embed.weight)
    v = torch.randn(3, 32)
    out = read_vectors(model, v, k=5)
    torch.testing.assert_close(out.tokens, (v * gain @ w_u.T).topk(5).indices)
    raw = read_vectors(model, v, k=5, gain=False)
    torch.testing.assert_close(raw.tokens, (v @ w_u.T).topk(5).indices)
    block = find_moe_blocks(model)[0]
    directions = expert_neurons(model, block.layer, 2)
    torch.testing.assert_close(directions, block.experts.down_proj[2].detach().T)
    neurons = read_neurons(model, block.layer, 2, [0, 5], k=3)
    assert neurons.tokens.shape == (2, 3) and len(neurons.decoded()) == 2
    acc = readout_accuracy(model, block.module, _prompts(), k=5)
    assert 0 <= acc["accuracy"] <= 1 and 0 <= acc["frequency_floor"] <= 1


def test_readout_hf():
    pytest.importorskip("transformers")
    import hf_tiny

    model = hf_tiny.build("mixtral")
    block = find_moe_blocks(model)[0]
    torch.testing.assert_close(
        expert_neurons(model, block.layer, 1), block.experts.down_proj[1].detach().T
    )
    out = read_vectors(model, torch.randn(2, 32), k=4)
    assert out.tokens.shape == (2, 4)


def test_bad_input():
    model = _lm()
    with pytest.raises(ValueError, match="hidden_dim"):
        Transcoder(8, 0)
    with pytest.raises(ValueError, match="same"):
        train_transcoder(torch.randn(4, 3), torch.randn(5, 3), 8)
    with pytest.raises(ValueError, match="transcoder input"):
        Transcoder(8, 4)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="vectors must be"):
        read_vectors(model, torch.randn(2, 31))
    with pytest.raises(ValueError, match="k must lie"):
        read_vectors(model, torch.randn(2, 32), k=0)
    with pytest.raises(ValueError, match="expert must lie"):
        expert_neurons(model, 1, 9)
    with pytest.raises(ValueError, match="no unembedding"):
        unembedding(torch.nn.Linear(2, 2))
