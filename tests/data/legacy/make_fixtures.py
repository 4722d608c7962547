"""How tests/data/legacy was made, with gatelab as it was before issue 14 (commit 70f0a28).

The two LM checkpoints came from ``gatelab train`` (RUN = moe or dense; the MoE run also had
``--set model.shared_expert_dim=4``)::

    gatelab train RUN-lm --set model.dim=8 --set model.num_layers=2 --set model.num_heads=2 \
        --set model.max_seq_len=16 --set model.expert_hidden_dim=4 --set model.num_experts=4 \
        --set model.ffn_hidden_dim=8 --set data.seq_len=16 --set data.batch_size=2 \
        --set train.steps=2 --set train.eval_every=2 --set train.save_every=2 \
        --set train.run_dir=TMP/RUN

then ``python make_fixtures.py OUT TMP`` wrote the module state dicts with their inputs and
outputs (modules.safetensors, modules.json), copied the checkpoints and wrote the LMs' logits
on fixed ids (lm_logits.safetensors). Kept for the record: it imports the old names.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from gatelab.tools import open_model
from safetensors.torch import save_file

from gatelab.adapt.g2m import MLP as G2MMLP
from gatelab.experts import SharedExpert
from gatelab.layers import GluMlp, HourglassBlock, Mlp, MoE
from gatelab.models.mohets import MoHETS, MoHETSConfig

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
specs = {
    "glu_mlp": ("GluMlp", dict(dim=6, hidden_dim=5, variant="geglu", bias=True)),
    "mlp": ("Mlp", dict(dim=6, hidden_dim=7, out_dim=3, act="gelu", bias=True)),
    "hourglass_block": ("HourglassBlock", dict(dim=6, hidden_dim=3)),
    "shared_glu_gated": (
        "SharedExpert",
        dict(dim=6, hidden_dim=5, act="silu", glu=True, gated=True),
    ),
    "shared_plain": ("SharedExpert", dict(dim=6, hidden_dim=5, act="gelu", glu=False, bias=True)),
    "moe_shared": (
        "MoE",
        dict(dim=6, hidden_dim=4, num_experts=3, top_k=2, shared_experts=5, shared_gate=True),
    ),
    "mohets_mlp": (
        "MoHETS",
        dict(
            lookback=8,
            horizon=4,
            patch_len=4,
            dim=8,
            hidden_dim=8,
            num_layers=1,
            num_heads=2,
            num_experts=2,
            top_k=1,
            expert_kind="mlp",
            shared_kind="mlp",
        ),
    ),
    "mohets_fan": (
        "MoHETS",
        dict(
            lookback=8,
            horizon=4,
            patch_len=4,
            dim=8,
            hidden_dim=8,
            num_layers=1,
            num_heads=2,
            num_experts=2,
            top_k=1,
            expert_kind="fan",
            shared_kind="dwconv",
        ),
    ),
    "g2m_mlp": ("G2MMLP", dict(in_dim=5, hidden_dim=6, num_classes=3, num_layers=3)),
}
ctor = {
    "GluMlp": GluMlp,
    "Mlp": Mlp,
    "HourglassBlock": HourglassBlock,
    "SharedExpert": SharedExpert,
    "MoE": MoE,
    "MoHETS": lambda **k: MoHETS(MoHETSConfig(**k)),
    "G2MMLP": G2MMLP,
}
tensors = {}
for name, (cls, kw) in specs.items():
    m = ctor[cls](**kw).eval()
    if cls == "MoHETS":
        x = torch.linspace(-2, 2, 2 * kw["lookback"] * 2).reshape(2, kw["lookback"], 2)
    elif cls == "G2MMLP":
        x = torch.linspace(-2, 2, 4 * kw["in_dim"]).reshape(4, kw["in_dim"])
    else:
        x = torch.linspace(-2, 2, 2 * 3 * kw["dim"]).reshape(2, 3, kw["dim"])
    with torch.no_grad():
        y = m(x)
    for k, v in m.state_dict().items():
        tensors[f"{name}/state/{k}"] = v.contiguous()
    tensors[f"{name}/input"] = x
    tensors[f"{name}/output"] = y.contiguous()
save_file(tensors, out / "modules.safetensors")
(out / "modules.json").write_text(
    json.dumps({k: {"class": c, "kwargs": kw} for k, (c, kw) in specs.items()}, indent=2) + "\n"
)

ids = (torch.arange(2 * 12) * 37 % 257).reshape(2, 12)
logits = {"ids": ids}
for run in ("moe", "dense"):
    src = Path(sys.argv[2]) / run / "checkpoints"
    dst = out / f"{run}-lm"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    model = open_model(dst).model
    with torch.no_grad():
        logits[f"{run}-lm"] = model(ids).logits
save_file(logits, out / "lm_logits.safetensors")
print(sorted(p.name for p in out.rglob("*")))
