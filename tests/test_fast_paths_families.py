"""Every fast path equals its slow exact reference on every family (issue 25, "Exactness").

One tiny random model per family of :data:`~factfind.testing.models.FAMILIES` and
:data:`~factfind.testing.models.DERIVED_FAMILIES` (3 layers; every weight, bias and norm gain
drawn, so no identity passes because a term is zero), left-padded prompts whose subject starts
at position 0, and for each fast path its reference, with the compared values asserted non-zero:

* incremental activation patching (sites stacked, runs resumed from the cached base run) vs
  one full forward per site;
* incremental causal tracing vs ROME's loop, one restoration per forward;
* AtP*'s GradDrop from one retained graph vs a detached forward and backward per layer;
* path patching's two stacked runs (and edge patching, which runs on them) vs the literal
  freeze-everything recipe, through all of a head's inputs, through its keys only with
  the direct path, and senders straight into the logits.

The families cover post-attention and post-MLP norms (Gemma 2/3, OLMo 2, EXAONE 4), q/k norms
(Qwen3, OLMo 2, Gemma 3, EXAONE 4), attention and final-logit softcapping (Gemma 2), biases
(GPT-2, NeoX, Qwen2), fused projections (GPT-2, NeoX, Phi-3), parallel blocks (GPT-J, NeoX),
grouped-query attention (the Llama-likes), sliding-window layers that the prompts cross
(Gemma 2 and 3 with a window of 3 tokens) and specs derived from the module tree (Helium,
EXAONE 4).
"""

import numpy as np
import pytest

from factfind.testing.models import DERIVED_FAMILIES, FAMILIES, tiny_model
from factfind.types import Role, Site

ALL_FAMILIES = FAMILIES + DERIVED_FAMILIES


@pytest.fixture(scope="module")
def subject_first():
    """Prompts that start with the subject, so that a patch at position 0 changes something."""
    from conftest_data import fact_records

    from factfind.data import from_records

    return from_records([{**r, "template": "{} plays the sport of"} for r in fact_records()])


# Gemma 2 and 3 with a 3-token sliding window, so that the prompts cross it (Gemma 2 alternates
# sliding and full layers; Gemma 3's first five layers slide)
SLIDING = {f"{f}-window3": (f, {"sliding_window": 3}) for f in ("gemma2", "gemma3")}


@pytest.fixture(scope="module", params=[*ALL_FAMILIES, *SLIDING])
def family(request, subject_first):
    name, overrides = SLIDING.get(request.param, (request.param, {}))
    model = tiny_model(name, n_layers=3, **overrides)
    pairs = subject_first.corrupt(model, seed=0, on_missing="skip")[:4]
    assert len(set(model.tokenize(list(pairs.clean)).lengths.tolist())) > 1  # left padding
    return model, pairs


def _joined(fast, slow, keys, col):
    a = fast.set_index(keys)[col].sort_index()
    b = slow.set_index(keys)[col].sort_index()
    assert list(a.index) == list(b.index)
    return a.to_numpy(), b.to_numpy()


def test_patching(family):
    from factfind.localize.patching import activation_patching, activation_patching_reference

    model, pairs = family
    kw = dict(components=["embed", "resid_pre", "attn_out", "mlp_out", "z", "resid_post"],
              positions=[0, "subject_last", "final"])
    fast = activation_patching(model, pairs, batch_size=3, chunk=5, progress=False, **kw)
    slow = activation_patching_reference(model, pairs, **kw)
    keys = ["component", "layer", "head", "position", "role", "prompt"]
    a, b = _joined(fast, slow, keys, "metric")
    moved = np.abs(b - slow.set_index(keys).sort_index()["corrupt"].to_numpy())
    assert moved.max() > 1e-2
    at0 = slow[(slow["position"] == 0)]
    if getattr(model.hf.config, "sliding_window", None) != 3:  # a 3-token window hides it
        assert (at0["metric"] - at0["corrupt"]).abs().max() > 1e-3  # position 0 acts
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_tracing(family, subject_first):
    from factfind.data import FactDataset
    from factfind.localize.tracing import causal_tracing, causal_tracing_reference

    model, _ = family
    lengths = model.tokenize(list(subject_first)).lengths
    data = FactDataset([subject_first[i] for i in (int(lengths.argmax()),
                                                   int(lengths.argmin()), 1)])
    kw = dict(kinds=("hidden", "mlp", "attn"), samples=2, window=2, seed=3)
    fast = causal_tracing(model, data, batch_size=3, progress=False, **kw)
    slow = causal_tracing_reference(model, data, **kw)
    a, b = _joined(fast, slow, ["method", "layer", "position", "prompt"], "effect")
    assert np.abs(b).max() > 1e-4  # probabilities of a random model: small but not zero
    np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-4)


