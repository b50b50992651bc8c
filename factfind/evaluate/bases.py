"""Bases side by side: is a circuit of features more faithful than one of neurons or MLPs?

A circuit can be written in three bases for the MLPs (attention is read per head in all of
them), and the features once more without their error nodes:

* **heads/MLPs**: each MLP layer at a token role is one node (Wang et al. 2022; Conmy et al.
  2023), ranked by AtP of ``head_out`` and ``mlp_out``;
* **neurons**: each MLP neuron is a node (Nanda et al. 2023's Fact Finding), ranked by AtP*
  (Kramár et al. 2024: the QK fix and GradDrop) of ``head_out`` and ``neurons``;
* **features**: each MLP is read through its dictionary (a transcoder, skip transcoder or
  ``mlp_out`` SAE) as its features *and its error node* (Marks et al. 2024, who count error
  nodes as nodes: a circuit that needs an MLP's unexplained part must spend a node on it),
  ranked by :func:`~factfind.features.attribution.feature_atp` together with AtP of the heads
  (and of the MLPs of layers without a dictionary) - the same first-order estimate of the same
  metric, so one ranking;
* **features, no error nodes** (``features_no_errors``): the features basis's ranking with
  every error node left out, the budget filled by the next heads and features, so an error
  node is always ablated like any node outside the circuit (:func:`basis_circuit`). Its full
  circuit is every head and feature (and the MLPs of layers without a dictionary) but no error
  node, so its ``F`` at the full budget is below 1: it measures what the features themselves
  carry of the model's behaviour, not the model (on the tiny test models with random
  dictionaries about 0 to 0.94; the report's table gives it for the real models).

At **equal node budgets** (10, 50, 200 nodes) the top nodes of each basis form a circuit, and
its **faithfulness** is the house's (:mod:`factfind.evaluate.engine`): everything outside the
circuit is ablated - mean (per token role, over the clean prompts) or resample (the corrupt
partner's activation) - and

    F(C) = (m(C) - m(∅)) / (m(M) - m(∅))

with ``m`` the mean logit difference, ``M`` the full model, ``∅`` everything ablated. Head and
neuron circuits run on :func:`~factfind.evaluate.engine.evaluate_circuits`. Feature circuits
run on :func:`evaluate_feature_circuits`, the same engine with each dictionary spliced into its
MLP, error kept: a feature outside the circuit takes its per-role mean (or partner's)
activation, an error node outside it its mean (or partner's) error, and the MLP writes
``decode(a') + err'``. The error node is everything the MLP writes that no feature writes,
``err = mlp_out - a @ W_dec - b_dec``: a skip transcoder's skip path ``x @ W_skip`` is part of
it and is ablated with it. The full circuit writes ``decode(a) + err = mlp_out``: the model
itself (``F = 1``), and the empty one writes the mean (partner's) ``mlp_out``, because the
decoder is affine - the same ``m(∅)`` as the other bases, except in models with a norm after
the MLP (Gemma's ``post_feedforward_layernorm``), where the other bases ablate the neurons
before the norm (Gemma-3-270M, 16 athlete pairs: ``m(∅)`` 1.802 here, 1.790 there). Nodes are
ranked at the attribution roles (``subject_first``, ``subject_last``, ``relation``,
``final``); nodes at other roles (the prefix, inner subject tokens) are in no budgeted
circuit, in every basis alike. ``tests/test_bases_reference.py`` checks the engine against a
literal splice, prompt by prompt and position by position.

Reading the table: a feature circuit can score *below* the empty circuit under mean ablation
and still above it under resample. An error node kept while its features are ablated writes
``mlp_out - (a - mean_a) @ W_dec``: the live MLP minus the features' deviation from their
role's dense mean. With the default skip transcoders that deviation is noise to the MLP: on
Gemma-3-270M (16 athlete pairs) the features explain -0.07 to 0.09 of the variance of
``mlp_out`` across prompts at ``subject_last`` (their deviation is 9-26% of the MLP's at
layers 0-3), so the error nodes carry the MLP and feature AtP ranks them high (4, 12, 22 of
the top 10, 50, 200 nodes). There heads plus error nodes score -0.10 / -0.20 / -0.28; heads
alone 0.00 / 0.08 / 0.03, heads and features 0.00 / 0.09 / 0.09, each kept error node widened
to its whole MLP 0.03 / 0.17 / 0.14. On SmolLM2-135M (16 ROME-known pairs) features and skip
path are large opposed writes at some layers (the features' deviation ~45x the MLP's at layer
11): heads plus error nodes 0.12 / -0.05 / -0.57, heads and features 0.02 / 0.07 / 0.15.
Ranked without error nodes (``features_no_errors``: the next heads and features fill the
budget), the basis scores -0.01 / 0.11 / 0.20 under mean and 0.01 / 0.01 / 0.03 under
resample on Gemma; in SmolLM2's fact-finding report (its run's first 16 pairs) -0.03 / -0.04 /
-0.10 and 0.00 / 0.00 / 0.00: the features basis's resample lead is its error nodes' too.
The table carries that basis beside the others so the reader sees both.

:func:`basis_comparison` makes the table (one row per basis, budget and ablation) and
:func:`basis_figure` its figure. Nothing is tuned toward a basis: each is ranked by its own
standard estimate and measured by the one engine; where features lose, the table says so.

Cost: the rankings (AtP of heads and MLPs; AtP* of heads and neurons, ``1 + n_layers``
backward passes per batch; feature AtP; the no-error ranking is the features' one, filtered),
then per ablation one stacked forward per batch and chunk of circuits for each basis (the
budgets, the full model and the empty circuit; a feature basis adds one forward per batch for
its dictionaries' means under mean ablation).

Example::

    table = basis_comparison(model, pairs, dicts, budgets=(10, 50, 200))
    table.pivot_table(index="budget", columns=["how", "basis"], values="faithfulness")
    fig = basis_figure(table)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.attribute.atp import atp, atp_star
from factfind.data.batch import encode_pairs
from factfind.errors import ArgumentError
from factfind.evaluate.engine import (
    ablation_edits,
    circuit_nodes,
    evaluate_circuits,
    metric_rows,
    universe_size,
)
from factfind.features.attribution import _checked, feature_atp
from factfind.features.circuits import node_ids
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.verification import parse_feature_node
from factfind.graph import ENDPOINTS, CircuitGraph, Node
from factfind.localize.ablation import mean_activations
from factfind.localize.patching import DEFAULT_ROLES
from factfind.metrics import logit_diff, share
from factfind.types import CIRCUIT_ABLATIONS, ROLE_NAMES, Component, Metric, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from factfind.data import FactDataset, FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model

log = logging.getLogger(__name__)

#: the bases, in the table's order: the features with and without their error nodes, the
#: neurons, the heads and whole MLPs
BASES = ("features", "features_no_errors", "neurons", "heads_mlps")
#: the node budgets of the issue
BUDGETS = (10, 50, 200)


# ----------------------------------------------------------------------------- nodes


def _mlp_dictionaries(dicts: Any, model: Model) -> Dictionaries:
    """The dictionaries as MLP replacements: each writes ``mlp_out`` (a transcoder, a skip
    transcoder or an ``mlp_out`` SAE), at most one per layer (typed one-line errors)."""
    ds = _checked(dicts, model)
    seen: dict[int, str] = {}
    for d in ds.values():
        if d.out_site is not Component.MLP_OUT:
            raise ArgumentError(f"{d.name} writes {d.out_site}: a feature circuit reads each MLP "
                                "through a dictionary that writes mlp_out (a transcoder, a skip "
                                "transcoder or an mlp_out SAE); leave it out")
        if d.layer in seen:
            raise ArgumentError(f"{seen[d.layer]} and {d.name} both replace the MLP of layer "
                                f"{d.layer}: keep one dictionary per layer")
        seen[d.layer] = d.name
    return ds


@dataclass
class _Keep:
    """What one circuit keeps, per (layer, role): heads ``[L R H]``, MLP units ``[L R N]``
    (whole MLPs of layers without a dictionary) and per dictionary its features ``[R F]`` and
    error ``[R]``."""

    heads: Tensor
    neurons: Tensor
    feats: dict[str, Tensor]
    errs: dict[str, Tensor]


def _keep(model: Model, ds: Dictionaries, nodes: Iterable[Node], *, fill: bool = False,
          roles: Sequence[str] = ()) -> _Keep:
    R = len(ROLE_NAMES)
    present = torch.zeros(R, dtype=torch.bool)
    if fill:
        present[[ROLE_NAMES.index(r) for r in roles]] = True
    k = _Keep(present[None, :, None].expand(model.n_layers, R, model.n_heads).clone(),
              present[None, :, None].expand(model.n_layers, R, model.d_mlp).clone(),
              {n: present[:, None].expand(R, d.d_sae).clone() for n, d in ds.items()},
              {n: present.clone() for n in ds})
    for n in nodes:
        r = ROLE_NAMES.index(n.role)
        if n.kind == "head":
            k.heads[n.layer, r, n.index] = True
        elif n.kind == "mlp":
            k.neurons[n.layer, r] = True
        elif n.kind == "feature":
            k.feats[f"L{n.layer}.{n.dictionary}"][r, n.index] = True
        elif n.kind == "error":
            k.errs[f"L{n.layer}.{n.dictionary}"][r] = True
    return k


def feature_circuit_nodes(model: Model, dicts: Dictionaries, circuit: Any,
                          roles: Sequence[str]) -> set[Node]:
    """The inner nodes of a feature circuit (a graph, node ids or nodes): heads (``attn``
    expands to every head), whole MLPs of layers without a dictionary, and the features and
    error nodes of the dictionaries; role ``all`` expands to ``roles``. An MLP or neuron of a
    layer read through a dictionary, a feature that does not exist, or a residual node is a
    one-line error."""
    items = [circuit.node(n) for n in circuit.graph] if isinstance(circuit, CircuitGraph) \
        else ([circuit] if isinstance(circuit, str) else list(circuit))
    by_layer = {d.layer: d for d in dicts.values()}
    out: set[Node] = set()
    for item in items:
        n = item if isinstance(item, Node) else Node.parse(str(item), n_layers=model.n_layers)
        if n.kind in ENDPOINTS:
            continue
        if not 0 <= n.layer < model.n_layers:
            raise ArgumentError(f"{n.id}: layer out of range ({model.n_layers} layers)")
        rs = list(roles) if n.role == "all" else [n.role]
        if n.kind in ("feature", "error"):
            parse_feature_node(Node(n.kind, n.layer, n.index, rs[0], n.dictionary).id, dicts)
            out |= {Node(n.kind, n.layer, n.index, r, n.dictionary) for r in rs}
        elif n.kind in ("mlp", "neuron"):
            if n.layer in by_layer:
                raise ArgumentError(f"{n.id}: the MLP of layer {n.layer} is read through "
                                    f"{by_layer[n.layer].name}: name its features and error "
                                    f"node ('{by_layer[n.layer].error_id(n.role)}')")
            if n.kind == "neuron":
                raise ArgumentError(f"{n.id}: a feature circuit holds whole MLPs at layers "
                                    "without a dictionary, not single neurons")
            out |= {Node("mlp", n.layer, None, r) for r in rs}
        elif n.kind == "attn":
            out |= {Node("head", n.layer, h, r) for h in range(model.n_heads) for r in rs}
        elif n.kind == "head":
            out |= {Node("head", n.layer, n.index, r) for r in rs}
        else:
            raise ArgumentError(f"{n.id}: residual-stream nodes cannot be kept or ablated")
    return out


def feature_universe(model: Model, dicts: Dictionaries, roles: Sequence[str]) -> int:
    """Every node of the feature basis at ``roles``: each head, each MLP of a layer without a
    dictionary, and each feature and error node of each dictionary."""
    bare = model.n_layers - len({d.layer for d in dicts.values()})
    per_role = model.n_layers * model.n_heads + bare + sum(d.d_sae + 1 for d in dicts.values())
    return len(roles) * per_role


# ----------------------------------------------------------------------------- the engine


def _dict_sites(d: Dictionary) -> tuple[SiteKey, SiteKey]:
    return (d.site, d.layer), (Component.MLP_OUT, d.layer)


def _dict_means(model: Model, ds: Dictionaries, facts: FactDataset, batch_size: int
                ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per dictionary the per-role mean feature activations ``[R F]`` and mean error
    ``[R d_out]`` over ``facts`` (the error's mean is the site's mean minus the decoded mean
    activations: the decoder is affine)."""
    R = len(ROLE_NAMES)
    keys = sorted({k for d in ds.values() for k in _dict_sites(d)})
    sums = {n: (torch.zeros(R, d.d_sae, dtype=torch.float64),
                torch.zeros(R, d.d_out, dtype=torch.float64)) for n, d in ds.items()}
    counts = torch.zeros(R, dtype=torch.float64)
    for start in range(0, len(facts), batch_size):
        tb = model.tokenize(list(facts[start:start + batch_size]))
        labels = tb.role_labels()
        onehot = torch.nn.functional.one_hot(labels.clamp(min=0), R).double() \
            * (labels >= 0)[..., None]  # [B P R]
        counts += onehot.sum((0, 1))
        with torch.no_grad():
            acts = model.run(tb, save=keys).acts
            for n, d in ds.items():
                read, write = _dict_sites(d)
                a = d.encode(acts[read]).double().cpu()
                y = acts[write].double().cpu()
                sums[n][0].add_(torch.einsum("bpr,bpf->rf", onehot, a))
                sums[n][1].add_(torch.einsum("bpr,bpd->rd", onehot, y))
    c = counts.clamp(min=1)[:, None]
    out = {}
    for n, d in ds.items():
        mean_a = (sums[n][0] / c).to(model.device, d.W_dec.dtype)
        mean_y = (sums[n][1] / c).to(model.device, d.W_dec.dtype)
        out[n] = (mean_a, mean_y - d.decode(mean_a))
    return out


