"""Edge attribution patching: exact on a linearised model (against edge-by-edge patching), and
recovery of the planted circuit. The one-pass gradients against the per-receiver reference, on
every family: tests/test_eap_families.py."""

import numpy as np
import pandas as pd
import pytest

from factfind.edges.eap import eap, eap_ig, edge_attribution, to_graph
from factfind.edges.edge_patching import edge_patching
from factfind.graph import prune
from factfind.testing.models import linearised_model, same_length_pairs


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama"])
def linear(request, facts):
    """A linearised model (llama: grouped-query attention, RMSNorm) and same-length pairs."""
    model = linearised_model(request.param)
    return model, same_length_pairs(model, facts)


def test_eap_equals_edge_patching_on_a_linear_model(linear):
    model, pairs = linear
    df = eap(model, pairs)
    assert df["sender"].str.startswith("embed@").any() and (df["receiver"] == "logits@final").any()
    assert not df.duplicated(["sender", "receiver"]).any() and len(df) > 400
    # every edge into the logits and into the last layer's heads at the final token, the 30
    # largest and 40 more at random: batched edge-by-edge patching
    last = f"L{model.n_layers - 1}."
    rcv = df["receiver"]
    into = rcv.eq("logits@final") | (rcv.str.startswith(last) & rcv.str.endswith("@final"))
    sample = pd.concat([df[into], df.reindex(df["effect"].abs().sort_values().index[-30:]),
                        df[~into].sample(40, random_state=0)])
    sample = sample.drop_duplicates(["sender", "receiver"])
    fast = edge_patching(model, pairs, list(zip(sample["sender"], sample["receiver"], strict=True)))
    assert np.abs(fast["effect"]).max() > 1e-2 and (np.abs(fast["effect"]) > 1e-3).sum() > 20
    np.testing.assert_allclose(sample["effect"], fast["effect"], atol=1e-5, rtol=0)
    # the slow reference (literal freeze-everything path patching, one edge at a time)
    few = sample.reindex(sample["effect"].abs().sort_values().index[-5:])
    slow = edge_patching(model, pairs, list(zip(few["sender"], few["receiver"], strict=True)),
                         reference=True)
    np.testing.assert_allclose(few["effect"], slow["effect"], atol=1e-5, rtol=0)


def test_eap_ig_and_neurons_on_a_linear_model(linear):
    model, pairs = linear
    base = eap(model, pairs)
    ig = eap_ig(model, pairs, steps=2)
    assert (ig["method"] == "eap-ig/2").all()
    np.testing.assert_allclose(base["effect"], ig["effect"], atol=1e-8)  # constant gradients
    nd = edge_attribution(model, pairs, neurons=True, copies=512)
    rcv = nd["receiver"]
    assert rcv.str.contains(r"\.n\d+@").any() and not rcv.str.contains("mlp").any()
    top = nd.reindex(nd["effect"].abs().sort_values().index[-4:])
    top = pd.concat([top, nd[nd["sender"].str.contains(r"\.n")].head(3)])
    exact = edge_patching(model, pairs, list(zip(top["sender"], top["receiver"], strict=True)))
    assert np.abs(exact["effect"]).max() > 1e-3
    np.testing.assert_allclose(top["effect"], exact["effect"], atol=1e-5, rtol=0)


def test_node_scores_sum_the_outgoing_edges(linear):
    """Summed over a node's outgoing edges, EAP is attribution patching of the node: for the
    embeddings of a linear model, exactly the activation-patching effect of the input."""
    model, pairs = linear
    df = eap(model, pairs)
    graph = to_graph(df, model, pairs)
    assert graph.provenance.method == "eap" and graph.provenance.dataset == pairs.fingerprint()
    embeds = [n for n in graph.graph if n.startswith("embed@")]
    total = sum(graph.graph.nodes[n]["score"] for n in embeds)
    pb_clean = model.run(model.tokenize(list(pairs.clean))).logits
    pb_bad = model.run(model.tokenize(list(pairs.corrupt))).logits
    ids = model.tokenize(list(pairs.clean)).attribute_ids
    wrong = model.tokenize(list(pairs.corrupt)).attribute_ids
    diff = lambda lg: (lg.gather(1, ids[:, None]) - lg.gather(1, wrong[:, None]))[:, 0]
    assert total == pytest.approx(float((diff(pb_bad) - diff(pb_clean)).mean()), abs=1e-6)


@pytest.mark.parametrize("steps", [0, 3])
def test_eap_recovers_the_planted_circuit(planted, steps):
    model, _, pairs, truth = planted
    df = edge_attribution(model, pairs, steps=steps)
    graph = to_graph(df, model, pairs)
    top = df["effect"].abs().max()
    circuit = prune(graph, threshold=0.01 * top)
    assert truth.precision_recall(circuit.graph.nodes) == (1.0, 1.0)
    assert set(circuit.graph.edges) == set(truth.edges)
    # everything off the planted path scores (numerically) zero
    off = df[~df.apply(lambda r: (r["sender"], r["receiver"]) in truth.edges, axis=1)]
    assert off["effect"].abs().max() < 1e-6 * top
    by_top = prune(graph, top_n=len(truth.edges))
    assert set(by_top.graph.edges) == set(truth.edges)


def test_eap_ig_with_one_step_is_eap(planted):
    model, _, pairs, _ = planted
    a, b = eap(model, pairs[:6]), eap_ig(model, pairs[:6], steps=1)
    assert np.abs(a["effect"]).max() > 1
    np.testing.assert_allclose(a["effect"], b["effect"], atol=1e-9)


def test_eap_recovers_the_planted_neurons(planted):
    model, _, pairs, truth = planted
    df = eap(model, pairs, neurons=True, copies=256)
    circuit = prune(to_graph(df, model, pairs), threshold=1e-3 * df["effect"].abs().max())
    assert truth.precision_recall(circuit.graph.nodes, neurons=True) == (1.0, 1.0)


def test_bad_options(planted):
    model, _, pairs, _ = planted
    with pytest.raises(ValueError, match="steps"):
        eap_ig(model, pairs, steps=0)
    with pytest.raises(ValueError, match="steps"):
        edge_attribution(model, pairs, steps=-1)
