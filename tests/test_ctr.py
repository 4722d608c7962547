"""FinalMLP, DualMLP, logistic CTR (layers/ctr.py), click logs (data/ctr.py), the experiment."""

from __future__ import annotations

import gzip
import math

import pytest
import torch

from gatelab import experiments
from gatelab.data.ctr import (
    MISSING,
    OOV,
    ClickModel,
    load_avazu,
    load_criteo,
    synthetic_ctr,
)
from gatelab.experiments.finalmlp import roc_auc
from gatelab.layers.ctr import (
    FeatureSelection,
    FieldEmbedding,
    InteractionAggregation,
    mlp_parameter_count,
)
from gatelab.models.ctr import DualMLP, FinalMLP, LogisticCTR

FIELDS = [7, 3, 11, 5]


def ids(batch: int, field_dims=FIELDS, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(d, (batch,), generator=gen) for d in field_dims], dim=1)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- layers -------------------------------------------------------------------------------


def test_field_embedding_offsets_and_checks():
    emb = FieldEmbedding(FIELDS, 4)
    x = ids(6)
    out = emb(x)
    assert out.shape == (6, 4, 4) and out.dtype == torch.float32
    offsets = [0, 7, 10, 21]
    for f in range(4):
        torch.testing.assert_close(out[:, f], emb.weight[x[:, f] + offsets[f]])
    with pytest.raises(ValueError, match=r"field 1 has an id outside \[0, field_dims\[1\]=3\)"):
        emb(torch.tensor([[0, 3, 0, 0]]))
    with pytest.raises(ValueError, match=r"shape \[batch, 4\]"):
        emb(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer category ids"):
        emb(torch.zeros(2, 4))


@pytest.mark.parametrize("context", [(None, None), ([0, 2], None), ([1], [3, 0])])
def test_finalmlp_shapes_and_gradient_to_every_parameter(context):
    model = FinalMLP(FIELDS, 8, [16, 12], [20, 8], [10], num_heads=4, fs_context=context)
    # The global context vector starts at zero (FuxiCTR), so at init the first layer of its
    # gate MLP gets no gradient; one step moves the vector, which this stands in for.
    with torch.no_grad():
        for bias in model.feature_selection.ctx_bias:
            bias.normal_()
    out = model(ids(9))
    assert out.shape == (9,) and out.dtype == torch.float32
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_context_vector_blocks_only_the_first_gate_layer():
    model = FinalMLP(FIELDS, 8, [16], [16], [10])
    model(ids(9)).square().sum().backward()
    fs = model.feature_selection
    assert [float(g[0].weight.grad.abs().sum()) for g in fs.gates] == [0.0, 0.0]
    assert all(float(b.grad.abs().sum()) > 0 for b in fs.ctx_bias)


@pytest.mark.parametrize("cls", [DualMLP, LogisticCTR])
def test_baselines_gradient_to_every_parameter(cls):
    model = cls(FIELDS)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    torch.nn.functional.binary_cross_entropy_with_logits(model(ids(5)), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_rows():
    for model in (FinalMLP(FIELDS, 4, [8], [8]), DualMLP(FIELDS, 4, [8], [8]), LogisticCTR(FIELDS)):
        assert model(torch.zeros(0, 4, dtype=torch.long)).shape == (0,)


def test_parameter_counts_match_the_formulas():
    d, nf = 8, len(FIELDS)
    width, emb = nf * d, sum(FIELDS) * d
    mlp1, mlp2, fs, heads = [16, 12], [20, 8], [10], 4
    gate = d + mlp_parameter_count(d, fs, width)  # context bias + gate MLP
    agg = (12 + 1) + (8 + 1) + heads * (12 // heads) * (8 // heads)
    streams = mlp_parameter_count(width, mlp1) + mlp_parameter_count(width, mlp2)
    final = FinalMLP(FIELDS, d, mlp1, mlp2, fs, num_heads=heads)
    assert count(final) == emb + 2 * gate + streams + agg
    # A context of two fields: the gate MLP reads 2 * d, no bias vector.
    ctx = FinalMLP(FIELDS, d, mlp1, mlp2, fs, num_heads=heads, fs_context=([0, 1], None))
    assert count(ctx) == count(final) - d + mlp_parameter_count(2 * d, fs, width) - (
        mlp_parameter_count(d, fs, width)
    )
    bare = FinalMLP(FIELDS, d, mlp1, mlp2, fs, num_heads=heads, feature_selection=False)
    assert count(bare) == emb + streams + agg
    dual = DualMLP(FIELDS, d, mlp1, mlp2)
    assert count(dual) == emb + mlp_parameter_count(width, mlp1, 1) + mlp_parameter_count(
        width, mlp2, 1
    )
    assert count(LogisticCTR(FIELDS)) == sum(FIELDS) + 1
    # By hand: 3 -> 4 -> 2 has (3 + 1) * 4 + (4 + 1) * 2 = 26 parameters.
    assert mlp_parameter_count(3, [4], 2) == 26


def test_aggregation_against_a_loop():
    agg = InteractionAggregation(6, 4, num_heads=2).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    w = agg.w_xy.view(2, 3, 2)
    want = agg.w_x(x).squeeze(1) + agg.w_y(y).squeeze(1)
    for b in range(5):
        for j in range(2):
            want[b] += x[b, 3 * j : 3 * j + 3] @ w[j] @ y[b, 2 * j : 2 * j + 2]
    torch.testing.assert_close(agg(x, y), want)


def test_feature_gates():
    emb = torch.randn(6, 4, 3)
    global_gates = FeatureSelection(4, 3, [5], (None, None))
    h1, h2 = global_gates(emb)
    g1 = global_gates.last_gates[0]
    assert h1.shape == (6, 12) and g1.shape == (1, 12)  # one gate for the whole batch
    assert bool(((g1 > 0) & (g1 < 2)).all())
    torch.testing.assert_close(h1, emb.flatten(1) * g1)
    per_example = FeatureSelection(4, 3, [5], ([1, 2], [0]))
    per_example(emb)
    assert not torch.allclose(per_example.last_gates[0][0], per_example.last_gates[0][1])


def test_without_feature_selection_both_streams_see_the_embeddings():
    model = FinalMLP(FIELDS, 4, [8], [8], feature_selection=False)
    x = ids(3)
    flat = model.embedding(x).flatten(1)
    want = model.aggregation(model.mlp1(flat), model.mlp2(flat))
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(mlp1_hidden_dims=[16, 10], num_heads=4),
            r"x_dim \(mlp1's last width\)=10 is not divisible by num_heads=4",
        ),
        (dict(mlp2_hidden_dims=[9], num_heads=2), r"y_dim \(mlp2's last width\)=9"),
        (dict(embed_dim=0), "embed_dim must be a positive int"),
        (dict(num_heads=0), "num_heads must be a positive int"),
        (dict(mlp1_hidden_dims=[]), "mlp1_hidden_dims must list at least one width"),
        (dict(fs_context=([9], None)), r"context fields .* in \[0, 4\)"),
        (dict(fs_context=(None,)), "one entry per stream"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(act="swish9"), "unknown act 'swish9'"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinalMLP(
            FIELDS, **{"embed_dim": 8, "mlp1_hidden_dims": [8], "mlp2_hidden_dims": [8], **kwargs}
        )


def test_bad_field_dims():
    with pytest.raises(ValueError, match="field_dims must list at least one width"):
        FinalMLP([])
    with pytest.raises(ValueError, match=r"field_dims\[1\] must be a positive int"):
        DualMLP([3, 0])


# -- synthetic log ----------------------------------------------------------------------------


def test_synthetic_log_is_seeded_and_follows_its_model():
    model = ClickModel.random(seed=3)
    a, b = synthetic_ctr(20000, model=model, seed=1), synthetic_ctr(20000, model=model, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.dtype == torch.int64 and a.y.dtype == torch.float32
    assert bool((a.x < torch.tensor(a.field_dims)).all()) and bool((a.x >= 0).all())
    torch.testing.assert_close(a.logits, model.logits(a.x))
    assert float(a.y.mean()) == pytest.approx(float(torch.sigmoid(a.logits).mean()), abs=0.01)
    # Popular values come first (Zipf): value 0 is the most frequent in every field.
    for f in range(a.x.shape[1]):
        assert int(torch.bincount(a.x[:, f]).argmax()) == 0
    # The log-odds are main effects plus the pairwise products, computed by hand here.
    x = a.x[:5]
    rank = model.factors[0].shape[1]
    for row in range(5):
        want = model.bias + sum(float(model.main[f][x[row, f]]) for f in range(x.shape[1]))
        for f, g in model.pairs:
            dot = float(model.factors[f][x[row, f]] @ model.factors[g][x[row, g]])
            want += model.scale * dot / math.sqrt(rank)
        assert float(a.logits[row]) == pytest.approx(want, abs=1e-4)


def test_synthetic_log_arguments():
    plain = ClickModel.random([4, 5, 6], num_pairs=0, seed=0)
    assert plain.pairs == [] and float(plain.interactions(ids(3, [4, 5, 6])).abs().sum()) == 0
    assert len(ClickModel.random([4, 5, 6], num_pairs=3).pairs) == 3
    with pytest.raises(ValueError, match=r"num_pairs must be in \[0, 3\]"):
        ClickModel.random([4, 5, 6], num_pairs=4)
    with pytest.raises(ValueError, match="not both"):
        synthetic_ctr(5, model=plain, rank=3)
    train, test = synthetic_ctr(100, seed=0).split([0.8, 0.2])
    assert len(train) == 80 and len(test) == 20


# -- file readers ------------------------------------------------------------------------------


def criteo_line(label, ints, cats) -> str:
    return "\t".join([str(label), *ints, *cats]) + "\n"


def test_load_criteo(tmp_path):
    ints = ["10", "", "1", "-1"] + ["0"] * 9
    lines = [
        criteo_line(1, ints, ["aa"] * 25 + ["x"]),
        criteo_line(0, ["3"] + ints[1:], ["bb"] * 25 + [""]),
        criteo_line(0, ints, ["aa"] * 25 + ["y"]),
    ]
    path = tmp_path / "train.txt"
    path.write_text("".join(lines))
    data = load_criteo(path, min_count=2)
    assert data.x.shape == (3, 39) and data.y.tolist() == [1.0, 0.0, 0.0]
    assert data.field_names[0] == "I1" and data.field_names[-1] == "C26"
    # I1: 10 -> floor(log(10)^2) = 5 twice (kept), 3 -> floor(log(3)^2) = 1 once (rare: OOV).
    assert data.vocabularies[0] == {"5": 2}
    assert data.x[:, 0].tolist() == [2, OOV, 2]
    assert data.x[:, 1].tolist() == [MISSING] * 3  # I2 is empty everywhere
    assert data.x[:, 13].tolist() == [2, OOV, 2]  # C1: "aa" twice, "bb" once
    assert data.x[:, 38].tolist() == [OOV, MISSING, OOV]  # C26: x, "", y all rare
    assert data.field_dims[0] == 3 and data.field_dims[13] == 3
    # A second split with the first one's ids; and gzip.
    gz = tmp_path / "more.txt.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(criteo_line(1, ints, ["bb"] * 25 + ["x"]))
    more = load_criteo(gz, vocabularies=data.vocabularies)
    assert more.x[0, 0] == 2 and more.x[0, 13] == OOV and more.field_dims == data.field_dims
    assert load_criteo(path, max_rows=2).x.shape == (2, 39)
    # Every id is valid for a model built on the log's field_dims.
    assert FinalMLP(data.field_dims, 4, [8], [8])(data.x).shape == (3,)


def test_load_criteo_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 40 tab-separated columns"):
        load_criteo(bad)
    bad.write_text(criteo_line(2, ["0"] * 13, ["a"] * 26))
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        load_criteo(bad)
    with pytest.raises(FileNotFoundError, match="already have"):
        load_criteo(tmp_path / "missing.txt")


AVAZU_HEADER = "id,click,hour,C1,banner_pos,site_id,device_type\n"


def test_load_avazu(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(
        AVAZU_HEADER
        + "1000009418151094273,0,14102100,1005,0,1fbe01fe,1\n"
        + "10000169349117863715,1,14102101,1005,1,,1\n"
        + "10000371904215119486,0,14102223,1002,0,1fbe01fe,0\n"
    )
    data = load_avazu(path)
    assert data.field_names == [
        "hour_of_day",
        "weekday",
        "C1",
        "banner_pos",
        "site_id",
        "device_type",
    ]
    assert data.y.tolist() == [0.0, 1.0, 0.0]
    hours, weekdays = data.vocabularies[0], data.vocabularies[1]
    assert set(hours) == {"00", "01", "23"}
    assert set(weekdays) == {"1", "2"}  # 2014-10-21 was a Tuesday, the 22nd a Wednesday
    assert data.x[:, 4].tolist() == [2, MISSING, 2]  # site_id
    assert data.x[:, 2].tolist() == [2, 2, 3]  # C1: 1005 (twice) before 1002


def test_load_avazu_errors(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("id,hour,C1\n1,14102100,1005\n")
    with pytest.raises(ValueError, match="header with 'click' and 'hour'"):
        load_avazu(path)
    path.write_text(AVAZU_HEADER + "1,0,141021,1005,0,a,1\n")
    with pytest.raises(ValueError, match="hour must be YYMMDDHH"):
        load_avazu(path)
    path.write_text(AVAZU_HEADER + "1,0,14102100,1005\n")
    with pytest.raises(ValueError, match="expected 7 columns, got 4"):
        load_avazu(path)


# -- the metric and the experiment ----------------------------------------------------------------


def test_roc_auc_matches_the_pairwise_definition_with_ties():
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(500, generator=gen) < 0.3).float()
    score = torch.randint(0, 20, (500,), generator=gen).float() + y  # many ties
    pos, neg = score[y == 1][:, None], score[y == 0][None, :]
    want = float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())
    assert roc_auc(y, score) == pytest.approx(want, abs=1e-12)
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([0.2, 0.9])) == 1.0
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])) == 0.5
    with pytest.raises(ValueError, match="both clicks and non-clicks"):
        roc_auc(torch.ones(3), torch.rand(3))


def test_smoke_run(tmp_path):
    result = experiments.get("finalmlp").run("smoke", seed=0, out_dir=tmp_path)
    summary = result["summary"]
    assert set(summary) == {
        "true log-odds",
        "FinalMLP",
        "FinalMLP without gates",
        "DualMLP",
        "logistic",
    }
    assert summary["logistic"]["parameters"] == sum(ClickModel.random(seed=0).field_dims) + 1
    for s in summary.values():
        assert 0.0 <= s["auc_mean"] <= 1.0
    assert "| FinalMLP |" in result["table"]


def test_old_import_paths_warn_and_give_the_same_classes():
    import gatelab.layers
    import gatelab.layers.ctr

    for module in (gatelab.layers, gatelab.layers.ctr):
        for name, cls in (
            ("FinalMLP", FinalMLP),
            ("DualMLP", DualMLP),
            ("LogisticCTR", LogisticCTR),
        ):
            with pytest.warns(DeprecationWarning, match=f"moved to gatelab.models.ctr.{name}"):
                assert getattr(module, name) is cls
    assert "FinalMLP" not in gatelab.layers.__all__
    with pytest.raises(AttributeError):
        gatelab.layers.ctr.NoSuchModel  # noqa: B018
