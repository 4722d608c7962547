"""Algorithmic graph data (gatelab.data.algorithms), the message-passing processor
(gatelab.layers.graph), the encode-process-decode reasoner (gatelab.models.nar) and the
nar-tropical experiment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab import experiments
from gatelab.data.algorithms import (
    AlgoGraph,
    algorithm_batch,
    bellman_ford,
    bfs_reach,
    edmonds_karp,
    er_graph,
    grid_graph,
    make_graph,
    random_batch,
)
from gatelab.layers.graph import AGGREGATIONS, MessagePassing, aggregate
from gatelab.models.nar import NARConfig, NARModel, cut_capacity, nar_loss, nar_metrics

# --- oracles written here -----------------------------------------------------------------


def floyd_warshall(adj, w):
    n = adj.shape[0]
    d = np.where(adj, w, np.inf)
    np.fill_diagonal(d, 0.0)
    for k in range(n):
        d = np.minimum(d, d[:, k : k + 1] + d[k : k + 1, :])
    return d


def closure(adj):
    """Reachability by repeated boolean matrix squaring (no BFS)."""
    r = adj | np.eye(adj.shape[0], dtype=bool)
    for _ in range(adj.shape[0]):
        r = r | ((r.astype(int) @ r.astype(int)) > 0)
    return r


def min_cut_by_enumeration(adj, cap, s, t):
    n = adj.shape[0]
    others = [v for v in range(n) if v not in (s, t)]
    best = np.inf
    for bits in itertools.product([0, 1], repeat=len(others)):
        side = np.zeros(n, dtype=bool)
        side[s] = True
        side[others] = np.array(bits, dtype=bool) if others else side[others]
        best = min(best, np.where(adj, cap, 0.0)[side][:, ~side].sum())
    return best


graph_seeds = st.tuples(st.integers(2, 7), st.integers(0, 10_000), st.floats(0.5, 4.0))


def _graph(spec):
    n, seed, degree = spec
    return er_graph(n, np.random.default_rng(seed), degree=degree)


# --- data ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(graph_seeds)
def test_bellman_ford_matches_floyd_warshall(spec):
    g = _graph(spec)
    dist, pred = bellman_ford(g.adj, g.weight, g.source)
    expect = floyd_warshall(g.adj, g.weight)[g.source]
    np.testing.assert_allclose(dist, expect, rtol=1e-12)
    for v in np.flatnonzero(np.isfinite(dist)):
        if v != g.source:  # the predecessor lies on a shortest path
            u = pred[v]
            assert g.adj[u, v] and np.isclose(dist[u] + g.weight[u, v], dist[v])
    assert (pred[~np.isfinite(dist)] == -1).all()


@settings(max_examples=60, deadline=None)
@given(graph_seeds)
def test_bfs_reach_matches_the_transitive_closure(spec):
    g = _graph(spec)
    np.testing.assert_array_equal(bfs_reach(g.adj, g.source), closure(g.adj)[g.source])
    assert bfs_reach(g.adj, g.source)[g.sink]  # the guaranteed path


@settings(max_examples=60, deadline=None)
@given(graph_seeds)
def test_max_flow_equals_the_enumerated_min_cut(spec):
    g = _graph(spec)
    value, flow, cut = edmonds_karp(g.adj, g.weight, g.source, g.sink)
    assert np.isclose(value, min_cut_by_enumeration(g.adj, g.weight, g.source, g.sink))
    assert value > 0 and cut[g.source] and not cut[g.sink]
    # a feasible flow: capacity, conservation, and its value leaves the source
    assert (flow <= np.where(g.adj, g.weight, 0) + 1e-9).all() and (flow >= 0).all()
    net = flow.sum(1) - flow.sum(0)
    inner = [v for v in range(g.num_nodes) if v not in (g.source, g.sink)]
    np.testing.assert_allclose(net[inner], 0, atol=1e-9)
    assert np.isclose(net[g.source], value)


def test_edge_cases_and_bad_input():
    adj = np.zeros((3, 3), dtype=bool)
    adj[0, 1] = True
    g = AlgoGraph(adj, np.where(adj, 0.5, 0.0), 0, 2)
    dist, pred = bellman_ford(g.adj, g.weight, 0)
    assert dist.tolist() == [0.0, 0.5, np.inf] and pred.tolist() == [0, 0, -1]
    value, _, cut = edmonds_karp(g.adj, g.weight, 0, 2)
    assert value == 0.0 and cut.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="source and sink"):
        edmonds_karp(g.adj, g.weight, 1, 1)
    with pytest.raises(ValueError, match="n must be"):
        er_graph(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="keep"):
        grid_graph(3, 3, np.random.default_rng(0), keep=2.0)
    with pytest.raises(ValueError, match="family"):
        make_graph("tree", 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="graphs"):
        algorithm_batch(
            [er_graph(4, np.random.default_rng(0)), er_graph(5, np.random.default_rng(0))]
        )


def test_grid_and_batch_shapes():
    rng = np.random.default_rng(1)
    g = grid_graph(4, 5, rng)
    assert g.num_nodes == 20 and bfs_reach(g.adj, g.source)[g.sink]
    b = random_batch("er", 10, 3, rng, flow=True)
    assert b["adj"].shape == (3, 10, 10) and b["dist"].shape == (3, 10)
    assert b["flow_value"].shape == (3,) and b["cut"].dtype == torch.float32
    assert (b["dist"][b["reach"] == 0] == 0).all()


# --- processor ----------------------------------------------------------------------------


def _inputs(b=2, n=6, d=4, f=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    adj = torch.rand(b, n, n, generator=gen) < 0.3
    adj[:, :, 0] = False  # node 0 has no in-neighbour
    return torch.randn(b, n, d, generator=gen), torch.randn(b, n, n, f, generator=gen), adj


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_aggregate_matches_a_loop_over_neighbours(how):
    h, _, adj = _inputs()
    msgs = torch.randn(2, 6, 6, 4)
    out = aggregate(msgs, adj, how, temperature=0.5)
    for b, v in itertools.product(range(2), range(6)):
        src = adj[b, :, v].nonzero().flatten()
        if len(src) == 0:
            expect = torch.zeros(4)
        else:
            m = msgs[b, src, v]
            expect = {
                "sum": m.sum(0),
                "mean": m.mean(0),
                "max": m.max(0).values,
                "minplus": m.min(0).values,
                "softminplus": -0.5 * torch.logsumexp(-m / 0.5, 0),
            }[how]
        torch.testing.assert_close(out[b, v], expect)


@pytest.mark.parametrize("how", AGGREGATIONS)
@pytest.mark.parametrize("self_loops", [True, False])
def test_masking_is_exact_and_gradients_finite(how, self_loops):
    h, e, adj = _inputs()
    h.requires_grad_(True)
    e.requires_grad_(True)
    layer = MessagePassing(4, 2, how, self_loops=self_loops)
    layer(h, e, adj).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(e.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    # non-edges get no gradient: perturbing their features changes nothing
    mask = adj | torch.eye(6, dtype=torch.bool) if self_loops else adj
    assert (e.grad[~mask] == 0).all()
    e2 = e.detach().clone()
    e2[~mask] += 100.0
    torch.testing.assert_close(layer(h, e2, adj), layer(h, e.detach(), adj))


def _bellman_ford_layer():
    """MessagePassing('minplus') with weights set so that channel 0 carries d_v and one step
    is d_v <- min(d_v, min_u d_u + w_uv); the other channels stay 0."""
    layer = MessagePassing(2, 2, "minplus")
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.msg_src.weight[0, 0] = 1.0  # hidden_0 = relu(h_u,0) = d_u (d >= 0)
        layer.msg_out.weight[0, 0] = 1.0  # m_uv,0 = d_u
        layer.edge_term.weight[0, 0] = 1.0  # + w_uv (edge feature 0; self-loops carry 0)
        layer.update.weight[0, 2] = 1.0  # h'_v,0 = relu(a_v,0) = a_v,0
        # channel 1 of the message is 0 on edges; its min is 0: keep channel 1 at 0
    return layer


@settings(max_examples=30, deadline=None)
@given(graph_seeds)
def test_minplus_layer_with_hand_set_weights_runs_bellman_ford(spec):
    g = _graph(spec)
    big = 1e6  # "infinity" for unreached nodes: d_u + w_uv > big never wins the min
    batch = algorithm_batch([g])
    n = g.num_nodes
    layer = _bellman_ford_layer().double()
    d = torch.full((1, n), big, dtype=torch.float64)
    d[0, g.source] = 0.0
    h = torch.stack([d, torch.zeros_like(d)], -1)
    w64 = torch.from_numpy(g.weight)[None]  # float64, as the numpy oracle
    e = torch.stack([w64, torch.zeros_like(w64)], -1)
    dist_np = np.full(n, np.inf)
    dist_np[g.source] = 0.0
    w = np.where(g.adj, g.weight, np.inf)
    for _ in range(max(1, n - 1)):
        h = layer(h, e, batch["adj"])
        dist_np = np.minimum(dist_np, (dist_np[:, None] + w).min(0))  # one relaxation
        expect = np.where(np.isfinite(dist_np), dist_np, big)
        np.testing.assert_allclose(h[0, :, 0].detach().numpy(), expect, rtol=1e-12)
    exact, _ = bellman_ford(g.adj, g.weight, g.source)
    np.testing.assert_allclose(
        h[0, :, 0].detach().numpy(), np.where(np.isfinite(exact), exact, big)
    )


def test_processor_bad_input():
    with pytest.raises(ValueError, match="aggregation"):
        MessagePassing(4, 2, "median")
    h, e, adj = _inputs()
    with pytest.raises(ValueError, match="adj"):
        MessagePassing(4, 2)(h, e, adj[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        aggregate(torch.zeros(1, 2, 2, 1), torch.ones(1, 2, 2), "softminplus", temperature=0)


def test_softminplus_tends_to_minplus():
    msgs, mask = torch.randn(2, 5, 5, 3), torch.rand(2, 5, 5) < 0.5
    hard = aggregate(msgs, mask, "minplus")
    soft = aggregate(msgs, mask, "softminplus", temperature=1e-4)
    torch.testing.assert_close(soft, hard, atol=1e-3, rtol=0)


# --- model --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_model_outputs_loss_and_metrics(how):
    batch = random_batch("er", 8, 3, np.random.default_rng(0), flow=True)
    model = NARModel(NARConfig(hidden=8, aggregation=how, tasks=("dist", "reach", "flow", "cut")))
    out = model(batch)
    assert out["dist"].shape == (3, 8) and out["flow"].shape == (3,)
    loss = nar_loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    m = nar_metrics(out, batch)
    assert set(m) == {"dist_rel_mae", "reach_acc", "cut_acc", "cut_ratio", "flow_rel_err"}
    assert m["cut_ratio"] >= 1 - 1e-6  # any s-t cut is at least the min cut
    assert model.num_steps(8) == 8 and model.num_steps(64) == 64


def test_true_cut_has_ratio_one_and_config_errors():
    batch = random_batch("er", 8, 4, np.random.default_rng(2), flow=True)
    torch.testing.assert_close(cut_capacity(batch["cut"].bool(), batch), batch["flow_value"])
    with pytest.raises(ValueError, match="tasks"):
        NARConfig(tasks=("sort",))
    with pytest.raises(ValueError, match="aggregation"):
        NARConfig(aggregation="median")


def test_smoke_experiment_runs(tmp_path):
    result = experiments.get("nar-tropical").run("smoke", seed=0, out_dir=tmp_path)
    assert "minplus" in result["table"] and "joint" in result["table"]
    assert (tmp_path / "metrics.json").exists()
