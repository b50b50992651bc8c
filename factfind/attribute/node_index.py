"""Nodes of attribution methods: a flat numbering of (component, layer, position, unit).

A node (:class:`NodeIndex`) is a component at a layer at a *position spec* - a role such as
``subject_last`` or an absolute index (negative indices count from the final token) - and a
unit: every MLP **neuron** (``neurons``, the input of ``W_out``), the MLP layer (``mlp_out``),
and per attention head its output (``head_out``, patched through ``z``) and its inputs at a
position: the query (``q``), key (``k``) and value (``v``) vectors. AtP
(:mod:`factfind.attribute.atp`), exact patching (:mod:`factfind.attribute.exact`), verification
(:mod:`factfind.attribute.verification`) and the neuron analyses (:mod:`factfind.attribute.neurons`)
all number nodes this way, so their ``[node]`` tensors line up, and :func:`node_frame` turns them
into one tidy frame.

Example::

    index = NodeIndex.build(model, components=["neurons"], positions=["subject_last"])
    len(index)                    # n_layers * d_mlp nodes
    node_frame(index, "atp", {"effect": scores})   # scores: [node]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.errors import ArgumentError, OutOfRangeError
from factfind.localize.patching import PatchSite
from factfind.types import RESULT_COLUMNS, Component, Role

if TYPE_CHECKING:
    from factfind.model import Model



#: node components in their canonical order (``z`` is reported as ``head_out``)
NODE_COMPONENTS: tuple[Component, ...] = (Component.NEURONS, Component.MLP_OUT, Component.Z,
                                          Component.Q, Component.K, Component.V)
ATTENTION_INPUTS: tuple[Component, ...] = (Component.Q, Component.K, Component.V)


def node_component(c: str | Component) -> Component:
    """The node component for a name: ``head_out`` and ``z`` both mean a head's output."""
    comp = Component(c)
    if comp is Component.HEAD_OUT:
        comp = Component.Z
    if comp not in NODE_COMPONENTS:
        raise ArgumentError(f"{comp} is not a node component; choose from neurons, mlp_out, "
                         "head_out, q, k, v")
    return comp


def component_name(c: Component) -> str:
    """The name a node component has in result frames (``z`` -> ``head_out``)."""
    return "head_out" if c is Component.Z else str(c)


