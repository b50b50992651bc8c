"""Node attribution over dictionary features and error nodes, verified by exact patching.

A dictionary spliced into a run with its error term (:mod:`factfind.features.splice`) writes

    site = sum_f a_f W_dec[f] + b_dec + err,          err = site - decode(a)

so the run is the model's own and every quantity downstream splits into the features' share and
the error's. **Sparse Feature Circuits** (Marks et al. 2024) attribute a counterfactual metric to
those nodes - every feature ``a_f`` of every dictionary and each dictionary's error ``err`` (a
``d_model`` vector), at each position - with attribution patching (AtP; Nanda 2023, Kramár et
al. 2024) or integrated gradients (IG). With clean/corrupt pairs and the default *noising*
direction (base = clean, source = corrupt), the effect of setting one node to its source value is

    c(n) ≈ (n(source) - n(base)) . dM/dn (base)                                      (AtP)
    c(n) ≈ (n(source) - n(base)) . mean_k dM/dn (base + alpha_k (source - base))     (IG)

with ``dM/da_f = W_dec[f] . dM/dsite`` (the decoder is linear) and ``dM/derr = dM/dsite``.

**Why one plain run suffices.** With the error kept, the spliced site is ``decode(encode(x)) +
(x - decode(encode(x))) = x``: its Jacobian is the identity, so the gradient at a site equals
the plain model's and the features' gradients are that gradient read through the decoder. AtP
of every feature of every dictionary therefore costs one base forward + backward and one source
forward of the *plain* model (saving each dictionary's input and output), plus the encoders at
the positions of the asked roles (with the default logit-difference metric, both runs unembed
the two answers only). **Sparsity**: a feature inactive in both runs at a position has
``a(source) - a(base) = 0`` there, so only the active entries are scored: each run's active
(position, feature) entries (TopK: the top-k's own indices) enter with their value, the base's
negated, each times ``W_dec[f] . g`` (one product ``g @ W_dec^T`` at the roles' positions, or
one ``d_model`` dot product per entry where the entries are few); summed per (position,
feature), the values give ``Δa`` - which decides that the feature moved there (a TopK entry of
value 0, or one equal in both runs, adds nothing) - and the products ``Δa . dM/da``. Every
dictionary's entries are summed together, then into (prompt, role, feature) nodes: the only
loop over dictionaries is their encoders. Nodes inactive in every prompt have exactly zero
attribution and no row. ``reference=True`` runs the literal recipe instead - the dictionaries
spliced in as Marks et al. splice them (the value is the site's own; the gradient reaches each
feature through its decoder, the error as it is, and the site's input unchanged), autograd with
respect to every feature activation and error term, dense - which the tests hold equal.

**Cost**, measured by ``benchmarks/bench_feature_atp.py`` with each model's default
dictionaries (a TopK skip transcoder at every layer, 4 x d_model wide, k 32) at 1 thread on a
shared 2-core machine (load 4-4.5), per batch in forward-pass equivalents (wall; CPU time in
brackets): the organism (16 pairs x 15 tokens, 4 x 512 features) 4.7 (4.2), SmolLM2-135M
(6 x 20, 30 x 2,304) 3.6 (3.5), Gemma-3-270M (10 x 19, 18 x 2,560) 3.1 (2.8). Of these the
model's runs are 2.8-3.0 (base forward + backward ~1.7-1.9, source forward ~0.8-1.0); the
encoders 0.2-0.5, the scoring 0.1-0.5 and the frame <= 0.4 (the organism's forward is so
small that its fixed costs show).

**Integrated gradients** (``steps=m``). As Marks et al. (who use 10 steps), each dictionary is
integrated on its own: its features and error move together on the straight line from base to
source values while the rest of the network runs, so the site's value moves on the straight line
``site(alpha) = (1 - alpha) site(base) + alpha site(source)`` (the decoder is affine with the
same bias at both ends). The gradients are taken at ``m`` points ``alpha_k = (k + 1/2) / m``:
Hanna et al. (2024)'s EAP-IG places them at ``k / m`` (a Riemann sum that includes one end);
the midpoint rule costs the same and its error falls as ``1/m^2``. **Completeness**: the
attributions of one dictionary's features and error over every position sum to ``sum_k
Δsite . g_k / m``, the quadrature of ``M(base with the whole site patched) - M(base)``. A
written site's IG costs ``m`` forward + backward rows per prompt (stacked in one run; the
path depends on the site alone, so dictionaries that write one site share it).

A role that names several tokens (``relation``) sums its tokens' attributions (AtP is linear)
and patches them together. A skip transcoder's dense skip path ``x @ W_skip`` is not a sparse
node: it is part of its error node, which holds everything the features do not write.

**Verification** (Kramár et al.'s AtP* recipe) lives in :mod:`factfind.features.verification`:
estimates rank; ``verify_features`` patches the top nodes exactly - one feature's activation
(and only it) from the source run, through its decoder, in the base run, error kept (the spliced
run with ``edit_features``, written as the equal additive edit ``site + Δa_f W_dec[f]``) - and
``feature_missed_bound`` bounds the unverified ones by patching subsets of them
(:func:`~factfind.attribute.verification.bound_subsets`; no-cancellation assumption).

Example::

    dicts = ff.load_dictionaries("transcoders/")           # or fit_dictionary(...)
    est = ff.feature_atp(model, pairs, dicts)              # one row per node, |effect| ranked
    ver = ff.verify_features(model, pairs, dicts, est, top=20)
    ver.frame[["node", "estimate", "effect"]]
    ff.to_graph(est.nlargest(500, "score"), model, pairs)  # feature and error nodes
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.batch import PairBatch, pair_batches
from factfind.errors import ArgumentError, check_mode
from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.tokens import as_dictionaries
from factfind.localize.patching import DEFAULT_ROLES
from factfind.results import check_effects, t_quantile
from factfind.types import DIRECTIONS, Component, Metric, Role, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model


#: integrated-gradient points when ``steps`` is asked for without a number (Marks et al. 2024)
DEFAULT_IG_STEPS = 10
#: the extra columns of a feature-attribution frame (after the result columns)
FEATURE_COLUMNS = ("dictionary", "feature", "node")


# ----------------------------------------------------------------------------- inputs


def _checked(dicts: Dictionaries | Dictionary | Iterable[Dictionary], model: Model
             ) -> Dictionaries:
    """``dicts`` as a :class:`Dictionaries` checked against ``model`` and moved to its device
    (an empty set, dictionaries of another model or site: one-line :class:`ArgumentError`)."""
    if not isinstance(dicts, (Dictionary, Dictionaries, list, tuple)):
        raise ArgumentError(f"dicts must be a Dictionaries, a Dictionary or a list of them, got "
                            f"{type(dicts).__name__}")
    if isinstance(dicts, (list, tuple)):
        bad = [type(d).__name__ for d in dicts if not isinstance(d, Dictionary)]
        if bad:
            raise ArgumentError(f"dicts holds Dictionary objects, got {bad[0]}")
    ds = as_dictionaries(dicts)
    ds.check(model)
    if any(d.W_dec.device != model.device for d in ds.values()):
        ds = ds.to(model.device)
    return ds


def _keys(d: Dictionary) -> tuple[SiteKey, SiteKey]:
    """The site a dictionary reads and the one it writes (a transcoder: ``mlp_in``,
    ``mlp_out``; an SAE: its site twice)."""
    return (d.site, d.layer), (d.out_site, d.layer)


def _roles(roles: Iterable[Role | str]) -> list[Role]:
    out = []
    for r in roles:
        try:
            out.append(Role(r))
        except ValueError:
            raise ArgumentError(f"roles must be position roles {[x.value for x in Role]}, got "
                                f"{r!r}") from None
    if not out:
        raise ArgumentError("roles is empty: name at least one position role")
    return out


def _role_masks(tb: TokenBatch, roles: Sequence[Role], device: torch.device) -> Tensor:
    """``[role batch pos]`` float: the tokens each role names in each row (0 on padding)."""
    am = tb.attention_mask.bool().cpu()
    return torch.stack([tb.position_mask(r) & am for r in roles]).to(device, torch.float32)


@dataclass
class _Side:
    """One run's dictionary nodes at the selected positions of a batch, dense (the reference's
    reading, and the verification's)."""

    acts: dict[str, Tensor]  # name -> [N d_sae] feature activations
    err: dict[str, Tensor]  # name -> [N d_out] error term (site - decode(acts))
    site: dict[str, Tensor]  # name -> [N d_out] the site's value


