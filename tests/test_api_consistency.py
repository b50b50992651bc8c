"""One concept, one name and one shape across the public analyses (#17).

* every analysis that shows a progress bar shows it by default (``progress=True``);
* every analysis of clean/corrupt pairs that measures a metric takes ``metric=`` (a
  :data:`factfind.types.Metric`), uses it on its fast path and on its slow reference alike,
  and refuses one that is not a function or returns the wrong shape;
* edge results (EAP, EAP-IG, edge patching) share :data:`factfind.types.EDGE_RESULT_COLUMNS`.
"""

import inspect

import numpy as np
import pytest
import torch

import factfind as ff
from factfind.attribute.exact import exact_patching_reference, patch_node_sets
from factfind.errors import ArgumentError
from factfind.localize.patching import PatchSite, activation_patching_reference
from factfind.metrics import logit_diff, prob_correct
from factfind.types import EDGE_RESULT_COLUMNS, Component, Role

#: the analyses of clean/corrupt pairs whose result is a change in a metric of the logits
METRIC_ANALYSES = (
    "activation_patching", "estimate", "exact_patching", "verify", "missed_effect_bound",
    "subspace_patching", "path_patching_sweep", "edge_patching", "edge_attribution",
    "path_patching_circuit", "evaluate_circuits",
)
#: measure what their paper defines (ROME's probability, Geva et al.'s relative probability
#: change, the direct logit attribution), so they take no metric
PAPER_METRICS = ("causal_tracing", "attention_knockout", "direct_logit_attribution")


def _analyses():
    for name in sorted(ff.__all__):
        obj = getattr(ff, name)
        if inspect.isfunction(obj):
            params = inspect.signature(inspect.unwrap(obj)).parameters
            if next(iter(params), None) == "model":
                yield name, params


def test_progress_is_on_by_default_wherever_there_is_a_bar():
    found = {name: p["progress"].default for name, p in _analyses() if "progress" in p}
    assert len(found) >= 12, found
    assert {name for name, default in found.items() if default is not True} == set()


def test_every_metric_analysis_takes_metric():
    params = dict(_analyses())
    for name in METRIC_ANALYSES:
        assert "metric" in params[name], f"{name} takes no metric="
        assert params[name]["metric"].default is None, name
    for name in PAPER_METRICS:
        assert "metric" not in params[name], name


def _double(logits, correct, wrong):
    return 2.0 * logit_diff(logits, correct, wrong)


def test_activation_patching_metric_fast_equals_reference(gpt2_model, pairs):
    pairs = pairs[:4]
    kw = dict(components=["resid_pre", "mlp_out"], positions=["subject_last", "final"],
              metric=prob_correct)
    fast = ff.activation_patching(gpt2_model, pairs, progress=False, **kw)
    slow = activation_patching_reference(gpt2_model, pairs, **kw)
    assert np.abs(fast["metric"] - fast["clean"]).max() > 1e-4  # patches move the probability
    assert (fast["clean"].between(0, 1)).all()  # a probability, not a logit difference
    np.testing.assert_allclose(fast["metric"], slow["metric"], atol=1e-6, rtol=1e-5)
    default = ff.activation_patching(gpt2_model, pairs, progress=False,
                                     **{**kw, "metric": None})
    assert not np.allclose(default["metric"], fast["metric"])


def test_exact_patching_metric_fast_equals_reference(family_model, facts):
    pairs = facts.corrupt(family_model, seed=0, on_missing="skip")[:4]
    sets = [[PatchSite(Component.MLP_OUT, 0, Role.SUBJECT_LAST)],
            [PatchSite(Component.Z, 1, Role.FINAL, head=0)],
            [PatchSite(Component.Q, 1, Role.FINAL, head=1)]]
    fast = patch_node_sets(family_model, pairs, sets, per_prompt=True, metric=prob_correct,
                           progress=False)
    slow = exact_patching_reference(family_model, pairs, sets, metric=prob_correct)
    assert slow.nan_to_num().abs().max() > 1e-5
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-4, equal_nan=True)


def test_atp_uses_the_metric(gpt2_model, pairs):
    kw = dict(components=["mlp_out"], positions=["subject_last", "final"], progress=False)
    one = ff.estimate(gpt2_model, pairs, **kw).frame["effect"].to_numpy()
    two = ff.estimate(gpt2_model, pairs, metric=_double, **kw).frame["effect"].to_numpy()
    assert np.abs(one).max() > 1e-3
    np.testing.assert_allclose(two, 2 * one, rtol=1e-5, atol=1e-7)


def test_a_bad_metric_is_a_typed_error(gpt2_model, pairs):
    with pytest.raises(ArgumentError, match="metric must be a function"):
        ff.activation_patching(gpt2_model, pairs, metric="prob", progress=False)
    with pytest.raises(ArgumentError, match="one number per row"):
        ff.activation_patching(gpt2_model, pairs[:2], components=["mlp_out"], layers=[0],
                               metric=lambda lg, c, w: lg.sum(), progress=False)


def test_edge_results_share_one_shape(gpt2_model, pairs):
    eap = ff.edge_attribution(gpt2_model, pairs[:2], progress=False)
    exact = ff.edge_patching(gpt2_model, pairs[:2], list(zip(eap["sender"][:3],
                                                             eap["receiver"][:3], strict=True)),
                             progress=False)
    assert tuple(eap.columns) == tuple(exact.columns) == EDGE_RESULT_COLUMNS


def test_one_builder_for_node_and_edge_results(gpt2_model, pairs):
    """``to_graph`` builds the graph of a node result (per prompt: averaged per node) and of
    an edge result, with the model's and the pairs' provenance."""
    kw = dict(components=["mlp_out", "attn_out"], positions=["subject_last", "final"],
              progress=False)
    per_prompt = ff.activation_patching(gpt2_model, pairs, **kw)
    g = ff.to_graph(per_prompt, gpt2_model, pairs)
    means = per_prompt.groupby(["component", "layer", "role"])["effect"].mean()
    assert g.graph.nodes["L1.mlp@final"]["score"] == pytest.approx(
        means[("mlp_out", 1, "final")], abs=1e-12)
    assert np.abs(means).max() > 1e-3
    assert g.provenance.dataset == pairs.fingerprint()
    assert g.provenance.method == "activation_patching/denoise"
    assert ff.to_graph(ff.aggregate(per_prompt), gpt2_model, pairs).nodes_frame().equals(
        g.nodes_frame())
    edges = ff.edge_attribution(gpt2_model, pairs[:2], progress=False)
    eg = ff.to_graph(edges, gpt2_model, pairs[:2])
    assert eg.graph.number_of_edges() == len(edges)
    assert ff.prune(eg, top_n=5).graph.number_of_edges() <= 5
    assert len(ff.prune_nodes(g, top_n=2)) <= 2 + 3  # + the embed and logits endpoints


def test_to_graph_refuses_what_is_not_a_graph(gpt2_model, pairs):
    at_positions = ff.activation_patching(gpt2_model, pairs[:2], components=["mlp_out"],
                                          positions=[0, -1], progress=False)
    with pytest.raises(ArgumentError, match="position roles"):
        ff.to_graph(at_positions, gpt2_model, pairs)
    with pytest.raises(ArgumentError, match=r"edge result.*or a node result"):
        ff.to_graph(at_positions[["prompt", "effect"]], gpt2_model, pairs)
    with pytest.raises(ArgumentError, match="result frame"):
        ff.to_graph({"sender": []}, gpt2_model, pairs)  # type: ignore[arg-type]
