"""Sparse dictionaries (SAEs, transcoders, skip transcoders): the basis to read circuits in.

* :mod:`.dictionary`: the :class:`Dictionary` type (weights + encode/decode/reconstruct/error)
  and :class:`Dictionaries`, a set over layers and sites;
* :mod:`.splice`: dictionaries spliced into a forward pass, with or without their error terms;
* :mod:`.formats`: the field's formats in and out (SAELens, sparsify, circuit-tracer, Gemma
  Scope): :func:`load_dictionaries`, :func:`save_dictionaries`;
* :mod:`.evaluation`: SAELens' evaluations on held-out tokens (:func:`evaluate_dictionaries`);
* :mod:`.dashboard`: feature dashboards (:func:`feature_dashboard`);
* :mod:`.labels`: features scored against known attributes (:func:`attribute_features`) and
  labelled from their top tokens;
* :mod:`.corpus`, :mod:`.activations`, :mod:`.training` (:mod:`.trainer`): the corpus
  (:func:`load_corpus`), the on-disk activation cache, and TopK / BatchTopK training with AuxK
  (:func:`fit_dictionary` on tensors, :func:`train_dictionaries` at every layer of a model);
* :mod:`.attribution`: AtP / IG of every feature and error node over clean/corrupt pairs
  (:func:`feature_atp`); :mod:`.verification`: exact feature patches (:func:`patch_features`),
  verification (:func:`verify_features`) and the missed-effect bound
  (:func:`feature_missed_bound`);
* :mod:`.interventions`: swap or steer the attributed features and count answer flips
  (:func:`feature_interventions`); :mod:`.circuits`: per-pair attributions aggregated over a
  relation (:func:`aggregate_circuit`) and their stability across halves
  (:func:`circuit_stability`). The three-bases comparison is
  :mod:`factfind.evaluate.bases` (it needs the circuit engine, a layer above);
* :mod:`.linear_graph`: circuit-tracer's single-prompt attribution graph over transcoders
  (:func:`linear_graph`: patterns and norms frozen, edges by batched gradient injection, each
  cross-position edge split over heads, influence pruning, replacement/completeness scores);
  :mod:`.linear_graph_export`: as a :class:`~factfind.graph.CircuitGraph`
  (:func:`to_circuit_graph`) or circuit-tracer's graph JSON (:func:`to_circuit_tracer_json`);
* :mod:`.feature_edges`: the counterfactual graph over pairs (:func:`feature_edges`: EAP-IG
  with feature and error nodes as senders and receivers, the transcoded MLPs frozen into
  nodes by :mod:`.feature_edges_model`, the shared pieces in :mod:`.feature_edges_batch`, the
  literal reference in :mod:`.feature_edges_reference`); :mod:`.feature_edge_heads`:
  :func:`split_edge_heads` splits each cross-position edge over the heads that carry it.
"""

from factfind.features.attribution import feature_atp
from factfind.features.circuits import aggregate_circuit, circuit_stability
from factfind.features.corpus import Corpus, load_corpus
from factfind.features.dashboard import FeatureDashboard, feature_dashboard, feature_dashboards
from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.evaluation import evaluate_dictionaries, feature_density
from factfind.features.feature_edge_heads import split_edge_heads
from factfind.features.feature_edges import feature_edges
from factfind.features.formats import load_dictionaries, save_dictionaries
from factfind.features.interventions import feature_interventions
from factfind.features.labels import attribute_features, best_attribute_features
from factfind.features.linear_graph import LinearGraph, linear_graph
from factfind.features.linear_graph_export import to_circuit_graph, to_circuit_tracer_json
from factfind.features.splice import splice_edits, spliced_run
from factfind.features.training import fit_dictionary, train_dictionaries
from factfind.features.verification import (
    FeatureVerification,
    feature_missed_bound,
    patch_features,
    verify_features,
)

__all__ = [
    "Activation",
    "Corpus",
    "DictKind",
    "Dictionaries",
    "Dictionary",
    "FeatureDashboard",
    "FeatureVerification",
    "LinearGraph",
    "aggregate_circuit",
    "attribute_features",
    "best_attribute_features",
    "circuit_stability",
    "evaluate_dictionaries",
    "feature_atp",
    "feature_dashboard",
    "feature_dashboards",
    "feature_density",
    "feature_edges",
    "feature_interventions",
    "feature_missed_bound",
    "fit_dictionary",
    "linear_graph",
    "load_corpus",
    "load_dictionaries",
    "patch_features",
    "save_dictionaries",
    "splice_edits",
    "spliced_run",
    "split_edge_heads",
    "to_circuit_graph",
    "to_circuit_tracer_json",
    "train_dictionaries",
    "verify_features",
]
