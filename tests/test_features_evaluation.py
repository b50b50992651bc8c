"""evaluate_dictionaries: SAELens' definitions checked on dictionaries whose answers are known
(an exact one recovers everything, a zero one nothing) and against a one-text-at-a-time loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from factfind.errors import ArgumentError, EmptyInputError
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.evaluation import evaluate_dictionaries
from factfind.features.tokens import special_ids, token_batches
from factfind.types import Component

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Michael Jordan plays the sport of basketball in Chicago.",
         "Paris is the capital of France.", "one two three four five six seven"]


def _exact_sae(d_model, layer):
    """relu(x) - relu(-x) = x: an SAE with 2 d_model features that reconstructs exactly."""
    eye = torch.eye(d_model)
    return Dictionary(kind="sae", activation="relu", layer=layer, site="resid_post",
                      W_enc=torch.cat([eye, -eye], 1), b_enc=torch.zeros(2 * d_model),
                      W_dec=torch.cat([eye, -eye], 0), b_dec=torch.zeros(d_model))


def test_exact_dictionary_recovers_everything(gpt2_model):
    d = _exact_sae(gpt2_model.d_model, 1)
    df = evaluate_dictionaries(gpt2_model, d, TEXTS, progress=False)
    row = df.iloc[0]
    assert row["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert row["mse"] < 1e-8 and row["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert row["ce_spliced"] == pytest.approx(row["ce_clean"], abs=1e-4)
    assert abs(row["ce_zero"] - row["ce_clean"]) > 0.01  # a random model: either way
    assert row["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert row["kl_recovered"] == pytest.approx(1.0, abs=1e-3) and row["kl_zero"] > 0
    assert row["dead_fraction"] < 0.5 and 0 < row["l0"] <= gpt2_model.d_model


def test_zero_decoder_is_zero_ablation(gpt2_model):
    d = Dictionary.random(kind="transcoder", d_in=gpt2_model.d_model, d_sae=32, k=4, layer=0)
    d.W_dec = torch.zeros_like(d.W_dec)
    row = evaluate_dictionaries(gpt2_model, d, TEXTS, progress=False).iloc[0]
    assert row["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert row["kl_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert row["explained_variance"] <= 0 and row["ce_zero"] != row["ce_clean"]


def test_against_a_loop_over_texts(gpt2_model):
    model = gpt2_model
    ds = Dictionaries([
        Dictionary.random(kind="transcoder", d_in=model.d_model, d_sae=48, k=6, layer=0, seed=4),
        Dictionary.random(d_in=model.d_model, d_sae=40, k=5, layer=1, seed=5,
                          site="resid_post")])
    df = evaluate_dictionaries(model, ds, TEXTS, batch_size=3, dense_threshold=0.2,
                               progress=False).set_index("dictionary")
    special = set(special_ids(model.tokenizer))
    for d in ds.values():
        ys, yh, acts, ce, ce_sp, ce_z, kl_sp, kl_z = [], [], [], [], [], [], [], []
        for t in TEXTS:  # unpadded, one at a time
            enc = model.tokenizer([t], return_tensors="pt")
            b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            ids = enc["input_ids"][0]
            ok = torch.tensor([int(i) not in special for i in ids])
            run = model.run(b, save=[(d.site, d.layer), (d.out_site, d.layer)], logits="all")
            x, y = run.acts[(d.site, d.layer)][0][ok], run.acts[(d.out_site, d.layer)][0][ok]
            ys.append(y)
            yh.append(d.reconstruct(x))
            acts.append(d.encode(x))
            out = model.run(b, logits="all", edits={(d.out_site, d.layer): torch.zeros_like})
            from factfind.features.splice import spliced_run
            sp = spliced_run(model, b, [d], error=False, logits="all")
            keep = ok[:-1] & ok[1:]
            for lg, bucket in ((run.logits, ce), (sp.logits, ce_sp), (out.logits, ce_z)):
                nll = F.cross_entropy(lg[0, :-1], ids[1:], reduction="none")
                bucket.append(nll[keep])
            p = F.log_softmax(run.logits[0], -1)
            for lg, bucket in ((sp.logits, kl_sp), (out.logits, kl_z)):
                q = F.log_softmax(lg[0], -1)
                bucket.append((p.exp() * (p - q)).sum(-1)[ok])
        y, y_hat, a = torch.cat(ys), torch.cat(yh), torch.cat(acts)
        ev = 1 - (y - y_hat).pow(2).sum(-1).mean() / (y - y.mean(0)).pow(2).sum(-1).mean()
        row = df.loc[d.name]
        assert row["tokens"] == len(y)
        assert row["explained_variance"] == pytest.approx(float(ev), abs=1e-4)
        assert row["l0"] == pytest.approx(float((a > 0).sum(-1).float().mean()), abs=1e-5)
        density = (a > 0).float().mean(0)
        assert row["dead_fraction"] == pytest.approx(float((density == 0).float().mean()))
        assert row["dense_fraction"] == pytest.approx(float((density > 0.2).float().mean()))
        c, s, z = (float(torch.cat(v).mean()) for v in (ce, ce_sp, ce_z))
        assert row["ce_clean"] == pytest.approx(c, abs=1e-4)
        assert row["ce_spliced"] == pytest.approx(s, abs=1e-4)
        assert row["ce_recovered"] == pytest.approx((z - s) / (z - c), abs=1e-3)
        ks, kz = float(torch.cat(kl_sp).mean()), float(torch.cat(kl_z).mean())
        assert row["kl_recovered"] == pytest.approx((kz - ks) / kz, abs=1e-3)
        assert row["mse"] > 0 and not math.isnan(row["ce_recovered"])
        assert row["component"] == str(d.site) and row["out_site"] == str(d.out_site)


def test_inputs_and_errors(gpt2_model, facts):
    d = Dictionary.random(d_in=gpt2_model.d_model, d_sae=16, k=2, layer=0, site="resid_post")
    with pytest.raises(EmptyInputError):
        evaluate_dictionaries(gpt2_model, d, ["  "], progress=False)
    with pytest.raises(ArgumentError, match="dense_threshold"):
        evaluate_dictionaries(gpt2_model, d, TEXTS, dense_threshold=1.5, progress=False)
    wide = Dictionary.random(d_in=gpt2_model.d_model + 1, d_sae=16, k=2, site="resid_post")
    with pytest.raises(ArgumentError, match="another model"):
        evaluate_dictionaries(gpt2_model, wide, TEXTS, progress=False)
    # facts, a token batch and a mapping give the same rows on the same tokens
    a = evaluate_dictionaries(gpt2_model, d, facts, downstream=False, progress=False)
    tb = gpt2_model.tokenize(list(facts))
    b = evaluate_dictionaries(gpt2_model, d, tb, downstream=False, progress=False)
    c = evaluate_dictionaries(gpt2_model, d, {"input_ids": tb.input_ids,
                                              "attention_mask": tb.attention_mask},
                              downstream=False, progress=False)
    for col in ("tokens", "explained_variance", "l0"):
        assert a[col].iloc[0] == pytest.approx(b[col].iloc[0]) == pytest.approx(c[col].iloc[0])
    assert a["tokens"].iloc[0] > 0
    assert "ce_recovered" not in a.columns or a["ce_recovered"].isna().all()
    # a Corpus (features.corpus) is read like its texts
    from factfind.features.corpus import Corpus

    e = evaluate_dictionaries(gpt2_model, d, Corpus(TEXTS), downstream=False, progress=False)
    f = evaluate_dictionaries(gpt2_model, d, TEXTS, downstream=False, progress=False)
    assert e["tokens"].iloc[0] == f["tokens"].iloc[0] > 0
    assert e["explained_variance"].iloc[0] == pytest.approx(f["explained_variance"].iloc[0])
    # padding and special tokens are never evaluated
    for t in token_batches(gpt2_model, TEXTS, batch_size=4):
        assert not t.valid[t.batch["attention_mask"] == 0].any()
    assert Component(d.site) is Component.RESID_POST


@pytest.mark.parametrize("bad", [0, -2, 2.5])
def test_sizes_are_refused_before_any_forward(gpt2_model, facts, bad):
    from factfind.features.dashboard import feature_dashboard
    from factfind.features.labels import attribute_features

    d = Dictionary.random(d_in=gpt2_model.d_model, d_sae=16, k=2, site="resid_post")
    for call in (lambda: evaluate_dictionaries(gpt2_model, d, TEXTS, batch_size=bad),
                 lambda: feature_dashboard(gpt2_model, d, 1, corpus=TEXTS, batch_size=bad),
                 lambda: attribute_features(gpt2_model, d, facts, attribute=facts[0].relation,
                                            batch_size=bad)):
        with pytest.raises(ArgumentError, match="batch_size"):
            call()


@pytest.mark.slow
def test_a_trained_organism_transcoder_recovers_the_loss(tmp_path):
    """A transcoder trained as a user would (train_dictionaries, 20k tokens of the organism's
    own fact sentences) keeps the model: measured EV 0.992, CE recovered 0.963, KL recovered
    0.981 on held-out sentences (L1, width 512, k=16, 1 thread)."""
    import random

    import factfind as ff
    from factfind.features.corpus import Corpus
    from factfind.features.training import train_dictionaries

    model, facts = ff.load_model("organism"), ff.load_facts("organism")
    rng = random.Random(0)
    by: dict = {}
    for p in facts:
        by.setdefault((p.subject, p.relation), []).append(p)
    texts = []
    for key in sorted(by):
        p = rng.choice(by[key])
        texts.append(p.template.format(p.subject) + " " + p.attribute + ".")
    train, held_out = Corpus(texts).split(0.05)
    ds = train_dictionaries(model, train, layers=[1], kind="transcoder", width=512, k=16,
                            tokens=20_000, cache_dir=tmp_path, progress=False)
    row = evaluate_dictionaries(model, ds, held_out, progress=False).iloc[0]
    assert row["dictionary"] == "L1.tc" and row["tokens"] > 3000
    assert row["explained_variance"] > 0.95
    assert row["ce_recovered"] > 0.9 and row["kl_recovered"] > 0.9
    assert row["l0"] <= 16 and row["dead_fraction"] < 0.8
