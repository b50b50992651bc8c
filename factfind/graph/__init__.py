"""Circuit graphs: which components, at which positions, pass a fact along which paths.

The residual stream makes a transformer a directed acyclic graph: every block reads the sum of
everything written before it, so any component can feed any later one. A *circuit graph* has a
node per component at a position role and an edge wherever one node's output reaches another's
input. A circuit is the part of that graph that carries the fact from the subject's tokens to
the logits. The pieces, one module each:

* :mod:`~factfind.graph.node`: :class:`Node` and its ids (``L5.mlp@subject_last``,
  ``L3.h2@final``, ``L4.n311@subject_last``, ``embed@<role>``, ``logits@final``), and which
  node reads which (:func:`feeds`: MLPs per position, heads across positions, parallel blocks);
* :mod:`~factfind.graph.provenance`: :class:`Provenance`, where a graph came from; combining
  graphs of different models or datasets raises :class:`ProvenanceMismatchError`;
* :mod:`~factfind.graph.circuit`: :class:`CircuitGraph`, built from node scores (activation
  or attribution patching) or edge scores (EAP / EAP-IG);
* :mod:`~factfind.graph.build`: :func:`to_graph`, the one builder: any edge result (EAP,
  EAP-IG, edge patching) or node result (patching at roles, AtP, verification) with the
  provenance of its model and data;
* :mod:`~factfind.graph.pruning`: :func:`prune` (edges) and :func:`prune_nodes` (nodes), which
  end by keeping only nodes on an input → logits path;
* :mod:`~factfind.graph.combine`: :func:`union`, :func:`compare` (Jaccard overlap),
  :func:`layout` for drawing;
* :mod:`~factfind.graph.io`: GraphML and JSON that round-trip exactly, written atomically.

Example::

    g = CircuitGraph.from_node_scores(aggregate(df), prov, n_layers=12)
    circuit = prune_nodes(g, top_n=20)
    to_json(circuit, "circuit.json"); assert read_json("circuit.json") == circuit
"""

from factfind.graph.build import provenance, to_graph
from factfind.graph.circuit import (
    COMPONENT_KINDS,
    EDGE_COLUMNS,
    NODE_COLUMNS,
    STRUCTURAL,
    CircuitGraph,
)
from factfind.graph.combine import compare, layout, union
from factfind.graph.io import read_graphml, read_json, to_graphml, to_json
from factfind.graph.node import ENDPOINTS, KINDS, ROLES, Node, feeds, sort_nodes, stage
from factfind.graph.provenance import Provenance, ProvenanceMismatchError, check_compatible
from factfind.graph.pruning import prune, prune_nodes

__all__ = [
    "COMPONENT_KINDS",
    "EDGE_COLUMNS",
    "ENDPOINTS",
    "KINDS",
    "NODE_COLUMNS",
    "ROLES",
    "STRUCTURAL",
    "CircuitGraph",
    "Node",
    "Provenance",
    "ProvenanceMismatchError",
    "check_compatible",
    "compare",
    "feeds",
    "layout",
    "provenance",
    "prune",
    "prune_nodes",
    "read_graphml",
    "read_json",
    "sort_nodes",
    "stage",
    "to_graph",
    "to_graphml",
    "to_json",
    "union",
]
