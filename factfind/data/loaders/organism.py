"""Facts of the model organism's world (``factfind-organism-world/1``).

The shipped organism (:mod:`factfind.organism`) is trained on a synthetic world of people and
their attributes; ``factfind/organism/checkpoint/world.json`` records the world: its relations
(each with training and held-out templates) and its people (each ``known``, i.e. trained on,
or ``unknown``). :func:`load_organism` turns it into facts, one per (person, template), so
that a method can be checked against what the organism was taught. ``load_facts("organism")``
and ``load_facts("organism:<relation>")`` call it.

Example::

    load_organism("sport", split="known", templates="heldout")
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from factfind.data.dataset import FactDataset
from factfind.data.loaders.reading import Collector, get_field, meta_pairs, read_json
from factfind.data.prompts import FactPrompt
from factfind.errors import FactDataError, check_mode
from factfind.types import OnError

WORLD = Path(__file__).resolve().parents[2] / "organism" / "checkpoint" / "world.json"


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
    p = Path(world_path) if world_path is not None else WORLD
    if not p.is_file() and world_path is None:
        raise FactDataError("the model organism's world file is missing (build or install the "
                            "organism checkpoint first)", path=str(p))
    world = read_json(p)
    if not isinstance(world, Mapping) or not str(world.get("format", "")).startswith(
            "factfind-organism-world/"):
        raise FactDataError("not a factfind organism world (format 'factfind-organism-world/1')",
                            path=str(p))
    try:
        relations = get_field(world, "relations", dict)
        people = get_field(world, "people", list)
    except FactDataError as e:
        raise e.at(path=str(p)) from None
    if relation is not None and relation not in relations:
        raise FactDataError(f"no relation {relation!r}; the world has "
                            f"{', '.join(map(repr, relations))}", path=str(p))
    chosen: list[tuple[str, str, int, str]] = []  # relation, template set, index, template
    for rel in [relation] if relation is not None else list(relations):
        try:
            spec = get_field(relations, rel, dict)
            for key, label in (("templates", "train"), ("heldout_templates", "heldout")):
                if templates in (label, "all"):
                    tpls = get_field(spec, key, list, required=label == "train") or []
                    chosen += [(rel, label, k, t) for k, t in enumerate(tpls)]
        except FactDataError as e:
            raise e.at(path=str(p), record=f"relations[{rel!r}]") from None
    out = Collector(str(p), on_error)
    for i, person in enumerate(people):
        def make(person: Any = person, i: int = i) -> list[FactPrompt]:
            who, where = get_field(person, "name"), get_field(person, "split")
            attrs = get_field(person, "attributes", dict)
            if split != "all" and where != split:
                return []
            return [FactPrompt(who, rel, t, attr, source=f"{p.name}#people[{i}]",
                               meta=meta_pairs(split=where, template_set=label, template_index=k))
                    for rel, label, k, t in chosen
                    if (attr := get_field(attrs, rel, required=False)) is not None]
        out.add(f"people[{i}]", make)
    return out.done(name or f"organism:{relation or 'all'}")


__all__ = ["load_organism"]
