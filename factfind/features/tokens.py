"""Token batches to measure dictionaries on: facts, text, a corpus or a token batch.

Every measurement of a dictionary (:mod:`.evaluation`, :mod:`.dashboard`, the feature concepts)
reads it on *evaluated tokens*: real tokens that are not the tokenizer's special tokens (BOS,
EOS, PAD; SAELens' ``ignore_tokens``). The BOS position's activations are outliers no
dictionary is asked to reconstruct, and padding is not text. :func:`token_batches` turns any of
the inputs a user has into left-padded batches with that mask.

Example::

    for t in token_batches(model, ["Paris is in France."], batch_size=8):
        t.batch, t.valid          # what Model.run takes; [batch pos] bool
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.errors import ArgumentError, EmptyInputError
from factfind.features.dictionary import Dictionaries, Dictionary

if TYPE_CHECKING:
    from factfind.model import Model


@dataclass
class Tokens:
    """One batch of tokens to evaluate on.

    Attributes:
        batch: what :meth:`Model.run` takes (a ``TokenBatch`` or ``{input_ids, attention_mask}``),
            left-padded.
        valid: ``[batch pos]`` bool: real tokens that are not special (BOS, EOS, PAD).
        source: ``"facts"`` or ``"corpus"``; ``rows``: the index of each row in the input.
    """

    batch: Any
    valid: Tensor
    source: str
    rows: list[int]

    @property
    def input_ids(self) -> Tensor:
        return self.batch["input_ids"] if isinstance(self.batch, Mapping) else \
            self.batch.input_ids


def special_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's special token ids (BOS, EOS, PAD, ...), which evaluations skip."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.add(int(v))
    return sorted(ids)


def _valid(input_ids: Tensor, attention_mask: Tensor, special: Sequence[int]) -> Tensor:
    ok = attention_mask.bool().cpu().clone()
    if special:
        ok &= ~torch.isin(input_ids.cpu(), torch.tensor(list(special)))
    return ok


def _texts(data: Any) -> list[str] | None:
    """The texts of ``data`` when it is text: a string, strings, or a corpus object (one with
    ``texts``/``documents`` or iterating over strings)."""
    if isinstance(data, str):
        return [data]
    for attr in ("texts", "documents"):
        got = getattr(data, attr, None)
        if got is not None and not callable(got):
            return [str(t) for t in got]
    if isinstance(data, Sequence) and data and all(isinstance(t, str) for t in data):
        return list(data)
    return None


def token_batches(model: Model, data: Any, *, batch_size: int = 16, max_length: int = 128,
                  max_tokens: int | None = None) -> Iterator[Tokens]:
    """Batches of evaluation tokens from facts, text or tokens.

    Args:
        data: a ``FactDataset`` or sequence of ``FactPrompt`` (tokenized with their role spans),
            a ``TokenBatch`` or ``{input_ids, attention_mask}`` mapping (left-padded), a string,
            a list of strings, or a corpus (an object with ``texts``/``documents``, e.g. what
            :func:`factfind.features.corpus.load_corpus` returns).
        batch_size: rows per batch; max_length: texts are truncated to this many tokens.
        max_tokens: stop after about this many evaluated tokens (whole batches).

    Raises:
        EmptyInputError: no rows, or no token left to evaluate.
    """
    special = special_ids(model.tokenizer)
    seen = 0
    texts = _texts(data)
    if texts is not None:
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise EmptyInputError("no text to evaluate on: the corpus is empty")
        tok = model.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            for start in range(0, len(texts), batch_size):
                enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                          truncation=True, max_length=max_length)
                ids, mask = enc["input_ids"], enc["attention_mask"]
                v = _valid(ids, mask, special)
                yield Tokens({"input_ids": ids, "attention_mask": mask}, v, "corpus",
                             list(range(start, start + len(ids))))
                seen += int(v.sum())
                if max_tokens is not None and seen >= max_tokens:
                    return
        finally:
            tok.padding_side = side
        return
    if isinstance(data, Mapping) or hasattr(data, "input_ids"):
        ids = data["input_ids"] if isinstance(data, Mapping) else data.input_ids
        mask = data["attention_mask"] if isinstance(data, Mapping) else data.attention_mask
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise EmptyInputError(f"token batch must be [batch pos] with batch > 0, got "
                                  f"{tuple(ids.shape)}")
        for start in range(0, ids.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            b = {k: v[sl] for k, v in data.items() if isinstance(v, Tensor)} \
                if isinstance(data, Mapping) else data.take(sl)
            v = _valid(ids[sl], mask[sl], special)
            yield Tokens(b, v, "tokens", list(range(start, min(start + batch_size, len(ids)))))
            seen += int(v.sum())
            if max_tokens is not None and seen >= max_tokens:
                return
        return
    prompts = list(data)
    if not prompts:
        raise EmptyInputError("no prompts to evaluate on: the dataset is empty")
    if not hasattr(prompts[0], "subject"):
        raise ArgumentError(f"data must be facts, text, a token batch or a corpus, got a "
                            f"sequence of {type(prompts[0]).__name__}")
    for start in range(0, len(prompts), batch_size):
        b = model.tokenize(prompts[start:start + batch_size])
        v = _valid(b.input_ids, b.attention_mask, special)
        yield Tokens(b, v, "facts", list(range(start, start + len(b))))
        seen += int(v.sum())
        if max_tokens is not None and seen >= max_tokens:
            return


def as_dictionaries(dicts: Dictionaries | Dictionary | Iterable[Dictionary]) -> Dictionaries:
    """A :class:`Dictionaries` from one dictionary, a set, or an iterable of them."""
    if isinstance(dicts, Dictionaries):
        return dicts
    if isinstance(dicts, Dictionary):
        return Dictionaries([dicts])
    return Dictionaries(list(dicts))


__all__ = ["Tokens", "as_dictionaries", "special_ids", "token_batches"]
