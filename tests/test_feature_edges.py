"""The counterfactual feature graph (factfind.features.feature_edges*).

The claims: the fast path (the run rebuilt with its transcoded MLPs frozen, receivers batched in
one backward pass) equals the literal reference (per receiver, the real model with its MLP
outputs detached into leaves) on non-zero values, EAP and EAP-IG, on GPT-2, a GQA Llama, a
parallel GPT-NeoX and post-norm Gemma 2 and 3; head shares plus the local part sum to every edge,
and with one attention layer in between a head's share is the edge through that head alone; on
the planted circuit the graph is the planted one at the feature level (P = R = 1) and the head
split names the planted heads; bad input is a typed one-line error.
"""

from __future__ import annotations

import networkx as nx
import pandas as pd
import pytest
import torch

import factfind as ff
from factfind.errors import ArgumentError, NotFoundError
from factfind.features import Dictionaries, Dictionary
from factfind.features.attribution import feature_atp
from factfind.features.feature_edges import feature_edges, split_edge_heads
from factfind.testing import planted as P
from factfind.testing.models import tiny_model
from factfind.testing.planted import planted_model
from factfind.testing.planted_features import planted_transcoders
from factfind.types import Component as C


def _transcoders(model, d_sae: int = 48) -> Dictionaries:
    """TopK transcoders and ReLU skip transcoders, alternating by layer."""
    items = []
    for i in range(model.n_layers):
        skip = i % 2 == 1
        d = Dictionary.random(kind="skip_transcoder" if skip else "transcoder",
                              activation="relu" if skip else "topk", layer=i, d_in=model.d_model,
                              d_sae=d_sae, k=6, seed=i)
        if skip:
            g = torch.Generator().manual_seed(10 + i)
            d.W_skip = torch.randn(d.d_in, d.d_out, generator=g) * 0.05
            d.b_enc = torch.full((d_sae,), -0.3)
        items.append(d)
    return Dictionaries(items)


FAMILIES = ["gpt2", "llama", "gpt_neox", "gemma2", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, facts):
    torch.manual_seed(0)
    model = tiny_model(request.param)
    dicts = _transcoders(model)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    nodes = feature_atp(model, pairs, dicts, progress=False).nlargest(14, "score")
    return model, dicts, pairs, nodes


@pytest.mark.parametrize("steps", [0, 2])
def test_fast_equals_the_literal_reference(setup, steps):
    """Every edge, fast == reference (real model, MLP outputs detached into leaves, autograd per
    receiver), relative to the largest, on non-zero values of every kind of sender and
    receiver."""
    model, dicts, pairs, nodes = setup
    fast = feature_edges(model, pairs, dicts, nodes, steps=steps, chunk=5, progress=False,
                         batch_size=4)
    ref = feature_edges(model, pairs, dicts, nodes, steps=steps, progress=False, batch_size=4,
                        reference=True)
    assert len(fast) == len(ref) > 40
    m = fast.merge(ref, on=["sender", "receiver"], suffixes=("_f", "_r"))
    assert len(m) == len(fast)
    scale = float(m["effect_r"].abs().max())
    big = m["effect_r"].abs() > 1e-3 * scale
    assert int(big.sum()) >= 20
    assert float((m["effect_f"] - m["effect_r"]).abs().max()) <= 1e-5 * scale
    kinds = {(s.split("@")[0].split(".")[-1][:3], r.split("@")[0].split(".")[-1][:3])
             for s, r in zip(m.loc[big, "sender"], m.loc[big, "receiver"], strict=True)}
    senders = {k[0] for k in kinds}
    receivers = {k[1] for k in kinds}
    assert {"emb", "err"} <= senders and any(s.startswith("f") for s in senders)
    assert "err" in receivers and "log" in receivers and any(r.startswith("f") for r in receivers)
    assert (fast["method"] == (f"feature-eap-ig/{steps}" if steps else "feature-eap")).all()
    # edges only run forward: a sender's layer is below its receiver's
    layer = lambda i: -1 if i.startswith("embed") else 99 if i.startswith("logits") else int(
        i[1:].split(".")[0])
    assert all(layer(s) < layer(r) for s, r in zip(fast["sender"], fast["receiver"],
                                                    strict=True))


