"""How good a circuit is: faithfulness, completeness, minimality and the faithfulness curve.

With ``m`` the mean metric over prompts, every node outside ``C`` ablated for ``m(C)``
(:mod:`factfind.evaluate.engine`), ``m(M)`` the full model and ``m(∅)`` everything ablated:

* **faithfulness** ``F(C) = (m(C) - m(∅)) / (m(M) - m(∅))`` (Wang et al. 2022; Hanna et al.
  2024). 1 = the circuit alone does what the model does.
* **completeness** ``(m(M) - m(M∖C)) / (m(M) - m(∅))``: the share of the behaviour lost when
  only the circuit is knocked out. 1 = nothing outside the circuit can do the task.
* **minimality** of a node ``v``: ``F(C) - F(C∖{v})``, how much faithfulness drops without it.
* **the faithfulness curve**: ``F`` of the top-``n`` nodes by score, against ``n``; a good
  ranking reaches high faithfulness with few nodes.

Example::

    truth = ["L0.h0@subject_last", "L1.mlp@subject_last", "L2.h0@final"]
    faithfulness(model, pairs, truth)                     # 1.0 on the planted model
    faithfulness_curve(model, pairs, eap_graph, sizes=[1, 2, 4, 8])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from factfind.edges.placement import all_nodes
from factfind.errors import ArgumentError
from factfind.evaluate.engine import (
    CircuitLike,
    _facts,
    circuit_nodes,
    evaluate_circuits,
    node_scores,
)
from factfind.graph import CircuitGraph, Node
from factfind.metrics import share
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.model import Model


@validated
def faithfulness(model: Model, data: FactPairs | FactDataset, circuit: CircuitLike, *,
                 how: str = "mean", **kwargs: Any) -> float:
    """``F(C) = (m(C) - m(∅)) / (m(M) - m(∅))``: the mean metric with every head and MLP
    outside the circuit ablated (``how="mean"`` or ``"resample"``, per role; embeddings are
    never ablated), relative to the full model ``M`` and to the empty circuit ``∅`` (every head
    and MLP ablated). Options as for :func:`evaluate_circuits`.

    Example::

        faithfulness(model, pairs, ["L2.h0@final", "L1.mlp@subject_last"], how="resample")
    """
    return float(evaluate_circuits(model, data, [circuit], how=how, **kwargs)
                 ["faithfulness"].iloc[0])


@validated
def completeness(model: Model, data: FactPairs | FactDataset, circuit: CircuitLike, *,
                 how: str = "mean", **kwargs: Any) -> float:
    """``(m(M) - m(M∖C)) / (m(M) - m(∅))``: the share of the behaviour lost when the circuit
    alone is knocked out (ablated) and everything else kept. Near 1: the rest of the model
    cannot do the task without the circuit; near 0: it can (the circuit is incomplete, or
    the behaviour is redundant)."""
    facts = _facts(data)
    batch = model.tokenize(list(facts[:64]))
    roles = batch.roles_present()
    inner = circuit_nodes(model, circuit, roles)
    # with single neurons in the circuit, keep the other neurons of their MLPs
    neurons = any(n.kind == "neuron" for n in inner)
    if neurons:  # an MLP node is all of its neurons
        inner |= {Node("neuron", n.layer, k, n.role) for n in inner if n.kind == "mlp"
                  for k in range(model.d_mlp)}
    rest = set(all_nodes(model, batch, neurons=neurons)) - inner
    df = evaluate_circuits(model, data, [sorted(rest)], how=how, **kwargs)
    r = df.iloc[0]
    return 1.0 - share(float(r["metric"]), float(r["empty"]), float(r["full"]),
                       what="completeness")


@validated
def minimality(model: Model, data: FactPairs | FactDataset, circuit: CircuitLike, *,
               how: str = "mean", **kwargs: Any) -> pd.DataFrame:
    """Per node ``v`` of the circuit: ``faithfulness_without`` = ``F(C∖{v})`` and ``drop`` =
    ``F(C) - F(C∖{v})`` (large = the node is needed), sorted by drop."""
    facts = _facts(data)
    roles = model.tokenize(list(facts[:64])).roles_present()
    nodes = sorted(circuit_nodes(model, circuit, roles))
    if not nodes:
        raise ArgumentError("the circuit has no inner nodes")
    sets = [nodes] + [[m for m in nodes if m != v] for v in nodes]
    df = evaluate_circuits(model, data, sets, how=how, **kwargs)
    f = df["faithfulness"].to_numpy()
    out = pd.DataFrame({"node": [v.id for v in nodes], "faithfulness": f[0],
                        "faithfulness_without": f[1:], "drop": f[0] - f[1:]})
    return out.sort_values("drop", ascending=False, kind="stable").reset_index(drop=True)


@validated
def faithfulness_curve(
    model: Model, data: FactPairs | FactDataset,
    scores: CircuitGraph | pd.DataFrame | Mapping[str, float], *,
    sizes: Sequence[int] | None = None, how: str = "mean", neurons: bool | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Faithfulness of the top-``n`` nodes by ``|score|`` for each ``n`` in ``sizes``.

    Args:
        scores: node scores (see :func:`node_scores`): a scored graph, an EAP edge frame, a
            node frame or a mapping id -> score.
        sizes: circuit sizes (default 1, 2, 4, ... up to every scored node).
        neurons: nodes are counted at neuron granularity (``fraction``'s denominator; see
            :func:`evaluate_circuits`, default: if any scored node is a neuron).

    Returns:
        A tidy frame: ``size`` (asked), ``n_nodes`` (in the circuit), ``fraction`` (of all nodes
        at the granularity), ``faithfulness``, ``metric``, ``full``, ``empty``, ``nodes``
        (the ids, ``;``-joined).
    """
    ranked = sorted(node_scores(scores).items(),
                    key=lambda kv: (-abs(kv[1]), Node.parse(kv[0], n_layers=model.n_layers)))
    if sizes is None:
        sizes, k = [], 1
        while k < len(ranked):
            sizes.append(k)
            k *= 2
        sizes.append(len(ranked))
    circuits = [[i for i, _ in ranked[:s]] for s in sizes]
    df = evaluate_circuits(model, data, circuits, how=how, neurons=neurons, **kwargs)
    df.insert(0, "size", list(sizes))
    df["nodes"] = [";".join(c) for c in circuits]
    first = ["size", "n_nodes", "fraction", "faithfulness"]
    return pd.DataFrame(df[first + [c for c in df.columns if c not in first and c != "circuit"]])


__all__ = ["completeness", "faithfulness", "faithfulness_curve", "minimality"]