def _active(d: Dictionary, x: Tensor, y: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``d``'s active entries at positions ``x [N d_in]`` - their rows, features and values,
    each ``[E]`` - and the error term ``y - decode(acts)`` ``[N d_out]``, decoded from the
    active entries only (one ``d_out`` row each, not the dense ``d_sae x d_out`` product).
    TopK keeps the top-k's own indices (:meth:`Dictionary.activate`'s computation): no dense
    ``[N d_sae]`` at all; other activations scan the dense encoding, returned last (TopK:
    ``None``)."""
    n = x.shape[0]
    if d.activation is Activation.TOPK:
        assert d.k is not None
        vals, idx = torch.relu(d.pre_acts(x)).topk(d.k, dim=-1, sorted=False)
        dec = F.embedding_bag(idx, d.W_dec, per_sample_weights=vals.to(d.W_dec.dtype),
                              mode="sum") + d.b_dec
        rows = torch.arange(n, device=idx.device).repeat_interleave(idx.shape[1])
        return rows, idx.flatten(), vals.flatten(), y.to(d.W_dec.dtype) - dec, None
    acts = d.encode(x)
    rows, feats = acts.nonzero(as_tuple=True)
    vals = acts[rows, feats]
    dec = d.b_dec.expand(n, d.d_out).clone().index_add_(
        0, rows, vals[:, None].to(d.W_dec.dtype) * d.W_dec[feats])
    return rows, feats, vals, y.to(d.W_dec.dtype) - dec, acts


def _encode(d: Dictionary, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Dense feature activations ``[N d_sae]`` and the error term ``[N d_out]`` at positions
    ``x [N d_in]``, ``y [N d_out]`` (:func:`_active`, scattered)."""
    rows, feats, vals, err, acts = _active(d, x, y)
    if acts is None:
        acts = torch.zeros(x.shape[0], d.d_sae, dtype=vals.dtype, device=vals.device)
        acts[rows, feats] = vals
    return acts, err