def test_head_shares_sum_to_every_edge(setup):
    """local + sum of the head shares == the edge (cross-position and same-role edges)."""
    model, dicts, pairs, nodes = setup
    edges = feature_edges(model, pairs, dicts, nodes, steps=2, progress=False)
    top = edges.head(12)
    sp = split_edge_heads(model, pairs, dicts, top, steps=2, progress=False)
    got = sp.groupby(["sender", "receiver"]).agg(share=("share", "sum"), local=("local", "first"),
                                                 edge=("edge", "first")).reset_index()
    m = got.merge(top, on=["sender", "receiver"])
    assert len(m) == len(top)  # every edge has its rows (a local-only edge: one, head <NA>)
    scale = float(m["effect"].abs().max())
    assert float((m["share"] + m["local"] - m["effect"]).abs().max()) <= 1e-5 * scale
    cross = [s.split("@")[1] != r.split("@")[1] for s, r in zip(m["sender"], m["receiver"],
                                                                  strict=True)]
    assert any(cross)
    assert (m.loc[cross, "local"].abs() <= 1e-7 * scale).all()  # nothing stays local
    heads = sp.dropna(subset=["head"])
    assert heads["head"].between(0, model.n_heads - 1).all()


def test_a_share_through_one_attention_layer_is_that_heads_edge(facts):
    """Sender at subject_last (the embeddings), receiver at the final token in layer 0: only
    layer 0's attention lies between, so head h's share is the edge computed with every other
    head of layer 0 detached (the real model, autograd; EAP at the clean input)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    dicts = _transcoders(model)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    d = dicts.at(0)
    est = feature_atp(model, pairs, dicts, progress=False)
    recv = est[(est["layer"] == 0) & (est["role"] == "final")
               & est["feature"].notna()].nlargest(1, "score")["node"].iloc[0]
    sp = split_edge_heads(model, pairs, dicts, [("embed@subject_last", recv)], steps=0,
                     progress=False)
    f = int(recv.split(".f")[1].split("@")[0])
    pb = ff.data.batch.encode_pairs(model, pairs)
    roles = pb.clean.role_labels()
    last = (roles == ff.types.ROLE_NAMES.index("subject_last")).float()
    final = (roles == ff.types.ROLE_NAMES.index("final")).float()
    emb = (C.RESID_PRE, 0)
    clean = model.run(pb.clean, save=[emb]).acts[emb]
    bad = model.run(pb.corrupt, save=[emb]).acts[emb]
    g_out = model.run(pb.clean, save=[(C.MLP_OUT, 0)],
                      metric=lambda lg: pb.logit_diff(lg).sum()).grads[(C.MLP_OUT, 0)]
    n_present = int((last.sum(1) > 0).sum())
    for h in range(model.n_heads):
        leaf: dict[str, torch.Tensor] = {}

        def x0(y, leaf=leaf):
            leaf["x"] = y.detach().clone().requires_grad_(True)
            return leaf["x"]

        def only(z, h=h):  # [B P H e]: every head but h detached
            keep = torch.zeros(z.shape[-2], 1, dtype=z.dtype)
            keep[h] = 1
            return z * keep + (z * (1 - keep)).detach()

        run = model.run(pb.clean, save=[(C.MLP_IN, 0)], keep_graph=True,
                        edits={emb: x0, (C.Z, 0): only, (C.MLP_OUT, 0): lambda y: y.detach()},
                        metric=lambda lg: lg.sum() * 0)
        x = run.live[(C.MLP_IN, 0)]
        a = d.encode(x)[..., f]
        read = (final * (g_out @ d.W_dec[f]) * a).sum()
        (gx,) = torch.autograd.grad(read, leaf["x"])
        want = float(((bad - clean) * last[..., None] * gx).sum()) / n_present
        row = sp[(sp["layer"] == 0) & (sp["head"] == h)]
        got = float(row["share"].iloc[0]) if len(row) else 0.0
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert sp["share"].abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_planted_circuit_is_recovered_at_the_feature_level(family):
    """Transcoders whose features are the planted MLPs' neurons: the feature graph's edges on
    paths to the logits are exactly embed@subject_first/-last -> the lookup features at
    subject_last -> logits (P = R = 1), and the head split puts each cross-position edge on the
    planted head: the previous-token head L0.h0 from the first name, the extraction head L2.h0
    to the final token."""
    model, facts, _ = planted_model(family)
    pairs = facts.corrupt(model, seed=0)
    dicts = planted_transcoders(model)
    est = feature_atp(model, pairs, dicts, progress=False)
    nodes = est[est["score"] > 0]
    edges = feature_edges(model, pairs, dicts, nodes, steps=5, progress=False)
    strong = edges[edges["score"] > 0.05 * edges["score"].max()]
    g = nx.DiGraph(list(zip(strong["sender"], strong["receiver"], strict=True)))
    on_path = {n for n in g if n == "logits@final" or nx.has_path(g, n, "logits@final")}
    found = {(s, r) for s, r in g.edges if s in on_path and r in on_path}
    # the truth, from the pairs: lookup neuron 4 i + j fires for subject (first i, last j); a
    # name that differs within a pair reaches both subjects' features, and every feature that
    # changes reaches the logits through the extraction head
    want = set()
    for clean, bad in zip(pairs.clean, pairs.corrupt, strict=True):
        (i, j), (k, m) = [(P.FIRST.index(p.subject.split()[0]), P.LAST.index(p.subject.split()[1]))
                          for p in (clean, bad)]
        feats = [f"L1.tc.f{4 * i + j}@subject_last", f"L1.tc.f{4 * k + m}@subject_last"]
        for n in feats:
            want.add((n, "logits@final"))
            if i != k:
                want.add(("embed@subject_first", n))
            if j != m:
                want.add(("embed@subject_last", n))
    assert len(want) >= 30
    hit = len(found & want)
    assert (hit / len(found), hit / len(want)) == (1.0, 1.0)
    cross = [e for e in sorted(want) if e[0] == "embed@subject_first"][:3] + \
        [e for e in sorted(want) if e[1] == "logits@final"][:3]
    sp = split_edge_heads(model, pairs, dicts, cross, steps=5, progress=False)
    for s, r in cross:
        rows = sp[(sp["sender"] == s) & (sp["receiver"] == r)]
        best = rows.loc[rows["share"].abs().idxmax()]
        planted = (0, 0) if s.startswith("embed") else (2, 0)
        assert (int(best["layer"]), int(best["head"])) == planted
        assert float(best["share"]) == pytest.approx(float(best["edge"]), rel=1e-3)


def test_graph_of_the_edges(setup):
    """to_graph takes the frame: feature, error, embedding and logit nodes, acyclic."""
    model, dicts, pairs, nodes = setup
    edges = feature_edges(model, pairs, dicts, nodes, steps=0, progress=False)
    g = ff.to_graph(edges, model, pairs)
    kinds = {a["kind"] for _, a in g.graph.nodes(data=True)}
    assert {"feature", "error", "embed", "logits"} <= kinds
    assert g.graph.number_of_edges() == len(edges)


def test_bad_input_is_a_typed_one_line_error(setup):
    model, dicts, pairs, nodes = setup
    bad = [
        ([], ArgumentError, "nodes must be a non-empty list"),
        (["L0.tc.f9999@final"], NotFoundError, "names feature 9999"),
        (["L0.h1@final"], NotFoundError, "is a head node"),
        (["L1.tc.f1@final"], NotFoundError, "names dictionary L1.tc"),
        (["L7.stc.f1@final"], NotFoundError, "outside a model with 2 layers"),
        (["nonsense"], NotFoundError, "names no feature"),
        (pd.DataFrame({"x": [1]}), ArgumentError, "'node' column"),
    ]
    for arg, err, text in bad:
        with pytest.raises(err, match=text) as got:
            feature_edges(model, pairs, dicts, arg, progress=False)
        assert "\n" not in str(got.value)
    with pytest.raises(ArgumentError, match="steps must be"):
        feature_edges(model, pairs, dicts, nodes, steps=-1, progress=False)
    sae = Dictionaries([Dictionary.random(kind="sae", layer=0, d_in=model.d_model, d_sae=16)])
    with pytest.raises(ArgumentError, match="needs transcoders"):
        feature_edges(model, pairs, sae, ["L0.res.f1@final"], progress=False)
    other = Dictionaries([Dictionary.random(kind="transcoder", layer=0, d_in=model.d_model + 1,
                                            d_sae=16)])
    with pytest.raises(ArgumentError, match="another model"):
        feature_edges(model, pairs, other, ["L0.tc.f1@final"], progress=False)
    late = str(nodes.loc[nodes["layer"] == 1, "node"].iloc[0])
    early = str(nodes.loc[nodes["layer"] == 0, "node"].iloc[0])
    with pytest.raises(ArgumentError, match="does not write before"):
        split_edge_heads(model, pairs, dicts, [(late, early)], progress=False)
    with pytest.raises(NotFoundError, match="is not a sender"):
        split_edge_heads(model, pairs, dicts, [("logits@final", early)], progress=False)
    with pytest.raises(ArgumentError, match="edges is empty"):
        split_edge_heads(model, pairs, dicts, [], progress=False)
