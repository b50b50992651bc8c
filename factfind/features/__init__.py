"""Sparse dictionaries (SAEs, transcoders, skip transcoders): the basis to read circuits in.

* :mod:`.dictionary`: the :class:`Dictionary` type (weights + encode/decode/reconstruct/error)
  and :class:`Dictionaries`, a set over layers and sites;
* :mod:`.splice`: dictionaries spliced into a forward pass, with or without their error terms;
* :mod:`.formats`: the field's formats in and out (SAELens, sparsify, circuit-tracer, Gemma
  Scope): :func:`load_dictionaries`, :func:`save_dictionaries`;
* :mod:`.evaluation`: SAELens' evaluations on held-out tokens (:func:`evaluate_dictionaries`);
* :mod:`.dashboard`: feature dashboards (:func:`feature_dashboard`);
* :mod:`.labels`: features scored against known attributes (:func:`attribute_features`) and
  labelled from their top tokens.
"""

from factfind.features.dashboard import FeatureDashboard, feature_dashboard, feature_dashboards
from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.evaluation import evaluate_dictionaries, feature_density
from factfind.features.formats import load_dictionaries, save_dictionaries
from factfind.features.labels import attribute_features, best_attribute_features
from factfind.features.splice import splice_edits, spliced_run

__all__ = ["Activation", "DictKind", "Dictionaries", "Dictionary", "FeatureDashboard",
           "attribute_features", "best_attribute_features", "evaluate_dictionaries",
           "feature_dashboard", "feature_dashboards", "feature_density", "load_dictionaries",
           "save_dictionaries", "splice_edits", "spliced_run"]
