"""The Routing contract: validation on construction and the views every consumer uses."""

from __future__ import annotations

import pytest
import torch
from conftest import make_routing
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab.routing import EMPTY, Routing
from gatelab.routing import routing as routing_module


def parts(t=3, e=4, k=2):
    logits = torch.randn(t, e)
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    return logits, logits.softmax(-1), experts.long(), torch.rand(t, k)


# -- validation -----------------------------------------------------------------------


def test_valid_routing_builds():
    r = Routing(*parts())
    assert (r.num_tokens, r.num_experts, r.num_slots) == (3, 4, 2)
    assert r.aux == {}


@pytest.mark.parametrize("field", ["logits", "scores", "experts", "weights"])
def test_fields_must_be_2d(field):
    fields = dict(zip(["logits", "scores", "experts", "weights"], parts(), strict=True))
    fields[field] = fields[field].reshape(-1)
    with pytest.raises(ValueError, match=f"Routing.{field} must be a 2-D tensor"):
        Routing(**fields)


def test_logits_and_scores_must_match():
    logits, scores, experts, weights = parts()
    with pytest.raises(ValueError, match="logits .* and scores .* must both be"):
        Routing(logits, scores[:, :3], experts, weights)


def test_experts_and_weights_must_match():
    logits, scores, experts, weights = parts()
    with pytest.raises(ValueError, match="experts .* and weights .* must both be"):
        Routing(logits, scores, experts, weights[:, :1])


def test_token_counts_must_match():
    logits, scores, experts, weights = parts()
    with pytest.raises(ValueError, match="3 tokens in logits but 2 in experts"):
        Routing(logits, scores, experts[:2], weights[:2])


def test_experts_must_be_int64():
    logits, scores, experts, weights = parts()
    with pytest.raises(TypeError, match="Routing.experts must be int64"):
        Routing(logits, scores, experts.int(), weights)


@pytest.mark.parametrize("field", ["logits", "scores", "weights"])
def test_float_fields_must_be_floating(field):
    fields = dict(zip(["logits", "scores", "experts", "weights"], parts(), strict=True))
    fields[field] = fields[field].long()
    with pytest.raises(TypeError, match=f"Routing.{field} must be floating point"):
        Routing(**fields)


@pytest.mark.parametrize("bad", [4, 7, -2])
def test_expert_ids_in_range(bad):
    logits, scores, experts, weights = parts()
    experts[1, 0] = bad
    if bad == -2:
        weights[1, 0] = 0
    with pytest.raises(ValueError, match="valid ids are 0..3"):
        Routing(logits, scores, experts, weights)


def test_empty_slot_needs_zero_weight():
    logits, scores, experts, weights = parts()
    experts[0, 1] = EMPTY
    with pytest.raises(ValueError, match="weights must be 0 in empty slots"):
        Routing(logits, scores, experts, weights)
    weights[0, 1] = 0
    Routing(logits, scores, experts, weights)


def test_no_duplicate_expert_in_a_row():
    logits, scores, _, weights = parts()
    experts = torch.tensor([[0, 1], [2, 2], [3, 0]])
    with pytest.raises(ValueError, match="same expert twice"):
        Routing(logits, scores, experts, weights)


def test_several_empty_slots_are_not_duplicates():
    r = make_routing([[EMPTY, 1, EMPTY], [EMPTY, EMPTY, EMPTY]], num_experts=2)
    assert r.valid.tolist() == [[False, True, False], [False, False, False]]


def _value_error(fields: dict, host_slots: int, monkeypatch) -> str | None:
    """The ValueError message of Routing(**fields) with value checks on the host for
    routings of at most ``host_slots`` slots (0: the tensor path), or None."""
    monkeypatch.setattr(routing_module, "HOST_CHECK_SLOTS", host_slots)
    try:
        Routing(**fields)
    except ValueError as err:
        return str(err)
    return None


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.integers(1, 5),
    num_experts=st.integers(1, 5),
    data=st.data(),
)
def test_host_value_checks_match_the_tensor_checks(tokens, num_experts, data):
    """Small CPU routings are checked from Python lists (decode steps); the verdict and
    message are the tensor path's on every routing, valid or not."""
    slots = data.draw(st.integers(1, num_experts + 1))
    ids = data.draw(
        st.lists(st.integers(-3, num_experts + 1), min_size=tokens * slots, max_size=tokens * slots)
    )
    values = data.draw(
        st.lists(
            st.sampled_from([0.0, -0.0, 0.5, float("nan")]),
            min_size=tokens * slots,
            max_size=tokens * slots,
        )
    )
    logits = torch.zeros(tokens, num_experts)
    fields = {
        "logits": logits,
        "scores": logits,
        "experts": torch.tensor(ids).view(tokens, slots),
        "weights": torch.tensor(values).view(tokens, slots),
    }
    with pytest.MonkeyPatch.context() as mp:
        host = _value_error(fields, routing_module.HOST_CHECK_SLOTS, mp)
        tensor = _value_error(fields, 0, mp)
    assert host == tensor


def test_check_false_skips_value_checks_only():
    logits, scores, experts, weights = parts()
    experts[0, 0] = 99
    Routing(logits, scores, experts, weights, check=False)
    with pytest.raises(TypeError):
        Routing(logits, scores, experts.int(), weights, check=False)


def test_zero_tokens_is_valid():
    r = Routing(*parts(t=0))
    assert r.num_tokens == 0
    assert r.tokens_per_expert().tolist() == [0, 0, 0, 0]
    assert r.flat().tokens.numel() == 0
    assert r.dense_weights().shape == (0, 4)


