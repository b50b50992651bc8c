"""Names of relation ids: ``P17`` is *country*, ``P101`` *field of work*.

ROME's known facts and CounterFact (Meng et al. 2022) label each fact with the Wikidata property
it states (``relation_id``), as LAMA's T-REx (Petroni et al. 2019) and ParaRel (Elazar et al.
2021) did before them. A bare ``P1412`` means nothing to a reader, so reports show
``"P1412 (languages spoken, written or signed)"``. The names come from a small table shipped with
the datasets, ``datasets/relations/relations.csv`` (columns ``id, name, source``): the labels LAMA
publishes for its 41 T-REx relations, plus Wikidata's label for the few ids the shipped data uses
beyond them (``datasets/relations/SOURCE`` says where each comes from). A relation that is
already a name (the organism's ``sport``, LRE's ``person plays pro sport``) or an id the table
lacks is shown as it is.

Example::

    >>> relation_name("P17")
    'country'
    >>> relation_label("P17"), relation_label("sport")
    ('P17 (country)', 'sport')
"""

from __future__ import annotations

import csv
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from factfind.data.loaders.published import datasets_dir
from factfind.errors import FactDataError

log = logging.getLogger(__name__)

#: where the table lives under a datasets directory
RELATIONS_FILE = Path("relations") / "relations.csv"
#: the table shipped beside the package (used when ``$FACTFIND_DATASETS`` has none)
SHIPPED = Path(__file__).resolve().parents[2] / "datasets" / RELATIONS_FILE
_COLUMNS = ("id", "name", "source")


@dataclass(frozen=True)
class RelationName:
    """One row of the table: the relation's ``id``, its ``name`` and the ``source`` of the name
    (``lama``: LAMA's T-REx relation list; ``wikidata``: Wikidata's property label)."""

    id: str
    name: str
    source: str


def _default_path() -> Path | None:
    for path in (datasets_dir() / RELATIONS_FILE, SHIPPED):
        if path.is_file():
            return path
    return None


@functools.cache
def _read(path: str) -> dict[str, RelationName]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise FactDataError("no such file; pass the path of a CSV with columns id, name, "
                            "source (the shipped one is datasets/relations/relations.csv)",
                            path=path) from None
    except UnicodeDecodeError as err:
        raise FactDataError(f"not UTF-8 text ({err.reason}); save the table as UTF-8 CSV",
                            path=path) from None
    if not rows or tuple(c.strip() for c in rows[0]) != _COLUMNS:
        got = ", ".join(rows[0]) if rows else "an empty file"
        raise FactDataError(f"the header must be 'id,name,source', got {got!r}; fix the "
                            "first line", path=path)
    table: dict[str, RelationName] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(_COLUMNS):
            raise FactDataError(f"{len(row)} fields, expected 3 (id, name, source); quote a "
                                "name that holds a comma", path=path, record=f"line {line}")
        rid, name, source = (c.strip() for c in row)
        if not rid or not name:
            raise FactDataError("an empty id or name; give both", path=path,
                                record=f"line {line}")
        if rid in table:
            raise FactDataError(f"relation {rid!r} is named twice (first as "
                                f"{table[rid].name!r}); keep one row", path=path,
                                record=f"line {line}")
        table[rid] = RelationName(rid, name, source)
    return table


def relation_names(path: str | Path | None = None) -> dict[str, RelationName]:
    """The table of relation names by id, read once per path.

    Args:
        path: a CSV with the columns ``id, name, source``; default
            ``datasets/relations/relations.csv`` under :func:`datasets_dir` (else the copy
            shipped beside the package; with neither, an empty table and a logged warning).

    Returns:
        ``{id: RelationName}`` in the file's order.

    Raises:
        FactDataError: a missing (given) file, a wrong header, a short row, an empty id or name,
            an id named twice; the message names the file and the line.
    """
    if path is None:
        found = _default_path()
        if found is None:
            log.warning("no relation names table (datasets/%s); relation ids are shown bare",
                        RELATIONS_FILE)
            return {}
        path = found
    return dict(_read(str(Path(path))))


def relation_name(relation: str, *, path: str | Path | None = None) -> str | None:
    """The name of ``relation`` (``"P17"`` -> ``"country"``), or ``None`` if the table lacks it."""
    entry = relation_names(path).get(str(relation).strip())
    return None if entry is None else entry.name


def relation_label(relation: Any, *, path: str | Path | None = None) -> str:
    """How a report shows ``relation``: ``"P17 (country)"`` for a named id, anything else as
    it is (``"sport"``, an unknown ``"P9999"``; a missing value as ``""``). Idempotent: a label
    is returned unchanged."""
    if relation is None or (pd.api.types.is_scalar(relation) and pd.isna(relation)):
        return ""
    text = str(relation)
    name = relation_name(text, path=path)
    return text if name is None else f"{text.strip()} ({name})"

