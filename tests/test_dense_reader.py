"""gatelab.experts.read_dense_ffn: the one reader of a dense FFN into expert-bank layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gatelab.experts import ExpertBank, UnreadableFFNError, read_dense_ffn
from gatelab.layers import GluMlp, Mlp, SharedExpert

D, H = 6, 10


class FusedHFMlp(nn.Module):
    """Phi-3's MLP layout: gate_up_proj (gate rows first), down_proj, act_fn."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(D, 2 * H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class SplitHFMlp(FusedHFMlp):
    """LlamaMLP's layout: gate_proj, up_proj, down_proj, act_fn (with biases here)."""

    def __init__(self):
        super().__init__()
        del self.gate_up_proj
        self.gate_proj, self.up_proj = nn.Linear(D, H), nn.Linear(D, H)
        self.act_fn = nn.GELU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


FFNS = {
    "glu_mlp": lambda: GluMlp(D, H, variant="geglu", bias=True),
    "mlp": lambda: Mlp(D, H, act="relu"),
    "shared_expert_ffn": lambda: SharedExpert(D, H).ffn,
    "sequential": lambda: nn.Sequential(
        nn.Linear(D, H), nn.GELU(approximate="tanh"), nn.Linear(H, D)
    ),
    "hf_fused": FusedHFMlp,
    "hf_split": SplitHFMlp,
}


@pytest.mark.parametrize("kind", sorted(FFNS))
def test_one_expert_bank_computes_the_ffn(kind):
    torch.manual_seed(0)
    ffn = FFNS[kind]().double()
    w = read_dense_ffn(ffn)
    assert w.num_experts == 1 and w.dim == D and w.hidden_dim == H
    bank = ExpertBank(1, D, H, act=w.act, glu=w.glu, bias=w.b_in is not None).double()
    with torch.no_grad():
        getattr(bank, bank.in_name).copy_(w.w_in)
        bank.down_proj.copy_(w.w_out)
        if w.b_in is not None:
            getattr(bank, bank.in_name + "_bias").copy_(w.b_in)
            bank.down_proj_bias.copy_(w.b_out if w.b_out is not None else 0.0)
    x = torch.randn(7, D, dtype=torch.float64)
    torch.testing.assert_close(bank.forward_expert(0, x), ffn(x))


def test_the_family_is_read_by_a_reshape():
    mlp = GluMlp(D, H)
    w = read_dense_ffn(mlp)
    assert w.w_in.data_ptr() == mlp.gate_up_proj.weight.data_ptr()  # a view, no copy
    assert w.w_out.data_ptr() == mlp.down_proj.weight.data_ptr()


def test_unreadable_ffns_raise_a_value_error():
    with pytest.raises(ValueError, match="cannot read Conv1d as a dense FFN"):
        read_dense_ffn(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="act='identity'"):
        read_dense_ffn(GluMlp(D, H, variant="bilinear"))
    with pytest.raises(ValueError, match="activation Tanh"):
        read_dense_ffn(nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D)))
    with pytest.raises(UnreadableFFNError, match="names no activation"):
        bare = nn.Module()
        bare.up_proj, bare.down_proj = nn.Linear(D, H), nn.Linear(H, D)
        read_dense_ffn(bare)
