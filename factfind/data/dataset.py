"""FactDataset: an immutable, ordered collection of fact prompts, and what a study does with it.

A fact-recall study starts from a set of facts (:class:`~factfind.data.FactPrompt`) and
narrows it before any patching: to the facts the model actually recalls
(:meth:`~FactDataset.known_by`, from the rank and probability of the attribute token,
:meth:`~FactDataset.attribute_scores`), to one relation, to a sample. :class:`FactDataset`
does that bookkeeping with value semantics:

* an immutable sequence (slicing gives a dataset; ``+`` concatenates) with views
  (:meth:`~FactDataset.filter`, :meth:`~FactDataset.by_relation`, :meth:`~FactDataset.sample`,
  :meth:`~FactDataset.with_prefix`) and a tidy :meth:`~FactDataset.to_frame`;
* a content :meth:`~FactDataset.fingerprint` (sha256 of every field, not the name) that keys
  caches and is stored in a run's config and a circuit graph's provenance;
* :meth:`~FactDataset.corrupt`: Fact Finding's corruption (Nanda et al. 2023), the same
  template with another subject of the same token length whose attribute differs, so every
  role sits at the same position (:func:`factfind.data.pairs.corrupt`).

Example::

    known = load_facts("organism:sport").known_by(model)    # facts the model gets right
    pairs = known.sample(64, seed=0).corrupt(model, seed=0)  # clean[i] vs corrupt[i]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, overload

import pandas as pd
import torch

from factfind.data.pairs import FactPairs, corrupt
from factfind.data.prompts import FactPrompt
from factfind.data.spans import attribute_token_ids
from factfind.errors import ArgumentError, NotFoundError, WrongTypeError, check_mode
from factfind.types import OnError

log = logging.getLogger(__name__)


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
                raise WrongTypeError(f"FactDataset item {i} is a {type(f).__name__}, "
                                     "not a FactPrompt")
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
            raise NotFoundError(f"{self._name} has no relation {relation!r}; it has {shown}"
                           + (" ..." if len(self.relations) > 20 else ""))
        return self.filter(lambda f: f.relation == relation, name=f"{self._name}/{relation}")

    def sample(self, n: int, seed: int = 0) -> FactDataset:
        """``n`` facts drawn without replacement, deterministically, kept in dataset order.

        Raises:
            ValueError: ``n`` is negative or larger than the dataset.
        """
        if not 0 <= n <= len(self):
            raise ArgumentError(f"cannot sample {n} of {len(self)} facts")
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

        The attribute token is the first token of ``" " + attribute`` at the prompt's final
        position: the quantity every factfind metric compares (logit differences of first
        tokens), and Fact Finding's own (its sports are single tokens). For a multi-token
        attribute (``"New York"``) the first token's probability bounds the whole attribute's
        from above, so a rule on it is the more permissive one.

        Args:
            model: anything with ``.tokenizer`` and ``final_logits(prompts, *, batch_size)``
                returning next-token logits ``[batch d_vocab]``.
            batch_size: prompts per forward pass (a model with ``tokenize`` gets them
                sorted by token length, so batches pad little).

        Returns:
            One row per fact: ``attribute_id``, ``rank`` (1 = the model's top prediction),
            ``prob`` and ``logit`` of the attribute token, and ``top_id``, the model's top
            prediction (what it says instead when ``rank > 1``). Cost: one forward pass per
            fact.
        """

        ids = attribute_token_ids(model.tokenizer, [f.attribute for f in self._facts])
        # batches of similar token length pad little (rome_known in batches of 64 in dataset
        # order: half the tokens were padding); results go back to dataset order
        order = list(range(len(self)))
        if hasattr(model, "tokenize") and len(self):
            lengths = model.tokenize(self._facts).lengths.tolist()
            order.sort(key=lambda i: lengths[i])
        ranks, probs, logits, tops = [], [], [], []
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            chunk = FactDataset([self._facts[i] for i in idx], name=self._name)
            lg = model.final_logits(chunk, batch_size=batch_size).float()  # [batch d_vocab]
            if lg.shape[0] != len(chunk):
                raise ArgumentError(f"final_logits returned {lg.shape[0]} rows for {len(chunk)}")
            target = lg.gather(-1, ids[idx, None].to(lg.device))  # [b 1]
            ranks.append((lg > target).sum(-1).cpu() + 1)
            probs.append(lg.softmax(-1).gather(-1, ids[idx, None].to(lg.device))[:, 0].cpu())
            logits.append(target[:, 0].cpu())
            tops.append(lg.argmax(-1).cpu())
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        cat = (lambda xs: torch.cat(xs)[back].tolist() if xs else [])
        return pd.DataFrame({"attribute_id": ids.tolist(), "rank": cat(ranks),
                             "prob": cat(probs), "logit": cat(logits), "top_id": cat(tops)})

    def known_by(self, model: Any, *, top_k: int = 1, min_prob: float = 0.0,
                 rule: KnownRule = "rank", batch_size: int = 64) -> FactDataset:
        """The facts ``model`` gets right, judged at the final position on the attribute's
        first token (:meth:`attribute_scores`; the rules are :func:`known_mask`'s).

        Args:
            model: as for :meth:`attribute_scores`.
            top_k: with ``rule="rank"``: keep facts whose attribute token has rank
                ``<= top_k`` (1 = argmax).
            min_prob: and whose probability is ``>= min_prob``.
            rule: ``"rank"`` (the default, as before: ``top_k`` and ``min_prob``) or
                ``"paper"``: Fact Finding's rule (Nanda et al. 2023), probability ``> 0.5``
                (which implies rank 1); ``top_k``/``min_prob`` then add to it.
            batch_size: prompts per forward pass.

        Returns:
            The kept facts, in order. The count is logged; when fewer than half are known,
            a warning names what the model predicts instead (:func:`describe_unknown`: e.g.
            " the" for a bare "plays the sport of" prompt, or the prefix's own example answer).

        Example::

            known = facts.known_by(model, rule="paper")       # p(attribute) > 0.5
            known = facts.known_by(model, top_k=1, min_prob=0.1)
        """
        if top_k < 1:
            raise ArgumentError(f"top_k must be >= 1, got {top_k}")
        scores = self.attribute_scores(model, batch_size=batch_size)
        keep = known_mask(scores, rule=rule, top_k=top_k, min_prob=min_prob)
        out = FactDataset((f for f, k in zip(self._facts, keep, strict=True) if k),
                          name=f"{self._name}|known")
        log.info("known_by: %d of %d facts of %s (%s)", len(out), len(self), self._name,
                 _rule_text(rule, top_k, min_prob))
        if len(self) and 2 * len(out) < len(self):
            prefixes = Counter(f.prefix for f in self._facts).most_common(1)[0][0]
            log.warning("%s", describe_unknown(scores, model.tokenizer, keep, name=self._name,
                                               prefix=prefixes))
        return out

    def corrupt(self, model_or_tokenizer: Any, *, seed: int = 0,
                on_missing: OnError = "raise", pool: FactDataset | None = None,
                fallback: tuple[str, ...] = ("relation",)) -> FactPairs:
        """Pair each prompt with a corrupted one for patching: see
        :func:`factfind.data.pairs.corrupt` (``pool``: more subjects to draw partners from, e.g. the
        whole dataset; ``fallback``: the steps tried, e.g. :data:`factfind.data.pairs.FALLBACKS`).

        Example::

            pairs = facts.corrupt(model, seed=0)
            pairs.clean[0].subject, pairs.corrupt[0].subject   # same token length
            pairs = known.corrupt(model, pool=facts, fallback=FALLBACKS)   # >= 90% paired
            pairs.to_frame()["partner_from"].value_counts()
        """

        return corrupt(self, model_or_tokenizer, seed=seed, on_missing=on_missing, pool=pool,
                       fallback=fallback)


