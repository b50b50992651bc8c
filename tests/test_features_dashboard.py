"""Feature dashboards: top contexts against a brute-force scan, the logit lens against its
definition, density, labels, HTML and typed errors for ids that name no feature."""

import pytest
import torch

from factfind.errors import ArgumentError, NotFoundError
from factfind.features.dashboard import (
    feature_dashboard,
    feature_dashboards,
    logit_lens,
    resolve_feature,
)
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.evaluation import feature_density
from factfind.features.tokens import special_ids
from factfind.types import Component

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Michael Jordan plays the sport of basketball in Chicago.",
         "Paris is the capital of France, and Rome is the capital of Italy.",
         "A B C D E F G H", "one two three four five six seven eight nine ten"]


@pytest.fixture(scope="module")
def dicts(gpt2_model):
    d_model = gpt2_model.d_model
    return Dictionaries([
        Dictionary.random(kind="transcoder", d_in=d_model, d_sae=64, k=8, layer=0, seed=1),
        Dictionary.random(d_in=d_model, d_sae=32, k=4, layer=1, seed=2, site="resid_post")])


def _scan(model, d, f):
    """Every (activation, text, position) of feature f on TEXTS, one text at a time."""
    special = set(special_ids(model.tokenizer))
    out = []
    for i, t in enumerate(TEXTS):
        ids = model.tokenizer([t], return_tensors="pt")
        run = model.run({"input_ids": ids["input_ids"],
                         "attention_mask": ids["attention_mask"]}, save=[(d.site, d.layer)])
        a = d.encode(run.acts[(d.site, d.layer)])[0, :, f]
        for p, v in enumerate(a.tolist()):
            if v > 0 and int(ids["input_ids"][0, p]) not in special:
                out.append((v, i, int(ids["input_ids"][0, p])))
    return sorted(out, reverse=True)


def test_top_contexts_match_a_brute_force_scan(gpt2_model, dicts):
    d = dicts["L0.tc"]
    density = feature_density(gpt2_model, d, TEXTS)
    f = int(density["fired"].idxmax())
    dash = feature_dashboard(gpt2_model, dicts, f"L0.tc.f{f}@final", corpus=TEXTS, n_top=3,
                             batch_size=2, progress=False)
    ref = _scan(gpt2_model, d, f)
    top = dash.contexts[dash.contexts["kind"] == "top"]
    assert dash.feature_id == f"L0.tc.f{f}@final"
    assert len(ref) > 3 and len(top) == 3
    torch.testing.assert_close(torch.tensor(list(top["activation"])),
                               torch.tensor([v for v, _, _ in ref[:3]]), rtol=1e-4, atol=1e-5)
    assert top["activation"].iloc[0] > 0
    assert top["token"].iloc[0] == gpt2_model.tokenizer.decode([ref[0][2]])
    assert TEXTS[ref[0][1]].find(top["left"].iloc[0].strip()[-5:]) >= 0
    assert (dash.contexts["context"].str.contains(r"\[\[", regex=True)).all()
    quant = dash.contexts[dash.contexts["kind"].str.startswith("quantile")]
    assert len(quant) > 0
    # density is what feature_density counts
    assert dash.density == pytest.approx(float(density.loc[f, "density"]))
    assert dash.tokens == int(density["tokens"].iloc[0]) and dash.density > 0
    assert dash.histogram["count"].sum() == density.loc[f, "fired"]
    assert dash.label.startswith("fires on ") and "promotes" in dash.label


def test_logit_lens_reads_the_decoder_row_through_the_final_norm(gpt2_model, dicts):
    d = dicts["L1.res"]
    lens = logit_lens(gpt2_model, d, 5, n=4)
    one = torch.ones(1, 1)
    want = (gpt2_model.final_norm_frozen(d.W_dec[5][None], one, bias=False) @
            gpt2_model.W_U)[0]
    top = want.topk(4)
    prom = lens[lens["direction"] == "promoted"]
    assert list(prom["token_id"]) == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(list(prom["logit"]), dtype=torch.float32),
                               top.values.float(), rtol=1e-4, atol=1e-5)
    sup = lens[lens["direction"] == "suppressed"]
    assert list(sup["token_id"]) == (-want).topk(4).indices.tolist()
    assert sup["logit"].iloc[0] < 0 < prom["logit"].iloc[0]


def test_facts_and_corpus_and_html(gpt2_model, dicts, facts):
    dashes = feature_dashboards(gpt2_model, dicts, [("L1.res", 3), "L0.tc.f7"], facts=facts,
                                corpus=TEXTS, progress=False)
    assert [x.feature_id for x in dashes] == ["L1.res.f3@all", "L0.tc.f7@all"]
    for dash in dashes:
        assert set(dash.stats["source"]) == {"facts", "corpus"}
        assert (dash.stats["tokens"] > 0).all()
        page = dash._repr_html_()
        assert page.startswith('<div class="ff-dash"') and "promoted" in page
        if len(dash.contexts):
            assert "<mark>" in page
    assert len(dashes[0].logit_lens) == 20


def test_features_that_do_not_exist_raise(gpt2_model, dicts):
    for bad in ("L9.tc.f1", "L0.tc.f64", "L0.tc.n3@final", ("L0.res", 1), 3):
        with pytest.raises(NotFoundError, match=r"names no feature|is an index"):
            resolve_feature(dicts, bad)
    with pytest.raises(ArgumentError, match="facts=, corpus="):
        feature_dashboard(gpt2_model, dicts, "L0.tc.f1")
    d, f = resolve_feature(Dictionaries([dicts["L0.tc"]]), 12)
    assert (d.name, f) == ("L0.tc", 12) and d.site is Component.MLP_IN
