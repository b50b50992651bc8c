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
* :class:`FactDataset` is an immutable sequence of prompts with filters, sampling, a content
  fingerprint, :meth:`~FactDataset.known_by` (keep facts a model gets right) and
  :meth:`~FactDataset.corrupt` (Fact Finding's corruption: the same template with another subject
  of the same token length whose attribute differs, so every role sits at the same position).
* :class:`~factfind.pairs.FactPairs` holds aligned clean and corrupt datasets for activation
  patching (:mod:`factfind.pairs`).

Loaders (``load_facts`` and friends, :mod:`factfind.loaders`), token-span alignment
(``encode``, ``TokenBatch``, :mod:`factfind.spans`) and ``FactPairs`` are re-exported here, so
``factfind.data`` is the one import for fact data. Every problem with the data raises
:class:`FactDataError`, which names the file and the record.

Example::

    facts = load_facts("lre:factual/person_plays_pro_sport")
    known = facts.known_by(model)                       # facts the model gets right
    pairs = known.corrupt(model, seed=0)                # clean[i] vs corrupt[i]
    batch = encode(model.tokenizer, pairs.clean)        # positions of every role
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import random
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, overload

import pandas as pd
import torch

if TYPE_CHECKING:
    from factfind.loaders import (
        available_datasets,
        datasets_dir,
        from_records,
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

log = logging.getLogger(__name__)

__all__ = [
    "Alignment", "FactDataError", "FactDataset", "FactPairs", "FactPrompt", "TokenBatch",
    "align", "attribute_collisions", "attribute_token_ids", "available_datasets",
    "datasets_dir", "encode", "from_records", "load_counterfact", "load_csv", "load_facts",
    "load_lre", "load_organism", "load_rome_known",
]

# Names defined in the sibling modules, imported on first use (PEP 562) because those modules
# import this one.
_LAZY = {
    **dict.fromkeys(("Alignment", "TokenBatch", "align", "attribute_collisions",
                     "attribute_token_ids", "encode"), "factfind.spans"),
    "FactPairs": "factfind.pairs",
    **dict.fromkeys(("available_datasets", "datasets_dir", "from_records", "load_counterfact",
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


# ----------------------------------------------------------------------------- datasets


def _tokenizer_of(model_or_tokenizer: Any) -> Any:
    from transformers import PreTrainedTokenizerBase

    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        return model_or_tokenizer
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is None:
        raise TypeError(f"expected a tokenizer or a model with .tokenizer, got "
                        f"{type(model_or_tokenizer).__name__}")
    return tok


class FactDataset(Sequence[FactPrompt]):
    """An immutable, ordered collection of :class:`FactPrompt`.

    Args:
        facts: the prompts.
        name: a label used in logs and reports (not part of :meth:`fingerprint`).
        skipped: ``(record, reason)`` for records a loader skipped with ``on_error="skip"``.

    Example::

        >>> ds = FactDataset([FactPrompt("Paris", "capital of", "{} is the capital of", "France")])
        >>> len(ds), ds.relations
        (1, ('capital of',))
    """

    __slots__ = ("_facts", "_name", "_skipped")

    def __init__(self, facts: Iterable[FactPrompt] = (), *, name: str = "facts",
                 skipped: Iterable[tuple[int | str, str]] = ()) -> None:
        self._facts: tuple[FactPrompt, ...] = tuple(facts)
        for i, f in enumerate(self._facts):
            if not isinstance(f, FactPrompt):
                raise TypeError(f"FactDataset item {i} is a {type(f).__name__}, not a FactPrompt")
        self._name = str(name)
        self._skipped: tuple[tuple[int | str, str], ...] = tuple(skipped)

    @property
    def name(self) -> str:
        """The dataset's label."""
        return self._name

    @property
    def skipped(self) -> tuple[tuple[int | str, str], ...]:
        """``(record, reason)`` for each record the loader skipped (``on_error="skip"``)."""
        return self._skipped

    # -- sequence ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._facts)

    @overload
    def __getitem__(self, index: int) -> FactPrompt: ...
    @overload
    def __getitem__(self, index: slice) -> FactDataset: ...
    def __getitem__(self, index: int | slice) -> FactPrompt | FactDataset:
        if isinstance(index, slice):
            return FactDataset(self._facts[index], name=self._name)
        return self._facts[index]

    def __iter__(self) -> Iterator[FactPrompt]:
        return iter(self._facts)

    def __add__(self, other: FactDataset) -> FactDataset:
        if not isinstance(other, FactDataset):
            return NotImplemented
        return FactDataset(self._facts + other._facts, name=f"{self._name}+{other._name}",
                           skipped=self._skipped + other._skipped)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FactDataset):
            return NotImplemented
        return self._facts == other._facts and self._name == other._name

    def __hash__(self) -> int:
        return hash((self._facts, self._name))

    def __repr__(self) -> str:
        return (f"FactDataset({self._name!r}, n={len(self)}, relations={len(self.relations)}"
                + (f", skipped={len(self._skipped)})" if self._skipped else ")"))

    # -- views ---------------------------------------------------------------------------------

    @property
    def relations(self) -> tuple[str, ...]:
        """The distinct relations, in order of first appearance."""
        return tuple(dict.fromkeys(f.relation for f in self._facts))

    def filter(self, fn: Callable[[FactPrompt], bool], *, name: str | None = None) -> FactDataset:
        """The facts for which ``fn(fact)`` is true, in order."""
        return FactDataset((f for f in self._facts if fn(f)), name=name or self._name)

    def by_relation(self, relation: str) -> FactDataset:
        """The facts of one relation.

        Raises:
            KeyError: the dataset has no such relation (the message lists those it has).
        """
        if relation not in self.relations:
            shown = ", ".join(map(repr, self.relations[:20]))
            raise KeyError(f"{self._name} has no relation {relation!r}; it has {shown}"
                           + (" ..." if len(self.relations) > 20 else ""))
        return self.filter(lambda f: f.relation == relation, name=f"{self._name}/{relation}")

    def sample(self, n: int, seed: int = 0) -> FactDataset:
        """``n`` facts drawn without replacement, deterministically, kept in dataset order.

        Raises:
            ValueError: ``n`` is negative or larger than the dataset.
        """
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot sample {n} of {len(self)} facts")
        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return FactDataset((self._facts[i] for i in keep), name=f"{self._name}[sample {n}]")

    def with_prefix(self, prefix: str) -> FactDataset:
        """The same facts with ``prefix`` (e.g. few-shot examples) before every template."""
        return FactDataset((dataclasses.replace(f, prefix=prefix) for f in self._facts),
                           name=self._name)

    def fingerprint(self) -> str:
        """Stable sha256 of the facts' content (all fields, in order; not the name).

        Equal content gives an equal fingerprint across processes and Python versions, so it
        can key caches and be stored in a run's config.
        """
        rows = [dataclasses.asdict(f) for f in self._facts]
        blob = json.dumps(rows, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_frame(self) -> pd.DataFrame:
        """One row per fact: subject, relation, template, attribute, prefix, prompt, source,
        then one column per ``meta`` key (prefixed ``meta.`` if it clashes)."""
        base = ["subject", "relation", "template", "attribute", "prefix", "prompt", "source"]
        rows = []
        for f in self._facts:
            row = {k: getattr(f, k) for k in base}
            for k, v in f.meta:
                row[f"meta.{k}" if k in base else k] = v
            rows.append(row)
        return pd.DataFrame(rows, columns=None if rows else base)

    # -- with a model --------------------------------------------------------------------------

    def attribute_scores(self, model: Any, *, batch_size: int = 64) -> pd.DataFrame:
        """Rank and probability of each fact's attribute token under ``model``.

        Args:
            model: anything with ``.tokenizer`` and ``final_logits(prompts, *, batch_size)``
                returning next-token logits ``[batch d_vocab]``.
            batch_size: prompts per forward pass.

        Returns:
            One row per fact: ``attribute_id``, ``rank`` (1 = the model's top prediction),
            ``prob`` and ``logit`` of the attribute token.
        """
        from factfind.spans import attribute_token_ids

        ids = attribute_token_ids(model.tokenizer, [f.attribute for f in self._facts])
        ranks, probs, logits = [], [], []
        for start in range(0, len(self), batch_size):
            chunk = self[start:start + batch_size]
            lg = model.final_logits(chunk, batch_size=batch_size).float()  # [batch d_vocab]
            if lg.shape[0] != len(chunk):
                raise ValueError(f"final_logits returned {lg.shape[0]} rows for {len(chunk)}")
            target = lg.gather(-1, ids[start:start + len(chunk), None].to(lg.device))  # [b 1]
            ranks.append((lg > target).sum(-1).cpu() + 1)
            probs.append(lg.softmax(-1).gather(-1, ids[start:start + len(chunk), None]
                                               .to(lg.device))[:, 0].cpu())
            logits.append(target[:, 0].cpu())
        cat = (lambda xs: torch.cat(xs).tolist() if xs else [])
        return pd.DataFrame({"attribute_id": ids.tolist(), "rank": cat(ranks),
                             "prob": cat(probs), "logit": cat(logits)})

    def known_by(self, model: Any, *, top_k: int = 1, min_prob: float = 0.0,
                 batch_size: int = 64) -> FactDataset:
        """The facts ``model`` gets right: attribute token ranked within ``top_k`` at the final
        position and with probability at least ``min_prob``.

        Args:
            model: as for :meth:`attribute_scores`.
            top_k: keep facts whose attribute token has rank ``<= top_k`` (1 = argmax).
            min_prob: and whose probability is ``>= min_prob``.
            batch_size: prompts per forward pass.

        Returns:
            The kept facts, in order (the number kept is logged).

        Example::

            known = facts.known_by(model, top_k=1, min_prob=0.1)
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        scores = self.attribute_scores(model, batch_size=batch_size)
        keep = ((scores["rank"] <= top_k) & (scores["prob"] >= min_prob)).tolist()
        out = FactDataset((f for f, k in zip(self._facts, keep, strict=True) if k),
                          name=f"{self._name}|known")
        log.info("known_by: %d of %d facts of %s (top_k=%d, min_prob=%g)",
                 len(out), len(self), self._name, top_k, min_prob)
        return out

    def corrupt(self, model_or_tokenizer: Any, *, seed: int = 0,
                on_missing: OnError = "raise") -> FactPairs:
        """Pair each prompt with a corrupted one for patching: see :func:`factfind.pairs.corrupt`.

        Example::

            pairs = facts.corrupt(model, seed=0)
            pairs.clean[0].subject, pairs.corrupt[0].subject   # same token length
        """
        from factfind.pairs import corrupt

        return corrupt(self, model_or_tokenizer, seed=seed, on_missing=on_missing)