KnownRule = Literal["rank", "paper"]
"""How :meth:`FactDataset.known_by` decides that a model knows a fact (see :func:`known_mask`)."""

PAPER_THRESHOLD = 0.5
"""Fact Finding's rule: the model knows a fact when p(attribute token) > 0.5."""


def known_mask(scores: pd.DataFrame, *, rule: KnownRule = "rank", top_k: int = 1,
               min_prob: float = 0.0) -> list[bool]:
    """Which facts count as known, from :meth:`FactDataset.attribute_scores`'s table.

    * ``rule="rank"``: the attribute token ranks within ``top_k`` and has probability
      ``>= min_prob`` (``top_k=1, min_prob=0``: the model's argmax; factfind's behaviour
      before the paper's rule was added).
    * ``rule="paper"``: Fact Finding's rule (Nanda et al. 2023), probability ``> 0.5``
      (:data:`PAPER_THRESHOLD`), which implies rank 1; ``top_k`` and ``min_prob`` still apply
      (they can only narrow it).

    Args:
        scores: a table with ``rank`` and ``prob`` columns.
        rule, top_k, min_prob: as above.

    Returns:
        One bool per row.

    Example::

        scores = facts.attribute_scores(model)
        known = [f for f, k in zip(facts, known_mask(scores, rule="paper")) if k]
    """
    check_mode(rule, "rule", ("rank", "paper"))
    if top_k < 1:
        raise ArgumentError(f"top_k must be >= 1, got {top_k}")
    keep = (scores["rank"] <= top_k) & (scores["prob"] >= min_prob)
    if rule == "paper":
        keep &= scores["prob"] > PAPER_THRESHOLD
    return [bool(k) for k in keep]


