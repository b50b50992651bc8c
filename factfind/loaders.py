"""Loaders: fact data from files, from memory and from the model organism's world.

Formats (``load_facts`` tells them apart):

* **LRE relations** (Hernandez et al. 2023): one JSON per relation, ``{name, prompt_templates,
  prompt_templates_zs, properties, samples: [{subject, object}]}``; relation = ``name``.
* **ROME known facts** (``known_1000.json``, Meng et al. 2022): a list of ``{known_id, subject,
  attribute, template, prompt, relation_id, ...}``; the prompt is rebuilt as a template by putting
  ``{}`` where the subject is (ROME's ``template`` field picks the occurrence if there are
  several); relation = ``relation_id``.
* **CounterFact** split files: a list of ``{case_id, prompt, subject, ground_truth, target_new,
  ...}``. They carry no relation id, so the template itself is the relation.
* **CSV** with columns ``subject, template, attribute`` and optional ``relation, prefix``
  (other columns go to ``meta``); relation defaults to the template.
* **records** in memory (``from_records``): mappings with ``subject, attribute`` and ``template``
  or ``prompt``, optional ``relation, prefix, source, meta``.
* **the model organism** (``"organism:<relation>"``): ``factfind/organism/checkpoint/world.json``.

Named sets shipped in the repository's ``datasets/`` directory (override its location with the
``FACTFIND_DATASETS`` environment variable): ``"rome_known"``, ``"counterfact:val"``,
``"lre:factual"`` (all factual relations) and ``"lre:factual/<relation>"``.

Errors. Every problem raises :class:`~factfind.data.FactDataError` naming the file and the record.
With ``on_error="skip"`` a bad *record* is left out instead, listed in ``dataset.skipped`` and
counted in a logged warning; a bad *file* (missing, not UTF-8, not JSON/CSV, wrong top-level
shape) always raises.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from factfind.data import (
    FactDataError,
    FactDataset,
    FactPrompt,
    OnError,
    check_mode,
    escape_braces,
)

log = logging.getLogger(__name__)

_WORLD = Path(__file__).resolve().parent / "organism" / "checkpoint" / "world.json"
_NAMED = {"rome_known": "rome_known/known_1000.json",
          "counterfact:val": "counterfact/counterfact-val.json"}


def datasets_dir() -> Path:
    """The shipped ``datasets/`` directory (``$FACTFIND_DATASETS`` if set)."""
    env = os.environ.get("FACTFIND_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "datasets"


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_facts` that resolve under :func:`datasets_dir`."""
    root = datasets_dir()
    names = [n for n, rel in _NAMED.items() if (root / rel).is_file()]
    for group in sorted(p for p in (root / "lre").glob("*") if p.is_dir()):
        names.append(f"lre:{group.name}")
        names += [f"lre:{group.name}/{f.stem}" for f in sorted(group.glob("*.json"))]
    return names


# ----------------------------------------------------------------------------- plumbing


def _read_text(path: Path) -> str:
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


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FactDataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                            path=str(path)) from None
    except (ValueError, RecursionError) as e:  # nesting too deep, huge integers
        raise FactDataError(f"invalid JSON: {type(e).__name__}", path=str(path)) from None


def _field(rec: Any, key: str, kind: type | tuple[type, ...] = str, *,
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


class _Collector:
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


def _meta(**items: Any) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(v)) for k, v in items.items() if v is not None)


# ----------------------------------------------------------------------------- file formats


def load_rome_known(path: str | Path | None = None, *, on_error: OnError = "raise",
                    name: str | None = None) -> FactDataset:
    """Load ROME's ``known_1000.json``.

    Args:
        path: the file; default the shipped copy.
        on_error: ``"raise"`` or ``"skip"`` bad records.
        name: dataset name (default ``"rome_known"``).

    Returns:
        One fact per record: relation = ``relation_id``, template rebuilt from ``prompt``,
        source ``"known_1000.json#<index>"``, meta ``known_id``.
    """
    p = Path(path) if path is not None else datasets_dir() / _NAMED["rome_known"]
    data = _read_json(p)
    if not isinstance(data, list):
        raise FactDataError(f"expected a JSON list of records, got {type(data).__name__}",
                            path=str(p))
    out = _Collector(str(p), on_error)
    for i, rec in enumerate(data):
        def make(rec: Any = rec, i: int = i) -> list[FactPrompt]:
            subject, prompt = _field(rec, "subject"), _field(rec, "prompt")
            hint = _field(rec, "template", required=False)
            known_id = _field(rec, "known_id", int, required=False)
            template, extra = template_from_prompt(prompt, subject, hint=hint)
            return [FactPrompt(subject, _field(rec, "relation_id"), template,
                               _field(rec, "attribute"), source=f"{p.name}#{i}",
                               meta=_meta(known_id=known_id) + extra)]
        out.add(i, make)
    return out.done(name or "rome_known")


