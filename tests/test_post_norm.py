"""Post-norm families (Gemma 2/3, OLMo 2): what each method built on head and neuron writes
computes there, against the model's own activations and autograd."""

import pytest
import torch

from factfind.edges.placement import place_site, set_changes, writes
from factfind.testing.models import tiny_model
from factfind.types import Component as C
from factfind.types import Site


@pytest.fixture(scope="module", params=["gemma2", "olmo2"])
def model(request):
    return tiny_model(request.param)


def _batches(model, facts):
    pairs = facts.corrupt(model, seed=0, on_missing="skip")[:4]
    return model.tokenize(list(pairs.clean)), model.tokenize(list(pairs.corrupt)), pairs


def test_z_grad_goes_through_the_post_norm(model, facts):
    """Model.z_grad (dM/dz from dM/d attn_out, used by AtP) equals autograd's dM/dz."""
    batch, _, _ = _batches(model, facts)
    metric = lambda lg: lg[:, 7].sum()
    run = model.run(batch, save=[(C.Z, 0), (C.ATTN_OUT, 0)], metric=metric)
    got = model.z_grad(0, run.acts[(C.Z, 0)], run.grads[(C.ATTN_OUT, 0)])
    want = run.grads[(C.Z, 0)].float()
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the frozen-scale shortcut (W_O alone) would be wrong here
    naive = torch.einsum("btm,hdm->bthd", run.grads[(C.ATTN_OUT, 0)], model.W_O(0))
    assert (naive - want).abs().max() > 1e-3


def test_set_changes_of_whole_layers_are_the_sublayer_outputs(model, facts):
    """A whole layer's change as path patching sends it is exactly the change of what enters
    the residual stream (attn_out, mlp_out), each run at its own post-norm scale."""
    clean, bad, _ = _batches(model, facts)
    keys = [(C.Z, 1), (C.NEURONS, 1), (C.ATTN_OUT, 1), (C.MLP_OUT, 1)]
    base, src = model.run(clean, save=keys).acts, model.run(bad, save=keys).acts
    placed = [place_site(model, clean, Site(C.ATTN_OUT, 1)),
              place_site(model, clean, Site(C.MLP_OUT, 1))]
    got = {kind: d for kind, _, d in set_changes(model, src, base, placed)}
    real = clean.attention_mask.bool()
    for kind, comp in (("head", C.ATTN_OUT), ("mlp", C.MLP_OUT)):
        want = src[(comp, 1)] - base[(comp, 1)]
        torch.testing.assert_close(got[kind][real], want[real], atol=1e-5, rtol=1e-4)
    # writes() of a whole attention layer is attn_out (no output bias in these families)
    w = writes(model, base, placed[0])
    torch.testing.assert_close(w[real], base[(C.ATTN_OUT, 1)][real], atol=1e-5, rtol=1e-4)


def test_neuron_dla_at_final_equals_the_dla_module(model, facts):
    import numpy as np

    from factfind.attribute.neurons import neuron_dla
    from factfind.localize.dla import direct_logit_attribution
    from factfind.types import Role

    _, _, pairs = _batches(model, facts)
    ours = neuron_dla(model, pairs, positions=[Role.FINAL])
    ref = direct_logit_attribution(model, pairs, sources=False)
    ref = ref[ref.component == "neurons"].groupby(["layer", "neuron"])["effect"].mean()
    mine = ours.set_index(["layer", "neuron"])["effect"].sort_index()
    assert np.abs(ref.to_numpy()).max() > 1e-3
    np.testing.assert_allclose(mine.to_numpy(), ref.sort_index().to_numpy(), atol=1e-5)


def test_eap_refuses_single_neurons(model, facts):
    from factfind.edges.eap import edge_attribution

    _, _, pairs = _batches(model, facts)
    with pytest.raises(ValueError, match="neurons=True"):
        edge_attribution(model, pairs, neurons=True)
