"""Searching for a circuit by its faithfulness: forward selection and backward elimination.

Attribution rankings propose circuits cheaply; these searches optimise faithfulness
(:mod:`factfind.evaluate.measures`) directly, at the cost of evaluating every candidate at
every step (all candidates of a step are stacked in few forwards):

* :func:`greedy_circuit` (forward selection) starts from the empty circuit and adds the node
  that raises faithfulness most: an upper envelope for curves from attribution rankings.
* :func:`minimize_circuit` (backward elimination) starts from a circuit and drops the node
  whose removal keeps faithfulness highest, while it stays above a target. Unlike forward
  selection it keeps nodes that only matter together, like the two inputs of an AND.

Example::

    greedy_circuit(model, pairs, max_nodes=6, target=0.95)
    minimize_circuit(model, pairs, eap_circuit, target=0.9)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd

from factfind.edges.placement import all_nodes
from factfind.evaluate.engine import CircuitLike, _facts, circuit_nodes, evaluate_circuits
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.model import Model


@validated
def greedy_circuit(
    model: Model, data: FactPairs | FactDataset, *, candidates: Iterable[str] | None = None,
    max_nodes: int = 12, target: float | None = None, how: str = "resample",
    neurons: bool | None = None, **kwargs: Any,
) -> pd.DataFrame:
    """Forward selection: start from the empty circuit and add, one at a time, the node whose
    addition raises faithfulness most (every candidate is tried, stacked in few forwards).
    An upper envelope for curves from attribution rankings, at a cost of one evaluation of
    every candidate per step.

    Args:
        candidates: node ids to choose from (default every node at the granularity).
        max_nodes: stop after this many nodes; target: or once faithfulness reaches it.

    Returns:
        The curve as :func:`faithfulness_curve` returns it, plus ``added`` (the node chosen at
        each size).
    """
    facts = _facts(data)
    batch = model.tokenize(list(facts[:64]))
    pool = list(candidates) if candidates is not None else [
        n.id for n in all_nodes(model, batch, neurons=bool(neurons))]
    chosen: list[str] = []
    rows = []
    while pool and len(chosen) < max_nodes:
        df = evaluate_circuits(model, data, [[*chosen, c] for c in pool], how=how,
                               neurons=neurons, **kwargs)
        best = int(df["faithfulness"].to_numpy().argmax())
        chosen.append(pool.pop(best))
        row = df.iloc[best].to_dict()
        rows.append({"size": len(chosen), "n_nodes": row["n_nodes"], "fraction": row["fraction"],
                     "faithfulness": row["faithfulness"], "metric": row["metric"],
                     "full": row["full"], "empty": row["empty"], "n": row["n"], "how": how,
                     "added": chosen[-1], "nodes": ";".join(chosen)})
        if target is not None and row["faithfulness"] >= target:
            break
    return pd.DataFrame(rows)


@validated
def minimize_circuit(
    model: Model, data: FactPairs | FactDataset, circuit: CircuitLike, *,
    target: float = 0.9, how: str = "resample", **kwargs: Any,
) -> pd.DataFrame:
    """Backward elimination: from ``circuit``, repeatedly drop the node whose removal keeps
    faithfulness highest, while it stays at least ``target``. Unlike forward selection this
    keeps nodes that only matter together (an AND of two paths).

    Returns:
        One row per circuit visited, largest first (``removed``: the node dropped to reach it);
        the last row is the smallest circuit with faithfulness >= ``target`` (or the start, if
        it is below ``target`` already).
    """
    facts = _facts(data)
    roles = model.tokenize(list(facts[:64])).roles_present()
    nodes = [n.id for n in sorted(circuit_nodes(model, circuit, roles))]
    first = evaluate_circuits(model, data, [nodes], how=how, **kwargs).iloc[0].to_dict()
    rows = [{**first, "removed": None, "nodes": ";".join(nodes)}]
    while len(nodes) > 1 and rows[-1]["faithfulness"] >= target:
        df = evaluate_circuits(model, data, [[m for m in nodes if m != v] for v in nodes],
                               how=how, **kwargs)
        best = int(df["faithfulness"].to_numpy().argmax())
        if df["faithfulness"].iloc[best] < target:
            break
        removed = nodes.pop(best)
        rows.append({**df.iloc[best].to_dict(), "removed": removed, "nodes": ";".join(nodes)})
    out = pd.DataFrame(rows).drop(columns=["circuit"])
    out.insert(0, "size", out["n_nodes"])
    return out


__all__ = ["greedy_circuit", "minimize_circuit"]
