"""State dicts and checkpoints written before issue 14 load into today's modules unchanged.

The fixtures in tests/data/legacy were made by the code before the FFN and attention
renames (see tests/data/legacy/make_fixtures.py): two ``gatelab train`` checkpoints (an MoE
LM with a shared expert, a dense LM) with their logits on fixed ids, and state dicts of the
modules whose parameter names changed, with their outputs on fixed inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gatelab.adapt.g2m import MLP as G2MMLP
from gatelab.commands._common import open_model
from gatelab.layers import GluMlp, HourglassBlock, Mlp, MoE, SharedExpert
from gatelab.models.mohets import MoHETS, MoHETSConfig

LEGACY = Path(__file__).parent / "data" / "legacy"
SPECS = json.loads((LEGACY / "modules.json").read_text())
BUILD = {
    "GluMlp": GluMlp,
    "Mlp": Mlp,
    "HourglassBlock": HourglassBlock,
    "SharedExpert": SharedExpert,
    "MoE": MoE,
    "MoHETS": lambda **kw: MoHETS(MoHETSConfig(**kw)),
    "G2MMLP": lambda in_dim, **kw: G2MMLP(dim=in_dim, **kw),
}


@pytest.fixture(scope="module")
def tensors():
    return load_file(LEGACY / "modules.safetensors")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_module_state_dicts_of_earlier_versions_load(name, tensors):
    spec = SPECS[name]
    module = BUILD[spec["class"]](**spec["kwargs"]).eval()
    prefix = f"{name}/state/"
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = module(tensors[f"{name}/input"])
    torch.testing.assert_close(out, tensors[f"{name}/output"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("run", ["moe-lm", "dense-lm"])
def test_lm_checkpoints_of_earlier_versions_load(run):
    logits = load_file(LEGACY / "lm_logits.safetensors")
    model = open_model(LEGACY / run).model
    with torch.no_grad():
        out = model(logits["ids"]).logits
    torch.testing.assert_close(out, logits[run], rtol=0, atol=1e-6)
    keys = model.state_dict()
    assert "blocks.0.attn.qkv_proj.weight" in keys and "blocks.0.attn.qkv.weight" not in keys


def test_a_dense_lm_run_of_an_earlier_version_resumes_with_its_optimizer():
    """The attention's parameters were renamed (qkv -> qkv_proj, proj -> o_proj): an earlier
    checkpoint's AdamW moments still land on the same parameters."""
    from gatelab.train import param_groups
    from gatelab.train.checkpoint import _param_names, load_checkpoint, read_checkpoint

    path = LEGACY / "dense-lm" / "step_00000002.json"
    model = open_model(LEGACY / "dense-lm").model
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    meta, _ = read_checkpoint(path)
    old = [n for group in meta["optimizer"]["param_names"] for n in group]
    new = [n for group in _param_names(model, optimizer) for n in group]
    assert old != new and len(old) == len(new)  # the fixture holds a rename
    load_checkpoint(path, model, optimizer, rng=False)
    state, params = optimizer.state_dict()["state"], dict(model.named_parameters())
    for i, name in enumerate(new):
        assert state[i]["exp_avg"].shape == params[name].shape
        assert state[i]["exp_avg"].abs().sum() > 0  # trained moments, not fresh zeros
