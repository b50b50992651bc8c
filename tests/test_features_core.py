"""The Dictionary type, exact splicing on every family, feature nodes in the graph vocabulary."""

from __future__ import annotations

import pytest
import torch

from factfind.errors import ArgumentError, NotFoundError
from factfind.features import Dictionaries, Dictionary, splice_edits, spliced_run
from factfind.graph import CircuitGraph, Node, feeds
from factfind.graph.io import read_graphml, read_json, to_graphml, to_json
from factfind.graph.provenance import Provenance
from factfind.testing.models import FAMILIES, tiny_model
from factfind.types import DICTIONARY_NAMES, Component

# ----------------------------------------------------------------------------- the type


def _random(kind: str, activation: str, **kw: object) -> Dictionary:
    d = Dictionary.random(kind=kind, activation=activation, d_in=16, d_sae=48, k=5, seed=3,
                          **kw)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    d.b_enc = torch.randn(48, generator=g) * 0.3
    d.b_dec = torch.randn(16, generator=g) * 0.3
    if d.W_skip is not None:
        d.W_skip = torch.randn(16, 16, generator=g) * 0.1
    if d.threshold is not None:
        d.threshold = torch.rand(d.threshold.shape, generator=g) * 0.5
    return d


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
def test_encode_decode_follow_the_written_definitions(kind: str, activation: str) -> None:
    d = _random(kind, activation)
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    pre = ((x - d.b_dec) if kind == "sae" else x) @ d.W_enc + d.b_enc
    if activation == "relu":
        want = pre.clamp(min=0)
    elif activation == "topk":
        r = pre.clamp(min=0)
        kth = r.topk(5, dim=-1).values[..., -1:]
        want = torch.where(r >= kth, r, torch.zeros_like(r))
    else:
        assert d.threshold is not None
        want = torch.where((pre > d.threshold) & (pre > 0), pre, torch.zeros_like(pre))
    acts = d.encode(x)
    assert acts.abs().sum() > 0 and (acts == 0).any()
    torch.testing.assert_close(acts, want)
    out = want @ d.W_dec + d.b_dec + (x @ d.W_skip if d.W_skip is not None else 0)
    torch.testing.assert_close(d.reconstruct(x), out)
    y = torch.randn(3, 4, 16)
    torch.testing.assert_close(d.error(x, y), y - out)
    if kind == "sae":
        torch.testing.assert_close(d.error(x), x - out)
    if activation == "topk":
        assert int((acts != 0).sum(-1).max()) <= 5


def test_a_dictionary_refuses_bad_shapes_widths_and_values() -> None:
    good = Dictionary.random(kind="sae", d_in=8, d_sae=16, k=2)
    with pytest.raises(ArgumentError, match=r"k must be in 1\.\.16"):
        Dictionary.random(kind="sae", d_in=8, d_sae=16, k=0)
    with pytest.raises(ArgumentError, match=r"k must be in 1\.\.16"):
        Dictionary.random(kind="sae", d_in=8, d_sae=16, k=17)
    with pytest.raises(ArgumentError, match="b_enc must be"):
        Dictionary(kind="sae", activation="relu", layer=0, site="resid_post", W_enc=good.W_enc,
                   b_enc=torch.zeros(3), W_dec=good.W_dec, b_dec=good.b_dec)
    with pytest.raises(ArgumentError, match="NaN"):
        Dictionary(kind="sae", activation="relu", layer=0, site="resid_post",
                   W_enc=good.W_enc * float("nan"), b_enc=good.b_enc, W_dec=good.W_dec,
                   b_dec=good.b_dec)
    with pytest.raises(ArgumentError, match="reads mlp_in"):
        Dictionary.random(kind="transcoder", d_in=8, d_sae=16, site="resid_post")
    with pytest.raises(ArgumentError, match="needs a threshold"):
        Dictionary(kind="sae", activation="jumprelu", layer=0, site="resid_post",
                   W_enc=good.W_enc, b_enc=good.b_enc, W_dec=good.W_dec, b_dec=good.b_dec)
    with pytest.raises(ArgumentError, match="activation must be one of"):
        Dictionary.random(kind="sae", activation="gelu", d_in=8, d_sae=16)
    with pytest.raises(ArgumentError, match="reads d_in=8"):
        good.encode(torch.zeros(2, 9))


