"""The single-prompt attribution graph over transcoder features, as circuit-tracer builds it.

Given one prompt, a model and a transcoder at every layer, :func:`linear_graph` builds the
*local replacement model* of :mod:`factfind.features.linear_graph_model` (attention patterns and
every norm's denominator frozen at the prompt's run, transcoders in place of the MLPs with their
errors as frozen nodes) and measures the direct effect of every node on every other:

* **nodes**: the active transcoder features (layer x position x feature; the BOS position's
  features and errors are left out, as circuit-tracer does when the prompt starts with a special
  token), one error node per layer x position, one token-embedding node per position (the stream
  entering block 0, position embeddings included), and the logits: the most probable next tokens
  until their probabilities sum to ``desired_logit_prob`` (0.95), at most ``max_n_logits`` (10);
* **edges**: ``A[t, s] = a_s * (W_dec[s] . J . W_enc[:, t])``, the change of target ``t``'s
  pre-activation that source ``s``'s write causes through the frozen linear residual path (for
  a logit target ``W_enc[:, t]`` is its unembedding column minus the mean column, read through
  the frozen final norm; for an error or embedding source ``a_s W_dec[s]`` is its vector);
* **cost**: one pass of the hand-written transposed model per *batch of targets* gives each
  target's edges from every source at once (circuit-tracer's gradient injection). A target
  costs a fraction of a forward: the frozen model has no MLP, and the pass stops at the
  target's layer. :meth:`LinearGraph.reference_edges` is the slow exact reference: one
  single-source intervention per source, pushed up the frozen model.

Each cross-position edge splits over the attention heads that carry it
(:meth:`LinearGraph.split_heads`): a path from another position reaches the target through
exactly one *last* cross-position step, taken by one head ``(layer, head)``; the head shares of
an edge sum to it exactly (circuit-tracer cannot split its edges by head: its issue #53).

:meth:`LinearGraph.prune` and :meth:`LinearGraph.scores` are circuit-tracer's influence pruning
and its replacement and completeness scores (:mod:`.linear_graph_prune`);
:func:`~factfind.features.linear_graph_export.to_circuit_graph` and
:func:`~factfind.features.linear_graph_export.to_circuit_tracer_json` export the graph.

Example::

    g = linear_graph(model, facts[0], dicts)       # one prompt; a transcoder per layer
    g.scores()                                      # (replacement, completeness)
    kept = g.prune()                                # node and edge masks
    g.edges_frame(kept).head()                      # sender, receiver, weight, ...
    g.split_heads(g.feature_index(12, 7, 301))      # head shares of the edges into a feature
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.errors import ArgumentError, MissingLayerError, NotFoundError
from factfind.features.dictionary import Dictionaries, Dictionary, DictKind
from factfind.features.linear_graph_model import FrozenRun, capture
from factfind.features.linear_graph_prune import PruneResult, graph_scores, prune_graph
from factfind.features.tokens import as_dictionaries, special_ids

log = logging.getLogger(__name__)

#: circuit-tracer's defaults
MAX_N_LOGITS = 10
DESIRED_LOGIT_PROB = 0.95
NODE_THRESHOLD = 0.8
EDGE_THRESHOLD = 0.98


@dataclass(eq=False)
class LinearGraph:
    """A single-prompt attribution graph (see the module docstring).

    Node order (circuit-tracer's): ``features`` (sorted by layer, position, feature), then the
    error nodes ``n_features + layer * n_pos + pos``, the token embeddings, the logits.

    Attributes:
        adjacency: ``[n n]`` float32, ``adjacency[target, source]`` the direct effect; rows of
            errors and embeddings (they read nothing) are zero.
        features: ``[n_features 3]`` long: layer, position, feature index.
        activations: ``[n_features]`` the features' activations.
        tokens: ``[n_pos]`` the prompt's token ids; ``token_strs``, ``roles`` per position.
        logit_tokens, logit_probs: ``[n_logits]`` the logit nodes' token ids and probabilities.
        dictionary: per layer the transcoder's short name (``tc``, ``stc``).
        prompt: the prompt's text; ``model_name``; ``meta`` (timings, settings).
    """

    adjacency: Tensor
    features: Tensor
    activations: Tensor
    tokens: Tensor
    token_strs: list[str]
    roles: list[str]
    logit_tokens: Tensor
    logit_probs: Tensor
    logit_strs: list[str]
    dictionary: list[str]
    n_layers: int
    prompt: str
    model_name: str
    meta: dict[str, Any] = field(default_factory=dict)
    # what the reference and the head split need (not exported)
    _frozen: FrozenRun | None = field(default=None, repr=False)
    _reads: Tensor | None = field(default=None, repr=False)      # [n_targets d] target reads
    _writes: Tensor | None = field(default=None, repr=False)     # [n_sources d] source writes
    _target_pos: Tensor | None = field(default=None, repr=False)  # [n_targets] per target
    _target_layer: Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ sizes and indices

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, i: int) -> int:
        return self.n_nodes - self.n_logits + i

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        """The node index of an active feature; a feature that is not active there (or does not
        exist) is a one-line :class:`NotFoundError`."""
        hit = ((self.features[:, 0] == layer) & (self.features[:, 1] == pos)
               & (self.features[:, 2] == feature)).nonzero()
        if len(hit) != 1:
            raise NotFoundError(f"feature {feature} of layer {layer} is not an active node at "
                                f"position {pos} of this graph ({self.n_features} active "
                                "features; see nodes_frame())")
        return int(hit[0, 0])

    def index_of(self, node: str) -> int:
        """The node index of a node named as in :meth:`nodes_frame`'s ``name`` column:
        ``L3.tc.f301@5`` (feature 301 of layer 3 at position 5), ``L3.tc.err@5``,
        ``embed@5``, ``logit@<token id>``; a factfind id at a role that names one position
        (``L3.tc.f301@final``) works too. A name that matches no node is a one-line
        :class:`NotFoundError`."""
        names = self.node_names()
        unit, _, where = node.rpartition("@")
        if unit and where in self.roles:  # a factfind id at a role that names one position
            hits = [p for p, r in enumerate(self.roles) if r == where]
            if len(hits) == 1:
                node = f"{unit}@{hits[0]}"
        try:
            return names.index(node)
        except ValueError:
            raise NotFoundError(f"no node {node!r} in this graph: name a feature active in "
                                "the prompt as 'L<layer>.<dict>.f<feature>@<position>' (see "
                                "nodes_frame()), an error 'L<layer>.<dict>.err@<position>', "
                                "'embed@<position>' or 'logit@<token id>'") from None

    def node_names(self) -> list[str]:
        """Per node, in node order, a name that carries its position (unique in the graph)."""
        out = [f"L{int(la)}.{self.dictionary[int(la)]}.f{int(f)}@{int(p)}"
               for la, p, f in self.features.tolist()]
        out += [f"L{la}.{self.dictionary[la]}.err@{p}" for la in range(self.n_layers)
                for p in range(self.n_pos)]
        out += [f"embed@{p}" for p in range(self.n_pos)]
        out += [f"logit@{int(t)}" for t in self.logit_tokens.tolist()]
        return out

    # ------------------------------------------------------------------ frames

    def nodes_frame(self, pruned: PruneResult | None = None) -> pd.DataFrame:
        """One row per node (kept nodes only, given a prune result): ``index, name, kind,
        layer, position, role, token, dictionary, feature, activation, influence``."""
        n = self.n_nodes
        kind = (["feature"] * self.n_features + ["error"] * self.n_errors +
                ["embed"] * self.n_pos + ["logits"] * self.n_logits)
        layer = (self.features[:, 0].tolist() + [la for la in range(self.n_layers)
                                                 for _ in range(self.n_pos)]
                 + [-1] * self.n_pos + [self.n_layers] * self.n_logits)
        pos = (self.features[:, 1].tolist() + [p for _ in range(self.n_layers)
                                               for p in range(self.n_pos)]
               + list(range(self.n_pos)) + [self.n_pos - 1] * self.n_logits)
        feat: list[Any] = self.features[:, 2].tolist() + [pd.NA] * (n - self.n_features)
        act: list[float] = self.activations.tolist() + [math.nan] * (n - self.n_features)
        df = pd.DataFrame({
            "index": np.arange(n), "name": self.node_names(), "kind": kind, "layer": layer,
            "position": pos, "role": [self.roles[p] for p in pos],
            "token": [self.token_strs[p] for p in pos[:n - self.n_logits]] + self.logit_strs,
            "dictionary": [self.dictionary[la] if k in ("feature", "error") else None
                           for k, la in zip(kind, layer, strict=True)],
            "feature": pd.array(feat, dtype="Int64"), "activation": act,
        })
        if pruned is not None:
            df["influence"] = pruned.cumulative_scores.numpy()
            df = pd.DataFrame(df.loc[pruned.node_mask.numpy()]).reset_index(drop=True)
        return df

    def edges_frame(self, pruned: PruneResult | None = None, *, min_abs: float = 0.0
                    ) -> pd.DataFrame:
        """One row per non-zero edge (kept edges only, given a prune result): ``source,
        target`` (node indices), ``sender, receiver`` (node names), ``weight``, sorted by
        ``|weight|`` descending."""
        A = self.adjacency
        mask = A.abs() > min_abs
        if pruned is not None:
            mask &= pruned.edge_mask
        dst, src = mask.nonzero(as_tuple=True)
        w = A[dst, src]
        order = w.abs().argsort(descending=True)
        dst, src, w = dst[order], src[order], w[order]
        names = np.array(self.node_names(), dtype=object)
        return pd.DataFrame({"source": src.numpy(), "target": dst.numpy(),
                             "sender": names[src.numpy()], "receiver": names[dst.numpy()],
                             "weight": w.numpy().astype(np.float64)})

    # ------------------------------------------------------------------ pruning and scores

    def prune(self, node_threshold: float = NODE_THRESHOLD,
              edge_threshold: float = EDGE_THRESHOLD) -> PruneResult:
        """circuit-tracer's influence pruning (:func:`.linear_graph_prune.prune_graph`)."""
        return prune_graph(self.adjacency, n_features=self.n_features, n_tokens=self.n_pos,
                           logit_probs=self.logit_probs, node_threshold=node_threshold,
                           edge_threshold=edge_threshold)

    def scores(self) -> tuple[float, float]:
        """circuit-tracer's ``(replacement score, completeness score)`` of the whole graph."""
        return graph_scores(self.adjacency, n_features=self.n_features, n_errors=self.n_errors,
                            n_tokens=self.n_pos, logit_probs=self.logit_probs)

    def error_share(self) -> pd.DataFrame:
        """Per layer, the share of the total influence on the logits held by that layer's
        error nodes (``error_share``), flagged above 30% (``flagged``)."""
        from factfind.features.linear_graph_prune import (
            compute_influence,
            logit_weights,
            normalize_matrix,
        )

        w = logit_weights(self.n_nodes, self.logit_probs)
        inf = compute_influence(normalize_matrix(self.adjacency.float()), w)
        total = float(inf.sum()) or 1.0
        err = inf[self.n_features:self.n_features + self.n_errors].reshape(self.n_layers,
                                                                           self.n_pos)
        feat = torch.zeros(self.n_layers).index_add_(0, self.features[:, 0],
                                                     inf[:self.n_features].cpu())
        share = err.sum(1) / total
        within = err.sum(1) / (err.sum(1) + feat).clamp(min=1e-30)
        return pd.DataFrame({"layer": np.arange(self.n_layers),
                             "error_share": share.numpy().astype(float),
                             "error_share_of_layer": within.numpy().astype(float),
                             "flagged": (within > 0.3).numpy()})

    # ------------------------------------------------------------------ reference and heads

    def _need(self) -> tuple[FrozenRun, Tensor, Tensor, Tensor, Tensor]:
        if self._frozen is None or self._reads is None or self._writes is None or \
                self._target_pos is None or self._target_layer is None:
            raise ArgumentError("this graph was loaded without its frozen run; rebuild it with "
                                "linear_graph() to compute references or head shares")
        return self._frozen, self._reads, self._writes, self._target_pos, self._target_layer

    def target_rows(self) -> list[int]:
        """The node indices of the targets (rows that read): features, then logits."""
        return list(range(self.n_features)) + [self.logit_index(i) for i in range(self.n_logits)]

    def source_location(self, index: int) -> tuple[int, int]:
        """``(layer, position)`` where a source writes: its layer's output stream (``-1``: the
        embeddings)."""
        if index < self.n_features:
            la, p, _ = self.features[index].tolist()
            return int(la), int(p)
        if index < self.n_features + self.n_errors:
            la, p = divmod(index - self.n_features, self.n_pos)
            return la, p
        if index < self.n_features + self.n_errors + self.n_pos:
            return -1, index - self.n_features - self.n_errors
        raise ArgumentError(f"node {index} is a logit: it writes nothing")

    def target_location(self, index: int) -> tuple[int, int]:
        """``(layer, position)`` where a target reads: a feature its layer's MLP input, a logit
        the final stream (layer ``n_layers``) at the last position."""
        if index < self.n_features:
            la, p, _ = self.features[index].tolist()
            return int(la), int(p)
        if index >= self.n_nodes - self.n_logits:
            return self.n_layers, self.n_pos - 1
        raise ArgumentError(f"node {index} is an error or embedding: it reads nothing")

    def reference_edges(self, sources: Sequence[int], *, dtype: torch.dtype | None = None
                        ) -> Tensor:
        """The slow exact reference: for each source, one intervention (its write alone) pushed
        up the frozen model (:meth:`FrozenRun.forward`), read at every target. Returns ``[n
        len(sources)]``: the adjacency's columns, rows of non-targets zero."""
        frozen, reads, writes, tpos, tlayer = self._need()
        if dtype is not None:
            frozen, reads, writes = frozen.to(dtype), reads.to(dtype), writes.to(dtype)
        S = len(sources)
        out = torch.zeros(self.n_nodes, S, dtype=reads.dtype)
        d = writes.shape[1]
        delta0 = torch.zeros(S, self.n_pos, d, dtype=writes.dtype, device=writes.device)
        per_layer: dict[int, Tensor] = {}
        for j, s in enumerate(sources):
            if not 0 <= s < self.n_nodes - self.n_logits:
                raise ArgumentError(f"source {s} is not a feature, error or embedding node "
                                    f"(0..{self.n_nodes - self.n_logits - 1})")
            la, p = self.source_location(s)
            if la < 0:
                delta0[j, p] = writes[s]
            else:
                per_layer.setdefault(la, torch.zeros_like(delta0))[j, p] = writes[s]
        streams = frozen.forward(delta0, per_layer, until=self.n_layers)
        rows = self.target_rows()
        for r, node in enumerate(rows):
            la, p = int(tlayer[r]), int(tpos[r])
            if la >= self.n_layers:  # a logit reads the final norm's output
                x = frozen.norm_final.linear(streams[la])[:, p]
            else:  # a feature reads its layer's MLP input
                x = frozen.mlp_in(la, streams[la])[:, p]
            out[node] = (x @ reads[r]).to(out.dtype).cpu()
        return out

    def split_heads(self, targets: int | Sequence[int], *, sources: Sequence[int] | None = None,
                    progress: bool = True) -> pd.DataFrame:
        """Split each cross-position edge into ``targets`` over the attention heads that carry
        it (see :meth:`FrozenRun.backward_by_head`).

        Args:
            targets: node indices of feature or logit targets.
            sources: keep only these sources (default: every source at another position).
            progress: a progress bar over targets.

        Returns:
            One row per (edge, head) with a non-zero share: ``source, target, sender,
            receiver, layer, head, share, edge``; per edge the shares sum to ``edge``.
            Cost: about ``n_heads * layer / 2`` target passes per target.
        """
        frozen, reads, writes, tpos, tlayer = self._need()
        tlist = [targets] if isinstance(targets, int) else list(targets)
        rows = self.target_rows()
        row_of = {node: r for r, node in enumerate(rows)}
        names = self.node_names()
        keep = None if sources is None else set(int(s) for s in sources)
        out: list[dict[str, Any]] = []
        for t in tqdm(tlist, desc="head split", unit="target",
                      disable=not progress or len(tlist) < 2):
            if t not in row_of:
                raise ArgumentError(f"node {t} ({names[t] if 0 <= t < len(names) else '?'}) "
                                    "reads nothing: split edges into a feature or a logit")
            r = row_of[t]
            la, p = int(tlayer[r]), int(tpos[r])
            shares: dict[int, Tensor] = {}
            read = functools.partial(self._read_shares, pos=p, keep=keep, writes=writes,
                                     shares=shares)

            g_in = reads[r] if la < self.n_layers else None
            g_final = None
            if la >= self.n_layers:
                g_final = frozen.norm_final.transpose(reads[r].reshape(1, 1, -1)
                                                      .expand(1, self.n_pos, -1))[0, p]
            tags = frozen.backward_by_head(la, p, g_in, g_final, read)
            for s, sh in shares.items():
                edge = float(self.adjacency[t, s])
                for (hl, hh), v in zip(tags[:len(sh)], sh.tolist(), strict=True):
                    if v != 0.0:
                        out.append({"source": s, "target": t, "sender": names[s],
                                    "receiver": names[t], "layer": hl, "head": hh,
                                    "share": v, "edge": edge})
        cols = ["source", "target", "sender", "receiver", "layer", "head", "share", "edge"]
        return pd.DataFrame(out, columns=cols)

    def _read_shares(self, layer: int, _u: Tensor, tagged: Tensor, *, pos: int,
                     keep: set[int] | None, writes: Tensor, shares: dict[int, Tensor]) -> None:
        """Each source's share per tag so far (sources at other positions than ``pos``)."""
        if tagged.shape[0] == 0:
            return
        for s in self._sources_at(layer):
            sp = self.source_location(s)[1]
            if sp != pos and (keep is None or s in keep):
                shares[s] = tagged[:, sp] @ writes[s]

    def _sources_at(self, layer: int) -> list[int]:
        """Source node indices writing into layer ``layer``'s output stream (``-1``: the
        embeddings)."""
        if layer < 0:
            return [self.token_index(p) for p in range(self.n_pos)]
        feats = (self.features[:, 0] == layer).nonzero()[:, 0].tolist()
        return feats + [self.error_index(layer, p) for p in range(self.n_pos)]


# ----------------------------------------------------------------------------- inputs


def _one_prompt(model: Any, prompt: Any) -> Any:
    """A one-row token batch from a FactPrompt, a one-fact dataset or a one-row TokenBatch."""
    from factfind.data import FactDataset, FactPrompt
    from factfind.data.batch import TokenBatch
    from factfind.data.pairs import FactPairs

    if isinstance(prompt, FactPairs):
        raise ArgumentError("linear_graph takes one prompt, got clean/corrupt pairs: pass "
                            "pairs.clean[i] (the single-prompt graph needs no counterfactual)")
    if isinstance(prompt, FactDataset):
        if len(prompt) != 1:
            raise ArgumentError(f"linear_graph takes one prompt, got a dataset of "
                                f"{len(prompt)}: pass facts[i]")
        prompt = prompt[0]
    if isinstance(prompt, TokenBatch):
        if len(prompt) != 1:
            raise ArgumentError(f"linear_graph takes one prompt, got a batch of {len(prompt)} "
                                "rows")
        return prompt
    if isinstance(prompt, (list, tuple)):
        raise ArgumentError(f"linear_graph takes one prompt, got a {type(prompt).__name__} of "
                            f"{len(prompt)}: pass one FactPrompt")
    if not isinstance(prompt, FactPrompt):
        raise ArgumentError(f"prompt must be a FactPrompt (e.g. facts[0]), got "
                            f"{type(prompt).__name__}")
    return model.tokenize([prompt])


def _transcoders(model: Any, dicts: Any) -> Dictionaries:
    """One transcoder per layer, fitting ``model`` (else a one-line error)."""
    if not isinstance(dicts, (Dictionary, Dictionaries, list, tuple)):
        raise ArgumentError(f"dicts must be a Dictionaries or a list of transcoders, got "
                            f"{type(dicts).__name__}")
    ds = as_dictionaries(dicts)
    ds.check(model)
    fp = model.fingerprint()
    for d in ds.values():
        if d.kind is DictKind.SAE:
            raise ArgumentError(f"{d.name} is an SAE on {d.site}: the linearised graph replaces "
                                "each MLP by a transcoder (tc or stc at mlp_in); dictionaries "
                                "of another site")
        owner = d.model or ds.model
        if owner and "@" in owner and owner.rsplit("@", 1)[1] != fp:
            raise ArgumentError(f"{d.name} was trained on {owner}, not on {model.name}@{fp}: "
                                "dictionaries of another model")
    missing = [la for la in range(model.n_layers) if la not in ds.layers]
    if missing:
        raise MissingLayerError(f"the linearised graph needs a transcoder at every layer; "
                                f"missing at layer(s) {missing}")
    twice = [la for la in ds.layers if sum(d.layer == la for d in ds.values()) > 1]
    if twice:
        raise ArgumentError(f"two transcoders at layer(s) {twice}: pass one per layer")
    if any(d.W_dec.device != model.device or d.W_dec.dtype != model.dtype for d in ds.values()):
        ds = ds.to(model.device, model.dtype)
    return ds


def _salient_logits(logits: Tensor, W_U: Tensor, *, max_n_logits: int,
                    desired_logit_prob: float) -> tuple[Tensor, Tensor, Tensor]:
    """circuit-tracer's ``compute_salient_logits``: the fewest top tokens whose probabilities
    reach ``desired_logit_prob`` (at most ``max_n_logits``), and their unembedding columns minus
    the mean column ``[k d_model]``."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_n_logits, probs.shape[-1]))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
    top_p, top_idx = top_p[:cutoff], top_idx[:cutoff]
    cols = W_U[:, top_idx]
    demeaned = cols - W_U.mean(dim=-1, keepdim=True)
    return top_idx, top_p, demeaned.T


# ----------------------------------------------------------------------------- the builder


def linear_graph(model: Any, prompt: Any, dicts: Dictionaries | Sequence[Dictionary], *,
                 max_n_logits: int = MAX_N_LOGITS, desired_logit_prob: float = DESIRED_LOGIT_PROB,
                 batch_size: int = 64, zero_bos: bool = True,
                 max_feature_nodes: int | None = None, update_interval: int = 4,
                 progress: bool = True) -> LinearGraph:
    """The single-prompt attribution graph (see the module docstring).

    Args:
        model: a :class:`~factfind.model.Model` with eager attention (the patterns are read).
        prompt: one :class:`~factfind.data.FactPrompt` (or a one-fact dataset, a one-row
            token batch). Pairs are an error: the graph explains one run.
        dicts: a transcoder (``tc`` or skip ``stc``) at every layer, fitting ``model``.
        max_n_logits, desired_logit_prob: the logit nodes (circuit-tracer's 10 and 0.95).
        batch_size: targets per transposed pass.
        zero_bos: leave out the features and errors of a leading special token.
        max_feature_nodes: keep only this many features, the most influential ones, as
            circuit-tracer's ``max_feature_nodes`` does: the logits' rows first, then, every
            ``update_interval`` batches, the features ranked by their influence on the logits
            through the rows computed so far; the unvisited features are no nodes (their
            columns dropped). ``None``: every active feature.
        update_interval: batches between re-rankings (circuit-tracer's 4).
        progress: a progress bar over target batches.

    Returns:
        A :class:`LinearGraph`. Cost: one forward, then per target a pass of the frozen model
        down from the target's layer (``meta['fe_per_target']`` measures it).
    """
    if not isinstance(max_n_logits, int) or isinstance(max_n_logits, bool) or max_n_logits < 1:
        raise ArgumentError(f"max_n_logits must be an int >= 1, got {max_n_logits!r}")
    if not 0 < float(desired_logit_prob) <= 1:
        raise ArgumentError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
    for name, v in (("batch_size", batch_size), ("update_interval", update_interval),
                    ("max_feature_nodes", 1 if max_feature_nodes is None else max_feature_nodes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ArgumentError(f"{name} must be an int >= 1, got {v!r}")
    tb = _one_prompt(model, prompt)
    ds = _transcoders(model, dicts)
    t0 = time.perf_counter()
    with torch.no_grad():
        frozen, vals = capture(model, tb, ds)
        out_logits = vals["out_logits"]
    t_capture = time.perf_counter() - t0
    L = model.n_layers
    ids = tb.input_ids[0].cpu()
    n_pos = int(ids.shape[0])
    skip_first = zero_bos and int(ids[0]) in set(special_ids(model.tokenizer))
    dtype = vals["embed"].dtype
    feats, acts, decs, encs, errs = [], [], [], [], []
    per_layer = [ds.at(la) for la in range(L)]
    with torch.no_grad():
        for la, d in enumerate(per_layer):
            x = vals["mlp_in"][la]
            a = d.encode(x)
            err = d.error(x, vals["mlp_out"][la]).to(dtype)
            if skip_first:
                a[0] = 0
                err[0] = 0
            nz = a.nonzero()  # [k 2]: pos, feature (sorted)
            feats.append(torch.cat([torch.full((len(nz), 1), la), nz.cpu()], 1))
            v = a[nz[:, 0], nz[:, 1]]
            acts.append(v)
            decs.append(d.W_dec[nz[:, 1]].to(dtype) * v[:, None].to(dtype))
            encs.append(d.W_enc[:, nz[:, 1]].T.to(dtype))
            errs.append(err)
    features = torch.cat(feats).long()
    n_f = int(features.shape[0])
    W_U = model.W_U.detach()
    logit_idx, logit_p, logit_vecs = _salient_logits(
        out_logits, W_U, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob)
    n_logits = int(logit_idx.shape[0])
    n_err = L * n_pos
    n = n_f + n_err + n_pos + n_logits
    if n_f == 0:
        log.warning("no transcoder feature is active on this prompt: the graph has only "
                    "error, embedding and logit nodes")
    writes = torch.cat([torch.cat(decs) if n_f else torch.zeros(0, model.d_model, dtype=dtype),
                        torch.cat([e for e in errs]), vals["embed"].to(dtype)])
    reads = torch.cat([torch.cat(encs) if n_f else torch.zeros(0, model.d_model, dtype=dtype),
                       logit_vecs.to(dtype)])
    t_layer = torch.cat([features[:, 0], torch.full((n_logits,), L)])
    t_pos = torch.cat([features[:, 1], torch.full((n_logits,), n_pos - 1)])
    src_index = _source_index(features, L, n_pos)
    activations = torch.cat(acts).float().cpu()
    t1 = time.perf_counter()

    def by_position(targets: Sequence[int]) -> list[list[int]]:
        """Features from the top layer down, then by position (a batch starts high and stops
        early), in batches."""
        order = sorted(targets, key=lambda i: (-int(t_layer[i]), int(t_pos[i])))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    logit_rows = [n_f + i for i in range(n_logits)]
    with torch.no_grad():
        if max_feature_nodes is None or max_feature_nodes >= n_f:
            adjacency = torch.zeros(n, n, dtype=torch.float32)
            node_of_row = list(range(n_f)) + [n - n_logits + i for i in range(n_logits)]
            batches = by_position(logit_rows) + by_position(range(n_f))
            for rows in tqdm(batches, desc="linear graph", unit="batch", disable=not progress):
                _target_batch(frozen, rows, reads, t_layer, t_pos, writes, src_index,
                              adjacency, [node_of_row[i] for i in rows], n_pos)
            n_targets = n_f + n_logits
        else:
            keep = _influential_features(frozen, max_feature_nodes, by_position, logit_rows,
                                         logit_p, reads, t_layer, t_pos, writes, src_index,
                                         n, n_f, n_pos, progress=progress,
                                         update_interval=update_interval,
                                         batch_size=batch_size)
            selected, adjacency = keep
            cols = torch.cat([selected, torch.arange(n_f, n)])
            tgt = torch.cat([selected, torch.arange(n_f, n_f + n_logits)])
            features, activations = features[selected], activations[selected]
            writes, reads = writes[cols[:n - n_f - n_logits + len(selected)]], reads[tgt]
            t_layer, t_pos = t_layer[tgt], t_pos[tgt]
            n_targets = len(selected) + n_logits
    t_targets = time.perf_counter() - t1
    t2 = time.perf_counter()
    with torch.no_grad():
        model.run(tb)
    t_fe = time.perf_counter() - t2
    tok = model.tokenizer
    roles = [r or "prefix" for r in tb.role_names()[0]]
    meta = {"seconds_capture": t_capture, "seconds_targets": t_targets,
            "seconds_forward": t_fe, "n_targets": n_targets,
            "fe_per_target": (t_targets / max(1, n_targets)) / max(t_fe, 1e-9),
            "batch_size": batch_size, "zero_bos": bool(skip_first),
            "dictionaries": ds.fingerprint(), "threads": torch.get_num_threads(),
            "n_active_features": n_f, "max_feature_nodes": max_feature_nodes}
    return LinearGraph(
        adjacency=adjacency, features=features, activations=activations,
        tokens=ids, token_strs=[tok.decode([int(t)]) for t in ids.tolist()], roles=roles,
        logit_tokens=logit_idx.cpu(), logit_probs=logit_p.cpu(),
        logit_strs=[tok.decode([int(t)]) for t in logit_idx.tolist()],
        dictionary=[d.short for d in per_layer], n_layers=L,
        prompt=tok.decode(ids.tolist()), model_name=model.name, meta=meta,
        _frozen=frozen, _reads=reads, _writes=writes, _target_pos=t_pos, _target_layer=t_layer)


@dataclass
class _Sources:
    """Per layer, the node indices and positions of the sources writing there."""

    feat_nodes: list[Tensor]
    feat_pos: list[Tensor]
    err_start: int


def _source_index(features: Tensor, n_layers: int, n_pos: int) -> _Sources:
    nodes, pos = [], []
    for la in range(n_layers):
        idx = (features[:, 0] == la).nonzero()[:, 0]
        nodes.append(idx)
        pos.append(features[idx, 1])
    return _Sources(nodes, pos, int(features.shape[0]))


def _target_batch(frozen: FrozenRun, rows: list[int], reads: Tensor, t_layer: Tensor,
                  t_pos: Tensor, writes: Tensor, src: _Sources, dest: Tensor,
                  dest_rows: list[int], n_pos: int) -> None:
    """One transposed pass for a batch of targets (``rows`` index ``reads``), writing their
    edges from every source into rows ``dest_rows`` of ``dest [.. n]``. The pass covers
    positions up to the batch's last target only (causal attention: nothing later reaches
    them; those sources' edges stay 0)."""
    B, d = len(rows), reads.shape[1]
    r = torch.tensor(rows)
    layers, pos, vec = t_layer[r], t_pos[r], reads[r]
    n = int(pos.max()) + 1
    frozen = frozen.narrow(n)
    L = frozen.n_layers
    g_final = torch.zeros(B, n, d, dtype=reads.dtype, device=reads.device)
    is_logit = layers >= L
    if bool(is_logit.any()):
        li = is_logit.nonzero()[:, 0]
        g = torch.zeros(len(li), n, d, dtype=reads.dtype, device=reads.device)
        g[torch.arange(len(li)), pos[li]] = vec[li]
        g_final[li] = frozen.norm_final.transpose(g)
    by_layer = {int(la): (layers == la).nonzero()[:, 0] for la in layers.unique().tolist()
                if la < L}
    out = torch.zeros(B, dest.shape[1], dtype=reads.dtype, device=reads.device)
    n_err = L * n_pos

    def inject(layer: int, g_in: Tensor) -> Tensor:
        hit = by_layer.get(layer)
        if hit is None:
            return g_in
        g_in = g_in.clone()
        g_in[hit, pos[hit]] += vec[hit]
        return g_in

    def read(layer: int, g: Tensor) -> None:
        if layer < 0:
            start = src.err_start + n_err
            out[:, start:start + n] = (g * writes[start:start + n][None]).sum(-1)
            return
        at = src.feat_pos[layer] < n
        nodes = src.feat_nodes[layer][at]
        if len(nodes):
            gs = g[:, src.feat_pos[layer][at]]                  # [B k d]
            out[:, nodes] = (gs * writes[nodes][None]).sum(-1)
        e0 = src.err_start + layer * n_pos
        out[:, e0:e0 + n] = (g * writes[e0:e0 + n][None]).sum(-1)

    frozen.backward(int(layers.max()), inject, read, g_final)
    dest[torch.tensor(dest_rows)] = out.float().cpu()


def _partial_influence(rows: Tensor, row_nodes: Tensor, logit_p: Tensor, n: int) -> Tensor:
    """circuit-tracer's ``compute_partial_influences``: each node's influence on the logits
    through the rows computed so far (``rows [k n]`` of nodes ``row_nodes [k]``)."""
    from factfind.features.linear_graph_prune import normalize_matrix

    normalized = normalize_matrix(rows)
    influence = torch.zeros(n)
    prod = torch.zeros(n)
    prod[n - len(logit_p):] = logit_p.float().cpu()
    for _ in range(1000):
        prod = prod[row_nodes] @ normalized
        if not bool(prod.any()):
            break
        influence += prod
    return influence


def _influential_features(frozen: FrozenRun, max_nodes: int, by_position: Any,
                          logit_rows: list[int], logit_p: Tensor, reads: Tensor,
                          t_layer: Tensor, t_pos: Tensor, writes: Tensor, src: _Sources, n: int,
                          n_f: int, n_pos: int, *, progress: bool, update_interval: int,
                          batch_size: int) -> tuple[Tensor, Tensor]:
    """circuit-tracer's influence-ordered visit (see ``max_feature_nodes``). Returns the
    selected features (ascending) and the square adjacency over them and every non-feature
    node."""
    n_logits = len(logit_rows)
    buf = torch.zeros(max_nodes + n_logits, n)
    row_nodes: list[int] = []
    bar = tqdm(total=max_nodes + n_logits, desc="linear graph", unit="target",
               disable=not progress)

    def compute(targets: list[int]) -> None:
        for rows in by_position(targets):
            st = len(row_nodes)
            nodes = [t if t < n_f else n - n_logits + (t - n_f) for t in rows]
            _target_batch(frozen, rows, reads, t_layer, t_pos, writes, src, buf,
                          list(range(st, st + len(rows))), n_pos)
            row_nodes.extend(nodes)
            bar.update(len(rows))

    compute(logit_rows)
    visited = torch.zeros(n_f, dtype=torch.bool)
    while int(visited.sum()) < max_nodes:
        infl = _partial_influence(buf[:len(row_nodes)], torch.tensor(row_nodes), logit_p, n)
        rank = torch.argsort(infl[:n_f], descending=True, stable=True)
        todo = rank[~visited[rank]][:min(update_interval * batch_size,
                                         max_nodes - int(visited.sum()))]
        visited[todo] = True
        compute(todo.tolist())
    bar.close()
    selected = visited.nonzero()[:, 0]
    new_index = torch.full((n,), -1, dtype=torch.long)
    new_index[selected] = torch.arange(len(selected))
    n_small = len(selected) + n - n_f
    new_index[n_f:] = torch.arange(len(selected), n_small)
    cols = torch.cat([selected, torch.arange(n_f, n)])
    adjacency = torch.zeros(n_small, n_small)
    adjacency[new_index[torch.tensor(row_nodes)]] = buf[:len(row_nodes)][:, cols]
    return selected, adjacency


__all__ = ["DESIRED_LOGIT_PROB", "EDGE_THRESHOLD", "MAX_N_LOGITS", "NODE_THRESHOLD",
           "LinearGraph", "linear_graph"]
