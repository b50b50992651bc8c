"""Causal tracing (Meng et al. 2022, ROME): where along (token, layer) is the fact recalled?

Corrupt the subject, then restore single clean states one at a time and see which restore the
answer:

1. **clean run** on the prompt; record every hidden state, MLP and attention output.
2. **corrupted run**: add Gaussian noise ``N(0, (nu * sigma)^2)`` to the token embeddings of
   the subject (``sigma`` = the standard deviation of the subject-token embeddings over the
   dataset, ``nu = 3`` by default), so the model no longer knows who the subject is.
3. **corrupted-with-restoration runs**: for each token ``t`` and layer ``l``, run corrupted
   but overwrite one state with its clean value: the hidden state (residual stream after layer
   ``l``), or - for the MLP and attention kinds - the MLP (attention) outputs at ``t`` of a
   *window* of ``w`` layers centred on ``l`` (ROME uses ``w = 10``).

With ``p`` the probability of the correct attribute token, the *total effect* is
``TE = p_clean - p_corrupt`` and the *indirect effect* of a state is
``IE = p_restored - p_corrupt``. ROME found a peak of MLP indirect effect at the last subject
token in early-middle layers - the lookup that Fact Finding studies at the neuron level.

The **severed** variant restores a hidden state while freezing the MLP outputs at that token
in all later layers at their corrupted values: if the hidden state's effect collapses, the
effect needed those MLPs. Zhang & Nanda (2024) argue that Gaussian noise can take activations
off-distribution; ``corruption="str"`` (symmetric token replacement) instead uses the corrupt
prompt of each pair (another subject of the same token length) and restores clean states into
its run.

All restorations for a chunk of sites, noise samples and prompts run in one stacked forward;
:func:`causal_tracing_reference` loops one restoration per forward (the exact reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.errors import ArgumentError
from factfind.metrics import prob
from factfind.model.incremental import OVERHEAD_ROWS, plan_groups
from factfind.results import tidy
from factfind.types import Component, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model
    from factfind.types import Remote


KINDS = {"hidden": Component.RESID_POST, "mlp": Component.MLP_OUT, "attn": Component.ATTN_OUT}




def traced_positions(batch: TokenBatch, roles: list[str] | None) -> list[int]:
    """The padded positions to restore: every one, or those holding one of ``roles`` in some
    row."""
    n_pos = batch.input_ids.shape[1]
    if roles is None:
        return list(range(n_pos))
    labels = batch.role_names()
    return [p for p in range(n_pos) if any(row[p] in roles for row in labels)]


def traced_slots(batch: TokenBatch, roles: list[str] | None) -> list[list[int]]:
    """Per row, the padded positions to restore, in order: every position, or those holding
    one of ``roles``. A restoration restores slot ``j`` of every row at once (row ``b`` at its
    own ``slots[b][j]``), so prompts whose subjects sit at different padded positions share
    one restoration per role instead of one per position that holds the role in some row."""
    n_pos = batch.input_ids.shape[1]
    if roles is None:
        return [list(range(n_pos)) for _ in range(batch.input_ids.shape[0])]
    return [[p for p in range(n_pos) if row[p] in roles] for row in batch.role_names()]


def subject_embedding_std(model: Model, batch: TokenBatch) -> float:
    """ROME's sigma: std of the token embeddings at subject positions over the dataset."""
    run = model.run(batch, save=[(Component.EMBED, 0)])
    emb = run.acts[(Component.EMBED, 0)]
    return float(emb[batch.masks[Role.SUBJECT].to(emb.device)].float().std())


