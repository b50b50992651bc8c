"""Loaders: fact data from files, from memory and from the model organism's world.

:func:`load_facts` tells the formats apart and hands each to its loader, one module per family:

* :mod:`~factfind.data.loaders.published`: **LRE relations** (Hernandez et al. 2023), **ROME known
  facts** (``known_1000.json``, Meng et al. 2022), **CounterFact** split files and **Fact
  Finding's athletes** (Nanda et al. 2023), and the named sets shipped in ``datasets/``
  (``"rome_known"``, ``"athletes"``, ``"counterfact:val"``,
  ``"lre:factual"``, ``"lre:factual/<relation>"``; override the directory with the
  ``FACTFIND_DATASETS`` environment variable);
* :mod:`~factfind.data.loaders.tables`: **CSV** with columns ``subject, template, attribute`` and
  optional ``relation, prefix``, and **records** in memory (:func:`from_records`);
* :mod:`~factfind.data.loaders.organism`: **the model organism** (``"organism:<relation>"``):
  ``factfind/organism/checkpoint/world.json``;
* :mod:`~factfind.data.loaders.reading`: what they share: reading with located errors, typed
  fields, rebuilding a template from a filled-in prompt.

Errors. Every problem raises :class:`~factfind.data.FactDataError` naming the file and the record.
With ``on_error="skip"`` a bad *record* is left out instead, listed in ``dataset.skipped`` and
counted in a logged warning; a bad *file* (missing, not UTF-8, not JSON/CSV, wrong top-level
shape) always raises.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from factfind.data.dataset import FactDataset
from factfind.data.loaders.organism import load_organism
from factfind.data.loaders.published import (
    NAMED,
    available_datasets,
    datasets_dir,
    load_athletes,
    load_counterfact,
    load_lre,
    load_rome_known,
)
from factfind.data.loaders.reading import read_json, template_from_prompt
from factfind.data.loaders.tables import from_records, load_csv
from factfind.errors import FactDataError

_NAMED_LOADERS = {"rome_known": load_rome_known, "athletes": load_athletes,
                  "fact_finding:athletes": load_athletes}


#: longest source string taken as a name or path (Linux's PATH_MAX)
MAX_SOURCE = 4096


def _check_source_text(source: str) -> None:
    """Refuse strings that are not a name or a path: empty, JSON text, or too long."""
    text = source.strip()
    if not text:
        raise FactDataError("the source is empty: give a dataset name (e.g. 'rome_known'), a "
                            "path or a list of records")
    if text[0] in "[{":
        raise FactDataError("the source looks like JSON text, not a name or a path: parse it "
                            "(json.loads) and pass the records, or save it to a .json file",
                            path=text[:60] + ("..." if len(text) > 60 else ""))
    if len(source) > MAX_SOURCE:
        raise FactDataError(f"the source is {len(source):,} characters, longer than any path "
                            f"({MAX_SOURCE:,}): give a dataset name, a path or a list of records",
                            path=source[:60] + "...")


def load_facts(source: Any, **kw: Any) -> FactDataset:
    """Load fact data from a named set, a path, or in-memory records.

    Args:
        source: one of

            * a named shipped set: ``"rome_known"``, ``"athletes"`` (Fact Finding's athletes
              with its one-shot prefix), ``"counterfact:val"``, ``"lre:factual"``,
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
        _check_source_text(source)
        if source == "organism" or source.startswith("organism:"):
            return load_organism(source.partition(":")[2] or None, **kw)
        root = datasets_dir()
        if source in NAMED:
            loader = _NAMED_LOADERS.get(source, load_counterfact)
            return loader(root / NAMED[source], **kw)
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
    try:
        is_dir, exists = p.is_dir(), p.exists()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise FactDataError(f"not a usable path ({e.strerror or e}); give a dataset name, a "
                            "path or a list of records", path=str(p)[:120]) from None
    if is_dir:
        return load_lre(p, **kw)
    if p.suffix.lower() == ".csv":
        return load_csv(p, **kw)
    if not exists:
        raise FactDataError(f"no such file or named dataset; named sets: "
                            f"{', '.join(available_datasets())}", path=str(p))
    data = read_json(p)
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


__all__ = ["available_datasets", "datasets_dir", "from_records", "load_athletes",
           "load_counterfact", "load_csv", "load_facts", "load_lre", "load_organism",
           "load_rome_known", "template_from_prompt"]
