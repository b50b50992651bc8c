"""Incremental patched runs (factfind.model.incremental): every incremental path equals its literal
reference on GPT-2, GPT-NeoX and Llama (grouped-query attention), with left padding, patches at
position 0 and at the final position, and non-zero effects."""

import numpy as np
import pytest
import torch

from factfind.localize.patching import activation_patching, activation_patching_reference
from factfind.model.incremental import cost, first_position, group_start, plan_groups
from factfind.testing.models import FAMILIES, tiny_model
from factfind.types import Component as C


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama"])
def fam(request):
    return tiny_model(request.param, n_layers=3)


def _padded_batch(n_rows=3, n_pos=9, vocab=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_rows, n_pos), generator=gen)
    mask = torch.ones(n_rows, n_pos, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


SITES = [(C.EMBED, 0), (C.RESID_PRE, 0), (C.RESID_PRE, 1), (C.Z, 1), (C.NEURONS, 1),
         (C.ATTN_OUT, 2), (C.MLP_OUT, 2), (C.RESID_POST, 2)]


@pytest.fixture(scope="module", params=[f for f in FAMILIES
                                        if f not in ("gpt2", "gpt_neox", "llama")])
def other_fam(request):
    """Every other family (post-norms, q/k norms, softcapping, fused projections, GPT-J)."""
    return tiny_model(request.param, n_layers=3)


@pytest.mark.parametrize("key", SITES, ids=lambda k: f"{k[0]}{k[1]}")
def test_run_from_equals_run_on_every_family(other_fam, key):
    test_run_from_equals_run(other_fam, key)


@pytest.mark.parametrize("key", SITES, ids=lambda k: f"{k[0]}{k[1]}")
def test_run_from_equals_run(fam, key):
    """run_from(prefix, start) == run(stacked batch) with base edits + patch, positions 0 and
    final included; a base edit (noise on the embeddings) is kept in the cached residual."""
    model = fam
    batch = _padded_batch()
    rows, n_pos = batch["input_ids"].shape
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(rows, n_pos, model.d_model, generator=gen)
    base_edits = {(C.EMBED, 0): lambda e: e + noise}
    prefix = model.base_run(batch, edits=base_edits)
    assert torch.allclose(prefix.logits, model.run(batch, edits=base_edits).logits, atol=1e-5)
    reps = 2
    shape = {C.Z: (model.n_heads, model.d_head), C.NEURONS: (model.d_mlp,)}.get(
        key[0], (model.d_model,))
    src = torch.randn(reps * rows, n_pos, *shape, generator=gen)
    stacked = {k: v.repeat(reps, 1) for k, v in batch.items()}
    for pos in (0, 4, n_pos - 1):
        def put(a, pos=pos):
            a = a.clone()
            a[rows:, pos] = src[rows:, pos]  # copy 1 patched, copy 0 left as the base
            return a

        def noised(e):
            return e + noise.repeat(reps, 1, 1)

        if key == (C.EMBED, 0):  # the base edit, then the patch
            ref = {key: lambda e, put=put: put(noised(e))}
        else:
            ref = {(C.EMBED, 0): noised, key: put}
        want = model.run(stacked, edits=ref).logits
        got = model.run_from(prefix, start=(key[1], pos), reps=reps, edits={key: put}).logits
        if pos == n_pos - 1 or key[1] < model.n_layers - 1:  # where the patch can matter
            assert (want[rows:] - prefix.logits).abs().max() > 1e-3
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_run_from_block_attention(fam):
    """An attention block (knockout) from the final position resumes at the final position."""
    model = fam
    batch = _padded_batch()
    rows, n_pos = batch["input_ids"].shape
    prefix = model.base_run(batch)
    block = torch.zeros(rows, n_pos, n_pos, dtype=torch.bool)
    block[:, -1, 3:6] = True
    want = model.run(batch, block_attention={1: block, 2: block}).logits
    got = model.run_from(prefix, start=(1, n_pos - 1), block_attention={1: block, 2: block})
    assert (want - prefix.logits).abs().max() > 1e-3
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=1e-5)


