"""Saving and loading circuit graphs: GraphML and node-link JSON, written atomically.

Both formats round-trip exactly: ``read_json(to_json(g, path)) == g``, node and edge
attributes and the :class:`~factfind.graph.Provenance` included (as a JSON object in JSON, as
JSON text in GraphML, which has no nested values and no null: a missing head or neuron index is
left out and read back as ``None``). A file is written to a temporary sibling and renamed into
place, so a failure never leaves a partial file; an existing file is replaced only with
``overwrite=True``.

Example::

    to_json(circuit, "circuit.json"); assert read_json("circuit.json") == circuit
    to_graphml(circuit, "circuit.graphml")          # for Gephi, Cytoscape, yEd
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import networkx as nx

from factfind.errors import ArgumentError
from factfind.graph.circuit import CircuitGraph
from factfind.graph.provenance import Provenance


def _atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], *,
                  overwrite: bool) -> Path:
    """Write through ``write(tmp_path)`` to a temporary sibling, then rename it into place, so a
    failure never leaves a partial file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _encoded(graph: CircuitGraph, *, graphml: bool) -> nx.DiGraph:
    g = graph.graph.copy()
    prov = dataclasses.asdict(graph.provenance)
    g.graph["provenance"] = json.dumps(prov, sort_keys=True) if graphml else prov
    if graphml:  # GraphML has no null: a missing index means None
        for _, d in g.nodes(data=True):
            if d.get("index") is None:
                d.pop("index", None)
    return g


def _decoded(g: nx.DiGraph) -> CircuitGraph:
    prov = g.graph.pop("provenance")
    for _, d in g.nodes(data=True):
        d.setdefault("index", None)
    return CircuitGraph(Provenance(**(json.loads(prov) if isinstance(prov, str) else prov)), g)


def to_graphml(graph: CircuitGraph, path: str | os.PathLike[str], *,
               overwrite: bool = False) -> Path:
    """Write GraphML (provenance as JSON text); :func:`read_graphml` gives an equal graph."""
    g = _encoded(graph, graphml=True)
    return _atomic_write(path, lambda tmp: nx.write_graphml(g, tmp), overwrite=overwrite)


def read_graphml(path: str | os.PathLike[str]) -> CircuitGraph:
    g = nx.read_graphml(path, node_type=str)
    if not isinstance(g, nx.DiGraph) or "provenance" not in g.graph:
        raise ArgumentError(f"{path} holds no factfind circuit graph")
    for key in ("node_default", "edge_default"):  # added by the reader when empty
        if g.graph.get(key) == {}:
            del g.graph[key]
    return _decoded(g)


def to_json(graph: CircuitGraph, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write node-link JSON; :func:`read_json` gives an equal graph."""
    data = nx.node_link_data(_encoded(graph, graphml=False), edges="edges")

    def write(tmp: str) -> None:  # streamed, so a failure midway is what atomicity is for
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)

    return _atomic_write(path, write, overwrite=overwrite)


def read_json(path: str | os.PathLike[str]) -> CircuitGraph:
    data = json.loads(Path(path).read_text())
    return _decoded(nx.node_link_graph(data, directed=True, multigraph=False, edges="edges"))


__all__ = ["read_graphml", "read_json", "to_graphml", "to_json"]