# ----------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class NodeIndex:
    """A flat numbering of nodes: component-major, then layer, position spec and unit.

    Per component the nodes form a ``[layer position unit]`` block, with ``unit`` the neuron
    (``d_mlp`` of them), the head (``n_heads``), or a single unit for ``mlp_out``.
    """

    components: tuple[Component, ...]
    layers: tuple[int, ...]
    positions: tuple[Role | int, ...]
    n_heads: int
    d_mlp: int

    @classmethod
    def build(cls, model: Model, *, components: Iterable[str | Component],
              positions: Iterable[Role | int | str], layers: Iterable[int] | None = None
              ) -> NodeIndex:
        comps = tuple(sorted({node_component(c) for c in components}, key=NODE_COMPONENTS.index))
        pos = tuple(p if isinstance(p, int) else Role(p) for p in positions)
        lays = tuple(range(model.n_layers)) if layers is None else tuple(sorted(set(layers)))
        if not comps or not pos or not lays:
            raise ArgumentError("need at least one component, position and layer")
        for layer in lays:
            if not 0 <= layer < model.n_layers:
                raise OutOfRangeError(f"layer {layer} does not exist: {model.name} has "
                                 f"{model.n_layers} layers")
        return cls(comps, lays, pos, model.n_heads, model.d_mlp)

    def units(self, comp: Component) -> int:
        if comp is Component.NEURONS:
            return self.d_mlp
        return 1 if comp is Component.MLP_OUT else self.n_heads

    def size(self, comp: Component) -> int:
        return len(self.layers) * len(self.positions) * self.units(comp)

    @cached_property
    def offsets(self) -> dict[Component, int]:
        sizes = [self.size(c) for c in self.components]
        return dict(zip(self.components, itertools.accumulate([0, *sizes[:-1]]), strict=True))

    def __len__(self) -> int:
        return sum(self.size(c) for c in self.components)

    def site(self, i: int) -> PatchSite:
        """The node numbered ``i`` as a :class:`~factfind.localize.patching.PatchSite`."""
        for comp in reversed(self.components):
            if i >= self.offsets[comp]:
                layer_i, pos_i, unit = np.unravel_index(
                    i - self.offsets[comp],
                    (len(self.layers), len(self.positions), self.units(comp)))
                unit = int(unit)
                return PatchSite(comp, self.layers[int(layer_i)], self.positions[int(pos_i)],
                                 head=None if comp in (Component.NEURONS, Component.MLP_OUT)
                                 else unit,
                                 neuron=unit if comp is Component.NEURONS else None)
        raise IndexError(i)

    def columns(self) -> dict[str, np.ndarray]:
        """Per node: component, layer, head, neuron, position, role (NaN / None when absent)."""
        cols = self.frame_columns
        return {k: (v.to_numpy(dtype=object, na_value=None) if k in ("component", "role")
                    else v.to_numpy(dtype=float, na_value=np.nan)) for k, v in cols.items()}

    @cached_property
    def frame_columns(self) -> dict[str, pd.api.extensions.ExtensionArray]:
        """Per node, as the nullable arrays of a result frame: ``component`` and ``role``
        (``string``), ``layer``, ``head``, ``neuron`` and ``position`` (``Int64``).

        Built from integer codes (a string column is a ``take`` from its few distinct
        values), so a frame of ~10^5 nodes costs a few milliseconds, not a Python loop."""
        ints: dict[str, list[np.ndarray]] = {k: [] for k in ("layer", "head", "neuron",
                                                             "position")}
        comp_codes, pos_codes = [], []
        pos_values = np.array([p if isinstance(p, int) else 0 for p in self.positions])
        pos_given = np.array([isinstance(p, int) for p in self.positions])
        for ci, comp in enumerate(self.components):
            shape = (len(self.layers), len(self.positions), self.units(comp))
            li, pi, ui = (a.ravel() for a in np.indices(shape))
            n = li.size
            comp_codes.append(np.full(n, ci))
            pos_codes.append(pi)
            none = np.full(n, -1)
            ints["layer"].append(np.asarray(self.layers)[li])
            has_head = comp not in (Component.NEURONS, Component.MLP_OUT)
            ints["head"].append(ui if has_head else none)
            ints["neuron"].append(ui if comp is Component.NEURONS else none)
            ints["position"].append(np.where(pos_given[pi], pos_values[pi], -1))
        out: dict[str, pd.api.extensions.ExtensionArray] = {}
        names = [component_name(c) for c in self.components]
        out["component"] = pd.array(names, dtype="string").take(np.concatenate(comp_codes))
        for k in ("layer", "head", "neuron"):
            v = np.concatenate(ints[k]).astype(np.int64)
            out[k] = pd.arrays.IntegerArray(v, v < 0)
        v = np.concatenate(ints["position"]).astype(np.int64)
        out["position"] = pd.arrays.IntegerArray(
            v, ~pos_given[np.concatenate(pos_codes)])
        roles = [str(p) if isinstance(p, Role) else None for p in self.positions]
        out["role"] = pd.array(roles, dtype="string").take(np.concatenate(pos_codes))
        return {k: out[k] for k in ("component", "layer", "head", "neuron", "position",
                                    "role")}

    def node_layers(self) -> Tensor:
        """``[node]`` the layer of every node."""
        return torch.cat([torch.tensor(self.layers).repeat_interleave(
            len(self.positions) * self.units(c)) for c in self.components])

    def node_positions(self) -> Tensor:
        """``[node]`` the index into :attr:`positions` of every node."""
        return torch.cat([torch.arange(len(self.positions)).repeat_interleave(self.units(c))
                          .repeat(len(self.layers)) for c in self.components])


def node_frame(index: NodeIndex, method: str, values: dict[str, np.ndarray | Tensor],
               *, prompts: np.ndarray | None = None) -> pd.DataFrame:
    """A tidy frame (:data:`~factfind.types.RESULT_COLUMNS` first) with one row per node - or
    per (prompt, node) when ``prompts`` gives each row's prompt and ``values`` are
    ``[prompt * node]`` - built column-wise, so a million rows take well under a second."""
    cols = index.frame_columns
    reps = 1 if prompts is None else len(prompts) // len(index)
    n_rows = len(index) * reps
    tile = np.tile(np.arange(len(index)), reps) if reps > 1 else None
    data: dict[str, object] = {"method": pd.array([method], dtype="string").take(
        np.zeros(n_rows, dtype=np.intp))}
    for name, col in cols.items():
        data[name] = col.copy() if tile is None else col.take(tile)
    data["prompt"] = (_int_array(np.full(n_rows, np.nan)) if prompts is None
                      else pd.array(prompts, dtype="Int64"))
    for name in ("effect", "ci_low", "ci_high", "n"):
        v = values.get(name)
        arr = np.full(n_rows, np.nan) if v is None else _np(v).astype("float64")
        data[name] = _int_array(arr) if name == "n" else arr
    for name, v in values.items():
        if name not in data:
            data[name] = _np(v)
    df = pd.DataFrame(data)
    return df.reindex(columns=list(RESULT_COLUMNS)
                      + [c for c in df.columns if c not in RESULT_COLUMNS])


def _int_array(v: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """Float counts (NaN: missing) as a nullable ``Int64`` array."""
    missing = np.isnan(v)
    return pd.arrays.IntegerArray(np.where(missing, 0, v).round().astype(np.int64), missing)


def _np(v: np.ndarray | Tensor) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