def test_run_from_rejects_patches_upstream(fam):
    prefix = fam.base_run(_padded_batch())
    with pytest.raises(ValueError, match="before the start layer"):
        fam.run_from(prefix, start=(2, 0), edits={(C.MLP_OUT, 1): lambda a: a})
    with pytest.raises(IndexError):
        fam.run_from(prefix, start=(0, 99))


@pytest.fixture(scope="module")
def subject_first_facts():
    """Prompts that start with the subject, so a patch at position 0 changes something."""
    from conftest_data import fact_records

    from factfind.data import from_records

    return from_records([{**r, "template": "{} plays the sport of"} for r in fact_records()])


@pytest.mark.parametrize("chunk", [None, 5])
def test_patching_incremental_equals_reference(fam, subject_first_facts, chunk):
    pairs = subject_first_facts.corrupt(fam, seed=0, on_missing="skip")[:5]
    assert len(set(fam.tokenize(list(pairs.clean)).lengths.tolist())) > 1  # left padding
    kw = dict(components=["embed", "resid_pre", "attn_out", "mlp_out", "z", "resid_post"],
              positions=[0, "subject_last", "relation", "final", -1])
    fast = activation_patching(fam, pairs, batch_size=4, chunk=chunk, progress=False, **kw)
    slow = activation_patching_reference(fam, pairs, **kw)
    keys = ["component", "layer", "head", "position", "role", "prompt"]
    a = fast.set_index(keys).sort_index()
    b = slow.set_index(keys).sort_index()
    assert list(a.index) == list(b.index)
    moved = (b["metric"] - b["corrupt"]).abs()  # what each patch changed
    assert moved.max() > 1e-2
    at0 = slow[(slow["position"] == 0) & slow["effect"].notna()]
    assert len(at0) and (at0["metric"] - at0["corrupt"]).abs().max() > 1e-3  # position 0
    last = slow[slow["role"] == "final"]
    assert (last["metric"] - last["corrupt"]).abs().max() > 1e-3  # the final position
    np.testing.assert_allclose(a["metric"], b["metric"], atol=1e-5, rtol=0)
    gap = float((b["clean"] - b["corrupt"]).abs().min())  # effects: rounding / gap
    np.testing.assert_allclose(a["effect"], b["effect"], atol=1e-5 / min(1.0, gap), rtol=1e-4)


def test_plan_groups_covers_each_site_once():
    starts = [(layer, pos) for layer in range(6) for pos in range(7)]
    groups = plan_groups(starts, n_layers=6, n_pos=7, max_size=5)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(starts)))
    assert max(len(g) for g in groups) <= 5
    total = sum(len(g) * cost(*group_start(starts, g), n_layers=6, n_pos=7) for g in groups)
    assert total < 0.8 * len(starts)  # far below one full forward per site
    assert plan_groups([], n_layers=6, n_pos=7, max_size=5) == []


def test_first_position():
    m = torch.zeros(2, 5, dtype=torch.bool)
    assert first_position(m) == 4
    m[1, 2] = True
    m[0, 3] = True
    assert first_position(m) == 2


def _tracing_keys():
    return ["method", "layer", "position", "prompt"]


def test_tracing_incremental_equals_reference(fam, subject_first_facts):
    """Gaussian-noise tracing, left-padded prompts whose subject starts at position 0: the
    incremental sweep equals the ROME-style loop (one full forward per restoration)."""
    from factfind.localize.tracing import causal_tracing, causal_tracing_reference

    lengths = fam.tokenize(list(subject_first_facts)).lengths
    from factfind.data import FactDataset

    data = FactDataset([subject_first_facts[i] for i in
                        (int(lengths.argmax()), int(lengths.argmin()), 1)])
    assert len(set(fam.tokenize(list(data)).lengths.tolist())) > 1  # left padding
    kw = dict(kinds=("hidden", "mlp", "attn"), samples=2, window=2, seed=3)
    fast = causal_tracing(fam, data, batch_size=3, progress=False, **kw)
    slow = causal_tracing_reference(fam, data, **kw)
    a = fast.set_index(_tracing_keys())["effect"].sort_index()
    b = slow.set_index(_tracing_keys())["effect"].sort_index()
    assert list(a.index) == list(b.index)
    assert b.abs().max() > 1e-5 and b.xs(0, level="position").abs().max() > 0
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-7, rtol=1e-4)


