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
* :class:`~factfind.dataset.FactDataset` is an immutable sequence of prompts with filters,
  sampling, a content fingerprint, ``known_by`` (keep facts a model gets right) and
  ``corrupt`` (Fact Finding's corruption: the same template with another subject of the same
  token length whose attribute differs, so every role sits at the same position;
  :mod:`factfind.dataset`).
* :class:`~factfind.pairs.FactPairs` holds aligned clean and corrupt datasets for activation
  patching (:mod:`factfind.pairs`).

This module holds the errors, the templates and :class:`FactPrompt`. ``FactDataset``, loaders
(``load_facts`` and friends, :mod:`factfind.loaders`), token-span alignment (``encode``,
``TokenBatch``, :mod:`factfind.spans`) and ``FactPairs`` are re-exported here, so
``factfind.data`` is the one import for fact data. Every problem with the data raises
:class:`FactDataError`, which names the file and the record.

Example::

    facts = load_facts("lre:factual/person_plays_pro_sport")
    known = facts.known_by(model)                       # facts the model gets right
    pairs = known.corrupt(model, seed=0)                # clean[i] vs corrupt[i]
    batch = encode(model.tokenizer, pairs.clean)        # positions of every role
"""

from __future__ import annotations

import importlib
import string
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from factfind.dataset import FactDataset
    from factfind.loaders import (
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
    from factfind.pairs import FactPairs
    from factfind.spans import (
        Alignment,
        TokenBatch,
        align,
        attribute_collisions,
        attribute_token_ids,
        encode,
    )

__all__ = [
    "Alignment", "FactDataError", "FactDataset", "FactPairs", "FactPrompt", "TokenBatch",
    "align", "attribute_collisions", "attribute_token_ids", "available_datasets",
    "datasets_dir", "encode", "from_records", "load_athletes", "load_counterfact", "load_csv",
    "load_facts",
    "load_lre", "load_organism", "load_rome_known",
]

# Names defined in the sibling modules, imported on first use (PEP 562) because those modules
# import this one.
_LAZY = {
    **dict.fromkeys(("Alignment", "TokenBatch", "align", "attribute_collisions",
                     "attribute_token_ids", "encode"), "factfind.spans"),
    "FactPairs": "factfind.pairs",
    "FactDataset": "factfind.dataset",
    **dict.fromkeys(("available_datasets", "datasets_dir", "from_records", "load_athletes",
                     "load_counterfact",
                     "load_csv", "load_facts", "load_lre", "load_organism", "load_rome_known"),
                    "factfind.loaders"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


OnError = Literal["raise", "skip"]


# ----------------------------------------------------------------------------- errors


class FactDataError(ValueError):
    """Bad fact data: a missing or malformed file or record, or a prompt that cannot be aligned.

    Attributes:
        reason: what is wrong, without the location.
        path: the file it came from, if any.
        record: the record within the file (index, ``"line 4"``, ``"samples[3]"``...), if any.
    """

    def __init__(self, reason: str, *, path: str | None = None,
                 record: int | str | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.record = record
        where = [p for p in (self.path, None if record is None else f"record {record}") if p]
        super().__init__(f"{': '.join(where)}: {reason}" if where else reason)

    def at(self, *, path: str | None = None, record: int | str | None = None) -> FactDataError:
        """The same error located at ``path`` / ``record`` (existing location wins)."""
        return FactDataError(self.reason, path=self.path or path,
                             record=self.record if self.record is not None else record)

    def __reduce__(self) -> Any:  # keep path/record through pickling (multiprocessing, xdist)
        return (_rebuild_error, (self.reason, self.path, self.record))


def _rebuild_error(reason: str, path: str | None, record: int | str | None) -> FactDataError:
    return FactDataError(reason, path=path, record=record)


def check_mode(value: str, name: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed`` (for mode arguments)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


# ----------------------------------------------------------------------------- one fact


def split_template(template: str) -> tuple[str, str]:
    """The literal text before and after a template's single ``{}`` slot (braces unescaped).

    Templates are :meth:`str.format` strings with exactly one empty field ``{}``; literal braces
    are written ``{{`` and ``}}``.

    Args:
        template: e.g. ``"{} plays the sport of"``.

    Returns:
        ``(before, after)``, e.g. ``("", " plays the sport of")``.

    Raises:
        FactDataError: no slot, several slots, a named/positional/formatted field, unbalanced
            braces, or nothing but whitespace after the slot (the prompt needs a token after
            the subject).
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:  # "Single '}' encountered", "unmatched '{'"...
        raise FactDataError(f"template {template!r} is not a valid format string ({e}); "
                            "write literal braces as '{{' and '}}'") from None
    fields = [(f, spec, conv) for _, f, spec, conv in parts if f is not None]
    if not fields:
        raise FactDataError(f"template {template!r} has no '{{}}' slot for the subject")
    if len(fields) > 1:
        raise FactDataError(f"template {template!r} has {len(fields)} slots; it needs exactly "
                            "one '{}' for the subject")
    if fields[0] != ("", "", None):
        raise FactDataError(f"template {template!r}: the subject slot must be a bare '{{}}'")
    before, after, seen = "", "", False
    for literal, field_name, _, _ in parts:
        if seen:
            after += literal
        else:
            before += literal
        seen = seen or field_name is not None
    if not after.strip():
        raise FactDataError(f"template {template!r} ends with the subject slot; the prompt "
                            "needs at least one token after the subject")
    return before, after