def test_dictionaries_find_check_and_name() -> None:
    model = tiny_model("llama")
    ds = Dictionaries([Dictionary.random(kind="transcoder", layer=layer, d_in=model.d_model,
                                         d_sae=64, k=4) for layer in (1, 0)])
    assert list(ds) == ["L0.tc", "L1.tc"] and ds.layers == [0, 1]
    assert ds.at(1).layer == 1 and ds["L0.tc"].short == "tc"
    assert ds.at(1).feature_id(7, "final") == "L1.tc.f7@final"
    assert ds.at(1).error_id("final") == "L1.tc.err@final"
    ds.check(model)
    with pytest.raises(NotFoundError, match=r"L5\.tc"):
        ds["L5.tc"]
    with pytest.raises(ArgumentError, match="another model"):
        Dictionaries([Dictionary.random(kind="transcoder", layer=0, d_in=model.d_model + 1,
                                        d_sae=8, k=2)]).check(model)
    with pytest.raises(ArgumentError, match="does not exist"):
        Dictionaries([Dictionary.random(kind="transcoder", layer=9, d_in=model.d_model,
                                        d_sae=8, k=2)]).check(model)
    with pytest.raises(ArgumentError, match="two dictionaries named"):
        Dictionaries([ds["L0.tc"], ds["L0.tc"]])
    with pytest.raises(ArgumentError, match="empty"):
        Dictionaries([])
    assert ds.fingerprint() != Dictionaries([ds["L0.tc"]]).fingerprint()


# ----------------------------------------------------------------------------- splicing


def _tokens(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0  # left padding on one row
    return {"input_ids": ids, "attention_mask": mask}


def _every_kind(model: object, seed: int = 0) -> Dictionaries:
    d_model, L = model.d_model, model.n_layers  # type: ignore[attr-defined]
    items = [Dictionary.random(kind="transcoder", layer=0, d_in=d_model, d_sae=64, k=6,
                               seed=seed),
             Dictionary.random(kind="skip_transcoder", activation="jumprelu", layer=L - 1,
                               d_in=d_model, d_sae=64, seed=seed + 1),
             Dictionary.random(kind="sae", activation="relu", layer=0, d_in=d_model, d_sae=64,
                               site="resid_post", seed=seed + 2),
             Dictionary.random(kind="sae", activation="batchtopk", layer=L - 1, d_in=d_model,
                               d_sae=64, k=4, site="attn_out", seed=seed + 3)]
    for d in items:  # non-zero biases and skips, so no identity passes on a zero term
        g = torch.Generator().manual_seed(d.layer + 7)
        d.b_enc = torch.randn(d.d_sae, generator=g) * 0.1
        d.b_dec = torch.randn(d.d_out, generator=g) * 0.1
        if d.W_skip is not None:
            d.W_skip = torch.randn(d.d_in, d.d_out, generator=g) * 0.05
    return Dictionaries(items)


@pytest.mark.parametrize("family", FAMILIES)
def test_splicing_with_the_error_term_is_the_model_and_without_it_is_not(family: str) -> None:
    """Every family's tiny model (GQA, post norms, q/k norms, softcapping, parallel blocks):
    reconstruction + error at four sites leaves the logits within 1e-4; dropping the error
    changes them; the captured features are the dictionaries' encodings of the run's own
    activations."""
    model = tiny_model(family)
    batch = _tokens()
    ds = _every_kind(model)
    base = model.run(batch, logits="all", save=[(Component.MLP_IN, 0),
                                                (Component.RESID_POST, 0)])
    feats: dict[str, torch.Tensor] = {}
    spliced = spliced_run(model, batch, ds, capture=feats, logits="all")
    torch.testing.assert_close(spliced.logits, base.logits, atol=1e-4, rtol=0)
    assert sorted(feats) == sorted(ds)
    torch.testing.assert_close(feats["L0.tc"], ds["L0.tc"].encode(base.acts[(Component.MLP_IN, 0)]))
    torch.testing.assert_close(feats["L0.res"],
                               ds["L0.res"].encode(base.acts[(Component.RESID_POST, 0)]))
    assert all(f.abs().sum() > 0 for f in feats.values())
    dropped = spliced_run(model, batch, ds, error=False, logits="all")
    assert (dropped.logits - base.logits).abs().max() > 1e-2
    one = spliced_run(model, batch, ds, error={"L0.tc": False}, logits="all")
    assert (one.logits - base.logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "gptj"])
def test_mlp_in_is_what_the_mlp_module_reads(family: str) -> None:
    model = tiny_model(family)
    batch = _tokens(1)
    seen: list[torch.Tensor] = []
    mlp = model.hf.get_submodule(model.spec.blocks)[1].get_submodule(model.spec.mlp)
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        run = model.run(batch, save=[(Component.MLP_IN, 1)])
    finally:
        handle.remove()
    assert seen and seen[0].abs().sum() > 0
    torch.testing.assert_close(run.acts[(Component.MLP_IN, 1)], seen[0])


def test_a_transcoders_splice_without_error_writes_its_reconstruction() -> None:
    """Dropping the error at one transcoder: the MLP's output in the spliced run is exactly
    the reconstruction of the MLP's input in that run."""
    model = tiny_model("llama")
    batch = _tokens(2)
    d = _every_kind(model)["L0.tc"]
    run = spliced_run(model, batch, [d], error=False,
                      save=[(Component.MLP_IN, 0), (Component.MLP_OUT, 0)])
    torch.testing.assert_close(run.acts[(Component.MLP_OUT, 0)],
                               d.reconstruct(run.acts[(Component.MLP_IN, 0)]))


