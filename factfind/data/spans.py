"""Token-span alignment: which tokens of a fact prompt hold the subject, the relation, the answer.

Patching and attribution results are indexed by position *roles* (:class:`~factfind.types.Role`)
rather than raw indices, so that prompts of different lengths can be compared. This module turns
prompts into a padded token batch and finds, for every row:

* ``subject_first`` / ``subject_last``: the first and last token of the subject;
* ``subject``: all subject tokens; ``relation``: the template's other tokens except the last;
* ``final``: the last real token, where the model predicts the attribute;
* ``prefix``: the tokens of a few-shot prefix (none when the prefix is empty).

How. The subject's character span comes from the template slot (``len(prefix) + len(text before
{})``), never from searching the text, so a subject that also occurs in the prefix or elsewhere
in the prompt is found at the slot. A fast tokenizer's ``offset_mapping`` gives each token's
character span; a token belongs to the subject when its overlap with the subject span contains a
non-space character (so GPT-2's ``" Jordan"``, whose leading space belongs to the template,
counts) or lies wholly inside it. Special tokens (a BOS) have no role.

BPE merges across the boundary. Some tokenizers merge subject and template characters into one
token (SentencePiece without punctuation splitting: ``"▁Jordan,"``; byte-level BPE on text with no
word breaks: ``"北京是"``). Rule: such a token *counts as a subject token* (so it is
``subject_last`` when the merge is at the end), the row is flagged in ``TokenBatch.merged`` and a
warning is logged; pass ``on_merge="raise"`` to refuse instead. A prompt whose final token would
be a subject token has no position to read the prediction from and always raises
:class:`~factfind.data.FactDataError`.

Padding. Causal LMs are run left-padded (nnsight does so): positions in :class:`TokenBatch` are
absolute indices in the padded batch, and ``position_ids = cumsum(mask) - 1`` gives a padded row
the same position ids as the unpadded prompt. Right padding is supported for comparisons.

Attribute tokens. The answer token is the first token of ``" " + attribute`` as the tokenizer
produces it after a word (see :func:`attribute_token_ids`): for byte-level BPE simply the first
token of ``" " + attribute``, for SentencePiece the ``"▁Paris"`` that follows a prompt rather
than the lone ``"▁"`` that a string-initial space becomes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from factfind.data.batch import TokenBatch
from factfind.data.prompts import FactPrompt, _tokenizer_of
from factfind.errors import ArgumentError, FactDataError, WrongTypeError, check_mode
from factfind.types import GROUP_ROLES, Role

log = logging.getLogger(__name__)

OnMerge = Literal["subject", "raise"]


@dataclass(frozen=True)
class Alignment:
    """One prompt's tokens and the role of each (unpadded).

    Attributes:
        ids: token ids, special tokens included.
        roles: per token a :class:`Role` (``PREFIX``, ``SUBJECT``, ``RELATION`` or ``FINAL``),
            or ``None`` for special tokens.
        merged: whether a subject token also holds non-space template or prefix characters.
    """

    ids: tuple[int, ...]
    roles: tuple[Role | None, ...]
    merged: bool = False

    @property
    def subject_first(self) -> int:
        """Index of the first subject token."""
        return self.roles.index(Role.SUBJECT)

    @property
    def subject_last(self) -> int:
        """Index of the last subject token."""
        return len(self.roles) - 1 - self.roles[::-1].index(Role.SUBJECT)

    @property
    def n_subject(self) -> int:
        """Number of subject tokens."""
        return self.roles.count(Role.SUBJECT)

    def matches(self, other: Alignment | FactDataError) -> bool:
        """Same roles at the same positions and the same tokens outside the subject."""
        return (isinstance(other, Alignment) and other.roles == self.roles
                and all(a == b for a, b, r in zip(self.ids, other.ids, self.roles, strict=True)
                        if r is not Role.SUBJECT))


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise WrongTypeError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; "
                             "token-span alignment needs offset mappings: load it with "
                             "use_fast=True")


def _align_one(ids: list[int], offsets: list[tuple[int, int]], special: list[int],
               fact: FactPrompt, on_merge: OnMerge) -> Alignment:
    text = fact.prompt
    s0, s1 = fact.subject_span
    n_prefix = len(fact.prefix)
    roles: list[Role | None] = []
    merged_tokens = []
    for (a, b), sp in zip(offsets, special, strict=True):
        if sp:
            roles.append(None)
            continue
        inside = text[max(a, s0):min(b, s1)]
        if inside and (inside.strip() or (a >= s0 and b <= s1)):
            roles.append(Role.SUBJECT)
            if text[a:s0].strip() or text[s1:b].strip():
                merged_tokens.append(text[a:b])
            continue
        piece = text[a:b]
        first = a + len(piece) - len(piece.lstrip()) if piece.strip() else a
        roles.append(Role.PREFIX if first < n_prefix else Role.RELATION)
    subj = [j for j, r in enumerate(roles) if r is Role.SUBJECT]
    if not subj:
        raise FactDataError(f"no token covers the subject {fact.subject!r} in {text!r}")
    if subj != list(range(subj[0], subj[-1] + 1)):
        raise FactDataError(f"the subject {fact.subject!r} is not a contiguous run of tokens "
                            f"in {text!r}")
    if merged_tokens and on_merge == "raise":
        raise FactDataError(f"token {merged_tokens[0]!r} merges the subject {fact.subject!r} "
                            f"with template text in {text!r}")
    if roles[-1] is None:
        raise FactDataError(f"the tokenizer ends {text!r} with a special token; factfind needs "
                            "the last token to be the prompt's own (disable add_eos_token)")
    if roles[-1] is Role.SUBJECT:
        raise FactDataError(f"the last token of {text!r} is a subject token "
                            f"({text[offsets[-1][0]:offsets[-1][1]]!r}): no template token "
                            "follows the subject to read the prediction from")
    roles[-1] = Role.FINAL
    return Alignment(tuple(ids), tuple(roles), merged=bool(merged_tokens))


def align_rows(tokenizer: Any, prompts: Sequence[FactPrompt], *,
               on_merge: OnMerge = "subject") -> list[Alignment | FactDataError]:
    """Like :func:`align`, but returns each row's error instead of raising it."""
    _check_fast(tokenizer)
    check_mode(on_merge, "on_merge", ("subject", "raise"))
    prompts = list(prompts)
    if not prompts:
        return []
    enc = tokenizer([p.prompt for p in prompts], add_special_tokens=True, padding=False,
                    truncation=False, return_offsets_mapping=True,
                    return_special_tokens_mask=True, return_attention_mask=False)
    out: list[Alignment | FactDataError] = []
    for i, p in enumerate(prompts):
        try:
            out.append(_align_one(enc["input_ids"][i], enc["offset_mapping"][i],
                                  enc["special_tokens_mask"][i], p, on_merge))
        except FactDataError as e:
            out.append(e.at(record=p.source or f"prompt {i}"))
    return out


