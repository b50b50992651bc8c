"""One builder: :func:`to_graph` turns any scored result of factfind into a circuit graph.

Two kinds of result score a circuit, and :func:`to_graph` tells them apart by their columns:

* *edge results* (:data:`factfind.types.EDGE_RESULT_COLUMNS`: ``sender``, ``receiver``,
  ``effect``; EAP, EAP-IG, edge patching) become :meth:`CircuitGraph.from_edge_scores`: every
  edge measured, a node scored by the sum of its outgoing edges;
* *node results* (the tidy ``component``, ``layer``, ``head``, ``neuron``, ``role``,
  ``effect``: activation patching at roles, AtP / AtP*, exact patching, verification) become
  :meth:`CircuitGraph.from_node_scores`: every node measured, the edges the residual stream
  allows marked ``structural``. Per-prompt rows are averaged per node first; rows at absolute
  positions are refused (a graph's nodes sit at position *roles*). Rows with a ``node`` id
  (:func:`~factfind.features.feature_atp`, ``verify_features``) become feature and error nodes
  (kind, layer, role, dictionary) with a ``label``: the frame's ``label`` column, else the id.

Either way the graph carries the :class:`~factfind.graph.Provenance` of the model and data it
measured, and is pruned with :func:`~factfind.graph.prune` (edge scores) or
:func:`~factfind.graph.prune_nodes` (node scores). The classmethods stay the lower-level
constructors for frames that come from elsewhere.

Example::

    g = to_graph(ff.eap_ig(model, pairs), model, pairs)          # edge scores
    g = to_graph(ff.verify(model, pairs, est).frame, model, pairs)  # node scores
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd

from factfind.errors import ArgumentError
from factfind.graph.circuit import CircuitGraph
from factfind.graph.provenance import Provenance

_NODE_KEYS = ["method", "component", "layer", "head", "neuron", "role"]


class Measured(Protocol):
    """What a graph needs of a model (a :class:`factfind.Model` has it)."""

    name: str
    revision: str | None
    n_layers: int


def provenance(model: Measured, data: Any, method: str, config: dict[str, Any]) -> Provenance:
    """The :class:`~factfind.graph.Provenance` of a graph measured on ``model`` and ``data``
    (facts or pairs: anything with ``fingerprint()``)."""
    return Provenance(model=model.name, revision=model.revision, dataset=data.fingerprint(),
                      method=method, config=config)


def to_graph(result: pd.DataFrame, model: Measured, data: Any, *,
             config: dict[str, Any] | None = None) -> CircuitGraph:
    """The complete scored circuit graph of an edge or node result (module docstring).

    Args:
        result: an edge result frame, or a node result frame (aggregated or per prompt).
        model: the model it measured (its name, revision and depth).
        data: the facts or pairs it measured (their fingerprint).
        config: recorded in the provenance (with ``n``, the number of prompts).

    Raises:
        ArgumentError: the frame is neither kind, or a node frame has rows at absolute
            positions.
    """
    if not isinstance(result, pd.DataFrame):
        raise ArgumentError(f"to_graph needs a result frame (an analysis' DataFrame), got "
                            f"{type(result).__name__}")
    method = str(result["method"].iloc[0]) if "method" in result and len(result) else "unknown"
    prov = provenance(model, data, method, {"n": len(data), **(config or {})})
    if "sender" in result.columns or "src" in result.columns:
        return CircuitGraph.from_edge_scores(result, prov, n_layers=model.n_layers)
    if not {"component", "layer", "effect"} <= set(result.columns):
        raise ArgumentError("to_graph needs an edge result (sender, receiver, effect) or a node "
                            "result (component, layer, ..., role, effect); got columns "
                            f"{', '.join(map(str, result.columns))}")
    nodes = _per_node(result)
    g = CircuitGraph.from_node_scores(nodes, prov, n_layers=model.n_layers,
                                      parallel=bool(getattr(model, "parallel", False)))
    if "node" in nodes.columns:  # feature and error nodes: a label each (the id's unit if none)
        labels = nodes["label"] if "label" in nodes.columns else [pd.NA] * len(nodes)
        for node_id, label in zip(nodes["node"].astype(str), labels, strict=True):
            unit = node_id.split("@")[0]
            g.graph.nodes[node_id]["label"] = unit if pd.isna(label) else str(label)
    return g


def _per_node(df: pd.DataFrame) -> pd.DataFrame:
    """One row per node: the mean effect over prompts (NaN where a node's role is absent)."""
    if "position" in df.columns and bool(df["position"].notna().to_numpy().any()):
        raise ArgumentError("this result has rows at absolute positions; a circuit graph's nodes "
                            "sit at position roles: rerun with positions=<roles> (e.g. "
                            "'subject_last', 'final')")
    keys = [c for c in (*_NODE_KEYS, "node") if c in df.columns]
    if bool(df.duplicated(keys).to_numpy().any()):
        means = df.groupby(keys, dropna=False, sort=False)["effect"].mean()
        df = pd.DataFrame(means).reset_index()
    effect = np.asarray(pd.to_numeric(pd.Series(df["effect"]), errors="coerce"), dtype=float)
    return pd.DataFrame(df[np.isfinite(effect)])


__all__ = ["Measured", "provenance", "to_graph"]
