"""Graph data (gatelab.data.graphs), FF-G2M distillation (gatelab.adapt.g2m) and the ff-g2m
experiment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatelab import experiments
from gatelab.adapt.g2m import (
    GCN,
    MLP,
    G2MConfig,
    distillation_loss,
    edge_index,
    high_frequency_loss,
    low_frequency_loss,
    normalized_adjacency,
    train_student,
    train_teacher,
)
from gatelab.data.graphs import block_densities, karate_club, sbm_graph, split_nodes


def _path_graph(n=4):
    adj = torch.zeros(n, n)
    for i in range(n - 1):
        adj[i, i + 1] = adj[i + 1, i] = 1.0
    return adj


# --- data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p_in,p_out", [(0.1, 0.01), (0.3, 0.05)])
def test_sbm_realised_densities_match_the_requested_ones(p_in, p_out):
    g = sbm_graph(num_nodes=400, num_classes=4, p_in=p_in, p_out=p_out, seed=1)
    within, between = block_densities(g.adj, g.y)
    # 4 blocks of 100: ~19800 within pairs and 60000 between; 4 binomial std is well inside
    assert within == pytest.approx(p_in, abs=4 * (p_in / 19800) ** 0.5)
    assert between == pytest.approx(p_out, abs=4 * (p_out / 60000) ** 0.5)


def test_sbm_graph_is_symmetric_loop_free_balanced_and_split():
    g = sbm_graph(num_nodes=203, num_classes=4, dim=8, val_per_class=10, seed=0)
    assert torch.equal(g.adj, g.adj.T) and g.adj.diagonal().sum() == 0
    assert set(g.adj.unique().tolist()) <= {0.0, 1.0}
    counts = torch.bincount(g.y)
    assert counts.max() - counts.min() <= 1
    assert g.x.shape == (203, 8)
    parts = [set(i.tolist()) for i in (g.train_idx, g.val_idx, g.test_idx)]
    assert sum(map(len, parts)) == 203 and not (parts[0] & parts[1] or parts[1] & parts[2])
    assert torch.equal(torch.bincount(g.y[g.train_idx]), torch.full((4,), 20))


def test_sbm_features_follow_class_means_with_the_requested_noise():
    g = sbm_graph(num_nodes=2000, num_classes=2, dim=16, signal=3.0, noise=0.5, seed=0)
    means = torch.stack([g.x[g.y == c].mean(0) for c in range(2)])
    assert means.norm(dim=1) == pytest.approx([3.0, 3.0], abs=0.15)
    resid = g.x - means[g.y]
    assert float(resid.std()) == pytest.approx(0.5, abs=0.02)


def test_karate_club_is_the_networkx_graph():
    g = karate_club()
    assert g.num_nodes == 34 and g.num_edges == 78 and g.num_classes == 2
    assert torch.equal(g.x, torch.eye(34))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(p_in=1.5), "p_in"),
        (dict(p_out=-0.1), "p_out"),
        (dict(num_classes=1), "num_classes"),
        (dict(num_nodes=40, train_per_class=10, val_per_class=5), "too few"),
    ],
)
def test_sbm_bad_configs_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sbm_graph(**kwargs)


def test_split_rejects_zero_train_nodes():
    with pytest.raises(ValueError, match="train_per_class"):
        split_nodes(torch.arange(10) % 2, 0, 1)


# --- adjacency ----------------------------------------------------------------------------


def test_normalized_adjacency_matches_the_gcn_formula():
    adj = _path_graph(4)
    a = adj + torch.eye(4)
    deg = torch.tensor([2.0, 3.0, 3.0, 2.0])
    want = a / (deg[:, None] * deg[None, :]).sqrt()
    torch.testing.assert_close(normalized_adjacency(adj), want)
    # symmetric, top eigenvalue 1 (eigenvector D^1/2 1) for a connected graph
    eig = torch.linalg.eigvalsh(normalized_adjacency(adj))
    assert float(eig.max()) == pytest.approx(1.0, abs=1e-5)


def test_normalized_adjacency_without_loops_leaves_isolated_nodes_at_zero():
    adj = torch.zeros(3, 3)
    adj[0, 1] = adj[1, 0] = 1.0
    norm = normalized_adjacency(adj, self_loops=False)
    assert torch.equal(norm[2], torch.zeros(3)) and norm[0, 1] == 1.0


@pytest.mark.parametrize(
    "adj,match",
    [
        (torch.ones(2, 3), "square"),
        (torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "symmetric"),
        (-torch.ones(2, 2), "non-negative"),
    ],
)
def test_bad_adjacency_errors(adj, match):
    with pytest.raises(ValueError, match=match):
        normalized_adjacency(adj)


def test_edge_index_both_directions_and_self_loops():
    adj = _path_graph(3)
    e = edge_index(adj)
    assert sorted(map(tuple, e.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert edge_index(adj, self_loops=True).shape[1] == 4 + 3


# --- models and losses --------------------------------------------------------------------


def test_gcn_and_mlp_shapes_and_gradients():
    g = sbm_graph(num_nodes=40, num_classes=2, dim=5, train_per_class=3, val_per_class=3)
    gcn, mlp = GCN(5, 16, 2, num_layers=3), MLP(5, 16, 2, num_layers=1)
    out_g = gcn(g.x, normalized_adjacency(g.adj))
    out_m = mlp(g.x)
    assert out_g.shape == out_m.shape == (40, 2)
    (out_g.sum() + out_m.sum()).backward()
    for p in [*gcn.parameters(), *mlp.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    with pytest.raises(ValueError, match="adj_norm"):
        gcn(g.x, torch.eye(3))


def test_gcn_uses_the_graph_and_mlp_does_not():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    gcn, mlp = GCN(3, 8, 2, dropout=0.0).eval(), MLP(3, 8, 2, dropout=0.0).eval()
    adj = _path_graph(4)
    x2 = x.clone()
    x2[3] += 1.0  # node 3 is a neighbour of node 2 only
    a = normalized_adjacency(adj)
    assert not torch.allclose(gcn(x, a)[2], gcn(x2, a)[2])
    # two layers reach two hops; node 0 is three hops from node 3
    torch.testing.assert_close(gcn(x, a)[0], gcn(x2, a)[0])
    torch.testing.assert_close(mlp(x)[:3], mlp(x2)[:3])


def test_low_frequency_loss_on_self_loops_is_per_node_kl_and_zero_at_the_teacher():
    torch.manual_seed(0)
    z, t = torch.randn(5, 3), torch.randn(5, 3)
    loops = torch.arange(5).repeat(2, 1)
    ref = (
        sum(
            (F.softmax(t[i], -1) * (F.log_softmax(t[i], -1) - F.log_softmax(z[i], -1))).sum()
            for i in range(5)
        )
        / 5
    )
    torch.testing.assert_close(low_frequency_loss(z, t, loops), ref)
    assert float(low_frequency_loss(t, t, loops)) == pytest.approx(0.0, abs=1e-6)


def test_low_frequency_loss_pairs_student_src_with_teacher_dst():
    z, t = torch.randn(2, 3), torch.randn(2, 3)
    edge = torch.tensor([[0], [1]])
    assert float(low_frequency_loss(t[[1, 1]], t, edge)) == pytest.approx(0.0, abs=1e-6)
    assert float(low_frequency_loss(z, t, edge)) > 0


def test_high_frequency_loss_sees_differences_not_levels():
    torch.manual_seed(0)
    t = torch.randn(6, 4)
    e = edge_index(_path_graph(6))
    # a student equal to the teacher plus a per-class constant has the same differences
    shifted = t + torch.tensor([3.0, -1.0, 0.5, 2.0])
    assert float(high_frequency_loss(shifted, t, e)) == pytest.approx(0.0, abs=1e-6)
    # the low-frequency term does see the shift
    loops = edge_index(_path_graph(6), self_loops=True)
    assert float(low_frequency_loss(shifted, t, loops)) > 0.1
    assert float(high_frequency_loss(torch.randn(6, 4), t, e)) > 0
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert float(high_frequency_loss(shifted, t, empty)) == 0.0
    with pytest.raises(ValueError, match="tau"):
        high_frequency_loss(t, t, e, tau=0.0)


def test_distillation_loss_weights_labels_by_lam_and_gradients_flow():
    g = sbm_graph(num_nodes=40, num_classes=2, dim=5, train_per_class=3, val_per_class=3)
    z = torch.randn(40, 2, requires_grad=True)
    t = torch.randn(40, 2)
    e_loop, e = edge_index(g.adj, True), edge_index(g.adj)
    nll = F.cross_entropy(z[g.train_idx], g.y[g.train_idx])
    plain = distillation_loss(z, t, g, G2MConfig(low="none", high=False), e_loop, e)
    torch.testing.assert_close(plain, nll)
    full = distillation_loss(z, t, g, G2MConfig(lam=0.3), e_loop, e)
    kd = low_frequency_loss(z, t, e_loop) + high_frequency_loss(z, t, e, 1.5)
    torch.testing.assert_close(full, 0.3 * nll + 0.7 * kd)
    full.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lam=1.5), "lam"),
        (dict(tau=0.0), "tau"),
        (dict(low="spectral"), "low"),
        (dict(epochs=0), "epochs"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G2MConfig(**kwargs)


def test_student_needs_teacher_logits_of_the_right_shape():
    g = sbm_graph(num_nodes=40, num_classes=2, dim=5, train_per_class=3, val_per_class=3)
    cfg = G2MConfig(epochs=2, hidden_dim=8)
    with pytest.raises(ValueError, match="teacher_logits are needed"):
        train_student(g, None, cfg)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        train_student(g, torch.zeros(40, 3), cfg)
    train_student(g, None, G2MConfig(epochs=2, hidden_dim=8, low="none", high=False))


def test_distilled_student_learns_from_a_good_teacher():
    # a clear SBM: the GCN is near perfect; the distilled MLP must beat the plain one
    g = sbm_graph(
        num_nodes=200,
        num_classes=2,
        p_in=0.1,
        p_out=0.01,
        dim=256,
        signal=1.5,
        train_per_class=5,
        val_per_class=10,
        seed=0,
    )
    cfg = G2MConfig(epochs=150, hidden_dim=64)
    teacher = train_teacher(g, cfg)
    assert teacher.test_acc > 0.9
    plain = train_student(g, None, G2MConfig(epochs=150, hidden_dim=64, low="none", high=False))
    student = train_student(g, teacher.logits, cfg)
    assert student.test_acc > plain.test_acc + 0.1


def test_smoke_experiment_runs(tmp_path):
    result = experiments.get("ff-g2m").run("smoke", seed=0, out_dir=tmp_path)
    assert "FF-G2M" in result["table"] and "karate" in result["table"]
    assert (tmp_path / "accuracies.json").exists()