def escape_braces(text: str) -> str:
    """Escape literal text for use in a template (``{`` -> ``{{``, ``}`` -> ``}}``)."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class FactPrompt:
    """One fact as a prompt: ``prompt = prefix + template.format(subject)``, answer ``attribute``.

    Attributes:
        subject: e.g. ``"Michael Jordan"`` (not empty; may itself occur in the prefix).
        relation: the relation's name, e.g. ``"person plays pro sport"``.
        template: a format string with one ``{}`` slot and text after it, e.g.
            ``"{} plays the sport of"``.
        attribute: the answer without a leading space, e.g. ``"basketball"``; the token to
            predict is the first token of ``" " + attribute``.
        prefix: text before the template, e.g. a few-shot ``"Fact: Tiger Woods plays the sport
            of golf\\n"``.
        source: where the fact came from, e.g. ``"known_1000.json#17"``.
        meta: hashable extra fields as ``(key, value)`` string pairs (a mapping is converted).

    Example::

        >>> FactPrompt("Jordan", "sport", "Fact: {} plays the sport of", "basketball").prompt
        'Fact: Jordan plays the sport of'
    """

    subject: str
    relation: str
    template: str
    attribute: str
    prefix: str = ""
    source: str = ""
    meta: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        record = self.source if isinstance(self.source, str) and self.source else None
        try:
            self._validate()
        except FactDataError as e:
            raise e.at(record=record) from None

    def _validate(self) -> None:
        for name in ("subject", "relation", "template", "attribute", "prefix", "source"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise FactDataError(f"{name} must be a string, got {type(value).__name__}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise FactDataError(f"{name} {value!r} is not valid Unicode "
                                    "(lone surrogate)") from None
        for name in ("subject", "relation", "attribute"):
            if not getattr(self, name).strip():
                raise FactDataError(f"{name} is empty")
        if self.attribute != self.attribute.lstrip():
            raise FactDataError(f"attribute {self.attribute!r} starts with whitespace; give it "
                                "bare: the answer token is the first token of ' ' + attribute")
        split_template(self.template)
        meta = self.meta
        if isinstance(meta, Mapping):
            meta = tuple(meta.items())
        try:
            meta = tuple((k, v) for k, v in meta)
        except (TypeError, ValueError):
            raise FactDataError("meta must be (key, value) pairs or a mapping") from None
        for k, v in meta:
            if not (isinstance(k, str) and isinstance(v, str)):
                raise FactDataError(f"meta entries must be strings, got {k!r}: {v!r}")
        object.__setattr__(self, "meta", meta)

    @cached_property
    def _parts(self) -> tuple[str, str]:
        return split_template(self.template)

    @property
    def prompt(self) -> str:
        """The full prompt text: ``prefix + template.format(subject)``."""
        before, after = self._parts
        return self.prefix + before + self.subject + after

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the template's subject within :attr:`prompt`."""
        start = len(self.prefix) + len(self._parts[0])
        return start, start + len(self.subject)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of a ``meta`` entry."""
        return dict(self.meta).get(key, default)


def _tokenizer_of(model_or_tokenizer: Any) -> Any:
    """The tokenizer itself, or a model's ``.tokenizer`` (for :mod:`factfind.spans` and
    :mod:`factfind.pairs`, which accept either)."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        return model_or_tokenizer
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is None:
        raise TypeError(f"expected a tokenizer or a model with .tokenizer, got "
                        f"{type(model_or_tokenizer).__name__}")
    return tok
