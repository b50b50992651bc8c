"""Provenance: where a circuit graph came from, and the rule that keeps graphs apart.

A circuit graph is a measurement of one model (name and revision) on one dataset (its content
fingerprint, :meth:`factfind.data.FactDataset.fingerprint`) by one method with one config.
Every :class:`~factfind.graph.CircuitGraph` carries its :class:`Provenance`, which is written
with it to GraphML and JSON. Combining graphs of different models, revisions or datasets
(:func:`~factfind.graph.union`, :func:`~factfind.graph.compare`) raises
:class:`ProvenanceMismatchError`; different methods on the same model and data may be combined.

Example::

    prov = Provenance(model="organism", revision="abc123", dataset=facts.fingerprint(),
                      method="eap", config={"top_n": 20})
    prov.config_dict   # {"top_n": 20}
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class ProvenanceMismatchError(ValueError):
    """Graphs from different models, revisions or datasets were combined."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version() -> str:
    try:
        return importlib.metadata.version("factfind")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Provenance:
    """Where a graph came from. ``config`` (a JSON-able dict) is kept as sorted JSON text so the
    record stays hashable; read it back with :attr:`config_dict`."""

    model: str
    revision: str | None
    dataset: str  # the dataset's fingerprint
    method: str
    config: str | Mapping[str, Any] = "{}"
    created: str = field(default_factory=_now)
    version: str = field(default_factory=_version)

    def __post_init__(self) -> None:
        cfg = json.loads(self.config) if isinstance(self.config, str) else self.config
        object.__setattr__(self, "config", json.dumps(cfg, sort_keys=True, allow_nan=False))

    @property
    def config_dict(self) -> dict[str, Any]:
        return json.loads(str(self.config))


def check_compatible(a: Provenance, b: Provenance) -> None:
    """Raise :class:`ProvenanceMismatchError` unless ``a`` and ``b`` share model, revision and
    dataset (the method may differ)."""
    problems = []
    if (a.model, a.revision) != (b.model, b.revision):
        problems.append(f"models {a.model}@{a.revision} vs {b.model}@{b.revision}")
    if a.dataset != b.dataset:
        problems.append(f"datasets {a.dataset} vs {b.dataset}")
    if problems:
        raise ProvenanceMismatchError("cannot combine circuit graphs from different "
                                      + " and ".join(problems))


__all__ = ["Provenance", "ProvenanceMismatchError", "check_compatible"]
