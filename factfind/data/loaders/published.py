"""Published fact datasets: ROME's known facts, CounterFact and LRE relations, and the named
sets shipped in the repository.

* **ROME known facts** (``known_1000.json``, Meng et al. 2022): a list of ``{known_id,
  subject, attribute, template, prompt, relation_id, ...}``; the prompt is rebuilt as a
  template by putting ``{}`` where the subject is (ROME's ``template`` field picks the
  occurrence if there are several); relation = ``relation_id``.
* **CounterFact** split files: a list of ``{case_id, prompt, subject, ground_truth,
  target_new, ...}``. They carry no relation id, so the template itself is the relation.
* **LRE relations** (Hernandez et al. 2023): one JSON per relation, ``{name,
  prompt_templates, prompt_templates_zs, properties, samples: [{subject, object}]}``;
  relation = ``name``.

* **Fact Finding's athletes** (Nanda et al. 2023): ``datasets/fact_finding/athletes.json``, LRE's
  athletes -> sport with the paper's one-shot prefix ``"Fact: Tiger Woods plays the sport of
  golf\\n"`` and template ``"Fact: {} plays the sport of"`` (:func:`load_athletes`).

Named sets shipped in the repository's ``datasets/`` directory (override its location with the
``FACTFIND_DATASETS`` environment variable): ``"rome_known"``, ``"counterfact:val"``,
``"athletes"`` (also ``"fact_finding:athletes"``),
``"lre:factual"`` (all factual relations) and ``"lre:factual/<relation>"``
(:func:`available_datasets` lists those present).

Example::

    load_lre(datasets_dir() / "lre" / "factual", templates="all")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from factfind.data.dataset import FactDataset
from factfind.data.loaders.reading import (
    Collector,
    decode_escapes,
    get_field,
    meta_pairs,
    read_json,
    read_list,
    template_from_prompt,
)
from factfind.data.loaders.tables import from_records
from factfind.data.prompts import FactPrompt
from factfind.errors import FactDataError, check_mode
from factfind.types import OnError

NAMED = {"rome_known": "rome_known/known_1000.json",
         "counterfact:val": "counterfact/counterfact-val.json",
         "athletes": "fact_finding/athletes.json",
         "fact_finding:athletes": "fact_finding/athletes.json"}


def datasets_dir() -> Path:
    """The shipped ``datasets/`` directory (``$FACTFIND_DATASETS`` if set)."""
    env = os.environ.get("FACTFIND_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "datasets"


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_facts` that resolve under :func:`datasets_dir`."""
    root = datasets_dir()
    names = [n for n, rel in NAMED.items() if (root / rel).is_file()]
    for group in sorted(p for p in (root / "lre").glob("*") if p.is_dir()):
        names.append(f"lre:{group.name}")
        names += [f"lre:{group.name}/{f.stem}" for f in sorted(group.glob("*.json"))]
    return names


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
    p = Path(path) if path is not None else datasets_dir() / NAMED["rome_known"]

    def fact(rec: Any, i: int) -> FactPrompt:
        subject, prompt = get_field(rec, "subject"), get_field(rec, "prompt")
        hint = get_field(rec, "template", required=False)
        known_id = get_field(rec, "known_id", int, required=False)
        template, extra = template_from_prompt(prompt, subject, hint=hint)
        return FactPrompt(subject, get_field(rec, "relation_id"), template,
                          get_field(rec, "attribute"), source=f"{p.name}#{i}",
                          meta=meta_pairs(known_id=known_id) + extra)

    return _fact_per_record(p, fact, on_error=on_error, name=name or "rome_known")


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
    p = Path(path) if path is not None else datasets_dir() / NAMED["counterfact:val"]

    def fact(rec: Any, i: int) -> FactPrompt:
        subject, prompt = get_field(rec, "subject"), get_field(rec, "prompt")
        case_id = get_field(rec, "case_id", int, required=False)
        target_new = get_field(rec, "target_new", required=False)
        template, extra = template_from_prompt(prompt, subject)
        return FactPrompt(subject, template, template, get_field(rec, "ground_truth"),
                          source=f"{p.name}#{i}",
                          meta=meta_pairs(case_id=case_id, target_new=target_new) + extra)

    return _fact_per_record(p, fact, on_error=on_error, name=name or p.stem)


def load_athletes(path: str | Path | None = None, *, on_error: OnError = "raise",
                  name: str | None = None) -> FactDataset:
    """Load Fact Finding's athletes -> sport set (``datasets/fact_finding/athletes.json``).

    Fact Finding (Nanda et al. 2023) asks for an athlete's sport after a one-shot example,
    ``"Fact: Tiger Woods plays the sport of golf\\nFact: {athlete} plays the sport of"``: without
    it a small model's top prediction after "plays the sport of" is often " the" rather than a
    sport. The facts are LRE's 318 athletes (soccer, football, baseball, basketball, hockey);
    see ``datasets/fact_finding/SOURCE`` and ``build_athletes.py`` there.

    Args:
        path: the records file; default the shipped one.
        on_error: ``"raise"`` or ``"skip"`` bad records.
        name: dataset name (default ``"athletes"``).

    Returns:
        One fact per athlete: relation ``"plays pro sport"`` (LRE's name), the prefix and
        template above, source ``"person_plays_pro_sport.json#<LRE index>"``.
    """

    p = Path(path) if path is not None else datasets_dir() / NAMED["athletes"]
    try:
        return from_records(read_list(p), name=name or "athletes", on_error=on_error)
    except FactDataError as e:
        raise e.at(path=str(p)) from None


def _fact_per_record(path: Path, fact: Callable[[Any, int], FactPrompt], *, on_error: OnError,
                     name: str) -> FactDataset:
    """One fact per record of a JSON list (``fact(record, index)``), collected per
    ``on_error``: the shape of ROME's and CounterFact's files."""
    data = read_list(path)
    out = Collector(str(path), on_error)
    for i, rec in enumerate(data):
        out.add(i, lambda rec=rec, i=i: [fact(rec, i)])
    return out.done(name)


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
        Facts with relation = the file's ``name``, attribute = ``object`` (JSON escapes the
        file left inside its strings decoded,
        :func:`~factfind.data.loaders.reading.decode_escapes`), source
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
    data = read_json(p)
    if not isinstance(data, Mapping):
        raise FactDataError(f"expected a JSON object, got {type(data).__name__}", path=str(p))
    try:
        relation = get_field(data, "name")
        key = "prompt_templates_zs" if templates == "zs" else "prompt_templates"
        tpls, samples = get_field(data, key, list), get_field(data, "samples", list)
        props = get_field(data, "properties", dict, required=False) or {}
        if not relation.strip():
            raise FactDataError("relation name is empty", record="name")
    except FactDataError as e:
        raise e.at(path=str(p)) from None
    if not tpls:
        raise FactDataError(f"{key} is empty", path=str(p))
    props = {k: str(v) for k, v in props.items()
             if isinstance(k, str) and isinstance(v, str | bool | int | float)}
    out = Collector(str(p), on_error)
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
            # LRE escaped some names twice ("Bras\\u00edlia"): decode what json.loads left
            subject = decode_escapes(get_field(rec, "subject"))
            obj = decode_escapes(get_field(rec, "object"))
            return [FactPrompt(subject, relation, t, obj, source=f"{p.name}#{j}",
                               meta=(("template_index", str(k)), *sorted(props.items())))
                    for k, t in good]
        out.add(f"samples[{j}]", make)
    return out.done(name or p.stem)


__all__ = ["available_datasets", "datasets_dir", "load_athletes", "load_counterfact", "load_lre",
           "load_rome_known"]
