"""The single-prompt linearised attribution graph (factfind.features.linear_graph*).

The claims: every edge equals a single-source intervention on the target's pre-activation in the
frozen model (GPT-2, a GQA Llama, post-norm Gemma 2 and Gemma 3; fast batched pass == slow
reference on non-zero values); the frozen model is the real model at the prompt's run (its
attention, norms and post norms reproduce the run) and, where the real model is affine, its
edges are the real model's own interventions; it is linear (second difference ~0, the real
model's is not); head shares sum to their edges; pruning and scores follow circuit-tracer on a
hand-computed graph; the exports load (CircuitGraph round trip, circuit-tracer's JSON schema as
its pydantic models and frontend read it); bad input is a typed one-line error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import factfind.graph as fg
from factfind.data.pairs import FactPairs
from factfind.errors import ArgumentError, EmptyGraphError, MissingLayerError, NotFoundError
from factfind.features import Dictionaries, Dictionary
from factfind.features.linear_graph import LinearGraph, linear_graph
from factfind.features.linear_graph_export import (
    circuit_tracer_graph,
    to_circuit_graph,
    to_circuit_tracer_json,
)
from factfind.features.linear_graph_model import capture, norm_paths
from factfind.features.linear_graph_prune import graph_scores, prune_graph
from factfind.model.architectures import _get
from factfind.testing.models import linearised_model, tiny_model
from factfind.types import Component as C


def _transcoders(model, *, dtype=torch.float32, d_sae=48) -> Dictionaries:
    """A transcoder per layer: TopK plain transcoders and ReLU skip transcoders alternate."""
    items = []
    for i in range(model.n_layers):
        skip = i % 2 == 1
        d = Dictionary.random(kind="skip_transcoder" if skip else "transcoder",
                              activation="relu" if skip else "topk", layer=i, d_in=model.d_model,
                              d_sae=d_sae, k=6, seed=i, dtype=dtype)
        if skip:
            g = torch.Generator().manual_seed(10 + i)
            d.W_skip = (torch.randn(d.d_in, d.d_out, generator=g) * 0.05).to(dtype)
            d.b_enc = torch.full((d_sae,), -0.3, dtype=dtype)  # sparse ReLU features
        items.append(d)
    return Dictionaries(items)


FAMILIES = ["gpt2", "llama", "gemma2", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, facts):
    torch.manual_seed(0)
    model = tiny_model(request.param)
    dicts = _transcoders(model)
    g = linear_graph(model, facts[0], dicts, batch_size=5, progress=False)
    return model, dicts, g


def test_every_edge_equals_a_single_source_intervention_in_the_frozen_model(built):
    """Fast (one transposed pass per batch of targets) == reference (one intervention per
    source pushed up the frozen model in float64), every source and target, 1e-4 relative."""
    _, _, g = built
    sources = list(range(g.n_nodes - g.n_logits))
    ref = g.reference_edges(sources, dtype=torch.float64)
    fast = g.adjacency[:, sources].double()
    scale = float(ref.abs().max())
    big = ref.abs() > 1e-3 * scale
    assert int(big.sum()) > 500  # features, errors and embeddings into features and logits
    rel = ((fast - ref).abs() / ref.abs().clamp(min=1e-30))[big]
    assert float(rel.max()) <= 1e-4
    assert float((fast - ref).abs().max()) <= 1e-5 * scale  # the small ones too
    kinds = {("feature" if s < g.n_features else "error" if s < g.n_features + g.n_errors
              else "embed") for s in big.nonzero()[:, 1].tolist()}
    assert kinds == {"feature", "error", "embed"}
    # cross-position edges exist (attention carries them)
    pos_s = torch.tensor([g.source_location(s)[1] for s in sources])
    tpos = torch.cat([g.features[:, 1], torch.full((g.n_logits,), g.n_pos - 1)])
    t_rows = torch.tensor(g.target_rows())
    cross = (tpos[:, None] != pos_s[None]) & big[t_rows]
    assert int(cross.sum()) > 50


def test_graph_nodes_follow_circuit_tracer(built, facts):
    model, dicts, g = built
    assert g.n_errors == model.n_layers * g.n_pos
    assert 1 <= g.n_logits <= 10
    p = g.logit_probs
    assert bool((p[:-1] >= p[1:]).all())
    assert float(p.sum()) >= 0.95 or g.n_logits == 10
    assert float(p[:-1].sum()) < 0.95  # the fewest tokens that reach 0.95
    # active features: exactly the non-zero activations of each layer's transcoder
    _, vals = capture(model, model.tokenize([facts[0]]), dicts)
    for la in range(model.n_layers):
        a = dicts.at(la).encode(vals["mlp_in"][la])
        mine = g.features[g.features[:, 0] == la]
        assert len(mine) == int((a != 0).sum())
        np.testing.assert_allclose(g.activations[g.features[:, 0] == la].numpy(),
                                   a[mine[:, 1], mine[:, 2]].numpy(), rtol=1e-6)
    # error and embedding rows read nothing; the diagonal is zero
    assert float(g.adjacency[g.n_features:g.n_nodes - g.n_logits].abs().sum()) == 0
    assert float(g.adjacency.diagonal().abs().sum()) == 0
    assert g.meta["fe_per_target"] > 0


def test_the_frozen_model_is_the_real_model_at_the_run(built, facts):
    """At the prompt's run, the frozen pieces reproduce what the real model computed: the value
    vectors are the frozen input norm's output through W_V (plus a bias that does not depend on
    the position), the pattern mixes them into z, and W_O with the frozen post-norm scale gives
    attn_out; the MLP input norm reproduces mlp_in (checked inside capture too); the frozen
    final norm and W_U give the raw logits."""
    model, dicts, _ = built
    tb = model.tokenize([facts[0]])
    frozen, _ = capture(model, tb, dicts)
    save = [(c, la) for la in range(model.n_layers)
            for c in (C.V, C.Z, C.ATTN_OUT, C.RESID_PRE, C.MLP_IN, C.RESID_POST)]
    run = model.run(tb, save=save)
    acts = {k: v[0] for k, v in run.acts.items()}
    for la in range(model.n_layers):
        na = frozen.norm_attn[la]
        x = acts[(C.RESID_PRE, la)]
        xn = x if na is None else na.affine(x)
        v = acts[(C.V, la)]                                          # [pos head d_head]
        bias = v - torch.einsum("pd,hde->phe", xn, frozen.W_V[la])
        torch.testing.assert_close(bias, bias[:1].expand_as(bias), atol=2e-5, rtol=1e-4)
        z = torch.einsum("hqk,khe->qhe", frozen.patterns[la], v)
        torch.testing.assert_close(z, acts[(C.Z, la)], atol=2e-5, rtol=1e-4)
        out = (torch.einsum("qhe,hed->qd", z, frozen.W_O[la]) + model.b_O(la)) \
            * frozen.attn_scale[la]
        torch.testing.assert_close(out, acts[(C.ATTN_OUT, la)], atol=2e-5, rtol=1e-4)
    final = frozen.norm_final.affine(acts[(C.RESID_POST, model.n_layers - 1)])[-1]
    logits = final @ model.W_U + model.b_U
    raw = run.logits_raw if run.logits_raw is not None else run.logits
    torch.testing.assert_close(logits, raw[0], atol=1e-4, rtol=1e-4)
    if model.spec.attn_post_norm is not None:  # a post norm's scale is really frozen here
        assert float((frozen.attn_scale[0] - frozen.attn_scale[0][:1]).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_edges_are_the_real_models_interventions_where_it_is_affine(family, facts):
    """On a model affine in its activations (patterns and norm scales constant), the frozen
    model is exact: each edge equals the real model's own intervention, run through the adapter
    with the transcoders spliced in (features and errors frozen, the skip path live)."""
    model = linearised_model(family)
    dicts = _transcoders(model, dtype=torch.float64)
    tb = model.tokenize([facts[0]])
    g = linear_graph(model, facts[0], dicts, progress=False)
    _, vals = capture(model, tb, dicts)
    L, P = model.n_layers, g.n_pos
    const = []
    for la in range(L):
        d = dicts.at(la)
        const.append(vals["mlp_out"][la] - d.skip(vals["mlp_in"][la]))

    def run_with(write_layer: int, pos: int, vec: torch.Tensor):
        edits = {}
        for la in range(L):
            seen: dict[str, torch.Tensor] = {}

            def remember(x, seen=seen):
                seen["x"] = x
                return x

            def frozen_mlp(y, la=la, seen=seen):
                out = const[la][None] + dicts.at(la).skip(seen.pop("x")).to(y.dtype)
                if la == write_layer:
                    out = out.clone()
                    out[:, pos] += vec
                return out

            edits[(C.MLP_IN, la)] = remember
            edits[(C.MLP_OUT, la)] = frozen_mlp
        if write_layer < 0:
            edits[(C.EMBED, 0)] = lambda e: e + torch.nn.functional.one_hot(
                torch.tensor(pos), P).to(e.dtype)[None, :, None] * vec
        return model.run(tb, edits=edits, save=[(C.MLP_IN, la) for la in range(L)],
                         logits="final")

    base = run_with(0, 0, torch.zeros(model.d_model, dtype=torch.float64))
    rng = np.random.default_rng(0)
    sources = sorted(set(rng.choice(g.n_nodes - g.n_logits, 12, replace=False).tolist())
                     | {g.token_index(0), g.error_index(0, P - 1)})
    checked = 0
    for s in sources:
        la, p = g.source_location(s)
        assert g._writes is not None
        got = run_with(la, p, g._writes[s])
        for t in g.target_rows():
            if t < g.n_features:
                tl, tp, f = g.features[t].tolist()
                d = dicts.at(tl)
                delta = got.acts[(C.MLP_IN, tl)][0, tp] - base.acts[(C.MLP_IN, tl)][0, tp]
                want = float(delta @ d.W_enc[:, f])
            else:
                k = t - (g.n_nodes - g.n_logits)
                dl = got.logits[0] - base.logits[0]
                want = float(dl[int(g.logit_tokens[k])] - dl.mean())
            assert float(g.adjacency[t, s]) == pytest.approx(want, rel=1e-4, abs=1e-6)
            checked += abs(want) > 1e-3
    assert checked > 20


def test_the_frozen_model_is_linear_and_the_real_one_is_not(facts):
    """Second difference along a random direction of the embeddings: ~0 in the frozen model
    (relative to the first difference), clearly not in the real model."""
    model = tiny_model("llama")
    dicts = _transcoders(model)
    g = linear_graph(model, facts[0], dicts, progress=False)
    assert g._frozen is not None
    frozen = g._frozen.to(torch.float64)
    torch.manual_seed(1)
    delta = torch.randn(1, g.n_pos, model.d_model, dtype=torch.float64) * 0.5

    def frozen_reads(eps: float) -> torch.Tensor:
        streams = frozen.forward(eps * delta, {}, until=model.n_layers)
        return torch.cat([frozen.mlp_in(la, streams[la]).flatten()
                          for la in range(model.n_layers)])

    f0, f1, f2 = (frozen_reads(e) for e in (0.0, 1.0, 2.0))
    assert float((f2 - 2 * f1 + f0).abs().max()) <= 1e-10 * float((f1 - f0).abs().max())
    tb = model.tokenize([facts[0]])

    def real_reads(eps: float) -> torch.Tensor:
        run = model.run(tb, edits={(C.RESID_PRE, 0): lambda x: x + eps * delta.to(x.dtype)},
                        save=[(C.MLP_IN, la) for la in range(model.n_layers)])
        return torch.cat([run.acts[(C.MLP_IN, la)].double().flatten()
                          for la in range(model.n_layers)])

    r0, r1, r2 = (real_reads(e) for e in (0.0, 1.0, 2.0))
    assert float((r2 - 2 * r1 + r0).abs().max()) > 1e-2 * float((r1 - r0).abs().max())


def test_head_shares_sum_to_each_cross_position_edge(built):
    model, _, g = built
    top = [i for i in range(g.n_features) if int(g.features[i, 0]) == model.n_layers - 1]
    targets = [g.logit_index(0), *top[:3]]
    df = g.split_heads(targets, progress=False)
    assert len(df) > 20
    assert set(df["layer"]) <= set(range(model.n_layers))
    assert set(df["head"]) <= set(range(model.n_heads))
    sums = df.groupby(["source", "target"]).agg(share=("share", "sum"), edge=("edge", "first"))
    scale = float(sums["edge"].abs().max())
    assert scale > 0 and (sums["edge"].abs() > 1e-3 * scale).sum() > 10
    np.testing.assert_allclose(sums["share"], sums["edge"], rtol=1e-4, atol=1e-5 * scale)
    # every cross-position source with a non-zero edge into the targets is split
    for t in targets:
        cross = [s for s in range(g.n_nodes - g.n_logits)
                 if g.source_location(s)[1] != g.target_location(t)[1]
                 and abs(float(g.adjacency[t, s])) > 1e-6 * scale]
        assert set(cross) <= set(df.loc[df["target"] == t, "source"])
    # more than one head carries something
    assert df.groupby(["layer", "head"]).size().shape[0] > 1


def test_pruning_and_scores_on_a_hand_computed_graph():
    """Nodes [f0, e0, t0, t1, logit]: logit <- f0 (2), e0 (-1); f0 <- t0 (3), t1 (1); e0 <- t0 (1).
    Normalised: logit 2/3, 1/3; f0 .75, .25; e0 1. Influence: f0 2/3, e0 1/3, t0 5/6, t1 1/6.
    Replacement: tokens 1 / (1 + errors 1/3) = 0.75. Completeness: non-error input shares
    (1, 1, 1, 1, 2/3) weighted by influence + logit weight (2/3, 1/3, 5/6, 1/6, 1) = 8/9."""
    A = torch.zeros(5, 5)
    A[4, 0], A[4, 1], A[0, 2], A[0, 3], A[1, 2] = 2.0, -1.0, 3.0, 1.0, 1.0
    probs = torch.tensor([1.0])
    rep, comp = graph_scores(A, n_features=1, n_errors=1, n_tokens=2, logit_probs=probs)
    assert rep == pytest.approx(0.75)
    assert comp == pytest.approx(8 / 9)
    res = prune_graph(A, n_features=1, n_tokens=2, logit_probs=probs, node_threshold=0.5,
                      edge_threshold=0.98)
    # influences sorted: t0 5/6, f0 2/3, e0 1/3, t1 1/6 (total 2): 0.5 keeps t0 and f0 only
    assert res.node_mask.tolist() == [True, False, True, True, True]
    assert not bool(res.edge_mask[:, 1].any()) and not bool(res.edge_mask[1].any())
    # cumulative influence rank: t0 5/12, f0 (5/6 + 2/3) / 2, e0 11/12, t1 and logit 1
    np.testing.assert_allclose(res.cumulative_scores.numpy(), [0.75, 11 / 12, 5 / 12, 1, 1],
                               atol=1e-6)
    with pytest.raises(ArgumentError, match="node_threshold"):
        prune_graph(A, n_features=1, n_tokens=2, logit_probs=probs, node_threshold=1.5)


def test_scores_and_pruning_of_a_built_graph(built):
    model, _, g = built
    rep, comp = g.scores()
    assert 0 < rep < 1 and 0 < comp < 1
    res = g.prune()
    assert res.node_mask[-g.n_logits - g.n_pos:].all()
    assert 0 < int(res.node_mask[:g.n_features].sum()) < g.n_features
    share = g.error_share()
    assert list(share.columns) == ["layer", "error_share", "error_share_of_layer", "flagged"]
    assert len(share) == model.n_layers and (share["error_share"] > 0).all()


def test_circuit_graph_export_round_trips(built, tmp_path):
    _, _, g = built
    res = g.prune()
    cg = to_circuit_graph(g, res)
    kinds = {d["kind"] for _, d in cg.graph.nodes(data=True)}
    assert kinds == {"feature", "error", "embed", "logits"}
    for nid, d in cg.graph.nodes(data=True):
        node = cg.node(nid)
        if node.kind in ("feature", "error"):
            assert d["dictionary"] in ("tc", "stc") and d["label"]
            assert d["role"] in ("prefix", "subject_first", "subject", "subject_last",
                                 "relation", "final")
    assert cg.provenance.method == "linear_graph"
    # logits@final's incoming edges: probability-weighted sums over the logit nodes
    some = next(u for u, v in cg.graph.in_edges("logits@final")
                if cg.node(u).kind == "embed" and len(cg.graph.nodes[u]["positions"]) == 1)
    p = int(cg.graph.nodes[some]["positions"])
    want = sum(float(g.adjacency[g.logit_index(k), g.token_index(p)] * g.logit_probs[k])
               for k in range(g.n_logits)
               if res.edge_mask[g.logit_index(k), g.token_index(p)])
    assert cg.graph.edges[some, "logits@final"]["score"] == pytest.approx(want, rel=1e-5)
    fg.to_json(cg, tmp_path / "g.json")
    fg.to_graphml(cg, tmp_path / "g.graphml")
    assert fg.read_json(tmp_path / "g.json") == cg
    assert fg.read_graphml(tmp_path / "g.graphml") == cg


# --------------------------------------------------------------- circuit-tracer's JSON schema


def _check_circuit_tracer_schema(data: dict) -> None:
    """What circuit-tracer 0.5.0 asserts when it reads a graph file: its pydantic models
    (``frontend/graph_models.py``: Metadata, QParams, Node, Model with ``links: list[dict]``;
    required fields present, typed as declared; optional ones may be null), and what its
    frontend's ``formatData`` needs (node ids unique, links between listed nodes, the
    embedding and logit nodes kept, feature types it knows)."""
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    for key, typ in (("slug", str), ("scan", str), ("prompt", str)):
        assert isinstance(meta[key], typ)
    assert all(isinstance(t, str) for t in meta["transcoder_list"])
    assert all(isinstance(t, str) for t in meta["prompt_tokens"])
    assert meta.get("node_threshold") is None or isinstance(meta["node_threshold"], float)
    assert meta.get("schema_version", 1) in (None, 1)
    q = data["qParams"]
    assert isinstance(q["pinnedIds"], list) and isinstance(q["supernodes"], list)
    assert all(isinstance(q[k], str) for k in ("linkType", "clickedId", "sg_pos"))
    ids = set()
    for n in data["nodes"]:
        for key, typ in (("node_id", str), ("feature", int), ("layer", str), ("ctx_idx", int),
                         ("feature_type", str), ("jsNodeId", str)):
            assert isinstance(n[key], typ) and not isinstance(n[key], bool), (key, n)
        assert isinstance(n.get("token_prob", 0.0), float)
        assert isinstance(n.get("is_target_logit", False), bool)
        assert isinstance(n.get("clerp", ""), str)
        for key in ("influence", "activation"):
            assert n.get(key) is None or isinstance(n[key], float)
        assert n["feature_type"] in ("cross layer transcoder", "mlp reconstruction error",
                                     "embedding", "logit")
        assert n["node_id"] not in ids
        ids.add(n["node_id"])
    for link in data["links"]:
        assert set(link) == {"source", "target", "weight"}
        assert link["source"] in ids and link["target"] in ids
        assert isinstance(link["weight"], float)


def test_circuit_tracer_json_matches_its_schema(built, tmp_path):
    model, _, g = built
    path = to_circuit_tracer_json(g, tmp_path / "graphs", slug="prompt-0")
    data = json.loads(path.read_text())
    _check_circuit_tracer_schema(data)
    types = {n["feature_type"] for n in data["nodes"]}
    assert types == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == g.n_pos
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == g.n_logits and logits[0]["is_target_logit"]
    assert logits[0]["layer"] == str(model.n_layers + 1)
    # link weights are the graph's edges
    names = {n["node_id"]: n for n in data["nodes"]}
    link = max(data["links"], key=lambda x: abs(x["weight"]))
    src, dst = names[link["source"]], names[link["target"]]
    assert dst["feature_type"] in ("cross layer transcoder", "logit")
    assert src["ctx_idx"] <= dst["ctx_idx"]
    listing = json.loads((tmp_path / "graphs" / "graph-metadata.json").read_text())
    assert [m["slug"] for m in listing["graphs"]] == ["prompt-0"]
    to_circuit_tracer_json(g, tmp_path / "graphs", slug="prompt-0")  # replaced, not duplicated
    listing = json.loads((tmp_path / "graphs" / "graph-metadata.json").read_text())
    assert len(listing["graphs"]) == 1
    # the schema check can fail
    bad = circuit_tracer_graph(g)
    bad["links"].append({"source": "nowhere", "target": bad["nodes"][0]["node_id"],
                         "weight": 1.0})
    with pytest.raises(AssertionError):
        _check_circuit_tracer_schema(bad)


# --------------------------------------------------------------- bad input


def test_bad_input_is_one_typed_line(facts):
    model = tiny_model("gpt2")
    dicts = _transcoders(model)
    one = facts[0]

    def one_line(exc):
        msg = str(exc.value)
        assert "\n" not in msg and len(msg) < 300
        return msg

    other = tiny_model("gpt2", d_model=48)
    with pytest.raises(ArgumentError) as e:  # another model's widths
        linear_graph(model, one, _transcoders(other), progress=False)
    assert "another model" in one_line(e)
    foreign = _transcoders(model)
    for d in foreign.values():
        d.model = "smollm2-135m@0123456789abcdef"
    with pytest.raises(ArgumentError) as e:  # same widths, trained on another model
        linear_graph(model, one, foreign, progress=False)
    assert "another model" in one_line(e)
    sae = Dictionaries([*list(dicts.values())[:-1],
                        Dictionary.random(kind="sae", layer=model.n_layers - 1,
                                          d_in=model.d_model, d_sae=32)])
    with pytest.raises(ArgumentError) as e:  # another site
        linear_graph(model, one, sae, progress=False)
    assert "another site" in one_line(e)
    with pytest.raises(MissingLayerError) as e:
        linear_graph(model, one, Dictionaries([dicts.at(0)]), progress=False)
    assert "every layer" in one_line(e)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    assert isinstance(pairs, FactPairs)
    with pytest.raises(ArgumentError) as e:
        linear_graph(model, pairs, dicts, progress=False)
    assert "one prompt" in one_line(e)
    with pytest.raises(ArgumentError) as e:
        linear_graph(model, facts, dicts, progress=False)
    assert "one prompt" in one_line(e)
    with pytest.raises(ArgumentError):
        linear_graph(model, one, dicts, max_n_logits=0, progress=False)
    g = linear_graph(model, one, dicts, progress=False)
    with pytest.raises(NotFoundError) as e:
        g.index_of("L0.tc.f99999@3")
    assert "no node" in one_line(e)
    with pytest.raises(NotFoundError) as e:
        g.feature_index(0, 0, 10 ** 6)
    one_line(e)
    assert g.index_of(g.node_names()[5]) == 5
    last = g.n_pos - 1
    final_feature = next(i for i in range(g.n_features) if int(g.features[i, 1]) == last)
    la, _, f = g.features[final_feature].tolist()
    assert g.index_of(f"L{la}.{g.dictionary[la]}.f{f}@final") == final_feature
    empty = g.prune()
    empty.node_mask[:] = False
    empty.edge_mask[:] = False
    with pytest.raises(EmptyGraphError) as e:
        to_circuit_graph(g, empty)
    one_line(e)
    with pytest.raises(EmptyGraphError):
        circuit_tracer_graph(g, empty)
    with pytest.raises(ArgumentError) as e:
        g.split_heads(g.error_index(0, 0), progress=False)
    assert "reads nothing" in one_line(e)
    loaded = LinearGraph(**{**{k: getattr(g, k) for k in (
        "adjacency", "features", "activations", "tokens", "token_strs", "roles",
        "logit_tokens", "logit_probs", "logit_strs", "dictionary", "n_layers", "prompt",
        "model_name")}})
    with pytest.raises(ArgumentError) as e:
        loaded.reference_edges([0])
    assert "frozen run" in one_line(e)


def test_norm_layouts_are_found():
    """The attention and MLP input norms of each family (Gemma's attention *post* norm is
    called post_attention_layernorm; OLMo 2 has no input norms)."""
    want = {"gpt2": ("ln_1", "ln_2"), "llama": ("input_layernorm", "post_attention_layernorm"),
            "gemma3": ("input_layernorm", "pre_feedforward_layernorm"),
            "olmo2": (None, None), "gpt_neox": ("input_layernorm", "post_attention_layernorm"),
            "gptj": ("ln_1", "ln_1")}
    for family, paths in want.items():
        model = tiny_model(family)
        assert norm_paths(model) == paths, family
        for p in paths:
            if p is not None:
                _get(model._block_hf(0), p)


def test_max_feature_nodes_keeps_the_most_influential_features(facts):
    """circuit-tracer's ``max_feature_nodes``: the logits' rows, then features in the order of
    their partial influence; the kept graph is the full graph restricted to the kept nodes
    (every entry), and its first re-ranking takes the features the logits' rows rank highest."""
    model = tiny_model("llama")
    dicts = _transcoders(model)
    full = linear_graph(model, facts[0], dicts, progress=False, batch_size=8)
    cap = linear_graph(model, facts[0], dicts, progress=False, batch_size=8,
                       max_feature_nodes=40, update_interval=2)
    assert cap.n_features == 40 and cap.meta["n_active_features"] == full.n_features
    sel = torch.tensor([full.feature_index(*f) for f in cap.features.tolist()])
    keep = torch.cat([sel, torch.arange(full.n_features, full.n_nodes)])
    np.testing.assert_allclose(cap.adjacency.numpy(), full.adjacency[keep][:, keep].numpy(),
                               rtol=1e-5, atol=1e-7)
    # the first 16 picked (2 batches of 8) are the top 16 by influence through the logit rows
    from factfind.features.linear_graph import _partial_influence

    n_l = full.n_logits
    rows = full.adjacency[full.n_nodes - n_l:]
    infl = _partial_influence(rows, torch.arange(full.n_nodes - n_l, full.n_nodes),
                              full.logit_probs, full.n_nodes)
    top = set(torch.argsort(infl[:full.n_features], descending=True, stable=True)[:16].tolist())
    assert top <= set(sel.tolist())
    # reference and head split still work on the kept graph
    ref = cap.reference_edges(list(range(cap.n_features)), dtype=torch.float64)
    np.testing.assert_allclose(cap.adjacency[:, :cap.n_features].numpy(), ref.numpy(),
                               rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    with pytest.raises(ArgumentError):
        linear_graph(model, facts[0], dicts, max_feature_nodes=0, progress=False)