def load_counterfact(path: str | Path | None = None, *, on_error: OnError = "raise",
                     name: str | None = None) -> FactDataset:
    """Load a CounterFact split file (``counterfact-{train,val,edit}.json``).

    Args:
        path: the file; default the shipped validation split.
        on_error: ``"raise"`` or ``"skip"`` bad records.
        name: dataset name (default the file's stem).

    Returns:
        One fact per record with attribute = ``ground_truth``; relation = the template (the
        split files carry no relation id); meta ``case_id`` and ``target_new``.
    """
    p = Path(path) if path is not None else datasets_dir() / _NAMED["counterfact:val"]
    data = _read_json(p)
    if not isinstance(data, list):
        raise FactDataError(f"expected a JSON list of records, got {type(data).__name__}",
                            path=str(p))
    out = _Collector(str(p), on_error)
    for i, rec in enumerate(data):
        def make(rec: Any = rec, i: int = i) -> list[FactPrompt]:
            subject, prompt = _field(rec, "subject"), _field(rec, "prompt")
            case_id = _field(rec, "case_id", int, required=False)
            target_new = _field(rec, "target_new", required=False)
            template, extra = template_from_prompt(prompt, subject)
            return [FactPrompt(subject, template, template, _field(rec, "ground_truth"),
                               source=f"{p.name}#{i}",
                               meta=_meta(case_id=case_id, target_new=target_new) + extra)]
        out.add(i, make)
    return out.done(name or p.stem)


def load_lre(path: str | Path, *, templates: str = "first", on_error: OnError = "raise",
             name: str | None = None) -> FactDataset:
    """Load LRE relation files: one ``.json`` file, or every ``.json`` under a directory.

    Args:
        path: a relation file or a directory of them (searched recursively, sorted).
        templates: ``"first"`` (the first of ``prompt_templates``), ``"all"`` (every one of
            them, a fact per sample and template) or ``"zs"`` (every ``prompt_templates_zs``).
        on_error: ``"raise"`` or ``"skip"`` bad samples and templates.
        name: dataset name (default the file or directory name).

    Returns:
        Facts with relation = the file's ``name``, attribute = ``object``, source
        ``"<file>#<sample index>"``, meta ``template_index`` and the relation's ``properties``.
    """
    check_mode(templates, "templates", ("first", "all", "zs"))
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.json"))
        if not files:
            raise FactDataError("directory holds no .json relation files", path=str(p))
        parts = [load_lre(f, templates=templates, on_error=on_error) for f in files]
        return FactDataset([f for part in parts for f in part], name=name or p.name,
                           skipped=[s for part in parts for s in part.skipped])
    data = _read_json(p)
    if not isinstance(data, Mapping):
        raise FactDataError(f"expected a JSON object, got {type(data).__name__}", path=str(p))
    try:
        relation = _field(data, "name")
        key = "prompt_templates_zs" if templates == "zs" else "prompt_templates"
        tpls, samples = _field(data, key, list), _field(data, "samples", list)
        props = _field(data, "properties", dict, required=False) or {}
        if not relation.strip():
            raise FactDataError("relation name is empty", record="name")
    except FactDataError as e:
        raise e.at(path=str(p)) from None
    if not tpls:
        raise FactDataError(f"{key} is empty", path=str(p))
    props = {k: str(v) for k, v in props.items()
             if isinstance(k, str) and isinstance(v, str | bool | int | float)}
    out = _Collector(str(p), on_error)
    good: list[tuple[int, str]] = []
    for k, t in enumerate(tpls if templates != "first" else tpls[:1]):
        def check(t: Any = t) -> list[FactPrompt]:
            if not isinstance(t, str):
                raise FactDataError(f"template must be a string, got {type(t).__name__}")
            FactPrompt("x", relation, t, "x")  # validates the template alone
            return []
        before = len(out.skipped)
        out.add(f"{key}[{k}]", check)
        if len(out.skipped) == before:
            good.append((k, t))
    for j, rec in enumerate(samples):
        def make(rec: Any = rec, j: int = j) -> list[FactPrompt]:
            subject, obj = _field(rec, "subject"), _field(rec, "object")
            return [FactPrompt(subject, relation, t, obj, source=f"{p.name}#{j}",
                               meta=(("template_index", str(k)), *sorted(props.items())))
                    for k, t in good]
        out.add(f"samples[{j}]", make)
    return out.done(name or p.stem)


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
    text = _read_text(p)
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
    out = _Collector(str(p), on_error)
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
    out = _Collector(name, on_error)
    for i, rec in enumerate(records):
        def make(rec: Any = rec, i: int = i) -> list[FactPrompt]:
            subject = _field(rec, "subject")
            template = _field(rec, "template", required=False)
            meta: tuple[tuple[str, str], ...] = ()
            if template is None:
                prompt = _field(rec, "prompt", required=False)
                if prompt is None:
                    raise FactDataError("needs a 'template' or a 'prompt' field")
                template, meta = template_from_prompt(prompt, subject)
            given = _field(rec, "meta", Mapping, required=False) or {}
            for k, v in [*given.items(), *((k, rec[k]) for k in rec if k not in known)]:
                if not isinstance(k, str) or not isinstance(v, str | int | float | bool):
                    raise FactDataError(f"meta value {k!r}: {type(v).__name__} is not a scalar")
                meta += ((k, str(v)),)
            relation = _field(rec, "relation", required=False)
            return [FactPrompt(subject, template if relation is None else relation,
                               template, _field(rec, "attribute"),
                               prefix=_field(rec, "prefix", required=False) or "",
                               source=_field(rec, "source", required=False) or f"{name}#{i}",
                               meta=meta)]
        out.add(i, make)
    return out.done(name)