def _window(layer: int, width: int, n_layers: int) -> range:
    """ROME's window of ``width`` layers centred on ``layer``, clipped to the model."""
    return range(max(0, layer - width // 2), min(n_layers, layer - (-width // 2)))


def prompt_noise(seed: int, prompt: int, samples: int, length: int, d_model: int) -> Tensor:
    """Standard-normal noise ``[samples length d_model]`` for one prompt, seeded by
    ``(seed, prompt)`` so any batching (and the reference loop) draws the same numbers."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + prompt)
    return torch.randn(samples, length, d_model, generator=gen)


@validated
def causal_tracing(
    model: Model,
    data: FactDataset | FactPairs,
    *,
    kinds: tuple[str, ...] = ("hidden", "mlp", "attn"),
    corruption: str = "noise",
    noise: float = 3.0,
    samples: int = 10,
    window: int = 10,
    severed: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    chunk: int | None = None,
    progress: bool = True,
    remote: Remote = None,
    incremental: bool = True,
    roles: Sequence[Role | str] | None = None,
) -> pd.DataFrame:
    """Indirect effect of restoring each (kind, layer, token) state; one row per prompt.

    Cost, in forward-pass equivalents (FE) of the ``samples x batch`` noised rows: one clean
    and one corrupted forward per prompt batch, then per restoration about ``(n_layers - l) /
    n_layers * (P - t) / P`` FE (``l`` the first layer a run recomputes: the restored layer's
    successor for hidden states, the window's first layer for mlp/attn; ``t`` the token;
    :mod:`factfind.model.incremental`), a quarter on average; restorations before the first
    corrupted token (the first subject token, or the first token a ``"str"`` pair changes)
    cost nothing, since the corrupted run equals the clean one there. At ROME's settings
    (10 samples, window 10, hidden + mlp + attn) on a 18-token prompt whose subject starts at
    token 5 that is 0.17 FE of the 10 noised rows per restoration on average, against ROME's
    one forward of 11 rows with logits at every position (``benchmarks/bench_incremental.py``).
    With ``incremental=False`` (and remotely) one full stacked forward per restoration.

    Args:
        model: the model.
        data: a :class:`~factfind.data.FactDataset` (noise corruption) or
            :class:`~factfind.data.FactPairs` (either corruption; ``"str"`` needs pairs).
        kinds: any of ``"hidden"``, ``"mlp"``, ``"attn"``.
        corruption: ``"noise"`` (Gaussian noise on subject embeddings) or ``"str"``.
        noise: the multiplier ``nu`` of sigma.
        samples: noise draws per prompt (ignored for ``"str"``).
        window: layers restored together for the ``mlp``/``attn`` kinds.
        severed: also report hidden-state restores with later MLPs at that token frozen at
            their corrupted values (``kind = "hidden/severed_mlp"``).
        seed: seeds the noise.
        remote: run the forwards as one nnsight session, ``"local"`` or on NDIF (``True``);
            see :meth:`~factfind.model.Model.session`.
        incremental: resume each stacked restoration from the cached corrupted run at its
            first restored layer and token (local runs only).

        roles: trace only tokens of these roles (e.g. ``("subject_last", "final")``, the
            two sites ROME's claims are about); default every token. A padded position is
            restored when it holds one of the roles in any row; rows are kept per role.

    Returns:
        Rows with ``method = "causal_tracing/<kind>"``, ``layer``, ``position`` (token index
        in the unpadded prompt), ``token``, ``role``,
        ``prompt``, ``effect`` (IE, averaged over samples), ``te``, ``p_clean``,
        ``p_corrupt``, ``p_restored``.
    """
    if corruption not in ("noise", "str"):
        raise ArgumentError(f"corruption must be 'noise' or 'str', not {corruption!r}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ArgumentError(f"unknown kinds {bad}; choose from {sorted(KINDS)}")
    if window < 1:
        raise ArgumentError("window must be >= 1")
    from factfind.data import FactPairs

    clean_data = data.clean if isinstance(data, FactPairs) else data
    if corruption == "str" and not isinstance(data, FactPairs):
        raise ArgumentError("symmetric token replacement needs FactPairs (facts.corrupt(model))")
    if len(clean_data) == 0:
        raise ArgumentError("no prompts to trace: the dataset is empty")
    if corruption == "str":
        from factfind.data.batch import encode_pairs

        assert isinstance(data, FactPairs)
        pb = encode_pairs(model, data)
        clean_all, corrupt_all = pb.clean, pb.corrupt
        samples = 1
    else:
        clean_all = model.tokenize(list(clean_data))
        corrupt_all = clean_all
    variants = [(k, False) for k in kinds] + ([("hidden", True)] if severed else [])
    n_layers = model.n_layers
    wanted = None if roles is None else [str(Role(r)) for r in roles]
    rows: list[dict[str, Any]] = []
    n = len(clean_data)
    bar = tqdm(total=n, desc="causal tracing", unit="prompt", disable=not progress)
    probs = model.session(_tracing_sweep, model, clean_all, corrupt_all, kinds=kinds,
                          variants=variants, corruption=corruption, noise=noise,
                          samples=samples, window=window, seed=seed, batch_size=batch_size,
                          chunk=chunk, progress=bar.update, remote=remote,
                          incremental=incremental and not remote, roles=wanted)
    bar.close()
    for k, (p_clean, p_corrupt, p_rest) in enumerate(probs):
        start = k * batch_size
        clean = clean_all.take(slice(start, start + batch_size))
        rows_b, n_pos = clean.input_ids.shape
        slots = traced_slots(clean, wanted) if wanted is not None else None
        n_slot = max((len(x) for x in slots), default=0) if slots is not None else n_pos
        roles_b = clean.role_names()
        tokens = [model.tokenizer.convert_ids_to_tokens(row) for row in clean.input_ids.tolist()]
        pc = p_corrupt.mean(0)
        # rows in the order (variant, layer, padded position, prompt) whatever the sweep's
        # sites were (slots of each row's traced positions, or padded positions)
        for v, (kind, sev) in enumerate(variants):
            name = "hidden/severed_mlp" if sev else kind
            for layer, pos, b in ((layer, pos, b) for layer in range(n_layers)
                                  for pos in traced_positions(clean, wanted)
                                  for b in range(rows_b)):
                role = roles_b[b][pos]
                if role is None or (wanted is not None and role not in wanted):
                    continue
                j = pos if slots is None else slots[b].index(pos)
                s = (v * n_layers + layer) * n_slot + j
                pr_mean = float(p_rest[s, :, b].mean())
                offset = n_pos - int(clean.lengths[b])  # left padding: report prompt positions
                rows.append({
                    "method": f"causal_tracing/{name}", "component": str(KINDS[kind]),
                    "layer": layer, "position": pos - offset, "role": role,
                    "token": tokens[b][pos], "prompt": start + b,
                    "effect": pr_mean - float(pc[b]), "te": float(p_clean[b] - pc[b]),
                    "p_clean": float(p_clean[b]), "p_corrupt": float(pc[b]),
                    "p_restored": pr_mean, "corruption": corruption,
                })
    return tidy(rows)


def _tracing_sweep(model: Model, clean_all: TokenBatch, corrupt_all: TokenBatch, *,
                   kinds: tuple[str, ...], variants: list[tuple[str, bool]], corruption: str,
                   noise: float, samples: int, window: int, seed: int, batch_size: int,
                   chunk: int | None, progress: Callable[[int], Any] | None = None,
                   incremental: bool = False, roles: list[str] | None = None
                   ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The model-side half of :func:`causal_tracing` (one nnsight session, torch only): per
    prompt batch ``p_clean [batch]``, ``p_corrupt [sample batch]`` and the restored
    probabilities ``[site sample batch]`` (sites ordered variant, layer, position)."""
    n_layers = model.n_layers
    sigma = subject_embedding_std(model, clean_all) if corruption == "noise" else 0.0
    n = clean_all.input_ids.shape[0]
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, n, batch_size):
        clean = clean_all.take(slice(start, start + batch_size))
        corrupt = corrupt_all.take(slice(start, start + batch_size))
        rows_b, n_pos = clean.input_ids.shape
        target = clean.attribute_ids
        keys = [(KINDS[k], layer) for k in {k for k, _ in variants}
                for layer in range(n_layers)]  # severed restores hidden states too
        if any(sev for _, sev in variants):
            keys += [(Component.MLP_OUT, layer) for layer in range(n_layers)]
        keys = sorted(set(keys))
        clean_run = model.run(clean, save=keys)
        p_clean = prob(clean_run.logits, target)
        # corrupted base: rows = samples x batch
        base = corrupt.repeat(samples)
        subj = corrupt.masks[Role.SUBJECT].repeat(samples, 1).to(model.device)
        if corruption == "noise":
            eps = torch.zeros(samples, rows_b, n_pos, model.d_model)
            for b in range(rows_b):
                length = int(corrupt.attention_mask[b].sum())
                eps[:, b, n_pos - length:] = prompt_noise(seed, start + b, samples, length,
                                                          model.d_model)
            eps = eps.flatten(0, 1)
            eps = (eps * noise * sigma).to(model.device, model.dtype) * subj[..., None]
            base_edits: dict[tuple[Component, int], Callable[[Tensor], Tensor]] = {
                (Component.EMBED, 0): lambda e, eps=eps: e + eps}
        else:
            base_edits = {}
        prefix = model.base_run(base, edits=base_edits, save=keys) if incremental else None
        corrupt_run = prefix if prefix is not None else model.run(base, edits=base_edits,
                                                                  save=keys)
        p_corrupt = prob(corrupt_run.logits, target.repeat(samples)).reshape(samples, rows_b)
        # a site restores slot j: position slots[b][j] of each row b that has one (all rows
        # share padded position j when every position is traced)
        slots = traced_slots(clean, roles)
        n_slot = max((len(x) for x in slots), default=0)
        at = [[x[j] if j < len(x) else None for x in slots] for j in range(n_slot)]
        sites = [(kind, sev, layer, j) for kind, sev in variants for layer in range(n_layers)
                 for j in range(n_slot)]
        size = chunk or max(1, 2048 // (samples * rows_b))
        p_rest = torch.empty(len(sites), samples, rows_b)
        if prefix is None:
            groups = [list(range(c0, min(len(sites), c0 + size)))
                      for c0 in range(0, len(sites), size)]
        else:  # each restoration starts at its first restored layer, at its token
            # (a hidden state restored after block l is block l+1's input: start there)
            starts = [(_hidden_start(layer, n_layers) if kind == "hidden"
                       else _window(layer, window, n_layers).start,
                       min(p for p in at[j] if p is not None)) for kind, _, layer, j in sites]
            # before the first corrupted token the corrupted run *is* the clean run (causal
            # attention): restoring a state there changes nothing, so a site whose rows all
            # restore before it is not run
            first = first_corrupted(clean, corrupt, base_edits != {})
            late = [max(p for p in at[j] if p is not None) >= first for *_, j in sites]
            for i, keep in enumerate(late):
                if not keep:
                    p_rest[i] = p_corrupt.cpu()
            todo = [i for i, keep in enumerate(late) if keep]
            groups = [[todo[j] for j in g] for g in plan_groups(
                [starts[i] for i in todo], n_layers=n_layers, n_pos=n_pos, max_size=size,
                overhead=OVERHEAD_ROWS / (samples * rows_b))]
        for idx in groups:
            group = [sites[i] for i in idx]
            g = len(group)
            masks: dict[tuple[Component, int], Tensor] = {}
            sources: dict[tuple[Component, int], Tensor] = {}
            for s, (kind, sev, layer, j) in enumerate(group):
                comp = KINDS[kind]
                # rows (copy-major over samples) and the position each restores
                here = torch.zeros(samples * rows_b, n_pos, dtype=torch.bool)
                for b, pos in enumerate(at[j]):
                    if pos is not None:
                        here[b::rows_b, pos] = True
                layers = [layer] if kind == "hidden" else list(_window(layer, window, n_layers))
                for lay in layers:
                    key = (comp, lay)
                    if prefix is not None and kind == "hidden" and lay + 1 < n_layers:
                        key = (Component.RESID_PRE, lay + 1)  # the same state (see starts)
                    m = masks.setdefault(key, torch.zeros(g, samples * rows_b, n_pos,
                                                          dtype=torch.bool))
                    m[s] |= here
                    sources[key] = clean_run.acts[(comp, lay)].repeat(samples, 1, 1)
                if sev:  # freeze later MLPs at this token to their corrupted values
                    for lay in range(layer + 1, n_layers):
                        m = masks.setdefault(("sever", lay), torch.zeros(  # type: ignore[arg-type]
                            g, samples * rows_b, n_pos, dtype=torch.bool))
                        m[s] |= here
            edits: dict[tuple[Component, int], Callable[[Tensor], Tensor]] = dict(base_edits)
            if base_edits:
                edits = {(Component.EMBED, 0): lambda e, eps=eps, g=g: e + eps.repeat(g, 1, 1)}
            if prefix is not None:
                edits = {}  # the prefix re-applies the base run's noise where it recomputes
            for key, m in masks.items():
                if key[0] == "sever":
                    continue
                edits[key] = _restore(m, sources[key], g)
            for key, m in masks.items():
                if key[0] != "sever":
                    continue
                mkey = (Component.MLP_OUT, key[1])
                frozen = corrupt_run.acts[mkey]
                prev = edits.get(mkey)
                edits[mkey] = _freeze(m, frozen, g, prev)
            if prefix is None:
                run = model.run(base.repeat(g), edits=edits)
            else:
                start = (min(starts[i][0] for i in idx), min(starts[i][1] for i in idx))
                run = model.run_from(prefix, start=start, reps=g, edits=edits)
            pr = prob(run.logits, target.repeat(samples * g)).reshape(g, samples, rows_b)
            p_rest[idx] = pr.cpu()
        out.append((p_clean.cpu(), p_corrupt.cpu(), p_rest))
        if progress is not None:
            progress(rows_b)
    return out


def _hidden_start(layer: int, n_layers: int) -> int:
    """Where an incremental run restoring ``resid_post[layer]`` starts: the next block, whose
    input that state is (the last layer's output feeds the unembedding: its own block)."""
    return layer + 1 if layer + 1 < n_layers else layer


def first_corrupted(clean: TokenBatch, corrupt: TokenBatch, noised: bool) -> int:
    """The first position at which some row of the corrupted run can differ from the clean
    run: the first subject token (Gaussian noise on the subject's embeddings, ``noised``) or
    the first column where the token batches differ (tokens, padding or positions). Causal
    attention leaves every state before it equal to the clean run's."""
    cols = clean.input_ids.shape[1]
    diff = torch.zeros(cols, dtype=torch.bool)
    for name in ("input_ids", "attention_mask", "position_ids"):
        a, b = getattr(clean, name), getattr(corrupt, name)
        diff |= (a != b).any(0) if a.shape == b.shape else torch.ones(cols, dtype=torch.bool)
    if noised:
        diff |= corrupt.masks[Role.SUBJECT].bool().any(0)
    hit = diff.nonzero()
    return int(hit[0, 0]) if len(hit) else cols


@validated
def causal_tracing_reference(
    model: Model, data: FactDataset, *, kinds: tuple[str, ...] = ("hidden", "mlp", "attn"),
    noise: float = 3.0, samples: int = 10, window: int = 10, seed: int = 0,
) -> pd.DataFrame:
    """The exact reference for Gaussian-noise tracing: a plain loop with one noise sample and
    one restoration per forward, written with direct index assignment (same padded batch)."""
    rows: list[dict[str, Any]] = []
    batch = model.tokenize(list(data))
    sigma = subject_embedding_std(model, batch)
    n_rows, n_pos = batch.input_ids.shape
    subj = batch.masks[Role.SUBJECT]
    eps = torch.zeros(samples, n_rows, n_pos, model.d_model)
    for b in range(n_rows):
        length = int(batch.lengths[b])
        eps[:, b, n_pos - length:] = prompt_noise(seed, b, samples, length, model.d_model)
    eps = eps * noise * sigma
    keys = [(KINDS[k], layer) for k in kinds for layer in range(model.n_layers)]
    clean = model.run(batch, save=keys)
    target = batch.attribute_ids
    p_clean = prob(clean.logits, target)

    def noised(e: Tensor, s: int) -> Tensor:
        e = e.clone()
        e[subj] = e[subj] + eps[s][subj].to(e.dtype)
        return e

    p_corrupt = torch.stack([prob(model.run(batch, edits={(Component.EMBED, 0): lambda e, s=s:
                             noised(e, s)}).logits, target) for s in range(samples)]).mean(0)
    roles = batch.role_names()
    for kind in kinds:
        comp = KINDS[kind]
        for layer in range(model.n_layers):
            layers = [layer] if kind == "hidden" else list(_window(layer, window, model.n_layers))
            for pos in range(n_pos):
                total = torch.zeros(n_rows)
                for s in range(samples):
                    edits: dict[tuple[Component, int], Callable[[Tensor], Tensor]] = {
                        (Component.EMBED, 0): lambda e, s=s: noised(e, s)}
                    for lay in layers:
                        def put(a: Tensor, lay: int = lay, pos: int = pos,
                                comp: Component = comp) -> Tensor:
                            a = a.clone()
                            a[:, pos] = clean.acts[(comp, lay)][:, pos]
                            return a
                        edits[(comp, lay)] = put
                    total += prob(model.run(batch, edits=edits).logits, target)
                for b in range(n_rows):
                    if roles[b][pos] is None:
                        continue
                    rows.append({
                        "method": f"causal_tracing/{kind}", "component": str(comp),
                        "layer": layer, "position": pos - (n_pos - int(batch.lengths[b])),
                        "role": roles[b][pos], "prompt": b,
                        "effect": float(total[b] / samples - p_corrupt[b]),
                        "te": float(p_clean[b] - p_corrupt[b]),
                    })
    return tidy(rows)


def _restore(mask: Tensor, src: Tensor, g: int):
    full = mask.flatten(0, 1)
    src_full = src.repeat(g, 1, 1)

    def edit(act: Tensor) -> Tensor:
        return torch.where(full.to(act.device)[..., None], src_full.to(act.dtype), act)
    return edit


def _freeze(mask: Tensor, frozen: Tensor, g: int, prev):
    full = mask.flatten(0, 1)
    val = frozen.repeat(g, 1, 1)

    def edit(act: Tensor) -> Tensor:
        if prev is not None:
            act = prev(act)
        return torch.where(full.to(act.device)[..., None], val.to(act.dtype), act)
    return edit