def test_tracing_roles_equals_the_full_trace_filtered(fam, subject_first_facts):
    """Tracing only some roles' tokens gives exactly the full trace's rows for those roles."""
    from factfind.localize.tracing import causal_tracing

    facts = subject_first_facts[:4]
    kw = dict(kinds=("mlp", "attn"), samples=2, window=2, seed=0, progress=False)
    full = causal_tracing(fam, facts, **kw)
    part = causal_tracing(fam, facts, roles=("subject_last", "final"), **kw)
    keep = full[full["role"].isin(["subject_last", "final"])].reset_index(drop=True)
    assert set(part["role"]) == {"subject_last", "final"} and len(part) == len(keep)
    assert np.abs(keep["effect"].to_numpy()).max() > 1e-4
    cols = ["method", "layer", "position", "role", "prompt"]
    part = part.sort_values(cols).reset_index(drop=True)
    keep = keep.sort_values(cols).reset_index(drop=True)
    assert part[cols].equals(keep[cols])
    np.testing.assert_allclose(part["effect"], keep["effect"], atol=1e-6, rtol=0)


def test_tracing_roles_share_restorations_across_rows(fam, facts):
    """Rows whose subjects sit at different padded positions restore each role in one site
    (row b at its own position): equal to the ROME-style loop filtered to the roles, and with
    severed MLPs to the full trace filtered; fewer sites than positions holding a role."""
    from factfind.localize.tracing import (
        causal_tracing,
        causal_tracing_reference,
        traced_positions,
        traced_slots,
    )

    batch = fam.tokenize(list(facts))
    roles = ["subject_first", "subject_last", "final"]
    rows = [b for b in range(len(facts))]
    lengths = batch.lengths.tolist()
    # a mix of prompt lengths, so subject positions differ between rows
    pick = sorted({lengths.index(x) for x in lengths})[:3] + rows[:1]
    data = facts[:0].__class__([facts[i] for i in pick])
    sub = fam.tokenize(list(data))
    n_slots = max(len(x) for x in traced_slots(sub, roles))
    assert len(traced_positions(sub, roles)) > n_slots  # the union is wider than the slots
    kw = dict(kinds=("hidden", "mlp", "attn"), samples=2, window=2, seed=1)
    fast = causal_tracing(fam, data, roles=roles, batch_size=4, progress=False, **kw)
    slow = causal_tracing_reference(fam, data, **kw)
    slow = slow[slow["role"].isin(roles)]
    a = fast.set_index(_tracing_keys())["effect"].sort_index()
    b = slow.set_index(_tracing_keys())["effect"].sort_index()
    assert list(a.index) == list(b.index) and b.abs().max() > 1e-4
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-7, rtol=1e-4)
    kw = dict(kinds=("mlp",), samples=2, window=2, seed=1, severed=True, batch_size=4,
              progress=False)
    part = causal_tracing(fam, data, roles=roles, **kw)
    full = causal_tracing(fam, data, **kw)
    keep = full[full["role"].isin(roles)].reset_index(drop=True)
    assert list(part["method"]) == list(keep["method"])  # same row order
    sev = part["method"] == "causal_tracing/hidden/severed_mlp"
    assert sev.any() and np.abs(part.loc[sev, "effect"]).max() > 1e-4
    np.testing.assert_allclose(part["p_restored"], keep["p_restored"], atol=1e-6, rtol=1e-5)


