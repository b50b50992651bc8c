"""Every discovery method recovers the planted circuit exactly, on both architectures.

The planted models (:mod:`factfind.testing.planted`) compute every answer through three components:
a previous-token head ``L0.h0@subject_last`` that joins the two-token subject, 16 lookup neurons
(one AND per subject) in ``L1.mlp@subject_last``, and an extraction head ``L2.h0@final``. The
rest is inert or a distractor that changes between clean and corrupt prompts but is read by
nothing. So the truth is known before any method runs.

Each method below reports a score for *every* unit it considers (a head or MLP at a role, a
neuron, a head's query/key/value, an attention edge from the final token, a graph edge), and
the planted truth is translated into that method's units (:class:`Case`). The suite asserts

* **exact recovery**: the units whose ``|score|`` exceeds ``1e-5 * max |score|`` are exactly
  the planted ones (precision = recall = 1);
* **non-zero effects**: every planted unit scores at least ``1e-2 * max |score|`` (a method that
  scored everything zero, or found only the largest unit, fails);
* and, for the methods that build a :class:`~factfind.graph.CircuitGraph`, that the pruned
  graph holds exactly the planted nodes (and, where edges are measured, the planted edges).

What each method can see follows from how it intervenes, and the truth says so:

* activation patching, AtP, AtP*, exact node patching: every planted node, each lookup neuron,
  and the planted heads' *values* at the token they read (their queries and keys do not differ
  between clean and corrupt prompts, so they carry nothing: zero);
* causal tracing with symmetric token replacement (one window layer): the MLP and attention
  *layers* of the planted nodes, at their tokens;
* attention knockout blocks edges *from the final token* only: it finds the extraction layer
  reading the subject's last token, not the previous-token head (which reads at the subject);
* DLA and direct path patching into the logits: only the extraction head writes the answer;
* edge attribution (EAP, EAP-IG) and edge patching of every edge: the five planted edges.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

from factfind.attribute.atp import atp, atp_star
from factfind.attribute.exact import exact_patching
from factfind.attribute.verification import missed_effect_bound, verify
from factfind.edges.eap import eap, eap_ig, to_graph
from factfind.edges.edge_patching import edge_patching, path_patching_circuit
from factfind.graph import CircuitGraph, Provenance, prune, prune_nodes
from factfind.localize.dla import direct_logit_attribution
from factfind.localize.knockout import attention_knockout
from factfind.localize.patching import activation_patching
from factfind.localize.tracing import causal_tracing

ROLES = ["subject_first", "subject_last", "relation", "final"]
NODES = ["neurons", "mlp_out", "head_out", "q", "k", "v"]  # AtP / exact node set
FOUND, FLOOR = 1e-5, 1e-2  # |score| relative to the largest: found above, planted at least


@dataclass(frozen=True)
class Case:
    """A method's scores over all its units, and the planted truth in those units."""

    scores: pd.Series  # index: unit id
    truth: frozenset[str]


def unit(component: Any, layer: Any, head: Any = None, neuron: Any = None,
         role: Any = "final") -> str:
    """A unit id in the circuit graph's naming (``L1.h0@final``, ``L1.mlp@final``, ``L1.n3@…``),
    extended with ``L1.h0.v@…`` for a head's query, key or value and ``L1.attn@…``."""
    c, r = str(component), str(role)
    if c in ("head_out", "z"):
        return f"L{layer}.h{int(head)}@{r}"
    if c in ("q", "k", "v"):
        return f"L{layer}.h{int(head)}.{c}@{r}"
    if c == "neurons":
        return f"L{layer}.n{int(neuron)}@{r}"
    return f"L{layer}.{ {'mlp_out': 'mlp', 'attn_out': 'attn'}[c]}@{r}"


def _by_unit(df: pd.DataFrame, col: str = "effect") -> pd.Series:
    """Mean ``col`` per unit over prompts (one row per unit if already aggregated)."""
    none = [None] * len(df)
    heads = df["head"].tolist() if "head" in df.columns else none
    neurons = df["neuron"].tolist() if "neuron" in df.columns else none
    ids = [unit(c, lay, h, n, r) for c, lay, h, n, r in zip(
        df["component"], df["layer"], heads, neurons, df["role"], strict=True)]
    return cast(pd.Series, pd.Series(df[col].to_numpy(dtype=float), index=ids)
                .groupby(level=0).mean())


def _layer_of(node: str) -> str:
    """``L0.h0@subject_last`` -> ``L0.attn@subject_last`` (heads to their attention layer)."""
    name, role = node.split("@")
    layer, what = name.split(".")
    return f"{layer}.{'attn' if what.startswith('h') else what}@{role}"


def _values(truth) -> frozenset[str]:
    """Each planted head's value input at the token it reads (the role its in-edges leave)."""
    return frozenset(f"{dst.split('@')[0]}.v@{src.split('@')[1]}" for src, dst in truth.edges
                     if ".h" in dst)


def _node_truth(truth) -> frozenset[str]:
    return truth.nodes | truth.neurons | _values(truth)


