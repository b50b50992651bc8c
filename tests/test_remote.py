"""Remote execution: every analysis through nnsight's serialised request path (``remote="local"``)
gives the numbers of a local run, as one session whose payload carries code, not weights.

The simulation is made *stricter* than nnsight's own: while the request is deserialised and
run, not only the user's local modules but also factfind, pandas and scipy cannot be imported -
a server has torch, numpy and transformers, not factfind (its code must travel by value) nor
the table libraries (sweeps must send back tensors and plain rows, tidied here; factfind's
references to them travel as lazy imports that the sweeps never trigger).
"""

from __future__ import annotations

import importlib.abc
import sys

import numpy as np
import pytest
import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.schema.request import RequestModel

import factfind as ff
from factfind.attribute.atp import atp_star
from factfind.edges.eap import edge_attribution
from factfind.localize.ablation import ablation
from factfind.results import tidy
from factfind.types import Component, Role, Site

NOT_ON_SERVER = ("factfind", "pandas", "scipy", "sklearn")


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in NOT_ON_SERVER:
            raise ModuleNotFoundError(f"{name} is not installed on the (simulated) server")
        return None


@pytest.fixture()
def server(monkeypatch):
    """A strict simulated server for the whole request (loading and running it); records each
    request's payload size."""
    call = LocalSimulationBackend.__call__
    blocker = _NotInstalled()
    payloads: list[int] = []

    def strict_call(self, tracer):
        gone = {name: sys.modules.pop(name) for name in list(sys.modules)
                if name.split(".")[0] in NOT_ON_SERVER}
        sys.meta_path.insert(0, blocker)
        try:
            return call(self, tracer)
        finally:
            sys.meta_path.remove(blocker)
            sys.modules.update(gone)

    serialize = RequestModel.serialize.__func__

    def counting_serialize(cls, tracer, compress=False):
        blob = serialize(cls, tracer, compress)
        payloads.append(len(blob))
        return blob

    monkeypatch.setattr(LocalSimulationBackend, "__call__", strict_call)
    monkeypatch.setattr(RequestModel, "serialize", classmethod(counting_serialize))
    return payloads


def _same(local, remote, *, col="effect", nonzero=1e-3):
    a, b = local[col].to_numpy(dtype=float), remote[col].to_numpy(dtype=float)
    assert len(a) == len(b) > 0
    finite = np.isfinite(a)
    assert finite.sum() > 0 and np.abs(a[finite]).max() > nonzero, "compare non-zero values"
    # float32 to rounding: local sweeps resume patched runs from a cached base run (other
    # shapes, other summation order); remote ones run full stacked forwards
    scale = max(1.0, float(np.abs(a[finite]).max()))
    np.testing.assert_allclose(b, a, atol=2e-5 * scale, rtol=0)
    # the other columns: labels equal; numbers equal to float rounding (local sweeps may
    # resume patched runs from a cached base run, remote ones run full stacked forwards)
    cols = [c for c in local.columns if c not in ("effect", "metric", "clean", "corrupt")]
    floats = [c for c in cols if local[c].dtype.kind == "f"]
    labels = [c for c in cols if c not in floats]
    assert local[labels].astype(str).equals(remote[labels].astype(str))
    for c in floats:
        np.testing.assert_allclose(remote[c].to_numpy(float), local[c].to_numpy(float),
                                   atol=2e-5 * scale, rtol=0, err_msg=c)


def test_patching_sweep_is_one_request_with_local_numbers(gpt2_model, pairs, server):
    """Activation patching over layers x roles x components (and every head): one request."""
    def run(**kw):
        return ff.activation_patching(gpt2_model, pairs, batch_size=4, chunk=9, progress=False,
                                      components=["resid_pre", "attn_out", "mlp_out", "z"],
                                      **kw)

    local, remote = run(), run(remote="local")
    assert len(server) == 1, "the whole sweep must be one session (one request)"
    _same(local, remote)
    assert set(remote["layer"]) == set(range(gpt2_model.n_layers))
    assert len(set(remote["role"])) == 4


@pytest.mark.parametrize("analysis", ["tracing", "knockout", "dla", "ablation", "atp*",
                                      "eap-ig"])
def test_each_analysis_remote_equals_local(family_model, facts, analysis, server):
    model = family_model
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    sites = [Site(Component.MLP_OUT, 0, position=Role.SUBJECT), Site(Component.Z, 1, head=1),
             Site(Component.NEURONS, 1, neuron=3, position=Role.SUBJECT_LAST)]
    run = {
        "tracing": lambda **k: ff.causal_tracing(model, facts[:5], samples=2, batch_size=3,
                                                 progress=False, **k),
        "knockout": lambda **k: ff.attention_knockout(model, facts, batch_size=5,
                                                      progress=False, **k),
        "dla": lambda **k: ff.direct_logit_attribution(model, pairs, batch_size=4, **k),
        "ablation": lambda **k: ablation(model, facts, sites, batch_size=5, **k),
        "atp*": lambda **k: atp_star(model, pairs, batch_size=4,
                                     components=["neurons", "head_out", "q", "k"], **k),
        "eap-ig": lambda **k: edge_attribution(model, pairs[:4], steps=2, **k).rename(
            columns={"score": "effect"}),
    }[analysis]
    local = run()
    remote = run(remote="local")
    assert len(server) == 1
    _same(local, remote, nonzero=1e-4)


def test_organism_sweep_ships_code_not_weights(server):
    model = ff.load_model("organism")
    pairs = ff.load_facts("organism:sport")[:12].corrupt(model, seed=0, on_missing="skip")
    def run(**kw):
        return ff.activation_patching(model, pairs[:6], components=["resid_pre", "mlp_out"],
                                      progress=False, **kw)

    local, remote = run(), run(remote="local")
    _same(local, remote)
    weights = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    assert server[0] < weights / 4, f"payload {server[0]} B vs weights {weights} B"


def test_strict_server_refuses_pandas(gpt2_model, server):
    """The negative control: a sweep that would need pandas on the server fails to load."""
    with pytest.raises(ModuleNotFoundError, match="pandas"):
        gpt2_model.session(tidy, [{"effect": 1.0}], remote="local")


def test_session_without_remote_is_a_plain_call(gpt2_model, server):
    assert gpt2_model.session(lambda x, progress=None: (x, progress), 3, progress=print) == (
        3, print)
    assert server == []


def test_results_come_back_on_cpu(gpt2_model, pairs, server):
    from factfind.data.batch import encode_pairs
    from factfind.localize.patching import _patching_sweep, enumerate_sites

    sites = enumerate_sites(gpt2_model, components=["mlp_out"], positions=["final"])
    out = gpt2_model.session(_patching_sweep, gpt2_model, encode_pairs(gpt2_model, pairs),
                             sites, direction="noise", batch_size=64, chunk=None,
                             progress=print, remote="local")
    assert len(out) == 1 and out[0].device == torch.device("cpu")
    assert out[0].shape == (2 + len(sites), len(pairs))
