"""Sparse dictionaries (SAEs, transcoders, skip transcoders): the basis to read circuits in.

* :mod:`.dictionary`: the :class:`Dictionary` type (weights + encode/decode/reconstruct/error)
  and :class:`Dictionaries`, a set over layers and sites;
* :mod:`.splice`: dictionaries spliced into a forward pass, with or without their error terms;
* :mod:`.formats`: the field's formats in and out (SAELens, sparsify, circuit-tracer, Gemma
  Scope): :func:`load_dictionaries`, :func:`save_dictionaries`.
"""

from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.formats import load_dictionaries, save_dictionaries
from factfind.features.splice import splice_edits, spliced_run

__all__ = ["Activation", "DictKind", "Dictionaries", "Dictionary", "load_dictionaries",
           "save_dictionaries", "splice_edits", "spliced_run"]