def _largest(values: Any) -> float:
    return float(np.abs(values.to_numpy(dtype=float)).max())


def _edge_ids(df: pd.DataFrame) -> list[str]:
    return [f"{s}->{d}" for s, d in zip(df["sender"], df["receiver"], strict=True)]


def _edge_truth(truth) -> frozenset[str]:
    return frozenset(f"{s}->{d}" for s, d in truth.edges)


# ----------------------------------------------------------------------------- the methods


def _patching(direction: str) -> Callable:
    def run(p) -> Case:
        df = activation_patching(p.model, p.pairs, components=["z", "attn_out", "mlp_out"],
                                 positions=ROLES, direction=direction, progress=False)
        heads = {_layer_of(n) for n in p.truth.nodes}
        return Case(_by_unit(df), p.truth.nodes | heads)
    return run


def _tracing(p) -> Case:
    df = causal_tracing(p.model, p.pairs, kinds=("mlp", "attn"), corruption="str", window=1,
                        progress=False)
    return Case(_by_unit(df), frozenset(_layer_of(n) for n in p.truth.nodes))


def _knockout(p) -> Case:
    df = attention_knockout(p.model, p.facts, sources=ROLES, progress=False)
    agg = cast(pd.DataFrame, df.groupby(["layer", "role"], as_index=False)["effect"].mean())
    scores = pd.Series(agg["effect"].to_numpy(), index=[
        f"L{layer}.attn@final<-{role}" for layer, role in zip(agg["layer"], agg["role"],
                                                               strict=True)])
    # the planted head at the final token, and the role it reads
    reads = {dst: src for src, dst in p.truth.edges}
    truth = {f"{_layer_of(n).split('@')[0]}@final<-{reads[n].split('@')[1]}"
             for n in p.truth.nodes if n.endswith("@final")}
    return Case(scores, frozenset(truth))


def _atp(p) -> Case:
    return Case(_by_unit(atp(p.model, p.pairs, components=NODES, positions=ROLES)),
                _node_truth(p.truth))


def _atp_star(p) -> Case:
    est = atp_star(p.model, p.pairs, components=NODES, positions=ROLES)
    return Case(_by_unit(est, "score"), _node_truth(p.truth))


def _atp_star_verified(p) -> Case:
    """AtP* candidates patched exactly until the stopping rule; the rest bounded by subsets."""
    est = atp_star(p.model, p.pairs, components=NODES, positions=ROLES)
    ver = verify(p.model, p.pairs, est, patience=16)
    bound = missed_effect_bound(p.model, p.pairs, ver)
    assert ver.stopped == "patience" and bool(bound.nodes["bound"].notna().all())
    scores = pd.concat([_by_unit(ver.frame), _by_unit(bound.nodes, "bound")])
    assert not scores.index.duplicated().any() and len(scores) == len(est)
    return Case(scores, _node_truth(p.truth))


def _exact(p) -> Case:
    df = exact_patching(p.model, p.pairs, components=NODES, positions=ROLES)
    return Case(_by_unit(df), _node_truth(p.truth))


def _dla(p) -> Case:
    df = direct_logit_attribution(p.model, p.pairs, neurons=False, sources=False)
    df = cast(pd.DataFrame, df[df["component"].isin(["head_out", "mlp_out"])])
    direct = {src for src, dst in p.truth.edges if dst.startswith("logits@")}
    return Case(_by_unit(df), frozenset(direct))


def _edge_patching(p) -> Case:
    """Exact edge patching (EAP's exact reference) of every edge into or out of a planted node
    or into the logits, and 150 more of the full graph's edges at random."""
    edges = eap(p.model, p.pairs)
    touch = [*p.truth.nodes, "logits@final"]
    near = edges["sender"].isin(touch) | edges["receiver"].isin(touch)
    edges = pd.concat([edges[near], edges[~near].sample(150, random_state=0)])
    df = edge_patching(p.model, p.pairs, list(zip(edges["sender"], edges["receiver"], strict=True)))
    return Case(pd.Series(df["effect"].to_numpy(), index=_edge_ids(df)), _edge_truth(p.truth))


def _eap(steps: int) -> Callable:
    def run(p) -> Case:
        df = eap(p.model, p.pairs) if steps == 0 else eap_ig(p.model, p.pairs, steps=steps)
        return Case(pd.Series(df["effect"].to_numpy(), index=_edge_ids(df)), _edge_truth(p.truth))
    return run


