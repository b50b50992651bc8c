"""Fact data: fact prompts, datasets of them, and clean/corrupt pairs for patching.

A *fact* is a (subject, relation, attribute) triple such as (Michael Jordan, plays the sport of,
basketball). A language model recalls it when, given a prompt that names the subject and the
relation, it predicts the attribute as the next token. Fact-recall studies (ROME's causal
tracing, Meng et al. 2022; DeepMind's "Fact Finding", Nanda et al. 2023) all need the same
bookkeeping, and this module does it once:

* :class:`FactPrompt` holds a fact as ``prefix + template.format(subject)`` with the attribute to
  predict. The template's single ``{}`` slot says where the subject is, so token positions are
  found from the slot and never by searching the text (a subject can also occur in a few-shot
  prefix such as Fact Finding's ``"Fact: Tiger Woods plays the sport of golf\\n"``).
* :class:`~factfind.data.dataset.FactDataset` is an immutable sequence of prompts with filters,
  sampling, a content fingerprint, ``known_by`` (keep facts a model gets right) and
  ``corrupt`` (Fact Finding's corruption: the same template with another subject of the same
  token length whose attribute differs, so every role sits at the same position;
  :mod:`factfind.data.dataset`).
* :class:`~factfind.data.pairs.FactPairs` holds aligned clean and corrupt datasets for activation
  patching (:mod:`factfind.data.pairs`).

The modules, in the order data flows through them: :mod:`~factfind.data.prompts` (one fact),
:mod:`~factfind.data.dataset` (many), :mod:`~factfind.data.pairs` (clean/corrupt),
:mod:`~factfind.data.loaders` (files and published datasets; :mod:`~factfind.data.relations`
names their relation ids), :mod:`~factfind.data.spans`
(token roles) and :mod:`~factfind.data.batch` (token batches and their helpers). Their public
names are re-exported here, so ``factfind.data`` is the one import for fact data. Every problem
with the data raises :class:`~factfind.errors.FactDataError`, which names the file and the
record.

Example::

    facts = load_facts("lre:factual/person_plays_pro_sport")
    known = facts.known_by(model)                       # facts the model gets right
    pairs = known.corrupt(model, seed=0)                # clean[i] vs corrupt[i]
    batch = encode(model.tokenizer, pairs.clean)        # positions of every role
"""

from factfind.data.batch import PairBatch, TokenBatch, encode_pairs, pair_batches
from factfind.data.dataset import FactDataset
from factfind.data.loaders import (
    available_datasets,
    datasets_dir,
    from_records,
    load_athletes,
    load_counterfact,
    load_csv,
    load_facts,
    load_lre,
    load_organism,
    load_rome_known,
)
from factfind.data.pairs import FactPairs
from factfind.data.prompts import FactPrompt
from factfind.data.relations import RelationName, relation_label, relation_name, relation_names
from factfind.data.spans import Alignment, align, attribute_collisions, attribute_token_ids, encode
from factfind.errors import FactDataError

__all__ = [
    "Alignment", "FactDataError", "FactDataset", "FactPairs", "FactPrompt", "PairBatch",
    "RelationName", "TokenBatch", "align", "attribute_collisions", "attribute_token_ids",
    "available_datasets",
    "datasets_dir", "encode", "encode_pairs", "from_records", "load_athletes",
    "load_counterfact", "load_csv", "load_facts", "load_lre", "load_organism",
    "load_rome_known", "pair_batches", "relation_label", "relation_name",
    "relation_names",
]