# ----------------------------------------------------------------------------- organism


def load_organism(relation: str | None = None, *, split: str = "known",
                  templates: str = "train", world_path: str | Path | None = None,
                  on_error: OnError = "raise", name: str | None = None) -> FactDataset:
    """Load facts of the model organism's world (``factfind-organism-world/1``).

    Args:
        relation: one relation (e.g. ``"sport"``), or ``None`` for all of them.
        split: people to include: ``"known"`` (trained on), ``"unknown"`` or ``"all"``.
        templates: ``"train"``, ``"heldout"`` or ``"all"`` templates.
        world_path: the world file (default ``factfind/organism/checkpoint/world.json``).
        on_error: ``"raise"`` or ``"skip"`` bad people records.
        name: dataset name (default ``"organism:<relation>"``).

    Returns:
        One fact per (person, template) for people who have the relation; meta ``split``,
        ``template_set`` and ``template_index``; source ``"world.json#people[<i>]"``.
    """
    check_mode(split, "split", ("known", "unknown", "all"))
    check_mode(templates, "templates", ("train", "heldout", "all"))
    p = Path(world_path) if world_path is not None else _WORLD
    if not p.is_file() and world_path is None:
        raise FactDataError("the model organism's world file is missing (build or install the "
                            "organism checkpoint first)", path=str(p))
    world = _read_json(p)
    if not isinstance(world, Mapping) or not str(world.get("format", "")).startswith(
            "factfind-organism-world/"):
        raise FactDataError("not a factfind organism world (format 'factfind-organism-world/1')",
                            path=str(p))
    try:
        relations = _field(world, "relations", dict)
        people = _field(world, "people", list)
    except FactDataError as e:
        raise e.at(path=str(p)) from None
    if relation is not None and relation not in relations:
        raise FactDataError(f"no relation {relation!r}; the world has "
                            f"{', '.join(map(repr, relations))}", path=str(p))
    chosen: list[tuple[str, str, int, str]] = []  # relation, template set, index, template
    for rel in [relation] if relation is not None else list(relations):
        try:
            spec = _field(relations, rel, dict)
            for key, label in (("templates", "train"), ("heldout_templates", "heldout")):
                if templates in (label, "all"):
                    tpls = _field(spec, key, list, required=label == "train") or []
                    chosen += [(rel, label, k, t) for k, t in enumerate(tpls)]
        except FactDataError as e:
            raise e.at(path=str(p), record=f"relations[{rel!r}]") from None
    out = _Collector(str(p), on_error)
    for i, person in enumerate(people):
        def make(person: Any = person, i: int = i) -> list[FactPrompt]:
            who, where = _field(person, "name"), _field(person, "split")
            attrs = _field(person, "attributes", dict)
            if split != "all" and where != split:
                return []
            return [FactPrompt(who, rel, t, attr, source=f"{p.name}#people[{i}]",
                               meta=_meta(split=where, template_set=label, template_index=k))
                    for rel, label, k, t in chosen
                    if (attr := _field(attrs, rel, required=False)) is not None]
        out.add(f"people[{i}]", make)
    return out.done(name or f"organism:{relation or 'all'}")


