"""The circuit-ablation engine: the mean metric with everything outside a circuit ablated.

A circuit is tested by removing everything else. The nodes here are heads and MLPs (or single
MLP neurons) at the roles of the token partition (:func:`factfind.edges.placement.role_labels`:
``prefix``, ``subject_first``, ``subject`` = inner subject tokens, ``subject_last``,
``relation``, ``final``); the embeddings are the input and are never ablated. A circuit may be
given as a graph, node ids, :class:`~factfind.graph.Node` values or
:class:`~factfind.types.Site` values (:func:`circuit_nodes`).

"Ablated" means replaced by the per-role mean over a pool of facts (``how="mean"``) or by the
activation of another prompt (``how="resample"``: the corrupt partner of each pair, or for a
plain dataset other subjects of the same relation and token length), as in
:mod:`factfind.localize.ablation`. The metric ``m`` is the mean over prompts of the logit
difference, or for a plain dataset the logit of the answer minus the mean logit of the relation's
other answers. :func:`evaluate_circuits` reports ``m(C)`` for each circuit ``C`` next to the full
model ``m(M)`` and the empty circuit ``m(∅)`` (every head and MLP ablated), and the
faithfulness ``(m(C) - m(∅)) / (m(M) - m(∅))``.

All circuits of a call, plus the full and the empty one, run stacked as copies of each prompt
batch: one forward per batch and chunk of circuits. The replacement values are those of
:mod:`factfind.localize.ablation` (:func:`~factfind.localize.ablation.mean_activations` per role;
the same resample partners), and the tests check the engine against
:func:`~factfind.localize.ablation.ablate_sets`; it is a separate engine because circuits address
the subject's inner tokens apart from its first and last (a :class:`~factfind.types.Site` cannot)
and because many circuits share one forward.

Example::

    evaluate_circuits(model, pairs, [["L0.h0@subject_last"], truth], how="resample")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from factfind.data.batch import PairBatch, encode_pairs
from factfind.edges.engine import where_edit
from factfind.errors import ArgumentError, OutOfRangeError
from factfind.graph import ENDPOINTS, CircuitGraph, Node
from factfind.localize.ablation import mean_activations
from factfind.metrics import logit_diff, logit_diff_vs_mean, share
from factfind.types import CIRCUIT_ABLATIONS, ROLE_NAMES, Component, Metric, Role, Site
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model

CircuitLike = CircuitGraph | Iterable[Node | str | Site]


# ----------------------------------------------------------------------------- nodes


def _site_nodes(model: Model, site: Site, roles: Sequence[str]) -> list[Node]:
    pos = site.position
    if isinstance(pos, int):
        raise ArgumentError(f"{site.name}: circuits need position roles, not absolute positions")
    if pos is None:
        rs = list(roles)
    elif pos is Role.SUBJECT:  # a Site's "subject" is every subject token
        rs = [r for r in ("subject_first", "subject", "subject_last") if r in roles]
    else:
        rs = [str(pos)]
    c, layer = site.component, site.layer
    if c in (Component.Z, Component.HEAD_OUT, Component.ATTN_OUT):
        heads = range(model.n_heads) if site.head is None else [site.head]
        return [Node("head", layer, h, r) for h in heads for r in rs]
    if c is Component.MLP_OUT or (c is Component.NEURONS and site.neuron is None):
        return [Node("mlp", layer, None, r) for r in rs]
    if c is Component.NEURONS:
        return [Node("neuron", layer, site.neuron, r) for r in rs]
    raise ArgumentError(f"{site.name}: a circuit holds heads, MLPs and neurons, not {c}")


def circuit_nodes(model: Model, circuit: CircuitLike, roles: Sequence[str]) -> set[Node]:
    """The inner nodes (heads, MLPs, neurons at roles) of a circuit given as a graph, node
    ids, :class:`~factfind.graph.Node` values or :class:`~factfind.types.Site` values; ``attn``
    nodes expand to every head and role ``all`` to every role in ``roles``."""
    items = [circuit.node(n) for n in circuit.graph] if isinstance(circuit, CircuitGraph) \
        else list(circuit)
    out: set[Node] = set()
    for item in items:
        if isinstance(item, Site):
            out |= set(_site_nodes(model, item, roles))
            continue
        n = item if isinstance(item, Node) else Node.parse(item, n_layers=model.n_layers)
        if n.kind in ENDPOINTS:
            continue
        if n.kind == "resid":
            raise ArgumentError(f"{n.id}: residual-stream nodes cannot be kept or ablated")
        if not 0 <= n.layer < model.n_layers:
            raise OutOfRangeError(f"{n.id}: layer out of range ({model.n_layers} layers)")
        rs = list(roles) if n.role == "all" else [n.role]
        if n.kind == "attn":
            out |= {Node("head", n.layer, h, r) for h in range(model.n_heads) for r in rs}
        else:
            out |= {Node(n.kind, n.layer, n.index, r) for r in rs}
    return out


def node_scores(scores: CircuitGraph | pd.DataFrame | Mapping[str, float]) -> dict[str, float]:
    """Inner node id -> score from a scored graph (its node scores; for an EAP graph the sum of
    each node's outgoing edges), an edge result frame (``sender``, ``effect``: summed by
    sender), a node frame (``id``, ``score``) or a mapping."""
    if isinstance(scores, CircuitGraph):
        items = {n: float(d["score"]) for n, d in scores.graph.nodes(data=True)}
    elif isinstance(scores, pd.DataFrame):
        if "sender" in scores.columns or "src" in scores.columns:  # (v0.1: src, score)
            new = "sender" in scores.columns
            items = {}
            for sender, effect in zip(scores["sender" if new else "src"],
                                      scores["effect" if new else "score"], strict=True):
                items[sender] = items.get(sender, 0.0) + float(effect)
        else:
            items = dict(zip(scores["id"], scores["score"], strict=True))
    else:
        items = dict(scores)
    return {str(k): float(v) for k, v in items.items()
            if not str(k).startswith(("embed@", "logits@"))}


# ----------------------------------------------------------------------------- the engine


def _keep_masks(model: Model, nodes: Iterable[Node]) -> tuple[Tensor, Tensor]:
    """Per (layer, role): kept heads ``[L R H]`` and kept neurons ``[L R N]`` (one indexed
    write per kind: a 30-layer model's circuits hold up to ~230k nodes)."""
    R = len(ROLE_NAMES)
    kz = torch.zeros(model.n_layers, R, model.n_heads, dtype=torch.bool)
    kn = torch.zeros(model.n_layers, R, model.d_mlp, dtype=torch.bool)
    heads: list[tuple[int, int, int]] = []
    units: list[tuple[int, int, int]] = []
    mlps: list[tuple[int, int]] = []
    for n in nodes:
        if n.kind == "head":
            heads.append((n.layer, ROLE_NAMES.index(n.role), n.index))  # type: ignore[arg-type]
        elif n.kind == "neuron":
            units.append((n.layer, ROLE_NAMES.index(n.role), n.index))  # type: ignore[arg-type]
        elif n.kind == "mlp":
            mlps.append((n.layer, ROLE_NAMES.index(n.role)))
    for mask, idx in ((kz, heads), (kn, units)):
        if idx:
            at = torch.tensor(idx, dtype=torch.long).T
            mask[at[0], at[1], at[2]] = True
    if mlps:
        at = torch.tensor(mlps, dtype=torch.long).T
        kn[at[0], at[1]] = True
    return kz, kn


def _full_masks(model: Model, roles: Sequence[str]) -> tuple[Tensor, Tensor]:
    """The keep masks of the full model: every head and neuron at every role present."""
    present = torch.zeros(len(ROLE_NAMES), dtype=torch.bool)
    present[[ROLE_NAMES.index(r) for r in roles]] = True
    kz = present[None, :, None].expand(model.n_layers, -1, model.n_heads).clone()
    kn = present[None, :, None].expand(model.n_layers, -1, model.d_mlp).clone()
    return kz, kn


def universe_size(model: Model, roles: Sequence[str], *, neurons: bool) -> int:
    """How many nodes :func:`~factfind.edges.placement.all_nodes` lists at these roles: each
    head and each MLP (or each MLP neuron) of every layer at every role."""
    return len(roles) * model.n_layers * (model.n_heads + (model.d_mlp if neurons else 1))


def _ablate(mask_keep: Tensor, labels: Tensor, value: Tensor):
    """An edit replacing every entry whose (role, unit) is not kept. ``mask_keep`` is
    ``[copies R units]``, ``labels`` ``[batch pos]``, ``value`` ``[copies*batch pos units ...]``.
    """
    real = labels >= 0
    keep = mask_keep[:, labels.clamp(min=0)]  # [C B P units]
    ablate = (~keep & real[None, ..., None]).flatten(0, 1)
    return where_edit(ablate, value)


def _candidates(model: Model, facts: FactDataset) -> dict[str, Tensor]:
    return {r: model.tokenize(list(facts.by_relation(r))).attribute_ids.unique()
            for r in facts.relations}


def _partners(model: Model, facts: FactDataset, seed: int) -> FactDataset:
    """One resample partner per prompt (as :func:`factfind.localize.ablation.ablate_sets` draws
    them: another subject of the relation with the same token length and a different answer)."""
    pairs = facts.corrupt(model, seed=seed, on_missing="skip")
    if len(pairs) != len(facts):
        raise ArgumentError(f"resample ablation needs a partner for every prompt; "
                         f"{len(facts) - len(pairs)} of {len(facts)} have none (seed {seed})")
    return pairs.corrupt


def _facts(data: FactPairs | FactDataset) -> FactDataset:
    """The measured prompts: the clean side of pairs, or the dataset itself."""
    return data.clean if isinstance(data, _pairs_type()) else data  # type: ignore[return-value]


def _pairs_type() -> type:
    from factfind.data.pairs import FactPairs

    return FactPairs


def ablation_edits(model: Model, group: Sequence[tuple[Tensor, Tensor]], labels: Tensor, *,
                   means: dict[Any, Tensor] | None, sources: Sequence[dict[Any, Tensor]]
                   ) -> dict[Any, Any]:
    """Edits for ``len(group) * reps`` stacked copies of a batch (``labels`` ``[B P]``): copy
    ``i`` keeps the heads and neurons of ``group[i // reps]`` (masks of :func:`_keep_masks`)
    and replaces every other one by its per-role mean (``means``) or, with ``sources`` (one
    activation dict per resample partner, ``reps`` of them), by the partner's activation."""
    reps = max(1, len(sources))
    C = len(group) * reps
    edits = {}
    for comp, k in ((Component.Z, 0), (Component.NEURONS, 1)):
        for layer in range(model.n_layers):
            keep = torch.stack([g[k][layer] for g in group for _ in range(reps)])
            if not sources:
                assert means is not None
                value = means[(comp, layer)][labels.clamp(min=0)]  # [B P units ...]
                value = value.repeat(C, *([1] * (value.dim() - 1)))
            else:
                value = torch.cat([a[(comp, layer)] for _ in group for a in sources])
            edits[(comp, layer)] = _ablate(keep, labels, value)
    return edits


def metric_rows(logits: Tensor, b: TokenBatch, copies: int, *, pb: PairBatch | None,
                idx: slice, metric: Metric, cand: Mapping[str, Tensor]) -> Tensor:
    """The metric per row ``[copies*B]`` of ``copies`` stacked copies of batch ``b`` (prompts
    ``idx`` of the data): ``metric`` on the pair's answers, or for a plain dataset the
    answer's logit minus the mean logit of the relation's other answers (``cand``)."""
    if pb is not None:
        return metric(logits, pb.correct[idx].repeat(copies), pb.wrong[idx].repeat(copies))
    ids = b.attribute_ids.repeat(copies)
    cands = [cand[p.relation] for p in b.prompts] * copies
    return torch.cat([logit_diff_vs_mean(logits[i:i + 1], ids[i:i + 1], cands[i])
                      for i in range(len(ids))])


def count_nodes(model: Model, nodes: set[Node], *, neurons: bool, name: str = "circuit") -> int:
    """Nodes of a circuit at the granularity: with ``neurons`` an MLP node counts as its
    ``d_mlp`` neurons; without, a single-neuron node is an error (it has no whole-MLP count,
    and counting it as one node would compare it with the wrong universe)."""
    if not neurons:
        bad = sorted(n.id for n in nodes if n.kind == "neuron")
        if bad:
            raise ArgumentError(f"{name} holds {len(bad)} single-neuron nodes (e.g. {bad[0]}): "
                             f"pass neurons=True to count nodes at neuron granularity")
        return len(nodes)
    return sum(model.d_mlp if n.kind == "mlp" else 1 for n in nodes)


@validated
def evaluate_circuits(
    model: Model, data: FactPairs | FactDataset, circuits: Sequence[CircuitLike], *,
    how: str = "mean", pool: FactDataset | None = None,
    means: dict[Any, Tensor] | None = None, resamples: int = 3, seed: int = 0,
    metric: Metric | None = None, neurons: bool | None = None,
    baseline: tuple[float, float] | None = None, batch_size: int = 16, chunk: int = 16,
) -> pd.DataFrame:
    """Mean metric with everything outside each circuit ablated, and its faithfulness.

    Args:
        model: the model.
        data: :class:`~factfind.data.FactPairs` (metric: logit difference between the clean
            and the corrupt answer; resample = the corrupt partner) or a
            :class:`~factfind.data.FactDataset` (metric: the answer's logit minus the mean
            logit of the relation's other answers; resample = ``resamples`` partners).
        circuits: each a graph, node ids, nodes or sites (see :func:`circuit_nodes`).
        how: ``"mean"`` or ``"resample"``.
        pool: prompts for the means (default the clean prompts); means: precomputed
            :func:`~factfind.localize.ablation.mean_activations` over ``z`` and ``neurons``.
        metric: for pairs, ``metric(logits, correct, wrong) -> [rows]``.
        neurons: count nodes at neuron granularity: ``fraction``'s denominator is every head
            and every MLP neuron at every role, and an MLP node counts as its ``d_mlp``
            neurons. ``None`` (default): at neuron granularity if any circuit holds a
            single-neuron node; ``False`` with such a node is a ``ValueError``.
        baseline: ``(full, empty)``, the full and the empty circuit's metric from an
            earlier call with the same data, ablation and metric: their two runs per batch are
            skipped (a search that measures one circuit per step, such as
            :func:`~factfind.evaluate.prune.prune_circuit`, pays a third of the cost).
        batch_size: prompts per forward; chunk: circuits stacked per forward.

    Returns:
        One row per circuit: ``circuit`` (index), ``n_nodes`` (at the granularity),
        ``fraction`` (of all nodes at the granularity), ``metric`` (mean ``m(C)``), ``full``
        (``m(M)``), ``empty`` (``m(∅)``), ``faithfulness``, ``n`` (prompts).
    """
    if how not in CIRCUIT_ABLATIONS:
        raise ArgumentError(f"how must be one of {CIRCUIT_ABLATIONS}, got {how!r}")
    pairs: FactPairs | None = data if isinstance(data, _pairs_type()) else None  # type: ignore[assignment]
    facts = _facts(data)
    pb = None
    if len(facts) == 0:
        raise ArgumentError("no prompts: the dataset is empty")
    L = model.n_layers
    keys = [(c, layer) for layer in range(L) for c in (Component.Z, Component.NEURONS)]
    if pairs is not None:
        pb = encode_pairs(model, pairs)
        batch = pb.clean
        sources = [pb.corrupt] if how == "resample" else []
    else:
        batch = model.tokenize(list(facts))
        sources = [model.tokenize(list(_partners(model, facts, seed + r)))
                   for r in range(resamples)] if how == "resample" else []
    roles = batch.roles_present()
    sets = [circuit_nodes(model, c, roles) for c in circuits]
    if neurons is None:
        neurons = any(n.kind == "neuron" for s in sets for n in s)
    universe = universe_size(model, roles, neurons=neurons)
    sizes = [count_nodes(model, s, neurons=neurons, name=f"circuit {i}")
             for i, s in enumerate(sets)]
    keeps = [_keep_masks(model, s) for s in sets]
    if baseline is None:  # the full model and the empty circuit, run as two more circuits
        keeps += [_full_masks(model, roles), _keep_masks(model, ())]
    if how == "mean" and means is None:
        means = mean_activations(model, pool or facts, keys)
    cand = _candidates(model, facts) if pairs is None else {}
    metric = metric or logit_diff
    labels_all = batch.role_labels()
    n = len(facts)
    total = torch.zeros(len(keeps), dtype=torch.float64)
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        b = batch.take(idx)
        labels = labels_all[idx]
        B = len(b)
        src_acts = [model.run(s.take(idx), save=keys).acts for s in sources]
        reps = max(1, len(src_acts))
        for c0 in range(0, len(keeps), chunk):
            group = keeps[c0:c0 + chunk]
            edits = ablation_edits(model, group, labels, means=means, sources=src_acts)
            logits = model.run(b.repeat(len(group) * reps), edits=edits).logits
            m = metric_rows(logits, b, len(group) * reps, pb=pb, idx=idx, metric=metric,
                            cand=cand)
            total[c0:c0 + len(group)] += m.double().cpu().reshape(len(group), reps, B).mean(1) \
                .sum(1)
    mean = total / n
    m_full, m_empty = (float(mean[-2]), float(mean[-1])) if baseline is None \
        else (float(baseline[0]), float(baseline[1]))
    rows = []
    for i in range(len(sets)):
        rows.append({"circuit": i, "n_nodes": sizes[i], "fraction": sizes[i] / universe,
                     "metric": float(mean[i]), "full": m_full, "empty": m_empty,
                     "faithfulness": share(float(mean[i]), m_empty, m_full,
                                           what="faithfulness"),
                     "n": n, "how": how})
    return pd.DataFrame(rows)


__all__ = ["CircuitLike", "ablation_edits", "circuit_nodes", "count_nodes",
           "evaluate_circuits", "metric_rows", "node_scores"]
