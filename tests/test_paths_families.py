"""proportion_explained's fast path equals its literal reference on every family (issue 25).

The fast path recomputes all of a layer's receivers in one stacked forward from the corrupt
stream plus their senders' changes (:func:`~factfind.edges.placement.set_changes`);
:func:`~factfind.evaluate.paths.proportion_explained_reference` runs one forward per receiver
with every upstream head's ``z``, MLP's neurons and the embeddings pinned (corrupt, but the
receiver's senders' units along ``H``) and lets the model compute the receiver itself. In
post-norm families (Gemma 2/3, OLMo 2, EXAONE 4) a sender set's change is not a sum of per-unit
writes at any frozen scale (the norm divides by the rms of the mix), which a per-unit fast path
gets wrong by several percent of the effect.

One tiny random model per family of :data:`~factfind.testing.models.FAMILIES` and
:data:`~factfind.testing.models.DERIVED_FAMILIES` (3 layers, every weight drawn), prompts
that start with the subject or follow a shared prefix (the fast path's copies resume past
it), and a random circuit of heads and MLPs at several roles, given both as a node set (the
edges it induces) and as a graph with a random half of those edges. For the node set the
proportion is also resample faithfulness (a node-level computation).
"""

import random

import numpy as np
import pytest
import torch

from factfind.testing.models import DERIVED_FAMILIES, FAMILIES, tiny_model

ALL_FAMILIES = FAMILIES + DERIVED_FAMILIES
# Gemma 2 and 3 with a 3-token sliding window that the prompts cross (resumed copies read the
# cached keys and values through it)
SLIDING = {f"{f}-window3": (f, {"sliding_window": 3}) for f in ("gemma2", "gemma3")}


@pytest.fixture(scope="module", params=["{} plays the sport of", "Fact: {} plays the sport of"])
def prompts(request):
    """Prompts that start with the subject (every position carries a change), and prompts
    after a shared prefix (the fast path's copies resume past it)."""
    from conftest_data import fact_records

    from factfind.data import from_records

    return from_records([{**r, "template": request.param} for r in fact_records()])


def _circuit(model, batch, seed):
    """A random circuit: heads and MLPs at every role present, about a third of all nodes,
    at least one head and one MLP at the final position."""
    from factfind.edges.placement import all_nodes

    rng = random.Random(seed)
    nodes = all_nodes(model, batch)
    picked = [n for n in nodes if rng.random() < 0.35]
    final = [n for n in nodes if n.role == "final" and n not in picked]
    picked += [rng.choice([n for n in final if n.kind == k]) for k in ("head", "mlp")
               if any(n.kind == k for n in final)]
    assert {n.kind for n in picked} == {"head", "mlp"} and len({n.role for n in picked}) > 2
    return sorted(picked)


def _graph(model, nodes, seed):
    """The graph the nodes induce (with the embeddings and the logits), half its edges kept
    (every edge into the logits stays, so that something reaches them)."""
    from factfind.edges.placement import is_parallel
    from factfind.graph import CircuitGraph, Node, Provenance, feeds

    roles = sorted({n.role for n in nodes})
    every = list(nodes) + [Node("embed", -1, None, r) for r in roles] + [
        Node("logits", model.n_layers, None, "final")]
    rng = random.Random(seed)
    g = CircuitGraph(Provenance("m", None, "d", "test"))
    for n in every:
        g.add_node(n, score=1.0)
    for u in every:
        for v in every:
            if feeds(u, v, is_parallel(model)) and (v.kind == "logits" or rng.random() < 0.5):
                g.add_edge(u, v, score=1.0)
    return g


@pytest.mark.parametrize("name", [*ALL_FAMILIES, *SLIDING])
def test_proportion_explained_fast_equals_reference(name, prompts):
    from factfind.data.batch import encode_pairs
    from factfind.evaluate import faithfulness
    from factfind.evaluate.paths import (
        _edge_patched_metric,
        _edge_patched_metric_reference,
        _edges,
        proportion_explained,
        proportion_explained_reference,
    )
    from factfind.metrics import logit_diff

    torch.manual_seed(0)
    family, overrides = SLIDING.get(name, (name, {}))
    model = tiny_model(family, n_layers=3, **overrides)
    pairs = prompts.corrupt(model, seed=0, on_missing="skip")[:4]
    pb = encode_pairs(model, pairs)
    nodes = _circuit(model, pb.clean, seed=1)
    m_k = logit_diff(model.run(pb.corrupt).logits, pb.correct, pb.wrong).double()
    m_c = logit_diff(model.run(pb.clean).logits, pb.correct, pb.wrong).double()
    for circuit in (nodes, _graph(model, nodes, seed=2)):
        edges = _edges(model, circuit, pb.clean.roles_present())
        args = (model, pb.clean, pb.corrupt, edges, pb.correct, pb.wrong, logit_diff)
        fast = _edge_patched_metric(*args).double()
        slow = _edge_patched_metric_reference(*args).double()
        # H moves the metric off the corrupt run and does not restore the clean one
        assert (slow - m_k).abs().max() > 1e-2 and (slow - m_c).abs().max() > 1e-2
        np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=1e-4, atol=1e-6)
        pe = proportion_explained(model, pairs, circuit)
        pe_ref = proportion_explained_reference(model, pairs, circuit)
        # (the per-prompt values above are the non-zero check: on a random model the mean
        # of four prompts' changes can nearly cancel)
        assert abs(pe_ref - 1) > 1e-3, pe_ref
        # float32 rounding of m(H) (~1e-6) divided by a small mean effect: an absolute bound
        assert pe == pytest.approx(pe_ref, rel=1e-4, abs=1e-5)
    # a node set's induced graph is node-level resample ablation: a third computation
    assert proportion_explained(model, pairs, nodes) == pytest.approx(
        faithfulness(model, pairs, nodes, how="resample"), rel=1e-4, abs=1e-5)
