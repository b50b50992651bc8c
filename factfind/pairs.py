"""Clean/corrupt prompt pairs for activation patching, and how Fact Finding builds them.

Activation patching (Meng et al. 2022; Heimersheim & Nanda 2024) runs a model on a *clean*
prompt and a *corrupt* one and copies activations between the runs: a site whose clean value
restores the clean answer in the corrupt run carries the fact. Copying position by position is
only meaningful when the two prompts line up token for token. ROME corrupts by adding noise to
the subject embeddings; DeepMind's "Fact Finding" (Nanda et al. 2023) instead swaps in *another
subject of the same relation with the same number of tokens and a different attribute*, which
keeps every activation on-distribution. :func:`corrupt` implements that scheme:

1. for a clean prompt, the candidates are the relation's other subjects whose attribute's first
   token differs from the clean one (so a metric can tell the two answers apart);
2. they are tried in an order shuffled by ``random.Random(seed | the fact's content)``, which is
   deterministic and independent of the other prompts in the dataset;
3. the first candidate whose prompt (the clean prefix and template with the candidate subject)
   tokenizes to the same length, with the subject at the same positions and identical tokens
   elsewhere, is taken, so the subject's token length is compared *in context*.

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
from collections.abc import Iterator
from dataclasses import InitVar, dataclass
from typing import Any, overload

from factfind.data import (
    FactDataError,
    FactDataset,
    FactPrompt,
    OnError,
    _tokenizer_of,
    check_mode,
)
from factfind.spans import Alignment, align_rows, attribute_token_ids

log = logging.getLogger(__name__)


def corrupt(dataset: FactDataset, model_or_tokenizer: Any, *, seed: int = 0,
            on_missing: OnError = "raise") -> FactPairs:
    """Pair each prompt of ``dataset`` with a corrupt prompt (see the module docstring).

    Args:
        dataset: the clean prompts.
        model_or_tokenizer: a fast tokenizer, or a model with ``.tokenizer``.
        seed: seeds the candidate order.
        on_missing: ``"raise"`` a :class:`~factfind.data.FactDataError` for a prompt with no
            valid partner, or ``"skip"`` it (logged and listed in ``FactPairs.skipped``).

    Returns:
        :class:`FactPairs` whose ``clean`` holds the prompts that found a partner, in order.
    """
    facts = tuple(dataset)
    check_mode(on_missing, "on_missing", ("raise", "skip"))
    tok = _tokenizer_of(model_or_tokenizer)
    clean_al = align_rows(tok, facts)
    attr_ids = attribute_token_ids(tok, [f.attribute for f in facts]).tolist()
    pools: dict[str, dict[tuple[str, str], tuple[FactPrompt, int]]] = {}
    for f, a in zip(facts, attr_ids, strict=True):
        pools.setdefault(f.relation, {}).setdefault((f.subject, f.attribute), (f, a))
    pool_lists = {rel: list(pool.values()) for rel, pool in pools.items()}
    cache: dict[tuple[str, str, str], Alignment | FactDataError] = {}
    clean: list[FactPrompt] = []
    bad: list[FactPrompt] = []
    missing: list[tuple[int | str, str]] = []
    for i, (fact, ref) in enumerate(zip(facts, clean_al, strict=True)):
        label = fact.source or f"prompt {i}"
        if isinstance(ref, FactDataError):
            raise ref.at(record=label)
        rng = random.Random(f"{seed}|{fact.relation}|{fact.prefix}|{fact.template}|"
                            f"{fact.subject}|{fact.attribute}")
        cands = (c for c, a in _shuffled(pool_lists[fact.relation], rng)
                 if c.subject != fact.subject and a != attr_ids[i])
        partner, n_tried = None, 0
        while partner is None and (chunk := list(itertools.islice(cands, 16))):
            n_tried += len(chunk)
            todo = [c for c in chunk if (fact.prefix, fact.template, c.subject) not in cache]
            if todo:  # align each (context, subject) once; a context is shared by many prompts
                prompts = [dataclasses.replace(fact, subject=c.subject) for c in todo]
                for c, al in zip(todo, align_rows(tok, prompts), strict=True):
                    cache[(fact.prefix, fact.template, c.subject)] = al
            hit = next((c for c in chunk
                        if ref.matches(cache[(fact.prefix, fact.template, c.subject)])), None)
            if hit is not None:
                partner = dataclasses.replace(fact, subject=hit.subject, attribute=hit.attribute,
                                              source=hit.source, meta=hit.meta)
        if partner is None:
            missing.append((label, f"no subject of relation {fact.relation!r} with the same "
                                   f"token length ({ref.n_subject}) and a different "
                                   f"attribute among {n_tried} candidates"))
            continue
        clean.append(fact)
        bad.append(partner)
    if missing:
        if on_missing == "raise":
            more = f" (and {len(missing) - 1} more prompts)" if len(missing) > 1 else ""
            raise FactDataError(f"{dataset.name}: {missing[0][1]}{more}", record=missing[0][0])
        log.warning("corrupt(%s): skipped %d of %d prompts with no valid partner, e.g. %s: %s",
                    dataset.name, len(missing), len(facts), *missing[0])
    return FactPairs(FactDataset(clean, name=dataset.name),
                     FactDataset(bad, name=f"{dataset.name}|corrupt(seed={seed})"),
                     seed=seed, skipped=tuple(missing))  # aligned above: no re-check


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
    """

    clean: FactDataset
    corrupt: FactDataset
    seed: int | None = None
    skipped: tuple[tuple[int | str, str], ...] = ()
    tokenizer: InitVar[Any] = None

    def __post_init__(self, tokenizer: Any) -> None:
        if len(self.clean) != len(self.corrupt):
            raise FactDataError(f"{len(self.clean)} clean but {len(self.corrupt)} corrupt prompts")
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
            return FactPairs(self.clean[index], self.corrupt[index], seed=self.seed)
        return self.clean[index], self.corrupt[index]

    def __iter__(self) -> Iterator[tuple[FactPrompt, FactPrompt]]:
        return zip(self.clean, self.corrupt, strict=True)

    def fingerprint(self) -> str:
        """Stable sha256 over both datasets' fingerprints and the seed."""
        blob = f"{self.clean.fingerprint()}|{self.corrupt.fingerprint()}|{self.seed}"
        return hashlib.sha256(blob.encode()).hexdigest()
