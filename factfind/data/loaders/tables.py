"""Tabular and in-memory facts: CSV files and lists of records.

* **CSV** with a header row and columns ``subject, template, attribute`` and optional
  ``relation, prefix`` (other columns go to ``meta``); relation defaults to the template.
* **records** in memory (:func:`from_records`): mappings with ``subject, attribute`` and
  ``template`` or ``prompt`` (the filled-in text, from which the template is rebuilt), optional
  ``relation, prefix, source, meta``.

Example::

    load_csv("my_facts.csv", on_error="skip")
    from_records([{"subject": "Paris", "template": "{} is in", "attribute": "France"}])
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from factfind.data.dataset import FactDataset
from factfind.data.loaders.reading import Collector, get_field, read_text, template_from_prompt
from factfind.data.prompts import FactPrompt
from factfind.errors import FactDataError
from factfind.types import OnError


def load_csv(path: str | Path, *, relation: str | None = None, on_error: OnError = "raise",
             name: str | None = None) -> FactDataset:
    """Load a CSV with a header row: ``subject, template, attribute[, relation, prefix, ...]``.

    Args:
        path: the file (UTF-8; a BOM is allowed).
        relation: relation for rows without a ``relation`` column (default: the template).
        on_error: ``"raise"`` or ``"skip"`` bad rows.
        name: dataset name (default the file's stem).

    Returns:
        One fact per row; extra columns go to ``meta``; source ``"<file>#line <n>"``.
    """
    p = Path(path)
    text = read_text(p)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise FactDataError(f"invalid CSV: {e}", path=str(p), record="line 1") from None
    if not header or not any(h.strip() for h in header):
        raise FactDataError("empty CSV: no header row", path=str(p))
    header = [h.strip() for h in header]
    missing = [c for c in ("subject", "template", "attribute") if c not in header]
    if missing:
        raise FactDataError(f"missing column(s) {', '.join(missing)} in header {header}",
                            path=str(p), record="line 1")
    if len(set(header)) != len(header):
        raise FactDataError(f"duplicate column names in header {header}", path=str(p),
                            record="line 1")
    out = Collector(str(p), on_error)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise FactDataError(f"invalid CSV: {e}", path=str(p),
                                record=f"line {reader.line_num}") from None
        if not row:
            continue  # a blank line is not a record

        def make(row: list[str] = row, line: int = reader.line_num) -> list[FactPrompt]:
            if len(row) != len(header):
                raise FactDataError(f"row has {len(row)} fields, header has {len(header)}")
            rec = dict(zip(header, row, strict=True))
            extra = tuple((k, v) for k, v in rec.items()
                          if k not in ("subject", "template", "attribute", "relation", "prefix"))
            return [FactPrompt(rec["subject"], rec.get("relation", relation or rec["template"]),
                               rec["template"], rec["attribute"], prefix=rec.get("prefix", ""),
                               source=f"{p.name}#line {line}", meta=extra)]
        out.add(f"line {reader.line_num}", make)
    return out.done(name or p.stem)


def from_records(records: Iterable[Mapping[str, Any]], *, name: str = "records",
                 on_error: OnError = "raise") -> FactDataset:
    """Build a dataset from in-memory records.

    Each record is a mapping with ``subject``, ``attribute`` and either ``template`` (with a
    ``{}`` slot) or ``prompt`` (the filled-in text; the template is rebuilt from the first
    occurrence of the subject), and optionally ``relation`` (default: the template),
    ``prefix``, ``source`` (default ``"<name>#<index>"``) and ``meta`` (a mapping of strings).
    Other keys with string, number or boolean values are added to ``meta``.

    Args:
        records: the records.
        name: dataset name, also used in error messages.
        on_error: ``"raise"`` or ``"skip"`` bad records.

    Returns:
        One fact per record.

    Example::

        >>> ds = from_records([{"subject": "Paris", "template": "{} is in", "attribute": "France"}])
        >>> ds[0].prompt, ds[0].relation, ds[0].source
        ('Paris is in', '{} is in', 'records#0')
    """
    if isinstance(records, str | bytes | Mapping) or not isinstance(records, Iterable):
        raise FactDataError(f"records must be a list of mappings, got {type(records).__name__}",
                            path=name)
    known = {"subject", "attribute", "template", "prompt", "relation", "prefix", "source", "meta"}
    out = Collector(name, on_error)
    for i, rec in enumerate(records):
        def make(rec: Any = rec, i: int = i) -> list[FactPrompt]:
            subject = get_field(rec, "subject")
            template = get_field(rec, "template", required=False)
            meta: tuple[tuple[str, str], ...] = ()
            if template is None:
                prompt = get_field(rec, "prompt", required=False)
                if prompt is None:
                    raise FactDataError("needs a 'template' or a 'prompt' field")
                template, meta = template_from_prompt(prompt, subject)
            given = get_field(rec, "meta", Mapping, required=False) or {}
            for k, v in [*given.items(), *((k, rec[k]) for k in rec if k not in known)]:
                if not isinstance(k, str) or not isinstance(v, str | int | float | bool):
                    raise FactDataError(f"meta value {k!r}: {type(v).__name__} is not a scalar")
                meta += ((k, str(v)),)
            relation = get_field(rec, "relation", required=False)
            return [FactPrompt(subject, template if relation is None else relation,
                               template, get_field(rec, "attribute"),
                               prefix=get_field(rec, "prefix", required=False) or "",
                               source=get_field(rec, "source", required=False) or f"{name}#{i}",
                               meta=meta)]
        out.add(i, make)
    return out.done(name)


__all__ = ["from_records", "load_csv"]
