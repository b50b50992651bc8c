"""Evaluating circuits: faithfulness, completeness, minimality, curves, proportion explained.

A circuit is a claim: *these* heads and MLPs, at *these* token roles, compute the behaviour. It
is tested by removing everything else: every head and MLP outside the circuit is ablated (mean
or resample, per token role; the embeddings never are), and the metric ``m`` is compared with
the full model ``M`` and the empty circuit ``∅``. The pieces, one module each:

* :mod:`~factfind.evaluate.engine`: :func:`evaluate_circuits`, many circuits ablated in one
  stacked forward per batch; :func:`circuit_nodes` (graphs, ids, nodes or sites as nodes at
  roles) and :func:`node_scores`;
* :mod:`~factfind.evaluate.measures`: :func:`faithfulness` ``(m(C) - m(∅)) / (m(M) - m(∅))``
  (Wang et al. 2022; Hanna et al. 2024), :func:`completeness`, :func:`minimality` and
  :func:`faithfulness_curve`;
* :mod:`~factfind.evaluate.search`: :func:`greedy_circuit` (forward selection) and
  :func:`minimize_circuit` (backward elimination, which keeps nodes that only matter together,
  like the two inputs of an AND);
* :mod:`~factfind.evaluate.prune`: :func:`prune_circuit`, backward elimination for thousands
  of nodes (heads and single neurons): attribution scores re-taken in each pruned circuit's
  context order the removals, exact faithfulness accepts them (:func:`removal_scores`);
* :mod:`~factfind.evaluate.paths`: :func:`proportion_explained` (Goldowsky-Dill et al. 2023),
  a graph tested as a hypothesis about paths by edge-level path patching;
* :mod:`~factfind.evaluate.bases`: feature circuits (dictionary features and error nodes)
  through the same engine (:func:`evaluate_feature_circuits`), and the feature, neuron and
  head/MLP bases compared at equal node budgets (:func:`basis_comparison`,
  :func:`basis_figure`).

Example::

    circuit = ["L0.h0@subject_last", "L1.mlp@subject_last", "L2.h0@final"]
    faithfulness(model, pairs, circuit), completeness(model, pairs, circuit)
    proportion_explained(model, pairs, circuit)           # the paths the nodes induce
"""

from factfind.evaluate.bases import basis_comparison, basis_figure, evaluate_feature_circuits
from factfind.evaluate.engine import CircuitLike, circuit_nodes, evaluate_circuits, node_scores
from factfind.evaluate.measures import completeness, faithfulness, faithfulness_curve, minimality
from factfind.evaluate.paths import proportion_explained
from factfind.evaluate.prune import prune_circuit, removal_scores
from factfind.evaluate.search import greedy_circuit, minimize_circuit

__all__ = ["CircuitLike", "basis_comparison", "basis_figure", "circuit_nodes", "completeness",
           "evaluate_circuits", "evaluate_feature_circuits", "faithfulness",
           "faithfulness_curve", "greedy_circuit", "minimality",
           "minimize_circuit", "node_scores", "proportion_explained", "prune_circuit",
           "removal_scores"]