METHODS: dict[str, Callable] = {
    "activation_patching/noise": _patching("noise"),
    "activation_patching/denoise": _patching("denoise"),
    "causal_tracing/str": _tracing,
    "attention_knockout": _knockout,
    "atp": _atp,
    "atp*": _atp_star,
    "atp*/verified": _atp_star_verified,
    "exact_patching": _exact,
    "dla": _dla,
    "edge_patching": _edge_patching,
    "eap": _eap(0),
    "eap-ig": _eap(3),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_recovers_exactly_the_planted_units(planted, method):
    case = METHODS[method](planted)
    size = case.scores.abs()
    top = float(size.max())
    assert top > 1e-2, f"{method}: every score is (near) zero"
    assert case.truth <= set(size.index), f"{method}: planted units not scored: " \
        f"{sorted(case.truth - set(size.index))}"
    found = set(size.index[size > FOUND * top])
    assert found == case.truth, (f"{method}: missed {sorted(case.truth - found)}, "
                                 f"spurious {sorted(found - case.truth)}")
    assert size[list(case.truth)].min() >= FLOOR * top, f"{method}: a planted unit is ~zero"
    inert = size.drop(list(case.truth))
    assert len(inert) >= len(case.truth), f"{method}: too few inert units to test against"
    if method != "attention_knockout":  # knockout is relative to p_clean; inert = exactly 0
        assert inert.max() <= FOUND * top


def test_node_precision_recall_of_the_node_methods(planted):
    """The same recovery in :class:`~factfind.testing.planted.PlantedCircuit`'s own terms."""
    case = _exact(planted)
    found = set(case.scores.index[case.scores.abs() > FOUND * case.scores.abs().max()])
    heads_mlps = {n for n in found if ".n" not in n and n.count(".") == 1}
    neurons = {n for n in found if ".n" in n} | {n for n in heads_mlps if ".h" in n}
    assert planted.truth.precision_recall(heads_mlps) == (1.0, 1.0)
    assert planted.truth.precision_recall(neurons, neurons=True) == (1.0, 1.0)


# ----------------------------------------------------------------------------- pruned graphs


def _node_graph(p, df: pd.DataFrame, method: str) -> CircuitGraph:
    """A node-scored graph of an aggregated frame, pruned to the nodes above the tolerance."""
    agg = cast(pd.DataFrame, df.groupby(["component", "layer", "head", "role"], dropna=False,
                                        as_index=False)["effect"].mean())
    agg["neuron"] = None
    graph = CircuitGraph.from_node_scores(agg, Provenance(p.model.name, p.model.revision,
                                                          p.pairs.fingerprint(), method),
                                          n_layers=p.model.n_layers,
                                          parallel=p.model.spec.name == "gpt_neox")
    return prune_nodes(graph, threshold=FOUND * _largest(agg["effect"]))


def _graph_patching(p) -> tuple[CircuitGraph, bool]:
    df = activation_patching(p.model, p.pairs, components=["z", "mlp_out"], positions=ROLES,
                             progress=False)
    return _node_graph(p, df, "activation_patching"), False


def _graph_verified(p) -> tuple[CircuitGraph, bool]:
    est = atp_star(p.model, p.pairs, components=["mlp_out", "head_out"], positions=ROLES)
    ver = verify(p.model, p.pairs, est, patience=8)
    return _node_graph(p, ver.frame, "atp*"), False


def _graph_eap(steps: int) -> Callable:
    def run(p) -> tuple[CircuitGraph, bool]:
        df = eap(p.model, p.pairs) if steps == 0 else eap_ig(p.model, p.pairs, steps=steps)
        graph = to_graph(df, p.model, p.pairs)
        return prune(graph, threshold=FOUND * _largest(df["effect"])), True
    return run


def _graph_path_patching(p) -> tuple[CircuitGraph, bool]:
    return path_patching_circuit(p.model, p.pairs, threshold=0.01), True


GRAPHS: dict[str, Callable] = {
    "activation_patching": _graph_patching,
    "atp*/verified": _graph_verified,
    "eap": _graph_eap(0),
    "eap-ig": _graph_eap(3),
    "path_patching": _graph_path_patching,
}


@pytest.mark.parametrize("method", list(GRAPHS))
def test_pruned_graph_is_the_planted_circuit(planted, method):
    graph, measured_edges = GRAPHS[method](planted)
    assert planted.truth.precision_recall(graph.graph.nodes) == (1.0, 1.0)
    scores = np.array([graph.graph.nodes[n]["score"] for n in planted.truth.nodes])
    if measured_edges:
        assert set(graph.graph.edges) == set(planted.truth.edges)
        scores = np.array([graph.graph.edges[e]["score"] for e in planted.truth.edges])
    assert (np.abs(scores) > 0.1).all(), "every planted node (edge) has a sizeable score"


def test_noise_tracing_sees_the_lookup_and_the_extraction_but_not_the_join(planted):
    """ROME's Gaussian-noise corruption noises *both* subject tokens, so restoring one state
    restores a planted effect only where that state alone carries the subject: the lookup MLP's
    output at the last subject token and the extraction layer's at the final token. The
    previous-token head's output is one input of an AND whose other input (the last name)
    stays noised, so its restoration does (almost) nothing - a known blind spot of single-state
    restoration that the symmetric-token-replacement run above does not have."""
    model, facts = planted.model, planted.facts
    df = causal_tracing(model, facts, kinds=("mlp", "attn"), window=1, samples=3,
                        progress=False)
    ie: dict[str, float] = _by_unit(df).to_dict()
    lookup, extract = "L1.mlp@subject_last", "L2.attn@final"
    assert ie.pop(lookup) > 0.3 and ie.pop(extract) > 0.5
    assert max(abs(v) for v in ie.values()) < 0.05
