"""One fact as a prompt: :class:`FactPrompt`, its template with a single ``{}`` subject slot.

A *fact* is a (subject, relation, attribute) triple such as (Michael Jordan, plays the sport of,
basketball). A language model recalls it when, given a prompt that names the subject and the
relation, it predicts the attribute as the next token. :class:`FactPrompt` holds a fact as
``prefix + template.format(subject)`` with the attribute to predict. The template's single
``{}`` slot says where the subject is, so token positions are found from the slot and never by
searching the text (a subject can also occur in a few-shot prefix such as Fact Finding's
``"Fact: Tiger Woods plays the sport of golf\\n"``).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from factfind.errors import FactDataError, WrongTypeError

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
    """The tokenizer itself, or a model's ``.tokenizer`` (for :mod:`factfind.data.spans` and
    :mod:`factfind.data.pairs`, which accept either)."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        return model_or_tokenizer
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is None:
        raise WrongTypeError(f"expected a tokenizer or a model with .tokenizer, got "
                        f"{type(model_or_tokenizer).__name__}")
    return tok