def test_tracing_str_severed_incremental_equals_full(fam, subject_first_facts):
    """Symmetric token replacement with severed MLPs: incremental == full stacked forwards."""
    _str_severed_incremental_equals_full(
        fam, subject_first_facts.corrupt(fam, seed=0, on_missing="skip")[:4])


def _str_severed_incremental_equals_full(fam, pairs):
    """Symmetric token replacement, severed MLPs: incremental tracing == full stacked
    forwards, with restorations that move the probability."""
    from factfind.localize.tracing import causal_tracing

    kw = dict(corruption="str", severed=True, window=2, batch_size=4, progress=False)
    fast = causal_tracing(fam, pairs, **kw)
    full = causal_tracing(fam, pairs, incremental=False, **kw)
    a = fast.set_index(_tracing_keys())["p_restored"].sort_index()
    b = full.set_index(_tracing_keys())["p_restored"].sort_index()
    pc = full.set_index(_tracing_keys())["p_corrupt"].sort_index()
    assert (b - pc).abs().max() > 1e-4
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-6, rtol=1e-5)


def test_tracing_skips_tokens_before_the_corruption_exactly(fam, facts):
    """Restorations before the first corrupted token are not run (the corrupted run equals
    the clean run there): Gaussian noise against the literal loop, and symmetric token
    replacement with severed MLPs against full stacked forwards, on prompts with a prefix
    before the subject (the skipped tokens) and left padding."""
    from factfind.data import FactDataset
    from factfind.localize.tracing import causal_tracing, causal_tracing_reference, first_corrupted

    lengths = fam.tokenize(list(facts)).lengths
    data = FactDataset([facts[i] for i in (int(lengths.argmax()), int(lengths.argmin()))])
    batch = fam.tokenize(list(data))
    skipped = first_corrupted(batch, batch, True)
    assert skipped >= 2  # "Fact:" before the subject in every row
    kw = dict(kinds=("hidden", "mlp", "attn"), samples=2, window=2, seed=1)
    fast = causal_tracing(fam, data, batch_size=2, progress=False, **kw)
    slow = causal_tracing_reference(fam, data, **kw)
    a = fast.set_index(_tracing_keys())["effect"].sort_index()
    b = slow.set_index(_tracing_keys())["effect"].sort_index()
    assert list(a.index) == list(b.index) and b.abs().max() > 1e-5
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-7, rtol=1e-4)
    early = fast[fast["position"] + (batch.input_ids.shape[1] - fast["prompt"].map(
        dict(enumerate(batch.lengths.tolist())))) < skipped]
    assert len(early) > 0 and np.abs(early["effect"]).max() < 1e-7
    pairs = facts.corrupt(fam, seed=0, on_missing="skip")[:4]
    from factfind.data.batch import encode_pairs

    pb = encode_pairs(fam, pairs)
    assert first_corrupted(pb.clean, pb.corrupt, False) >= 2
    _str_severed_incremental_equals_full(fam, pairs)


