"""MVP vs MLP-FT (gatelab.adapt.mvp), the substitution attack (gatelab.adapt.text_attack)
and the mvp experiment at smoke scale."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab import experiments
from gatelab.adapt.mvp import (
    AdversarialLoss,
    MLPHeadClassifier,
    PromptClassifier,
    accuracy,
    classification_loss,
)
from gatelab.adapt.text_attack import (
    candidate_bytes,
    edit_budget,
    greedy_substitution_attack,
    margins,
)
from gatelab.models import LM, LMConfig


class Additive(torch.nn.Module):
    """A toy classifier whose logit for class 1 is a sum of per-(position, byte) weights, so
    the best k-edit attack is the k largest single-edit gains at distinct positions."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.w = weights  # [L, 256]

    def forward(self, ids):
        score = self.w.gather(1, ids.T).sum(0)  # [N]
        return torch.stack([torch.zeros_like(score), score], 1)


def _brute_force(model, ids, label, k, kind):
    """The smallest margin over every set of <= k substitutions at distinct positions."""
    options = [(p, b) for p in range(ids.numel()) for b in candidate_bytes(int(ids[p]), kind)]
    best = float(margins(model(ids[None]), torch.tensor([label]))[0])
    for r in range(1, k + 1):
        for combo in itertools.combinations(options, r):
            if len({p for p, _ in combo}) < r:
                continue
            x = ids.clone()
            for p, b in combo:
                x[p] = b
            best = min(best, float(margins(model(x[None]), torch.tensor([label]))[0]))
    return best


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 2))
def test_greedy_attack_finds_the_best_attack_on_an_additive_classifier(seed, k):
    gen = torch.Generator().manual_seed(seed)
    length = 4
    model = Additive(torch.randn(length, 256, generator=gen) + 10.0)  # margin starts high
    ids = torch.tensor([[ord(c) for c in "aS0q"]])
    result = greedy_substitution_attack(model, ids, torch.tensor([1]), max_edits=k)
    assert float(result.margin[0]) == pytest.approx(_brute_force(model, ids[0], 1, k, "keyboard"))
    assert int(result.edits[0]) == int((result.ids != ids).sum()) <= k
    assert not bool(result.flipped[0])  # margin ~ 40 cannot flip with two edits


def test_attack_stops_once_flipped_and_respects_the_query_bound():
    w = torch.zeros(6, 256)
    w[2, ord("x")] = -5.0  # one edit (c -> x: a keyboard neighbour) flips the prediction
    model = Additive(w + 0.1 / 6)
    ids = torch.tensor([[ord(c) for c in "abcdef"]] * 3)
    result = greedy_substitution_attack(model, ids, torch.ones(3, dtype=torch.long), max_edits=3)
    assert result.flipped.all() and (result.edits == 1).all()
    assert result.ids[0, 2] == ord("x")
    bounded = greedy_substitution_attack(
        model, ids, torch.ones(3, dtype=torch.long), max_edits=2, queries_per_step=4, seed=7
    )
    assert (bounded.queries <= 1 + 2 * 4).all()
    again = greedy_substitution_attack(
        model, ids, torch.ones(3, dtype=torch.long), max_edits=2, queries_per_step=4, seed=7
    )
    assert torch.equal(bounded.ids, again.ids)  # deterministic under a seed


def test_candidate_sets_and_budget():
    assert ord("A") in candidate_bytes(ord("a")) and ord("s") in candidate_bytes(ord("a"))
    assert ord("0") in candidate_bytes(ord("o")) and ord("!") in candidate_bytes(ord("1"))
    assert candidate_bytes(ord(" ")) == () and candidate_bytes(ord("\n")) == ()
    assert len(candidate_bytes(ord("a"), "printable")) == 94
    assert edit_budget(32, 0.1) == 3 and edit_budget(5, 0.05) == 1
    with pytest.raises(ValueError, match="candidates"):
        candidate_bytes(1, "unicode")
    with pytest.raises(ValueError, match="fraction"):
        edit_budget(10, 0.0)
    with pytest.raises(ValueError, match="max_edits"):
        greedy_substitution_attack(
            Additive(torch.zeros(2, 256)),
            torch.zeros(1, 2).long(),
            torch.zeros(1).long(),
            max_edits=-1,
        )


def _lm():
    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=257, dim=16, num_layers=1, num_heads=2, max_seq_len=32, ffn_hidden_dim=32
    )
    return LM(cfg).eval()


def test_prompt_classifier_scores_are_verbaliser_log_probabilities():
    lm = _lm()
    clf = PromptClassifier(lm, ("ab", "c"), templates=(" is ",))
    ids = torch.randint(256, (3, 5))
    scores = clf(ids)
    for k, v in enumerate(("ab", "c")):
        for i in range(3):
            seq = torch.cat([ids[i], torch.tensor(list(b" is " + v.encode()))])
            logp = torch.log_softmax(lm(seq[None]).logits[0].float(), -1)
            want = sum(
                float(logp[len(seq) - len(v) - 1 + j, seq[len(seq) - len(v) + j]])
                for j in range(len(v))
            )
            assert float(scores[i, k]) == pytest.approx(want, abs=1e-4)
    two = PromptClassifier(lm, ("ab", "c"), templates=(" is ", " was "))
    assert two(ids).shape == (3, 2)
    with pytest.raises(ValueError, match="verbalisers"):
        PromptClassifier(lm, ("x", "x"))


def test_mlp_head_and_training_losses():
    lm = _lm()
    clf = MLPHeadClassifier(lm, 2)
    ids, labels = torch.randint(256, (4, 6)), torch.tensor([0, 1, 0, 1])
    assert clf(ids).shape == (4, 2)
    assert sum(p.numel() for p in clf.parameters()) > sum(p.numel() for p in lm.parameters())
    loss = classification_loss(clf, (ids, labels))
    loss.backward()
    adv = AdversarialLoss({"max_edits": 1, "queries_per_step": 3}, seed=1)
    assert torch.isfinite(adv(clf, (ids, labels))) and adv.calls == 1
    assert 0.0 <= accuracy(clf, ids, labels) <= 1.0
    with pytest.raises(ValueError, match="ids"):
        clf(torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_classes"):
        MLPHeadClassifier(lm, 1)


def test_mvp_experiment_smoke(tmp_path):
    result = experiments.get("mvp").run("smoke", 0, tmp_path)
    assert "| MVP |" in result["table"] and "| MLP-FT + adv |" in result["table"]
    for rows in result["runs"].values():
        for r in rows:
            assert 0 <= r["attacked"] <= r["clean_attacked_subset"] <= 1