def test_feature_edits_change_the_run_by_their_decoded_difference() -> None:
    """Zeroing every feature of an SAE with the error kept leaves the site at its error plus
    b_dec: the run's resid_post is exactly x - decode(encode(x)) + b_dec."""
    model = tiny_model("gpt2")
    batch = _tokens(3)
    d = _every_kind(model)["L0.res"]
    base = model.run(batch, save=[(Component.RESID_POST, 0)]).acts[(Component.RESID_POST, 0)]
    run = spliced_run(model, batch, [d], edit_features={"L0.res": torch.zeros_like},
                      save=[(Component.RESID_POST, 0)])
    want = base - d.decode(d.encode(base)) + d.b_dec
    torch.testing.assert_close(run.acts[(Component.RESID_POST, 0)], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ArgumentError, match="no dictionary named"):
        splice_edits([d], edit_features={"L3.tc": torch.zeros_like})
    with pytest.raises(ArgumentError, match="clash"):
        spliced_run(model, batch, [d], edits={(Component.RESID_POST, 0): lambda a: a})


# ----------------------------------------------------------------------------- graph vocabulary


@pytest.mark.parametrize("node_id", ["L5.tc.f1234@subject_last", "L5.tc.err@final",
                                     "L0.res.f3@all", "L2.mlp.f7@final", "L1.att.f0@relation",
                                     "L4.stc.f12@subject", "L3.rpre.err@final"])
def test_feature_and_error_ids_parse_and_print_back(node_id: str) -> None:
    node = Node.parse(node_id)
    assert node.id == node_id and node.kind in ("feature", "error")
    assert node.dictionary in DICTIONARY_NAMES
    assert (node.index is None) == (node.kind == "error")


def test_feature_nodes_refuse_what_they_cannot_be() -> None:
    with pytest.raises(ArgumentError, match="dictionary must be one of"):
        Node("feature", 2, 5, "final", "xyz")
    with pytest.raises(ArgumentError, match="need a dictionary"):
        Node("feature", 2, 5, "final")
    with pytest.raises(ArgumentError, match="take no dictionary"):
        Node("head", 2, 5, "final", "tc")
    with pytest.raises(ArgumentError, match="need index"):
        Node("feature", 2, None, "final", "tc")
    with pytest.raises(ArgumentError, match="malformed"):
        Node.parse("L2.tc.x5@final")


def test_feature_nodes_sit_where_their_dictionary_reads() -> None:
    p = Node.parse
    assert feeds(p("L1.tc.f3@final"), p("L2.tc.f1@final"), False)
    assert not feeds(p("L1.tc.f3@final"), p("L1.tc.f1@final"), False)      # one layer's MLP
    assert not feeds(p("L1.tc.f3@subject_last"), p("L2.tc.f1@final"), False)  # per position
    assert feeds(p("L1.tc.f3@subject_last"), p("L2.h0@final"), False)       # heads move it
    assert feeds(p("L1.h0@subject_last"), p("L1.tc.f2@subject_last"), False)
    assert not feeds(p("L1.h0@subject_last"), p("L1.tc.f2@subject_last"), True)  # parallel
    assert feeds(p("L1.tc.f3@final"), p("L1.res.f2@final"), False)          # stream leaving
    assert feeds(p("L1.res.f2@final"), p("L2.rpre.f0@final"), False)
    assert feeds(p("L1.mlp@final"), p("L1.res.err@final"), False)
    assert feeds(p("L0.tc.f3@subject_last"), p("L1.att.f1@final"), False)   # attention's SAE
    assert sorted([p("L1.tc.f3@final"), p("L1.h2@final"), p("L1.tc.err@final"),
                   p("L0.res.f9@final")]) == [p("L0.res.f9@final"), p("L1.h2@final"),
                                              p("L1.tc.f3@final"), p("L1.tc.err@final")]


def test_graphs_with_feature_nodes_round_trip_through_graphml_and_json(tmp_path: object) -> None:
    g = CircuitGraph(Provenance(model="m", revision=None, dataset="d", method="test"))
    ids = ["L0.tc.f3@subject_last", "L0.tc.err@subject_last", "L1.h0@final", "L2.res.f9@final"]
    for i, node_id in enumerate(ids):
        g.add_node(Node.parse(node_id), score=0.5 - i)
    g.add_edge(ids[0], ids[2], score=0.25)
    for write, read, name in ((to_graphml, read_graphml, "g.graphml"),
                              (to_json, read_json, "g.json")):
        back = read(write(g, tmp_path / name))  # type: ignore[operator]
        assert [n.id for n in back.nodes()] == [n.id for n in g.nodes()]
        assert back.node("L0.tc.f3@subject_last").dictionary == "tc"
        assert back.node("L1.h0@final").dictionary is None
        assert back.graph.nodes["L0.tc.f3@subject_last"]["score"] == 0.5
    assert list(g.nodes_frame()["kind"]) == ["feature", "error", "head", "feature"]