def test_replace_validates_again():
    r = Routing(*parts())
    with pytest.raises(ValueError, match="valid ids"):
        r.replace(experts=torch.full_like(r.experts, 9))


# -- views ----------------------------------------------------------------------------

EXPERTS = [[2, 0], [0, EMPTY], [1, 2], [EMPTY, EMPTY], [2, 1]]
WEIGHTS = [[0.6, 0.4], [1.0, 0.0], [0.7, 0.3], [0.0, 0.0], [0.9, 0.1]]


def example():
    return make_routing(EXPERTS, WEIGHTS, num_experts=4)


def test_tokens_per_expert():
    r = example()
    assert r.tokens_per_expert().tolist() == [2, 2, 3, 0]
    mask = torch.tensor([True, False, True, True, False])
    assert r.tokens_per_expert(mask).tolist() == [1, 1, 2, 0]
    assert r.tokens_per_expert(mask.float().reshape(1, 5)).tolist() == [1, 1, 2, 0]


def test_flat_is_sorted_by_expert():
    flat = example().flat()
    # (token, expert, weight, slot) of every non-empty slot, by expert then by slot index.
    want = [
        (0, 0, 0.4, 1),
        (1, 0, 1.0, 2),
        (2, 1, 0.7, 4),
        (4, 1, 0.1, 9),
        (0, 2, 0.6, 0),
        (2, 2, 0.3, 5),
        (4, 2, 0.9, 8),
    ]
    assert flat.tokens.tolist() == [w[0] for w in want]
    assert flat.experts.tolist() == [w[1] for w in want]
    assert flat.weights.tolist() == pytest.approx([w[2] for w in want])
    assert flat.slots.tolist() == [w[3] for w in want]
    assert flat.counts.tolist() == [2, 2, 3, 0]
    assert flat.offsets.tolist() == [2, 4, 7, 7]
    assert flat.tokens.dtype == flat.experts.dtype == flat.slots.dtype == torch.int64


def test_flat_slots_index_the_routing():
    r = example()
    flat = r.flat()
    assert torch.equal(r.experts.reshape(-1)[flat.slots], flat.experts)
    assert torch.equal(r.weights.reshape(-1)[flat.slots], flat.weights)


def test_dense_weights():
    dense = example().dense_weights()
    want = torch.tensor(
        [
            [0.4, 0.0, 0.6, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.7, 0.3, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 0.1, 0.9, 0.0],
        ]
    )
    torch.testing.assert_close(dense, want)


def test_dense_weights_keep_gradient():
    r = example()
    weights = r.weights.clone().requires_grad_()
    r = r.replace(weights=weights)
    (r.dense_weights() * torch.arange(4.0)).sum().backward()
    want = torch.where(r.valid, r.experts.float(), torch.zeros(()))
    torch.testing.assert_close(weights.grad, want)


@pytest.mark.parametrize("off", [[2], torch.tensor([False, False, True, False])])
def test_mask_experts(off):
    r = example().mask_experts(off)
    assert r.experts.tolist() == [[EMPTY, 0], [0, EMPTY], [1, EMPTY], [EMPTY, EMPTY], [EMPTY, 1]]
    torch.testing.assert_close(
        r.weights, torch.tensor([[0, 0.4], [1, 0], [0.7, 0], [0, 0], [0, 0.1]])
    )
    assert r.tokens_per_expert().tolist() == [2, 2, 0, 0]


def test_mask_experts_renormalize():
    r = example().mask_experts([2], renormalize=True)
    # Tokens that keep an expert get weight 1; token 3 had nothing and stays empty.
    torch.testing.assert_close(
        r.weights, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    )


def test_mask_experts_several_and_none():
    r = example()
    assert r.mask_experts([]).experts.tolist() == EXPERTS
    gone = r.mask_experts([0, 1, 2, 3])
    assert (gone.experts == EMPTY).all() and (gone.weights == 0).all()


@pytest.mark.parametrize("bad", [[4], [-1]])
def test_mask_experts_rejects_bad_ids(bad):
    with pytest.raises(ValueError, match="expert ids must lie in 0..3"):
        example().mask_experts(bad)


def test_mask_experts_rejects_bad_mask_shape():
    with pytest.raises(ValueError, match=r"expert mask must have shape \[4\]"):
        example().mask_experts(torch.tensor([True, False]))


def test_keep_slots():
    r = example()
    keep = torch.tensor([[True, False], [True, True], [False, True], [True, True], [True, True]])
    out = r.keep_slots(keep)
    assert out.experts.tolist() == [[2, EMPTY], [0, EMPTY], [EMPTY, 2], [EMPTY, EMPTY], [2, 1]]
    torch.testing.assert_close(
        out.weights, torch.tensor([[0.6, 0], [1, 0], [0, 0.3], [0, 0], [0.9, 0.1]])
    )
    renorm = r.keep_slots(keep, renormalize=True)
    torch.testing.assert_close(
        renorm.weights, torch.tensor([[1.0, 0], [1, 0], [0, 1.0], [0, 0], [0.9, 0.1]])
    )
    # logits, scores and aux are carried over unchanged
    assert out.logits is r.logits and out.scores is r.scores


def test_detach():
    logits = torch.randn(2, 3, requires_grad=True)
    r = Routing(
        logits,
        logits.softmax(-1),
        torch.tensor([[0], [2]]),
        logits.softmax(-1)[:, :1],
        {"t": logits.sum()},
    )
    d = r.detach()
    assert not any(t.requires_grad for t in (d.logits, d.scores, d.weights, d.aux["t"]))
    assert torch.equal(d.experts, r.experts)