def test_grad_drop(family, facts):
    """On "Fact: {} plays the sport of" prompts: the fast path runs the positions before the
    subject once without gradients and the rest with them (``_base_run``), the reference
    runs every position."""
    from factfind.attribute.atp import estimate

    model, _ = family
    pairs = facts.corrupt(model, seed=0, on_missing="skip")[:4]
    first = model.tokenize(list(pairs.clean)).position_mask(Role.SUBJECT_FIRST)
    assert int(first.any(0).nonzero()[0, 0]) > 0  # a truncated prefix to skip
    kw = dict(components=["neurons", "mlp_out", "head_out", "q", "k", "v"],
              positions=["subject_first", "subject_last", "final"], qk_fix=True,
              grad_drop=True, batch_size=4, progress=False)
    fast = estimate(model, pairs, **kw)
    slow = estimate(model, pairs, reference=True, **kw)
    assert fast.grad_drop is not None and slow.grad_drop is not None
    low = fast.index.node_layers() < model.n_layers - 1  # nodes with a layer above them
    # GradDrop differs from |AtP*| there, so the comparison tests the blocked passes
    own = slow.stats.mean.abs() * fast.index.node_layers() / (model.n_layers - 1)
    assert slow.grad_drop[low].abs().max() > 1e-3
    assert (slow.grad_drop - own)[low].abs().max() > 1e-4
    np.testing.assert_allclose(fast.grad_drop.numpy(), slow.grad_drop.numpy(), atol=1e-5,
                               rtol=1e-4)
    np.testing.assert_allclose(fast.stats.mean.numpy(), slow.stats.mean.numpy(), atol=1e-6)


# one head, one neuron and a whole MLP as senders: in post-norm families a single head's or
# neuron's change passes the norm together with its layer's other units (not a sum)
SENDERS = [Site("mlp_out", 0, position="subject_first"), Site("z", 1, head=1),
           Site("neurons", 0, neuron=5, position=0)]
RECEIVERS = [Site("z", 2, head=2, position="final"), Site("mlp_out", 1, position=0),
             Site("neurons", 2, neuron=3, position="subject_last")]


def test_path_patching(family):
    from factfind.edges.path_patching import (
        path_patching,
        path_patching_reference,
        path_patching_sweep,
    )

    model, pairs = family
    for kw in (dict(receiver_input="qkv"), dict(receiver_input="k", direct=True)):
        fast = path_patching_sweep(model, pairs, SENDERS, RECEIVERS, chunk=4, progress=False,
                                   **kw)
        slow = path_patching_sweep(model, pairs, SENDERS, RECEIVERS, reference=True,
                                   progress=False, **kw)
        assert np.abs(slow["metric"] - slow["clean"]).max() > 1e-3, kw
        np.testing.assert_allclose(fast["metric"], slow["metric"], atol=1e-5, rtol=1e-5)
    fast = path_patching(model, pairs, SENDERS, None, direction="denoise", progress=False)
    slow = path_patching_reference(model, pairs, SENDERS, None, direction="denoise",
                                   progress=False)
    assert np.abs(slow["metric"] - slow["corrupt"]).max() > 1e-3
    np.testing.assert_allclose(fast["metric"], slow["metric"], atol=1e-5, rtol=1e-5)


def test_edge_patching(family):
    from factfind.edges.edge_patching import edge_patching

    model, pairs = family
    edges = [("embed@subject_last", "L0.h1@final"), ("L0.h2@subject_last", "L2.h0@final"),
             ("L0.mlp@subject_first", "L1.mlp@relation"), ("L1.h3@final", "logits@final"),
             ("L1.mlp@final", "L2.h1@final")]
    fast = edge_patching(model, pairs, edges, progress=False)
    slow = edge_patching(model, pairs, edges, reference=True, progress=False)
    assert np.abs(slow["effect"]).max() > 1e-3
    np.testing.assert_allclose(fast["effect"], slow["effect"], atol=1e-4, rtol=1e-4)
