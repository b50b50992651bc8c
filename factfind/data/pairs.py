"""Clean/corrupt prompt pairs for activation patching, and how Fact Finding builds them.

Activation patching (Meng et al. 2022; Heimersheim & Nanda 2024) runs a model on a *clean*
prompt and a *corrupt* one and copies activations between the runs: a site whose clean value
restores the clean answer in the corrupt run carries the fact. Copying position by position is
only meaningful when the two prompts line up token for token. ROME corrupts by adding noise to
the subject embeddings; DeepMind's "Fact Finding" (Nanda et al. 2023) instead swaps in *another
subject of the same relation with the same number of tokens and a different attribute*, which
keeps every activation on-distribution. :func:`corrupt` implements that scheme:

1. for a clean prompt, the candidates are the relation's other subjects whose attribute's first
   token differs from the clean one (so a metric can tell the two answers apart), drawn from
   the clean dataset and from ``pool`` (typically the whole dataset the clean, known facts were
   sampled from: a partner only has to change the answer, the model need not know it);
2. they are tried in an order shuffled by ``random.Random(seed | the fact's content)``, which is
   deterministic and independent of the other prompts in the dataset;
3. the first candidate whose prompt (the clean prefix and template with the candidate subject)
   tokenizes to the same length, with the subject at the same positions and identical tokens
   elsewhere, is taken, so the subject's token length is compared *in context*.

When no subject of the relation fits (a four-token athlete among three-token ones), the
``fallback`` steps say where to look next, in order (:data:`FALLBACKS`):

* ``"relation"``: steps 1-3 above (always the first step in practice);
* ``"other_relation"``: a subject of *another* relation in the pool, of the same token length
  in context, put in the clean prompt ("Fact: Honda Civic plays the sport of"). It has no
  answer of its own here, so its attribute is a *contrast answer*: one of the clean
  relation's attributes whose first token differs, drawn with the same seeded generator. Its
  corrupt run is off-distribution in the subject; analyses that need on-distribution
  corruption keep only ``partner_from == "relation"``.

:attr:`FactPairs.partner_from` records the step each partner came from (a column of
:meth:`FactPairs.to_frame`).

Example::

    pairs = corrupt(facts, tokenizer, seed=0)
    [(clean.prompt, bad.prompt) for clean, bad in pairs]   # each fact and its corruption
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import InitVar, dataclass
from typing import TYPE_CHECKING, Any, overload

import pandas as pd

from factfind.data.prompts import FactPrompt, _tokenizer_of
from factfind.data.spans import Alignment, align_rows, attribute_token_ids
from factfind.errors import ArgumentError, FactDataError, check_mode
from factfind.types import OnError

if TYPE_CHECKING:
    from factfind.data.dataset import FactDataset

log = logging.getLogger(__name__)


FALLBACKS = ("relation", "other_relation")
"""Where :func:`corrupt` looks for a partner, in order (see the module docstring)."""


def corrupt(dataset: FactDataset, model_or_tokenizer: Any, *, seed: int = 0,
            on_missing: OnError = "raise", pool: FactDataset | None = None,
            fallback: tuple[str, ...] = ("relation",)) -> FactPairs:
    """Pair each prompt of ``dataset`` with a corrupt prompt (see the module docstring).

    Args:
        dataset: the clean prompts.
        model_or_tokenizer: a fast tokenizer, or a model with ``.tokenizer``.
        seed: seeds the candidate order.
        on_missing: ``"raise"`` a :class:`~factfind.data.FactDataError` for a prompt with no
            valid partner, or ``"skip"`` it (logged and listed in ``FactPairs.skipped``).
        pool: where partners come from, besides ``dataset`` itself: typically the whole
            dataset the clean prompts were drawn from (partners need not be facts the model
            knows: they only have to change the answer). Default: ``dataset`` alone.
        fallback: the steps tried in order, from :data:`FALLBACKS`: ``"relation"`` (a subject
            of the same relation whose attribute's first token differs) and
            ``"other_relation"`` (a subject of another relation, with a contrast attribute).

    Returns:
        :class:`FactPairs` whose ``clean`` holds the prompts that found a partner, in order,
        and ``partner_from`` the step each partner came from.
    """
    facts = tuple(dataset)
    check_mode(on_missing, "on_missing", ("raise", "skip"))
    if not fallback or any(step not in FALLBACKS for step in fallback):
        raise ArgumentError(f"fallback must be a non-empty tuple of {FALLBACKS}, got {fallback!r}")
    tok = _tokenizer_of(model_or_tokenizer)
    clean_al = align_rows(tok, facts)
    everyone = facts + tuple(pool or ())
    ids = attribute_token_ids(tok, [f.attribute for f in everyone]).tolist()
    attr_ids = ids[:len(facts)]
    pools: dict[str, dict[tuple[str, str], tuple[FactPrompt, int]]] = {}
    for f, a in zip(everyone, ids, strict=True):
        pools.setdefault(f.relation, {}).setdefault((f.subject, f.attribute), (f, a))
    pool_lists = {rel: list(p.values()) for rel, p in pools.items()}
    answers = {rel: sorted({(f.attribute, a) for f, a in p}) for rel, p in pool_lists.items()}
    by_subject = {f.subject: (f, a) for f, a in zip(everyone, ids, strict=True)}
    subjects = {rel: {f.subject for f, _ in p} for rel, p in pool_lists.items()}
    cache: dict[tuple[str, str, str], Alignment | FactDataError] = {}
    clean: list[FactPrompt] = []
    bad: list[FactPrompt] = []
    steps: list[str] = []
    missing: list[tuple[int | str, str]] = []
    for i, (fact, ref) in enumerate(zip(facts, clean_al, strict=True)):
        label = fact.source or f"prompt {i}"
        if isinstance(ref, FactDataError):
            raise ref.at(record=label)
        rng = random.Random(f"{seed}|{fact.relation}|{fact.prefix}|{fact.template}|"
                            f"{fact.subject}|{fact.attribute}")
        partner, n_tried = None, 0
        for step in fallback:
            if step == "relation":
                cands = ((c, c.attribute) for c, a in _shuffled(pool_lists[fact.relation], rng)
                         if c.subject != fact.subject and a != attr_ids[i])
            else:  # another relation's subject; the contrast answer is one of this relation's
                others = [(attr, a) for attr, a in answers[fact.relation] if a != attr_ids[i]]
                if not others:
                    continue
                contrast = rng.choice(others)[0]
                cands = ((c, contrast) for c, _ in _shuffled(list(by_subject.values()), rng)
                         if c.subject not in subjects[fact.relation])
            hit, tried = _first_aligned(fact, ref, cands, tok, cache)
            n_tried += tried
            if hit is not None:
                c, attribute = hit
                same = c.relation == fact.relation
                partner = dataclasses.replace(fact, subject=c.subject, attribute=attribute,
                                              source=c.source, meta=c.meta if same else ())
                steps.append(step)
                break
        if partner is None:
            where = "" if fallback == ("relation",) else f" (steps: {', '.join(fallback)})"
            missing.append((label, f"no subject of relation {fact.relation!r} with the same "
                                   f"token length ({ref.n_subject}) and a different "
                                   f"attribute among {n_tried} candidates{where}"))
            continue
        clean.append(fact)
        bad.append(partner)
    if missing:
        if on_missing == "raise":
            more = f" (and {len(missing) - 1} more prompts)" if len(missing) > 1 else ""
            raise FactDataError(f"{dataset.name}: {missing[0][1]}{more}", record=missing[0][0])
        log.warning("corrupt(%s): skipped %d of %d prompts with no valid partner, e.g. %s: %s",
                    dataset.name, len(missing), len(facts), *missing[0])
    counts = Counter(steps)
    if set(counts) - {"relation"}:
        log.info("corrupt(%s): partners by step: %s", dataset.name,
                 ", ".join(f"{k} {v}" for k, v in counts.items()))
    make = type(dataset)  # the dataset's class: pairs sit below datasets in the import order
    return FactPairs(make(clean, name=dataset.name),
                     make(bad, name=f"{dataset.name}|corrupt(seed={seed})"),
                     seed=seed, skipped=tuple(missing),
                     partner_from=tuple(steps))  # aligned above: no re-check


def _first_aligned(fact: FactPrompt, ref: Alignment, cands: Iterator[tuple[FactPrompt, str]],
                   tok: Any, cache: dict[tuple[str, str, str], Alignment | FactDataError]
                   ) -> tuple[tuple[FactPrompt, str] | None, int]:
    """The first candidate whose subject, put in ``fact``'s prompt, tokenizes like ``ref``
    outside the subject (same roles at the same positions), and how many were tried.
    Candidates are aligned 16 at a time; each (context, subject) once (``cache``)."""
    n_tried = 0
    while chunk := list(itertools.islice(cands, 16)):
        n_tried += len(chunk)
        todo = list(dict.fromkeys(c.subject for c, _ in chunk
                                  if (fact.prefix, fact.template, c.subject) not in cache))
        if todo:
            prompts = [dataclasses.replace(fact, subject=s) for s in todo]
            for s, al in zip(todo, align_rows(tok, prompts), strict=True):
                cache[(fact.prefix, fact.template, s)] = al
        for c, attribute in chunk:
            if ref.matches(cache[(fact.prefix, fact.template, c.subject)]):
                return (c, attribute), n_tried
    return None, n_tried


def _shuffled(items: list[Any], rng: random.Random) -> Iterator[Any]:
    """``items`` in a random order drawn lazily (Fisher-Yates), so taking k costs O(k) draws."""
    items = list(items)
    for k in range(len(items)):
        j = rng.randrange(k, len(items))
        items[k], items[j] = items[j], items[k]
        yield items[k]


@dataclass(frozen=True)
class FactPairs:
    """Clean and corrupt prompts for patching: ``clean[i]`` and ``corrupt[i]`` share relation,
    token length and role positions (checked when a ``tokenizer`` is given).

    Attributes:
        clean: the original prompts.
        corrupt: one partner per clean prompt.
        seed: the seed that chose the partners (``None`` if built by hand).
        skipped: ``(record, reason)`` for clean prompts left out for lack of a partner.
        partner_from: per pair, the :func:`corrupt` step its partner came from
            (``"relation"``, ``"other_relation"``); empty when built by hand. Not part of
            :meth:`fingerprint` (the prompts already say everything it records).
    """

    clean: FactDataset
    corrupt: FactDataset
    seed: int | None = None
    skipped: tuple[tuple[int | str, str], ...] = ()
    tokenizer: InitVar[Any] = None
    partner_from: tuple[str, ...] = ()

    def __post_init__(self, tokenizer: Any) -> None:
        if len(self.clean) != len(self.corrupt):
            raise FactDataError(f"{len(self.clean)} clean but {len(self.corrupt)} corrupt prompts")
        object.__setattr__(self, "partner_from", tuple(self.partner_from))
        if self.partner_from and len(self.partner_from) != len(self.clean):
            raise FactDataError(f"{len(self.partner_from)} partner_from entries for "
                                f"{len(self.clean)} pairs")
        for i, (c, k) in enumerate(zip(self.clean, self.corrupt, strict=True)):
            if c.relation != k.relation:
                raise FactDataError(f"clean relation {c.relation!r} != corrupt {k.relation!r}",
                                    record=i)
        if tokenizer is None:
            return
        for i, (a, b) in enumerate(zip(align_rows(tokenizer, self.clean),
                                       align_rows(tokenizer, self.corrupt), strict=True)):
            if isinstance(a, FactDataError):
                raise a.at(record=i)
            if isinstance(b, FactDataError):
                raise b.at(record=i)
            if a.roles != b.roles:
                raise FactDataError(
                    f"clean {self.clean[i].prompt!r} and corrupt {self.corrupt[i].prompt!r} "
                    f"do not align: token roles {a.roles} vs {b.roles}", record=i)

    def __len__(self) -> int:
        return len(self.clean)

    @overload
    def __getitem__(self, index: int) -> tuple[FactPrompt, FactPrompt]: ...
    @overload
    def __getitem__(self, index: slice) -> FactPairs: ...
    def __getitem__(self, index: int | slice) -> tuple[FactPrompt, FactPrompt] | FactPairs:
        if isinstance(index, slice):
            return FactPairs(self.clean[index], self.corrupt[index], seed=self.seed,
                             partner_from=self.partner_from[index])
        return self.clean[index], self.corrupt[index]

    def __iter__(self) -> Iterator[tuple[FactPrompt, FactPrompt]]:
        return zip(self.clean, self.corrupt, strict=True)

    def to_frame(self) -> pd.DataFrame:
        """One row per pair: ``relation``, ``clean_subject``, ``corrupt_subject``,
        ``clean_attribute``, ``corrupt_attribute``, ``clean_prompt``, ``corrupt_prompt``,
        ``corrupt_source`` and ``partner_from`` (empty string when built by hand)."""
        steps = self.partner_from or ("",) * len(self)
        return pd.DataFrame(
            [{"relation": c.relation, "clean_subject": c.subject, "corrupt_subject": k.subject,
              "clean_attribute": c.attribute, "corrupt_attribute": k.attribute,
              "clean_prompt": c.prompt, "corrupt_prompt": k.prompt, "corrupt_source": k.source,
              "partner_from": step} for (c, k), step in zip(self, steps, strict=True)],
            columns=["relation", "clean_subject", "corrupt_subject", "clean_attribute",
                     "corrupt_attribute", "clean_prompt", "corrupt_prompt", "corrupt_source",
                     "partner_from"])

    def fingerprint(self) -> str:
        """Stable sha256 over both datasets' fingerprints and the seed."""
        blob = f"{self.clean.fingerprint()}|{self.corrupt.fingerprint()}|{self.seed}"
        return hashlib.sha256(blob.encode()).hexdigest()