def _rule_text(rule: str, top_k: int, min_prob: float) -> str:
    extra = f"top_k={top_k}, min_prob={min_prob:g}"
    return f"p > {PAPER_THRESHOLD:g}, {extra}" if rule == "paper" else extra


def describe_unknown(scores: pd.DataFrame, tokenizer: Any, known: Sequence[bool] | None = None,
                     *, name: str = "facts", prefix: str = "") -> str:
    """One line on why a model knows few facts: how many it knows, and its most common top
    prediction on the others: ``' the'`` (the prompt does not ask for the attribute), or a
    word of the few-shot ``prefix`` (the model copies the example's answer: SmolLM2-135M
    answers " golf" after Fact Finding's "Fact: Tiger Woods plays the sport of golf").

    Args:
        scores: :meth:`FactDataset.attribute_scores`'s table (with ``top_id``).
        tokenizer: decodes the top prediction.
        known: the mask of known facts (default :func:`known_mask` with ``rule="rank"``).
        name: the dataset's name, for the message.
        prefix: the prompts' few-shot prefix, if any.

    Example::

        describe_unknown(facts.attribute_scores(model), model.tokenizer)
        # "knows 2 of 318 facts of plays pro sport; on 301 of the 316 others its top
        #  prediction is ' the' ..."
    """
    known = list(known) if known is not None else known_mask(scores)
    n, k = len(scores), sum(known)
    if k == n or "top_id" not in scores:  # a table cached before top_id was recorded
        return f"knows {k} of {n} facts of {name}"
    unknown = [int(t) for t, ok in zip(scores["top_id"], known, strict=True) if not ok]
    top, count = Counter(unknown).most_common(1)[0]
    text = tokenizer.decode([top])
    msg = (f"knows {k} of {n} facts of {name}; on {count} of the {len(unknown)} others its top "
           f"prediction is {text!r}, not the attribute")
    if count * 2 <= len(unknown):  # no single answer dominates: the facts, not the prompt
        return msg
    if text.strip() and text.strip() in prefix.split():
        return msg + (": it copies the answer of the few-shot prefix; try other or more "
                      "examples (FactDataset.with_prefix)")
    return msg + (": the prompt does not ask for the attribute; give an example first "
                  "(FactDataset.with_prefix; 'athletes' is Fact Finding's one-shot prompt)")


__all__ = ["PAPER_THRESHOLD", "FactDataset", "KnownRule", "describe_unknown", "known_mask"]