# ----------------------------------------------------------------------------- dispatcher


def load_facts(source: Any, **kw: Any) -> FactDataset:
    """Load fact data from a named set, a path, or in-memory records.

    Args:
        source: one of

            * a named shipped set: ``"rome_known"``, ``"counterfact:val"``, ``"lre:factual"``,
              ``"lre:factual/person_occupation"`` (see :func:`available_datasets`);
            * ``"organism"`` or ``"organism:<relation>"`` (options of :func:`load_organism`);
            * a path to an LRE relation file or directory, ``known_1000.json``, a CounterFact
              split file, a JSON list of records, or a ``.csv`` file;
            * a list of record mappings (:func:`from_records`) or a :class:`FactDataset`.
        **kw: options of the chosen loader (e.g. ``on_error="skip"``, ``templates="all"``).

    Returns:
        The dataset.

    Raises:
        FactDataError: unknown name, missing file, unrecognised format or bad records.

    Example::

        facts = load_facts("lre:factual/person_occupation", templates="all")
    """
    if isinstance(source, FactDataset):
        return source
    if isinstance(source, list | tuple):
        return from_records(source, **kw)
    if isinstance(source, str):
        if source == "organism" or source.startswith("organism:"):
            return load_organism(source.partition(":")[2] or None, **kw)
        root = datasets_dir()
        if source in _NAMED:
            loader = load_rome_known if source == "rome_known" else load_counterfact
            return loader(root / _NAMED[source], **kw)
        if source.startswith("counterfact:"):
            raise FactDataError("only the validation split is shipped ('counterfact:val'); "
                                "load other splits by path", path=source)
        if source.startswith("lre:"):
            rel = source[4:]
            target = root / "lre" / rel
            target = target if target.is_dir() else target.with_suffix(".json")
            if not rel or not target.exists():
                raise FactDataError(f"no shipped LRE relation {rel!r}; available: "
                                    f"{', '.join(available_datasets())}", path=str(target))
            return load_lre(target, **kw)
    if not isinstance(source, str | os.PathLike):
        raise FactDataError(f"cannot load facts from a {type(source).__name__}")
    p = Path(source)
    if p.is_dir():
        return load_lre(p, **kw)
    if p.suffix.lower() == ".csv":
        return load_csv(p, **kw)
    if not p.exists():
        raise FactDataError(f"no such file or named dataset; named sets: "
                            f"{', '.join(available_datasets())}", path=str(p))
    data = _read_json(p)
    if isinstance(data, Mapping):
        if str(data.get("format", "")).startswith("factfind-organism-world/"):
            return load_organism(kw.pop("relation", None), world_path=p, **kw)
        if "samples" in data:
            return load_lre(p, **kw)
    if isinstance(data, list):
        first = data[0] if data and isinstance(data[0], Mapping) else {}
        if "known_id" in first or "relation_id" in first:
            return load_rome_known(p, **kw)
        if "case_id" in first or "ground_truth" in first:
            return load_counterfact(p, **kw)
        return from_records(data, name=kw.pop("name", p.name), **kw)
    raise FactDataError("unrecognised fact data format (expected an LRE relation, ROME known "
                        "facts, CounterFact, an organism world or a list of records)",
                        path=str(p))