def _read(model: Model, dicts: Dictionaries, tb: TokenBatch, sel: Tensor, *,
          metric: Callable[[Tensor], Tensor] | None = None,
          ) -> tuple[_Side, dict[SiteKey, Tensor], dict[SiteKey, Tensor]]:
    """One plain run of ``tb`` reading every dictionary's input and output (with ``metric``:
    and the gradients at the outputs); features and errors encoded at ``sel [batch pos]``."""
    saves = sorted({k for d in dicts.values() for k in _keys(d)})
    run = model.run(tb, save=saves, metric=metric)
    side = _Side({}, {}, {})
    for name, d in dicts.items():
        read, write = _keys(d)
        y = run.acts[write][sel]
        side.acts[name], side.err[name] = _encode(d, run.acts[read][sel], y)
        side.site[name] = y
    return side, run.acts, run.grads


# ----------------------------------------------------------------------------- attribution

#: a batch's scores as integer-coded arrays: dictionary index, feature (-1: the error node),
#: role index, prompt, value - the frame's strings are made once per node, at the end
Scores = dict[str, np.ndarray]


def _fast_batch(model: Model, ds: Dictionaries, roles: Sequence[Role], pb: PairBatch,
                base_tb: TokenBatch, src_tb: TokenBatch, masks: Tensor, offset: int, *,
                metric: Metric | None, steps: int | None) -> list[Scores]:
    """One batch of the fast path: the two plain runs (or IG's stacked ones), then every
    dictionary's active entries at the roles' ``N`` positions, scored all together.

    Per dictionary (the only loop): one encoder product of the ``2N`` base and source rows,
    the active entries (TopK: the top-k's indices), the error decoded from them, and for each
    entry ``±a . (W_dec[f] . g)`` (base ``-``, source ``+``). Then, for every dictionary at
    once: the entries keyed by (position, feature) and summed - ``Δa`` decides which moved
    (an entry active on both sides with the same value has ``Δa = 0`` and no row, as the
    dense reference has none), the products give ``Δa . dM/da`` - and the moved ones summed
    into (prompt, role, feature) with the role's weight at each position."""
    sel = masks.sum(0).gt(0)  # [batch pos]: the positions of any role
    flat = sel.flatten().nonzero().squeeze(1)  # [N] their indices in the flattened batch
    pos_b = torch.div(flat, sel.shape[1], rounding_mode="floor")  # [N] their prompts
    saves = sorted({k for d in ds.values() for k in _keys(d)})
    # the default metric needs the two answers' logits only: the runs skip the unembedding
    # (the source run's logits are not used at all)
    answers = pb.answer_ids().to(model.device)
    fn = lambda lg: pb.measure(lg, 1, metric, answers=metric is None).sum()
    base = model.run(base_tb, save=saves, metric=None if steps else fn,
                     logits=answers if metric is None else "final")
    src = model.run(src_tb, save=saves, logits=answers)

    def at(t: Tensor) -> Tensor:  # [batch pos ...] -> [N ...] at the roles' positions
        return t.flatten(0, 1).index_select(0, flat)

    grads: dict[SiteKey, Tensor] = {}  # written site -> [N d_out] dM/dsite
    for d in ds.values():
        write = _keys(d)[1]
        if write not in grads:  # IG of a site depends on the site alone: once per site
            grads[write] = at(base.grads[write] if steps is None else _ig_grads(
                model, write, base_tb, pb, metric, base.acts[write], src.acts[write], steps))
    n = len(flat)
    offsets = np.cumsum([0] + [d.d_sae for d in ds.values()])
    width = int(offsets[-1])  # features of every dictionary, numbered one after another
    keys, deltas, products, errors = [], [], [], []
    for i, d in enumerate(ds.values()):
        read, write = _keys(d)
        x = torch.cat([at(base.acts[read]), at(src.acts[read])])
        y = torch.cat([at(base.acts[write]), at(src.acts[write])])
        rows, feats, vals, err, _ = _active(d, x, y)
        g = grads[write].to(d.W_dec.dtype)
        pos = rows % n
        if n * d.d_sae <= 64 * len(rows):
            # many active entries per position: one product g @ W_dec^T beats gathering a
            # d_out row per entry (the gather is memory-bound: ~80x a multiply-add here)
            gdot = (g @ d.W_dec.T)[pos, feats]
        else:
            gdot = (g[pos] * d.W_dec[feats]).sum(-1)
        signed = torch.where(rows < n, -vals.double(), vals.double())  # base -, source +
        keys.append(pos * width + int(offsets[i]) + feats)
        deltas.append(signed)
        products.append(signed * gdot.double())
        errors.append(((err[n:] - err[:n]) * g).sum(-1).double())
    R, B, L = len(roles), sel.shape[0], len(ds)
    uniq, inv = torch.unique(torch.cat(keys), return_inverse=True)
    # Δa per (position, feature), exactly 0 where equal on both sides (x - x in float64)
    moved = torch.zeros(len(uniq), dtype=torch.float64, device=inv.device).index_add_(
        0, inv, torch.cat(deltas)) != 0
    value = torch.zeros(len(uniq), dtype=torch.float64, device=inv.device).index_add_(
        0, inv, torch.cat(products))[moved]
    uniq = uniq[moved]
    pos, feat = torch.div(uniq, width, rounding_mode="floor"), uniq % width
    w = masks.flatten(1)[:, flat]  # [role N] each position's weight in each role
    wu = w[:, pos]  # [role U]
    r, u = wu.nonzero(as_tuple=True)
    node = (pos_b[pos[u]] * R + r) * width + feat[u]  # (prompt, role, feature)
    uniq, inv = torch.unique(node, return_inverse=True)
    total = torch.zeros(len(uniq), dtype=torch.float64, device=inv.device).index_add_(
        0, inv, value[u] * wu[r, u].double())
    # the error nodes: [role batch dictionary], NaN where the role is absent in a prompt
    de = torch.stack(errors, 1)  # [N dictionary]
    err = torch.zeros(R, B, L, dtype=torch.float64, device=de.device).index_add_(
        1, pos_b, w.double()[:, :, None] * de[None])
    err = torch.where(masks.sum(-1).gt(0)[..., None], err, torch.nan)
    u_np = uniq.cpu().numpy()
    g_feat = u_np % width
    di = np.searchsorted(offsets, g_feat, side="right") - 1
    rr, bb, ll = np.meshgrid(np.arange(R), np.arange(B), np.arange(L), indexing="ij")
    return [{"dict": np.concatenate([di, ll.ravel()]),
             "feature": np.concatenate([g_feat - offsets[di], np.full(ll.size, -1)]),
             "role": np.concatenate([(u_np // width) % R, rr.ravel()]),
             "prompt": np.concatenate([u_np // (width * R), bb.ravel()]) + offset,
             "effect": np.concatenate([total.cpu().numpy(), err.cpu().numpy().ravel()])}]


def _codes(di: int, f: Tensor, r: Tensor, b: Tensor, val: Tensor) -> Scores:
    return {"dict": np.full(len(f), di, dtype=np.int64), "feature": f.numpy().astype(np.int64),
            "role": r.numpy().astype(np.int64), "prompt": b.numpy().astype(np.int64),
            "effect": val.numpy().astype(np.float64)}


def _ig_grads(model: Model, write: SiteKey, tb: TokenBatch, pb: PairBatch,
              metric: Metric | None, base_site: Tensor, src_site: Tensor, steps: int) -> Tensor:
    """``[batch pos d_out]``: the mean of ``dM/dsite`` over the ``steps`` midpoints of the
    straight line from the base to the source value of the site ``write`` (the rest of the
    network running), in one stacked run of ``steps * batch`` rows (with the default metric,
    unembedding the two answers only)."""
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    a = alphas.to(base_site.device, base_site.dtype)[:, None, None, None]
    target = (base_site[None] + a * (src_site - base_site)[None]).flatten(0, 1)

    def edit(y: Tensor) -> Tensor:  # the value of the point, the gradient of the site
        return y + (target.to(y.dtype) - y).detach()

    fn = lambda lg: pb.measure(lg, steps, metric, answers=metric is None).sum()
    lg = pb.answer_ids(steps).to(model.device) if metric is None else "final"
    run = model.run(tb.repeat(steps), save=[write], edits={write: edit}, metric=fn, logits=lg)
    g = run.grads[write]
    return g.reshape(steps, *base_site.shape).mean(0)


def _method(steps: int | None) -> str:
    return "feature_atp" if steps is None else "feature_ig"


@validated
def feature_atp(
    model: Model,
    pairs: FactPairs | PairBatch,
    dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    *,
    roles: Sequence[Role | str] = DEFAULT_ROLES,
    direction: str = "noise",
    metric: Metric | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    per_prompt: bool = False,
    reference: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """AtP (or IG with ``steps``) of every feature and error node of every dictionary.

    Per batch: one base forward + backward and one source forward of the plain model (AtP;
    measured 2.8-4.7 forward-pass equivalents per batch in all, see the module doc), or per
    written site one stacked run of ``steps`` interpolation points (IG).

    Args:
        model: the model the dictionaries were trained on.
        pairs: clean/corrupt prompt pairs (or their :class:`~factfind.data.batch.PairBatch`).
        dicts: the dictionaries (a :class:`Dictionaries`, one :class:`Dictionary` or a list).
        roles: the position roles whose nodes are scored.
        direction: ``"noise"`` (default: base clean, source corrupt) or ``"denoise"``.
        metric: ``metric(logits, correct, wrong) -> [rows]``, differentiable (default the
            logit difference).
        steps: ``None`` for AtP; ``m >= 1`` for integrated gradients with ``m`` midpoints
            (:data:`DEFAULT_IG_STEPS` = 10 as in Marks et al.).
        batch_size: prompts per forward.
        per_prompt: one row per prompt and node (every prompt for each node that changes in
            some prompt: ``ff.aggregate`` of it gives the default frame) instead of one per node.
        reference: the slow literal recipe (dictionaries spliced in, autograd with respect to
            every feature activation and error term, dense): what the fast path is tested
            against.
        progress: a progress bar over batches.

    Returns:
        A tidy frame: ``method`` (``feature_atp`` / ``feature_ig``), ``component`` (the
        dictionary's short name, e.g. ``tc``), ``layer``, ``role``, ``effect`` (mean over
        prompts, with a 95% CI and ``n``; one value per prompt with ``per_prompt``), then
        ``dictionary`` (``L5.tc``), ``feature`` (<NA> for an error node), ``node``
        (``L5.tc.f1234@subject_last``, ``L5.tc.err@final``), ``score = |effect|`` and
        ``direction``. Features whose activation changes in no prompt have no row (their
        attribution is exactly 0).

    Example::

        est = feature_atp(model, pairs, dicts, roles=["subject_last", "final"])
        est.nlargest(20, "score")
        ff.to_graph(est.nlargest(500, "score"), model, pairs)   # structural edges: O(nodes^2)
    """
    check_mode(direction, "direction", DIRECTIONS)
    if steps is not None and steps < 1:
        raise ArgumentError(f"steps must be >= 1 (integrated gradients) or None (AtP), got "
                            f"{steps}")
    ds = _checked(dicts, model)
    role_list = _roles(roles)
    batches = list(pair_batches(model, pairs, batch_size))
    bar = tqdm(total=len(batches), desc=_method(steps), unit="batch", disable=not progress)
    frames: list[Scores] = []
    present: list[Tensor] = []
    for start, pb in batches:
        base_tb, src_tb = pb.base_and_source(direction)
        masks = _role_masks(base_tb, role_list, model.device)
        present.append(masks.sum(-1).gt(0).cpu())
        if reference:
            frames += _reference_batch(model, ds, role_list, pb, base_tb, src_tb, masks, start,
                                       metric=metric, steps=steps)
        else:
            frames += _fast_batch(model, ds, role_list, pb, base_tb, src_tb, masks, start,
                                  metric=metric, steps=steps)
        bar.update(1)
    bar.close()
    scores = {k: np.concatenate([f[k] for f in frames]) for k in frames[0]}
    return _finish(ds, scores, torch.cat(present, 1), role_list, per_prompt=per_prompt,
                   method=_method(steps), direction=direction)


def _finish(ds: Dictionaries, scores: Scores, present: Tensor, roles: Sequence[Role], *,
            per_prompt: bool, method: str, direction: str) -> pd.DataFrame:
    """The tidy frame, built once: per-prompt rows completed with zeros (a node's prompts where
    its role exists but it did not change), or one row per node - the mean over the prompts
    where its role exists, a 95% Student-t interval and ``n``. Strings are made once per node
    (the site's once per dictionary), every column in its final type and place."""
    have = present.numpy()  # [role prompt]
    ok = np.isfinite(scores["effect"])
    sc = {k: v[ok] for k, v in scores.items()}
    R = len(roles)
    W = max(d.d_sae for d in ds.values()) + 1
    key = (sc["dict"] * W + sc["feature"] + 1) * R + sc["role"]
    uniq, codes = np.unique(key, return_inverse=True)
    u_dict, u_feat, u_role = uniq // (W * R), (uniq // R) % W - 1, uniq % R
    nodes = _node_ids(ds, roles, u_dict, u_feat, u_role)
    if per_prompt:  # every node x every prompt where its role exists
        n_have = have.sum(1)[u_role]
        rep = np.repeat(np.arange(len(uniq)), n_have)  # row -> node
        starts = np.cumsum(n_have) - n_have
        prompts = np.concatenate([np.flatnonzero(h) for h in have])  # each role's prompts
        p_start = np.cumsum(have.sum(1)) - have.sum(1)
        prompt = prompts[p_start[u_role[rep]] + np.arange(len(rep)) - starts[rep]]
        # each score's row: its node's first row + its prompt's rank among the role's prompts
        rank = np.cumsum(have, 1) - 1  # [role prompt]
        effect = np.zeros(len(rep))
        effect[starts[codes] + rank[u_role[codes], sc["prompt"]]] = sc["effect"]
        stats = {"prompt": _ints(prompt), "effect": effect, "ci_low": np.full(len(rep), np.nan),
                 "ci_high": np.full(len(rep), np.nan), "n": _ints(None, len(rep))}
        u_dict, u_feat, u_role, nodes = u_dict[rep], u_feat[rep], u_role[rep], nodes[rep]
        extra: dict[str, Any] = {}
    else:
        s1 = np.bincount(codes, weights=sc["effect"], minlength=len(uniq))
        s2 = np.bincount(codes, weights=sc["effect"] ** 2, minlength=len(uniq))
        n = have.sum(1)[u_role].astype(float)
        mean = s1 / n
        var = np.where(n > 1, (s2 - n * mean ** 2) / np.maximum(n - 1, 1), np.nan)
        counts, where = np.unique(n, return_inverse=True)  # a few distinct counts: one t each
        half = np.sqrt(np.maximum(var, 0) / n) * np.asarray(t_quantile(counts))[where]
        stats = {"prompt": _ints(None, len(uniq)), "effect": mean, "ci_low": mean - half,
                 "ci_high": mean + half, "n": _ints(n.astype(np.int64))}
        extra = {"score": np.abs(mean)}
    rows = len(u_dict)
    dl = list(ds.values())
    strings = lambda values, codes: pd.array(values, dtype="string").take(codes)
    df = pd.DataFrame({
        "method": strings([method], np.zeros(rows, dtype=np.int64)),
        "component": strings([d.short for d in dl], u_dict),
        "layer": _ints(np.array([d.layer for d in dl], dtype=np.int64)[u_dict]),
        "head": _ints(None, rows), "neuron": _ints(None, rows), "position": _ints(None, rows),
        "role": strings([str(r) for r in roles], u_role),
        **stats,
        "dictionary": np.array([d.name for d in dl], dtype=object)[u_dict],
        "feature": _ints(np.where(u_feat < 0, 0, u_feat), u_feat < 0),
        "node": nodes, **extra,
        "direction": np.full(rows, direction, dtype=object)}, copy=False)
    if len(df) and not np.isfinite(stats["effect"]).any():
        check_effects(df)  # every effect NaN: its one-line error
    return df


def _ints(values: np.ndarray | None, missing: np.ndarray | int | None = None) -> Any:
    """A nullable Int64 column: ``values`` with ``missing`` (a mask) as <NA>; ``None``: a
    column of ``missing`` (a length) <NA>s."""
    if values is None:
        assert isinstance(missing, int)
        return pd.arrays.IntegerArray(np.zeros(missing, dtype=np.int64),
                                      np.ones(missing, dtype=bool))
    mask = np.zeros(len(values), dtype=bool) if missing is None else np.asarray(missing)
    return pd.arrays.IntegerArray(values.astype(np.int64), mask)


def _node_ids(ds: Dictionaries, roles: Sequence[Role], di: np.ndarray, feat: np.ndarray,
              role: np.ndarray) -> np.ndarray:
    """``[node]`` object: the ids of integer-coded nodes (``L5.tc.f1234@subject_last``; feature
    -1: the error node, ``L5.tc.err@final``)."""
    names = np.array([d.name for d in ds.values()], dtype=object)
    role_names = np.array([str(r) for r in roles], dtype=object)
    unit = np.where(feat < 0, ".err", np.char.add(".f", feat.astype(str))).astype(object)
    return names[di] + unit + "@" + role_names[role]


# ----------------------------------------------------------------------------- reference


def _reference_batch(model: Model, ds: Dictionaries, roles: Sequence[Role], pb: PairBatch,
                     base_tb: TokenBatch, src_tb: TokenBatch, masks: Tensor, offset: int, *,
                     metric: Metric | None, steps: int | None) -> list[Scores]:
    """The literal recipe: spliced runs, autograd with respect to every feature activation and
    error term at every position, dense products, a loop over dictionaries and IG points."""
    every = base_tb.attention_mask.to(model.device).bool()
    base, _, _ = _read(model, ds, base_tb, every)
    src, _, _ = _read(model, ds, src_tb, every)
    shape = every.shape
    grads: dict[str, Tensor] = {}
    fn = lambda lg: pb.measure(lg, 1, metric).sum()
    if steps is None:
        grads.update(_spliced_grads(model, ds, base_tb, fn, {}))
    else:
        for name, d in ds.items():
            acc_a = torch.zeros(*shape, d.d_sae, dtype=d.W_dec.dtype, device=model.device)
            acc_e = torch.zeros(*shape, d.d_out, dtype=d.W_dec.dtype, device=model.device)
            for k in range(steps):
                alpha = (k + 0.5) / steps
                a = _dense(base.acts[name], every) + alpha * _dense(
                    src.acts[name] - base.acts[name], every)
                e = _dense(base.err[name], every) + alpha * _dense(
                    src.err[name] - base.err[name], every)
                got = _spliced_grads(model, ds, base_tb, fn, {name: (a, e)}, only=name)
                acc_a += got[name + "/acts"]
                acc_e += got[name]
            grads[name] = acc_e / steps
            grads[name + "/acts"] = acc_a / steps
    out = []
    n_batch = shape[0]
    w = masks[:, every]  # [role N]
    present = masks.sum(-1).gt(0).cpu()
    for di, (name, d) in enumerate(ds.items()):
        ga = grads[name + "/acts"][every]
        ge = grads[name][every]
        delta = src.acts[name] - base.acts[name]  # [N F] dense
        per_pos = delta * ga  # [N F]
        feats = torch.einsum("rn,nf->rnf", w.to(per_pos.dtype), per_pos)
        pos_b = every.nonzero(as_tuple=True)[0]
        per_prompt = torch.zeros(len(roles), n_batch, d.d_sae, dtype=per_pos.dtype,
                                 device=per_pos.device).index_add_(1, pos_b, feats)
        changed = torch.zeros(len(roles), n_batch, d.d_sae, dtype=torch.bool,
                              device=per_pos.device).index_add_(
            1, pos_b, (w[:, :, None] != 0) & (delta != 0)[None])
        r, b, f = changed.nonzero(as_tuple=True)
        out.append(_codes(di, f.cpu(), r.cpu(), b.cpu() + offset,
                          per_prompt[r, b, f].double().cpu()))
        de = ((src.err[name] - base.err[name]) * ge).sum(-1)
        err = torch.zeros(len(roles), n_batch, dtype=de.dtype, device=de.device).index_add_(
            1, pos_b, w.to(de.dtype) * de[None]).double()
        err = torch.where(present.to(err.device), err, torch.nan).cpu()
        rr, bb = torch.meshgrid(torch.arange(len(roles)), torch.arange(n_batch), indexing="ij")
        out.append(_codes(di, torch.full((err.numel(),), -1), rr.flatten(),
                          bb.flatten() + offset, err.flatten()))
    return out


def _dense(values: Tensor, sel: Tensor) -> Tensor:
    out = torch.zeros(*sel.shape, values.shape[-1], dtype=values.dtype, device=values.device)
    out[sel] = values
    return out


def _chain_sae(prev: Callable[[Tensor], Tensor] | None, write: Callable[[Tensor, Tensor], Tensor]
               ) -> Callable[[Tensor], Tensor]:
    def edit(y: Tensor) -> Tensor:
        y = prev(y) if prev is not None else y
        return write(y, y)
    return edit


def _spliced_grads(model: Model, ds: Dictionaries, tb: TokenBatch,
                   fn: Callable[[Tensor], Tensor], fixed: dict[str, tuple[Tensor, Tensor]],
                   only: str | None = None) -> dict[str, Tensor]:
    """A run of ``tb`` with every dictionary spliced in (error kept) and the gradients of
    ``fn`` with respect to each one's feature activations (``name + "/acts"``) and error term
    (``name``), ``[batch pos ...]``. ``fixed`` sets a dictionary's features and error to given
    values (a point of IG's path); ``only`` takes that one's gradients only."""
    held: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}

    def hook(name: str, d: Dictionary) -> Callable[[Tensor, Tensor], Tensor]:
        def write(x: Tensor, target: Tensor) -> Tensor:
            if name in fixed:  # a point of IG's path: the site is what these write
                a, e = (t.clone().requires_grad_(True) for t in fixed[name])
                held[name + "/acts"], held[name] = a, e
                return (d.decode(a) + e).to(target.dtype)
            a = d.encode(x).detach().requires_grad_(True)
            # the error holds everything the features do not write (a skip path too)
            e = (target.to(a.dtype) - d.decode(a)).detach().requires_grad_(True)
            held[name + "/acts"], held[name] = a, e
            # Marks et al.'s splice: the value is the site's own, the gradient reaches the
            # features through the decoder, the error as it is, and the site's input (the
            # model upstream) unchanged - not a second time through the encoder
            spliced = d.decode(a) + e
            return (target.to(a.dtype) + (spliced - spliced.detach())).to(target.dtype)
        return write

    edits: dict[SiteKey, Callable[[Tensor], Tensor]] = {}
    seen: dict[str, Tensor] = {}
    for name, d in ds.items():
        w = hook(name, d)
        if d.kind is DictKind.SAE:
            key = (d.site, d.layer)
            edits[key] = _chain_sae(edits.get(key), w)
        else:
            kin, kout = (Component.MLP_IN, d.layer), (Component.MLP_OUT, d.layer)
            pin, pout = edits.get(kin), edits.get(kout)

            def remember(x: Tensor, name: str = name, pin: Any = pin) -> Tensor:
                x = pin(x) if pin else x
                seen[name] = x
                return x

            def replace(y: Tensor, name: str = name, w: Any = w, pout: Any = pout) -> Tensor:
                y = pout(y) if pout else y
                return w(seen.pop(name), y)

            edits[kin], edits[kout] = remember, replace

    def metric(lg: Tensor) -> Tensor:
        value = fn(lg)
        names = [n for n in held if only is None or n.split("/")[0] == only]
        got = torch.autograd.grad(value, [held[n] for n in names], allow_unused=True,
                                  retain_graph=True)
        for n, g in zip(names, got, strict=True):
            out[n] = torch.zeros_like(held[n]) if g is None else g.detach()
        return value

    model.run(tb, edits=edits, metric=metric)
    return out


__all__ = ["DEFAULT_IG_STEPS", "FEATURE_COLUMNS", "feature_atp"]
