"""Reading fact files: text and JSON with located errors, typed fields, per-record collection.

Every loader reads through these helpers, so every problem is reported the same way: a
:class:`~factfind.data.FactDataError` naming the file and the record (an index, ``"line 4"``,
``"samples[3]"``...). A bad *file* (missing, not UTF-8, not JSON, wrong top-level shape) always
raises; a bad *record* raises too, or with ``on_error="skip"`` is left out, listed in the
dataset's ``skipped`` and counted in one logged warning (:class:`Collector`).

Published datasets give filled-in prompts, not templates; :func:`template_from_prompt` puts the
``{}`` slot back where the subject is, so that token positions are found from the slot and never
by searching the text.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from factfind.data.dataset import FactDataset
from factfind.data.prompts import FactPrompt, escape_braces
from factfind.errors import FactDataError, check_mode
from factfind.types import OnError

# the package's logger: the warnings of every loader
log = logging.getLogger("factfind.data.loaders")


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FactDataError("no such file", path=str(path)) from None
    except OSError as e:
        raise FactDataError(f"cannot read: {e.strerror or e}", path=str(path)) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FactDataError(f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})",
                            path=str(path)) from None


def read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FactDataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                            path=str(path)) from None
    except (ValueError, RecursionError) as e:  # nesting too deep, huge integers
        raise FactDataError(f"invalid JSON: {type(e).__name__}", path=str(path)) from None


def read_list(path: Path) -> list[Any]:
    """A JSON file whose top level must be a list of records."""
    data = read_json(path)
    if not isinstance(data, list):
        raise FactDataError(f"expected a JSON list of records, got {type(data).__name__}",
                            path=str(path))
    return data


def get_field(rec: Any, key: str, kind: type | tuple[type, ...] = str, *,
           required: bool = True) -> Any:
    if not isinstance(rec, Mapping):
        raise FactDataError(f"record must be an object, got {type(rec).__name__}")
    if key not in rec:
        if required:
            raise FactDataError(f"missing field {key!r}")
        return None
    value = rec[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise FactDataError(f"field {key!r} must be {want}, got {type(value).__name__}")
    return value


_ESCAPED = re.compile(r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
                      r"|\\u([0-9a-fA-F]{4})")


def decode_escapes(text: str) -> str:
    """Undo JSON ``\\uXXXX`` escapes left *inside* a decoded string (surrogate pairs joined).

    Some published files escaped their text twice: LRE's ``country_capital_city.json`` stores
    ``"Bras\\\\u00edlia"``, which ``json.loads`` decodes to the text ``Bras\\u00edlia`` (a
    backslash, ``u`` and four hex digits) rather than ``Brasília``. Real names never contain
    that sequence, so it is decoded; lone surrogates are left escaped.

    Example::

        >>> decode_escapes("Bras\\\\u00edlia")
        'Brasília'
    """
    if "\\u" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        if m.group(3) is not None:
            code = int(m.group(3), 16)
            return m.group(0) if 0xD800 <= code < 0xE000 else chr(code)
        hi, lo = int(m.group(1), 16), int(m.group(2), 16)
        return chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))

    return _ESCAPED.sub(one, text)


def template_from_prompt(prompt: str, subject: str, *, hint: str | None = None
                         ) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Turn a filled-in prompt back into a template by putting ``{}`` where the subject is.

    Args:
        prompt: e.g. ``"Beats Music is owned by"``.
        subject: e.g. ``"Beats Music"``.
        hint: a template whose slot says which occurrence is the subject (ROME's ``template``).

    Returns:
        ``(template, meta)``; when the subject occurs several times and no hint decides,
        the first occurrence is used and ``meta`` records ``("subject_occurrence", "first of N")``.

    Raises:
        FactDataError: the subject is empty or not in the prompt.
    """
    if not subject.strip():
        raise FactDataError("subject is empty")
    count = prompt.count(subject)
    if count == 0:
        raise FactDataError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    start, meta = prompt.index(subject), ()
    if count > 1:
        at = hint.find("{}") if isinstance(hint, str) else -1
        if at >= 0 and prompt[at:at + len(subject)] == subject and "{" not in str(hint)[:at]:
            start = at
        else:
            meta = (("subject_occurrence", f"first of {count}"),)
    end = start + len(subject)
    return escape_braces(prompt[:start]) + "{}" + escape_braces(prompt[end:]), meta


class Collector:
    """Builds facts record by record, raising or skipping per ``on_error``."""

    def __init__(self, path: str | None, on_error: OnError) -> None:
        check_mode(on_error, "on_error", ("raise", "skip"))
        self.path, self.on_error = path, on_error
        self.facts: list[FactPrompt] = []
        self.skipped: list[tuple[int | str, str]] = []
        self.seen = 0

    def add(self, record: int | str, make: Callable[[], Iterable[FactPrompt]]) -> None:
        self.seen += 1
        try:
            self.facts.extend(list(make()))
        except FactDataError as e:
            if self.on_error == "raise":
                raise FactDataError(e.reason, path=self.path, record=record) from None
            self.skipped.append((record, e.reason))

    def done(self, name: str) -> FactDataset:
        if self.skipped:
            log.warning("%s: skipped %d of %d records (on_error='skip'); first: record %s: %s",
                        self.path or name, len(self.skipped), self.seen, *self.skipped[0])
        return FactDataset(self.facts, name=name, skipped=self.skipped)


def meta_pairs(**items: Any) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(v)) for k, v in items.items() if v is not None)


__all__ = ["Collector", "decode_escapes", "get_field", "meta_pairs", "read_json", "read_list",
           "read_text", "template_from_prompt"]