@pytest.mark.parametrize("window", [1, 2])
def test_knockout_incremental_equals_reference(fam, facts, window):
    """Knockout resumes at the final position (left-padded batch of mixed lengths)."""
    from factfind.data import FactDataset
    from factfind.localize.knockout import attention_knockout, attention_knockout_reference

    lengths = fam.tokenize(list(facts)).lengths
    data = FactDataset([facts[i] for i in (int(lengths.argmax()), int(lengths.argmin()), 2)])
    kw = dict(sources=["subject", "relation", "subject_first"], window=window)
    fast = attention_knockout(fam, data, batch_size=3, progress=False, **kw)
    slow = attention_knockout_reference(fam, data, **kw)
    keys = ["role", "layer", "prompt"]
    a = fast.set_index(keys).sort_index()
    b = slow.set_index(keys).sort_index()
    assert list(a.index) == list(b.index) and b["effect"].abs().max() > 1e-3
    np.testing.assert_allclose(a["p_knockout"], b["p_knockout"], atol=1e-7, rtol=1e-5)
    np.testing.assert_allclose(a["effect"], b["effect"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("how", ["mean", "resample"])
def test_ablation_incremental_equals_reference(fam, subject_first_facts, how):
    """Ablated sets resume at their first layer and position (0 and final included)."""
    from factfind.localize.ablation import ablate_sets, ablate_sets_reference
    from factfind.types import Role, Site

    data = subject_first_facts.corrupt(fam, seed=0, on_missing="skip").clean[:4]
    assert len(set(fam.tokenize(list(data)).lengths.tolist())) > 1  # left padding
    sets = [[Site(C.MLP_OUT, 0, position=0)],
            [Site(C.Z, 2, head=1, position=Role.FINAL), Site(C.NEURONS, 1, neuron=5)],
            [Site(C.ATTN_OUT, layer) for layer in range(1, 3)],
            [Site(C.RESID_POST, 2, position=Role.FINAL)],
            [Site(C.RESID_PRE, 1, position=Role.SUBJECT_LAST)]]
    kw = dict(how=how, resamples=2, seed=0, pool=subject_first_facts)
    fast = ablate_sets(fam, data, sets, batch_size=4, **kw)
    slow = ablate_sets_reference(fam, data, sets, **kw)
    a = fast.set_index(["set", "prompt"]).sort_index()
    b = slow.set_index(["set", "prompt"]).sort_index()
    assert list(a.index) == list(b.index)
    assert b["effect"].xs(0, level="set").abs().max() > 1e-3  # the position-0 set matters
    assert b["effect"].xs(3, level="set").abs().max() > 1e-3  # the final-position set
    np.testing.assert_allclose(a["metric"], b["metric"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(a["correct"], b["correct"])


def test_subspace_incremental_equals_reference(fam, subject_first_facts):
    """Subspace patches resume at their layer and role (left-padded pairs)."""
    from factfind.localize.subspace import (
        FULL,
        SubspacePatch,
        subspace_patching,
        subspace_patching_reference,
    )

    pairs = subject_first_facts.corrupt(fam, seed=0, on_missing="skip")[:4]
    gen = torch.Generator().manual_seed(0)
    d, n = fam.d_model, len(pairs)
    patches = [SubspacePatch(FULL, "resid_pre", 0, "subject_first"),  # position 0 for some
               SubspacePatch("shared-3", "resid_post", 1, "subject_last",
                             basis=torch.randn(d, 3, generator=gen)),
               SubspacePatch("per-pair", "mlp_out", 2, "final",
                             basis=torch.randn(n, d, 2, generator=gen)),
               SubspacePatch("relation", "attn_out", 1, "relation",
                             basis=torch.randn(d, 5, generator=gen))]
    fast = subspace_patching(fam, pairs, patches, batch_size=4, max_rows=8)
    slow = subspace_patching_reference(fam, pairs, patches)
    assert (fast["subspace"].tolist(), fast["prompt"].tolist()) == (
        slow["subspace"].tolist(), slow["prompt"].tolist())
    assert (slow["change"].abs() > 1e-3).mean() > 0.8
    np.testing.assert_allclose(fast["metric_patched"], slow["metric_patched"], atol=1e-5)


def test_node_sets_incremental_equals_reference(fam, subject_first_facts):
    """Exact node patching (the AtP* verification engine), incl. head q/k/v patched through z,
    resumes at each group's first layer and position; left-padded, positions 0 and final."""
    from factfind.attribute.exact import exact_patching_reference, patch_node_sets
    from factfind.localize.patching import PatchSite
    from factfind.types import Role

    pairs = subject_first_facts.corrupt(fam, seed=0, on_missing="skip")[:4]
    assert len(set(fam.tokenize(list(pairs.clean)).lengths.tolist())) > 1  # left padding
    sets = [[PatchSite(C.NEURONS, 0, 0, neuron=3)],
            [PatchSite(C.MLP_OUT, 1, Role.SUBJECT_FIRST)],
            [PatchSite(C.Z, 2, Role.FINAL, head=1), PatchSite(C.NEURONS, 2, -1, neuron=5)],
            [PatchSite(C.K, 1, Role.SUBJECT_LAST, head=0)],
            [PatchSite(C.V, 2, 0, head=3), PatchSite(C.Q, 2, Role.FINAL, head=1)],
            [PatchSite(C.MLP_OUT, 2, Role.FINAL)]]
    for direction in ("noise", "denoise"):
        fast = patch_node_sets(fam, pairs, sets, per_prompt=True, batch_size=4, chunk=2,
                               direction=direction)
        slow = exact_patching_reference(fam, pairs, sets, direction=direction)
        assert torch.equal(fast.isnan(), slow.isnan())
        assert slow[0].nan_to_num().abs().max() > 1e-3  # position 0
        assert slow[-1].nan_to_num().abs().max() > 1e-3  # final position
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_path_patching_incremental_equals_reference(fam, subject_first_facts):
    """Path patching's two stacked runs resume from the cached base run (run 1 at the first
    receiver layer, run 2 at its first written layer and position); left-padded pairs,
    receivers at position 0 and at the final position."""
    from factfind.edges.path_patching import (
        path_patching,
        path_patching_reference,
        path_patching_sweep,
    )
    from factfind.types import Site

    pairs = subject_first_facts.corrupt(fam, seed=0, on_missing="skip")[:4]
    assert len(set(fam.tokenize(list(pairs.clean)).lengths.tolist())) > 1  # left padding
    senders = [Site("mlp_out", 0, position="subject_first"), Site("z", 1, head=1),
               Site("neurons", 0, neuron=5, position=0)]
    receivers = [Site("z", 2, head=2, position="final"), Site("mlp_out", 1, position=0),
                 Site("neurons", 2, neuron=3, position="subject_last")]
    for kw in (dict(receiver_input="qkv"), dict(receiver_input="k", direct=True)):
        fast = path_patching_sweep(fam, pairs, senders, receivers, chunk=4, **kw)
        slow = path_patching_sweep(fam, pairs, senders, receivers, reference=True, **kw)
        assert np.abs(slow["metric"] - slow["clean"]).max() > 1e-3
        np.testing.assert_allclose(fast["metric"], slow["metric"], atol=1e-5, rtol=1e-5)
    fast = path_patching(fam, pairs, senders, None, direction="denoise")  # direct to logits
    slow = path_patching_reference(fam, pairs, senders, None, direction="denoise")
    np.testing.assert_allclose(fast["metric"], slow["metric"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_logits_equal_the_full_unembedding(family):
    """``logits=<token ids>`` (what the default-metric patched runs unembed) equals the same
    columns of the full final-position logits, for run and run_from, on every family
    (Llama: grouped-query attention; Gemma 2: post norms and the final logit softcap)."""
    model = tiny_model(family, n_layers=3)
    batch = _padded_batch()
    ids = torch.tensor([[5, 7], [11, 3], [2, 39]])
    full = model.run(batch).logits
    cols = model.run(batch, logits=ids).logits
    assert cols.shape == (3, 2) and full.gather(1, ids).abs().max() > 1e-2
    torch.testing.assert_close(cols, full.gather(1, ids), atol=1e-5, rtol=1e-5)
    prefix = model.base_run(batch)
    put = lambda a: 3.0 * a
    edits = {(C.MLP_OUT, 1): put}
    both = model.run_from(prefix, start=(1, 0), reps=2, edits=edits).logits
    mine = model.run_from(prefix, start=(1, 0), reps=2, edits=edits, logits=ids.repeat(2, 1))
    torch.testing.assert_close(mine.logits, both.gather(1, ids.repeat(2, 1)), atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(mine.logits, cols.repeat(2, 1), atol=1e-3)  # the patch acted
    with pytest.raises(ValueError, match=r"\[batch k\]"):
        model.run(batch, logits=ids[:2])
