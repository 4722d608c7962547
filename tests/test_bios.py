"""Synthetic biographies (bioS), the bits-of-knowledge measure, the knowledge-capacity run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gatelab.data.bios import ATTRIBUTES, INFORMATIVE, BioSpec, bios, knowledge_bits, span_losses
from gatelab.experiments.knowledge_capacity import lm_config
from gatelab.models.lm import LM


def test_people_have_unique_names_and_values_from_their_sets():
    data = bios(500, seed=3)
    assert len({tuple(n) for n in data.names.tolist()}) == 500
    for i, kind in enumerate(("first", "middle", "last")):
        assert all(data.vocab[t].startswith(f"{kind}_") for t in data.names[:, i].tolist())
    for attribute, kinds in ATTRIBUTES.items():
        values = data.values[attribute]
        assert values.shape == (500, len(kinds))
        for j, kind in enumerate(kinds):
            assert all(data.vocab[t].startswith(f"{kind}_") for t in values[:, j].tolist())


def test_employer_city_is_a_function_of_the_employer():
    data = bios(2000, seed=1)
    city_of = {}
    for company, city in zip(
        data.values["employer"][:, 0].tolist(),
        data.values["employer_city"][:, 0].tolist(),
        strict=True,
    ):
        assert city_of.setdefault(company, city) == city


def test_attribute_values_are_uniform():
    """Chi-square of each single-token attribute against uniform, at the 0.1% level."""
    spec = BioSpec()
    data = bios(8000, spec, seed=0)
    for attribute, kind in (("birth_city", "city"), ("major", "major"), ("employer", "company")):
        size = getattr(spec, kind)
        _, counts = torch.unique(data.values[attribute][:, 0], return_counts=True)
        assert len(counts) == size
        expected = 8000 / size
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        df = size - 1
        assert chi2 < df + 3.1 * math.sqrt(2 * df)  # ~ the 99.9% quantile


def test_render_spans_point_at_the_name_and_values():
    data = bios(50, seed=0)
    people = torch.tensor([3, 7, 11])
    ids, mask, spans = data.render(people, torch.Generator().manual_seed(0))
    assert ids.shape[0] == 3 and mask.dtype == torch.bool
    assert (ids[~mask] == data.pad_id).all()
    for b, person in enumerate(people.tolist()):
        start, end = spans["name"][b].tolist()
        assert start == 1 and ids[b, start:end].tolist() == data.names[person].tolist()
        for attribute in ATTRIBUTES:
            start, end = spans[attribute][b].tolist()
            assert ids[b, start:end].tolist() == data.values[attribute][person].tolist()
            assert ids[b, start - 3 : start].tolist() != []  # the sentence's words come first


def test_templates_vary_between_exposures():
    data = bios(20, seed=0)
    a = data.render(torch.arange(20), torch.Generator().manual_seed(0))[0]
    b = data.render(torch.arange(20), torch.Generator().manual_seed(1))[0]
    assert a.shape != b.shape or not torch.equal(a, b)


def test_span_losses_match_a_direct_sum():
    data = bios(10, seed=0)
    ids, _, spans = data.render(torch.arange(4), torch.Generator().manual_seed(0))
    logits = torch.randn(ids.shape[0], ids.shape[1], len(data.vocab))
    got = span_losses(logits, ids, spans)
    logp = logits.log_softmax(-1)
    for key in ("name", "birth_date", "major"):
        for b in range(4):
            start, end = spans[key][b].tolist()
            ref = -sum(float(logp[b, j - 1, ids[b, j]]) for j in range(start, end))
            assert float(got[key][b]) == pytest.approx(ref, rel=1e-5)


def test_knowledge_bits_is_zero_for_uniform_and_full_for_perfect():
    spec = BioSpec()
    data = bios(300, spec, seed=0)
    uniform = {"name": math.log(spec.num_names)}
    uniform |= {a: math.log(spec.domain_size(a)) for a in INFORMATIVE}
    assert knowledge_bits(data, uniform)["total"] == pytest.approx(0.0, abs=1e-6)
    perfect = {"name": math.log(300), **{a: 0.0 for a in INFORMATIVE}}
    bits = knowledge_bits(data, perfect)
    expected = 300 * math.log2(spec.num_names / 300)
    expected += 300 * sum(math.log2(spec.domain_size(a)) for a in INFORMATIVE)
    assert bits["total"] == pytest.approx(expected)
    assert spec.domain_size("birth_date") == spec.month * spec.day * spec.year
    with pytest.raises(ValueError, match="lacks"):
        knowledge_bits(data, {"name": 1.0})


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="num_people"):
        bios(10, BioSpec(first=2, middle=2, last=2))
    with pytest.raises(ValueError, match="BioSpec.city"):
        bios(10, BioSpec(city=0))
    with pytest.raises(ValueError, match="divide by 3"):
        lm_config(bios(5), "mlp", 16)


def test_mlp_and_gated_ffn_lms_have_equal_parameters():
    data = bios(20)
    mlp, gated = (LM(lm_config(data, ffn, 12)) for ffn in ("mlp", "swiglu"))
    assert mlp.num_parameters() == gated.num_parameters()
    assert type(mlp.blocks[0].ffn).__name__ == "Mlp"
    assert (
        type(gated.blocks[0].ffn).__name__ == "GluMlp" and gated.blocks[0].ffn.variant == "swiglu"
    )


def test_knowledge_capacity_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("knowledge-capacity").run("smoke", seed=0, out_dir=tmp_path)
    json.dumps(result, allow_nan=False)  # the CLI writes result.json this way
    assert "GatedMLP" in result["table"]
    for runs in result["results"].values():
        r = runs[0]
        assert math.isfinite(r["bits_per_param"]) and r["params"] > 0
