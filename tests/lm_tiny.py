"""A tiny gatelab MoE LM with MoE layers at 0 and 2 (shared by the inspect/edit tests)."""

from __future__ import annotations

import torch

from gatelab.inspect.access import find_moe_blocks
from gatelab.models import LM, LMConfig

CONFIG = dict(
    vocab_size=50,
    dim=32,
    num_layers=3,
    num_heads=4,
    max_seq_len=32,
    moe_layers=[0, 2],
    num_experts=6,
    top_k=2,
    expert_hidden_dim=24,
)


def tiny_moe_lm(router_std: float | None = 0.5, **changes) -> LM:
    """The LM in eval mode, seeded; ``changes`` override CONFIG; routers redrawn at
    ``router_std`` (None: left at init) so that tokens spread over the experts."""
    torch.manual_seed(0)
    model = LM(LMConfig(**{**CONFIG, **changes})).eval()
    if router_std is not None:
        with torch.no_grad():
            for block in find_moe_blocks(model):
                block.router.weight.normal_(0.0, router_std)
    return model