def align(tokenizer: Any, prompts: Sequence[FactPrompt], *,
          on_merge: OnMerge = "subject") -> list[Alignment]:
    """Tokenize prompts (unpadded) and give each token its role.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        prompts: the prompts.
        on_merge: ``"subject"``: a token that merges subject and template text counts as a
            subject token; ``"raise"``: raise :class:`FactDataError` instead.

    Returns:
        One :class:`Alignment` per prompt.

    Raises:
        FactDataError: a prompt cannot be aligned (named by its ``source``).
    """
    rows = align_rows(tokenizer, prompts, on_merge=on_merge)
    for r in rows:
        if isinstance(r, FactDataError):
            raise r
    return [r for r in rows if isinstance(r, Alignment)]


def encode(tokenizer: Any, prompts: Iterable[FactPrompt], *, padding_side: str = "left",
           on_merge: OnMerge = "subject") -> TokenBatch:
    """Tokenize and pad prompts and locate every role.

    Args:
        tokenizer: a fast Hugging Face tokenizer (its own padding settings are not used or
            changed; the pad id is ``pad_token_id``, else ``eos_token_id``, else 0).
        prompts: the prompts (a :class:`~factfind.data.FactDataset` works).
        padding_side: ``"left"`` (as causal LMs are run) or ``"right"``.
        on_merge: see :func:`align`.

    Returns:
        A :class:`TokenBatch`.

    Raises:
        FactDataError: a prompt cannot be aligned.

    Example::

        batch = encode(tok, [FactPrompt("Michael Jordan", "sport", "{} plays", "basketball")])
        tok.decode(batch.input_ids[0, batch.positions[Role.SUBJECT_LAST]])   # ' Jordan'
    """
    check_mode(padding_side, "padding_side", ("left", "right"))
    prompts = tuple(prompts)
    if not prompts:
        raise ArgumentError("encode() needs at least one prompt")
    rows = align(tokenizer, prompts, on_merge=on_merge)
    n_batch, n_pos = len(rows), max(len(r.ids) for r in rows)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    input_ids = torch.full((n_batch, n_pos), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros(n_batch, n_pos, dtype=torch.long)
    masks = {role: torch.zeros(n_batch, n_pos, dtype=torch.bool) for role in GROUP_ROLES}
    first, last, final = (torch.zeros(n_batch, dtype=torch.long) for _ in range(3))
    for i, r in enumerate(rows):
        off = n_pos - len(r.ids) if padding_side == "left" else 0
        input_ids[i, off:off + len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        attention_mask[i, off:off + len(r.ids)] = 1
        for j, role in enumerate(r.roles):
            if role is not None:
                masks[role][i, off + j] = True
        first[i], last[i] = off + r.subject_first, off + r.subject_last
        final[i] = off + len(r.ids) - 1
    n_merged = sum(r.merged for r in rows)
    if n_merged:
        example = next(p for p, r in zip(prompts, rows, strict=True) if r.merged)
        log.warning("%d of %d prompts have a token merging subject and template text "
                    "(counted as subject), e.g. %r", n_merged, n_batch, example.prompt)
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        positions={Role.SUBJECT_FIRST: first, Role.SUBJECT_LAST: last, Role.FINAL: final},
        masks=masks,
        attribute_ids=attribute_token_ids(tokenizer, [p.attribute for p in prompts]),
        lengths=attention_mask.sum(-1),
        merged=torch.tensor([r.merged for r in rows], dtype=torch.bool),
        prompts=prompts,
        padding_side=padding_side,
    )


_PROBE = "is"


def attribute_token_ids(tokenizer: Any, attributes: Sequence[str]) -> Tensor:
    """The answer token of each attribute: its first token when it follows a word and a space.

    The text ``"is " + attribute`` is tokenized without special tokens and the token after
    ``"is"`` is taken. For byte-level BPE (GPT-2, Pythia) this is exactly the first token of
    ``" " + attribute``; for SentencePiece tokenizers, which split a string-initial ``" Paris"``
    into ``["▁", "▁Paris"]``, it is ``"▁Paris"``, the token that really follows a prompt. If the
    probe word merges with the attribute, the first token of ``" " + attribute`` is used.

    Args:
        tokenizer: a Hugging Face tokenizer.
        attributes: attribute strings without a leading space, e.g. ``["golf"]``.

    Returns:
        ``[len(attributes)]`` long tensor of token ids.

    Raises:
        FactDataError: an attribute has no token.
    """
    if not attributes:
        return torch.zeros(0, dtype=torch.long)
    probe = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    enc = tokenizer([f"{_PROBE} {a}" for a in attributes], add_special_tokens=False)["input_ids"]
    out = []
    for a, ids in zip(attributes, enc, strict=True):
        if list(ids[:len(probe)]) == probe and len(ids) > len(probe):
            out.append(ids[len(probe)])
            continue
        alone = tokenizer(" " + a, add_special_tokens=False)["input_ids"]
        if not alone:
            raise FactDataError(f"attribute {a!r} has no token")
        out.append(alone[0])
    return torch.tensor(out, dtype=torch.long)


def attribute_collisions(dataset: Iterable[FactPrompt], tokenizer: Any) -> pd.DataFrame:
    """Relations in which different attributes share their first token.

    Metrics read only the first attribute token, so colliding attributes (" New York" and
    " New Delhi" both start with " New") cannot be told apart at the final position.

    Args:
        dataset: fact prompts.
        tokenizer: a tokenizer, or a model with ``.tokenizer``.

    Returns:
        One row per ``(relation, token_id)`` shared by two or more distinct attributes, with
        columns ``relation, token_id, token, attributes`` (sorted tuple) ``, n_facts``; sorted by
        relation and token id; empty when there is no collision.
    """
    tok = _tokenizer_of(tokenizer)
    facts = list(dataset)
    ids = attribute_token_ids(tok, [f.attribute for f in facts]).tolist()
    groups: dict[tuple[str, int], dict[str, int]] = {}
    for f, t in zip(facts, ids, strict=True):
        counts = groups.setdefault((f.relation, t), {})
        counts[f.attribute] = counts.get(f.attribute, 0) + 1
    rows = [{"relation": rel, "token_id": t, "token": tok.decode([t]),
             "attributes": tuple(sorted(c)), "n_facts": sum(c.values())}
            for (rel, t), c in sorted(groups.items()) if len(c) > 1]
    return pd.DataFrame(rows, columns=["relation", "token_id", "token", "attributes", "n_facts"])