def _dict_values(model: Model, ds: Dictionaries, tb: TokenBatch
                 ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per dictionary the feature activations ``[B P F]`` and error ``[B P d_out]`` of a run
    of ``tb`` (the resample partners)."""
    keys = sorted({k for d in ds.values() for k in _dict_sites(d)})
    with torch.no_grad():
        acts = model.run(tb, save=keys).acts
    out = {}
    for n, d in ds.items():
        read, write = _dict_sites(d)
        a = d.encode(acts[read])
        out[n] = (a, acts[write].to(a.dtype) - d.decode(a))
    return out


def _dict_edits(ds: Dictionaries, group: Sequence[_Keep], labels: Tensor,
                ref: Mapping[str, tuple[Tensor, Tensor]], *, per_role: bool
                ) -> dict[SiteKey, Any]:
    """Edits splicing each dictionary into its MLP for ``len(group)`` stacked copies: features
    and error outside copy ``c``'s circuit take the reference values (per-role means with
    ``per_role``, else the partner's ``[B P ...]``)."""
    C = len(group)
    real = labels >= 0  # [B P]
    lab = labels.clamp(min=0)
    edits: dict[SiteKey, Any] = {}
    for name, d in ds.items():
        read, write = _dict_sites(d)
        seen: dict[str, Tensor] = {}
        kf = torch.stack([g.feats[name] for g in group])  # [C R F]
        ke = torch.stack([g.errs[name] for g in group])  # [C R]
        ra, re = ref[name]
        if per_role:
            ra, re = ra[lab.to(ra.device)], re[lab.to(re.device)]  # [B P ...]
        dev = ra.device
        ablate_f = (~kf[:, lab] & real[None, ..., None]).flatten(0, 1).to(dev)  # [CB P F]
        ablate_e = (~ke[:, lab] & real[None]).flatten(0, 1).to(dev)[..., None]  # [CB P 1]
        ra_c = ra.repeat(C, *([1] * (ra.dim() - 1)))
        re_c = re.repeat(C, *([1] * (re.dim() - 1)))

        def replace(y: Tensor, d: Dictionary = d, seen: dict[str, Tensor] = seen,
                    af: Tensor = ablate_f, ae: Tensor = ablate_e, ra: Tensor = ra_c,
                    re: Tensor = re_c) -> Tensor:
            x = seen.pop("x", y)  # an mlp_out SAE reads what it writes
            a = d.encode(x)
            err = y.to(a.dtype) - d.decode(a)
            a2 = torch.where(af, ra.to(a.dtype), a)
            e2 = torch.where(ae, re.to(a.dtype), err)
            # decode(a2) + e2, written as a change of y: exact where nothing is ablated
            out = y.to(a.dtype) + (a2 - a).to(d.W_dec.dtype) @ d.W_dec + (e2 - err)
            return out.to(y.dtype)

        if read != write:
            def remember(x: Tensor, seen: dict[str, Tensor] = seen) -> Tensor:
                seen["x"] = x
                return x
            edits[read] = remember
        edits[write] = replace
    return edits


@validated
def evaluate_feature_circuits(
    model: Model, pairs: FactPairs, dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    circuits: Sequence[Any], *, how: str = "mean", pool: FactDataset | None = None,
    metric: Metric | None = None, batch_size: int = 16, chunk: int = 8, progress: bool = True,
) -> pd.DataFrame:
    """Faithfulness of feature circuits: the house's engine with each MLP read through its
    dictionary (module doc).

    Args:
        model: the model.
        pairs: clean/corrupt pairs (metric: the logit difference; resample = the partner).
        dicts: one dictionary per MLP it replaces (transcoders, skip transcoders or
            ``mlp_out`` SAEs); the MLPs of other layers are whole-MLP nodes.
        circuits: each a graph or node ids / nodes (:func:`feature_circuit_nodes`).
        how: ``"mean"`` or ``"resample"``; pool: prompts for the means (default the clean
            prompts).
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default the logit difference).
        batch_size: pairs per forward; chunk: circuits stacked per forward.

    Returns:
        One row per circuit, as :func:`evaluate_circuits`: ``circuit``, ``n_nodes`` (heads,
        MLPs, features and error nodes, each one node), ``fraction`` (of
        :func:`feature_universe`), ``metric``, ``full``, ``empty``, ``faithfulness``, ``n``,
        ``how``, plus ``n_heads``, ``n_features``, ``n_errors``, ``n_mlps``.
    """
    if how not in CIRCUIT_ABLATIONS:
        raise ArgumentError(f"how must be one of {CIRCUIT_ABLATIONS}, got {how!r}")
    if not circuits:
        raise ArgumentError("circuits is empty: give at least one circuit (node ids or a graph)")
    ds = _mlp_dictionaries(dicts, model)
    pb = encode_pairs(model, pairs)
    batch = pb.clean
    roles = batch.roles_present()
    sets = [feature_circuit_nodes(model, ds, c, roles) for c in circuits]
    keeps = [_keep(model, ds, s) for s in sets]
    keeps += [_keep(model, ds, (), fill=True, roles=roles), _keep(model, ds, ())]  # M, ∅
    keys = [(c, layer) for layer in range(model.n_layers)
            for c in (Component.Z, Component.NEURONS)]
    dict_layers = {d.layer for d in ds.values()}
    means = dict_means = None
    if how == "mean":
        facts = pool if pool is not None else pairs.clean
        means = mean_activations(model, facts, keys)
        dict_means = _dict_means(model, ds, facts, batch_size)
    metric = metric or logit_diff
    labels_all = batch.role_labels()
    n = len(pb)
    total = torch.zeros(len(keeps), dtype=torch.float64)
    starts = list(range(0, n, batch_size))
    bar = tqdm(total=len(starts) * -(-len(keeps) // chunk), desc=f"feature circuits ({how})",
               unit="forward", disable=not progress)
    for start in starts:
        idx = slice(start, min(n, start + batch_size))
        b = batch.take(idx)
        labels = labels_all[idx]
        if how == "resample":
            src = pb.corrupt.take(idx)
            with torch.no_grad():
                sources = [model.run(src, save=keys).acts]
            ref = _dict_values(model, ds, src)
        else:
            assert dict_means is not None
            sources, ref = [], dict_means
        for c0 in range(0, len(keeps), chunk):
            group = keeps[c0:c0 + chunk]
            edits = ablation_edits(model, [(g.heads, g.neurons) for g in group], labels,
                                   means=means, sources=sources)
            for layer in dict_layers:  # the dictionary's edit replaces the MLP's output
                edits.pop((Component.NEURONS, layer), None)
            edits.update(_dict_edits(ds, group, labels, ref, per_role=how == "mean"))
            with torch.no_grad():
                logits = model.run(b.repeat(len(group)), edits=edits).logits
            m = metric_rows(logits, b, len(group), pb=pb, idx=idx, metric=metric, cand={})
            total[c0:c0 + len(group)] += m.double().cpu().reshape(len(group), -1).sum(1)
            bar.update(1)
    bar.close()
    mean = total / n
    m_full, m_empty = float(mean[-2]), float(mean[-1])
    universe = feature_universe(model, ds, roles)
    rows = []
    for i, s in enumerate(sets):
        kinds = [x.kind for x in s]
        rows.append({"circuit": i, "n_nodes": len(s), "fraction": len(s) / universe,
                     "metric": float(mean[i]), "full": m_full, "empty": m_empty,
                     "faithfulness": share(float(mean[i]), m_empty, m_full,
                                           what="faithfulness"),
                     "n": n, "how": how, "n_heads": kinds.count("head"),
                     "n_features": kinds.count("feature"), "n_errors": kinds.count("error"),
                     "n_mlps": kinds.count("mlp")})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the bases


def basis_scores(model: Model, pairs: FactPairs, dicts: Any, *,
                 roles: Sequence[str] = tuple(str(r) for r in DEFAULT_ROLES),
                 neuron_method: str = "atp*", metric: Metric | None = None,
                 batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Each basis's node ranking: ``basis``, ``node``, ``effect`` and ``score`` (module doc).

    Heads and MLPs by AtP (``head_out``, ``mlp_out``); heads and neurons by AtP*
    (``neuron_method="atp"``: plain AtP); features and error nodes by feature AtP, with the
    heads and the MLPs of layers without a dictionary by AtP.
    """
    if neuron_method not in ("atp", "atp*"):
        raise ArgumentError(f"neuron_method must be 'atp' or 'atp*', got {neuron_method!r}")
    ds = _mlp_dictionaries(dicts, model)
    kw: dict[str, Any] = {"positions": list(roles), "batch_size": batch_size,
                          "progress": progress, "metric": metric}
    hm = atp(model, pairs, components=["head_out", "mlp_out"], **kw)
    nn = (atp_star if neuron_method == "atp*" else atp)(
        model, pairs, components=["head_out", "neurons"], **kw)
    fa = feature_atp(model, pairs, ds, roles=list(roles), metric=metric, batch_size=batch_size,
                     progress=progress)

    def part(frame: pd.DataFrame, basis: str) -> pd.DataFrame:
        score = frame["score"] if "score" in frame.columns else frame["effect"].abs()
        return pd.DataFrame({"basis": basis, "node": node_ids(frame).to_numpy(),
                             "effect": frame["effect"].to_numpy(dtype=float),
                             "score": score.fillna(0.0).to_numpy(dtype=float)})

    dict_layers = {d.layer for d in ds.values()}
    bare = pd.DataFrame(hm[~((hm["component"] == "mlp_out")
                             & hm["layer"].isin(sorted(dict_layers))).to_numpy()])
    out = pd.concat([part(fa, "features"), part(bare, "features"), part(nn, "neurons"),
                     part(hm, "heads_mlps")], ignore_index=True)
    order = out.sort_values(by=["basis", "score", "node"], ascending=[True, False, True],
                            kind="stable")
    return pd.DataFrame(order).reset_index(drop=True)


def basis_circuit(scores: pd.DataFrame, basis: str, budget: int | None) -> list[str] | None:
    """The node ids of ``basis``'s circuit at ``budget``: its top-``budget`` nodes of a
    :func:`basis_scores` frame by score (ties by node id; all of them if fewer), ``None`` for
    the full basis (``budget=None``). ``features_no_errors`` reads the ``features`` ranking
    and skips every error node, so the next heads and features fill its budget.

    Example::

        basis_circuit(basis_scores(model, pairs, dicts), "features_no_errors", 50)
    """
    if basis not in BASES:
        raise ArgumentError(f"basis must be one of {BASES}, got {basis!r}")
    if budget is None:
        return None
    ranked = "features" if basis == "features_no_errors" else basis
    sel = pd.DataFrame(scores[(scores["basis"] == ranked).to_numpy()])
    sel = sel.sort_values(by=["score", "node"], ascending=[False, True], kind="stable")
    if basis != "features_no_errors":
        return sel["node"].head(budget).astype(str).tolist()
    out: list[str] = []
    for node in sel["node"].astype(str):  # parse only as far down as the budget reaches
        if len(out) == budget:
            break
        if Node.parse(node).kind != "error":
            out.append(node)
    return out


@validated
def basis_comparison(
    model: Model, pairs: FactPairs, dicts: Dictionaries | Dictionary | Sequence[Dictionary], *,
    budgets: Sequence[int | None] = BUDGETS, hows: Sequence[str] = ("mean", "resample"),
    scores: pd.DataFrame | None = None, neuron_method: str = "atp*",
    metric: Metric | None = None, batch_size: int = 16, chunk: int = 8, progress: bool = True,
) -> pd.DataFrame:
    """Faithfulness of the feature (with and without error nodes), neuron and head/MLP
    circuits at equal node budgets.

    Args:
        model, pairs, dicts: as :func:`evaluate_feature_circuits`.
        budgets: node counts; each basis's circuit is its top-``budget`` nodes by
            :func:`basis_scores` (all of its ranked nodes if fewer; :func:`basis_circuit`).
            ``None``: the full basis (every node at every role present: ``F = 1``; for
            ``features_no_errors`` every node but the error nodes, so ``F`` is what the
            features carry, below 1 wherever the error nodes matter).
        hows: the ablations (``"mean"``, ``"resample"``).
        scores: a :func:`basis_scores` frame (computed if not given).
        neuron_method: the neuron ranking (``"atp*"`` or ``"atp"``).
        metric: the metric of the rankings and the faithfulness (default the logit
            difference).
        batch_size, chunk: as :func:`evaluate_circuits`.

    Returns:
        The table: one row per (basis, budget, how): ``basis``, ``budget`` (<NA> for the full
        basis), ``how``, ``n_nodes``, ``fraction`` (of the basis's nodes), ``faithfulness``,
        ``metric``, ``full``, ``empty``, ``n`` (pairs), ``n_heads``, ``n_units`` (MLPs,
        neurons or features), ``n_errors`` (error nodes: features basis only; 0 in
        ``features_no_errors`` by construction).

    Example::

        t = basis_comparison(model, pairs, dicts)
        t.pivot_table(index="budget", columns=["how", "basis"], values="faithfulness")
    """
    ds = _mlp_dictionaries(dicts, model)
    blist = list(budgets)
    if not blist or any(b is not None and (isinstance(b, bool) or not isinstance(b, int)
                                           or b < 1) for b in blist):
        raise ArgumentError(f"budgets must be node counts >= 1 (or None for the full basis), "
                            f"got {blist}")
    for h in hows:
        if h not in CIRCUIT_ABLATIONS:
            raise ArgumentError(f"hows must be among {CIRCUIT_ABLATIONS}, got {h!r}")
    if scores is None:
        scores = basis_scores(model, pairs, ds, neuron_method=neuron_method, metric=metric,
                              batch_size=batch_size, progress=progress)
    elif not {"basis", "node", "score"} <= set(scores.columns):
        raise ArgumentError("scores must be a basis_scores frame (columns basis, node, score)")
    roles = encode_pairs(model, pairs).clean.roles_present()
    rows = []
    for how in hows:
        means = None
        if how == "mean":
            keys = [(c, layer) for layer in range(model.n_layers)
                    for c in (Component.Z, Component.NEURONS)]
            means = mean_activations(model, pairs.clean, keys)
        for basis in BASES:
            circuits = [basis_circuit(scores, basis, b) for b in blist]
            if basis in ("features", "features_no_errors"):
                errors = basis == "features"
                full = [*[f"L{layer}.attn@all" for layer in range(model.n_layers)],
                        *[f"L{layer}.mlp@all" for layer in range(model.n_layers)
                          if layer not in {d.layer for d in ds.values()}],
                        *[d.feature_id(f) for d in ds.values() for f in range(d.d_sae)],
                        *([d.error_id() for d in ds.values()] if errors else [])]
                given = [c if c is not None else full for c in circuits]
                res = evaluate_feature_circuits(model, pairs, ds, given, how=how,
                                                metric=metric, batch_size=batch_size,
                                                chunk=chunk, progress=progress)
                res["n_units"] = res["n_features"]
                if not errors:  # the basis's nodes: every feature node but the error nodes
                    res["fraction"] = res["n_nodes"] / (feature_universe(model, ds, roles)
                                                        - len(ds) * len(roles))
            else:
                neurons = basis == "neurons"
                given = [c if c is not None else [f"L{layer}.{u}@all"
                                                  for layer in range(model.n_layers)
                                                  for u in ("attn", "mlp")] for c in circuits]
                res = evaluate_circuits(model, pairs, given, how=how, means=means,
                                        metric=metric, neurons=neurons, batch_size=batch_size,
                                        chunk=chunk)
                sets = [circuit_nodes(model, c, roles) for c in given]
                res["n_heads"] = [sum(x.kind == "head" for x in s) for s in sets]
                res["n_units"] = [sum(model.d_mlp if (x.kind == "mlp" and neurons) else 1
                                      for x in s if x.kind != "head") for s in sets]
                res["n_errors"] = 0
                res["fraction"] = res["n_nodes"] / universe_size(model, roles, neurons=neurons)
            res["basis"], res["budget"] = basis, pd.array(blist, dtype="Int64")
            log.info("basis %s, %s ablation: faithfulness %s at budgets %s", basis, how,
                     [round(float(f), 3) for f in res["faithfulness"]], blist)
            rows.append(res)
    table = pd.concat(rows, ignore_index=True)
    cols = ["basis", "budget", "how", "n_nodes", "fraction", "faithfulness", "metric", "full",
            "empty", "n", "n_heads", "n_units", "n_errors"]
    return pd.DataFrame(table[cols]).reset_index(drop=True)


def basis_figure(table: pd.DataFrame, *, title: str = "",
                 labels: Mapping[str, str] | None = None) -> Figure:
    """Faithfulness against the node budget, one line per basis, one panel per ablation
    (seaborn); the full-basis rows (budget <NA>) are left out. The features without error
    nodes share the features' colour, dashed. ``labels`` names the bases in the legend
    (default their table names). A matplotlib figure (no pyplot): the report wraps it with
    ``factfind.report.from_matplotlib``."""
    import seaborn as sns
    from matplotlib.figure import Figure

    need = {"basis", "budget", "how", "faithfulness"}
    if not need <= set(table.columns):
        raise ArgumentError(f"table must be a basis_comparison frame (columns {sorted(need)})")
    df = pd.DataFrame(table[table["budget"].notna().to_numpy()]).copy()
    if df.empty:
        raise ArgumentError("the table has no budgeted rows to plot")
    df["budget"] = df["budget"].astype(int)
    shown = [b for b in BASES if b in set(df["basis"])]
    name = {b: (labels or {}).get(b, b) for b in shown}
    cycle = {"features": "C0", "features_no_errors": "C0", "neurons": "C1", "heads_mlps": "C2"}
    colour = {name[b]: cycle[b] for b in shown}
    dashes: dict[str, Any] = {name[b]: (4, 2) if b == "features_no_errors" else ""
                              for b in shown}
    df = pd.DataFrame(df[df["basis"].isin(shown).to_numpy()])
    df["basis"] = [name[str(b)] for b in df["basis"]]
    hows = list(dict.fromkeys(df["how"]))
    fig = Figure(figsize=(4.2 * len(hows), 3.4), layout="constrained")
    axes = fig.subplots(1, len(hows), sharey=True, squeeze=False)[0]
    for ax, how in zip(axes, hows, strict=True):
        part = pd.DataFrame(df[(df["how"] == how).to_numpy()])
        ticks = sorted(int(b) for b in set(part["budget"]))
        order = [name[b] for b in shown if name[b] in set(part["basis"])]
        sns.lineplot(data=part, x="budget", y="faithfulness", hue="basis", style="basis",
                     hue_order=order, style_order=order, palette=colour, markers=True,
                     dashes={n: dashes[n] for n in order}, ax=ax)
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(b) for b in ticks])
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("nodes in the circuit")
        ax.set_ylabel("faithfulness")
        ax.set_title(f"{how} ablation")
    if title:
        fig.suptitle(title)
    return fig


__all__ = ["BASES", "BUDGETS", "basis_circuit", "basis_comparison", "basis_figure",
           "basis_scores", "evaluate_feature_circuits", "feature_circuit_nodes", "feature_universe"]
