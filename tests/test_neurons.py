"""Fact Finding's neuron analyses: identities on tiny models, end to end on the organism."""

import numpy as np
import pandas as pd
import pytest
import torch

from factfind.attribute.atp import estimate
from factfind.attribute.neurons import (
    cross_relation_correlation,
    mlp_output_norms,
    neuron_dla,
    neuron_nonlinearity,
    neuron_sites,
    resample_neurons,
    swap_variants,
)
from factfind.attribute.verification import verify
from factfind.data import FactDataset, from_records
from factfind.localize.dla import direct_logit_attribution
from factfind.testing.models import tiny_model
from factfind.types import RESULT_COLUMNS, Component, Role, Site

COUNTRIES = ["Paris", "Japan", "Dublin", "Apple", "Antarctica", "Malmö"]


@pytest.fixture(scope="module")
def neox():
    return tiny_model("gpt_neox")


@pytest.fixture(scope="module")
def two_relations(facts):
    """The fixture subjects with a second relation (country) besides sport."""
    recs = [{"subject": f.subject, "relation": "country",
             "template": "Fact: {} lives in the country of", "attribute": COUNTRIES[i % 6]}
            for i, f in enumerate(facts)]
    return facts + from_records(recs)


def test_dla_at_final_equals_dla_module(neox, facts):
    pairs = facts.corrupt(neox, seed=0, on_missing="skip")
    ours = neuron_dla(neox, pairs, positions=[Role.FINAL], batch_size=4)
    ref = direct_logit_attribution(neox, pairs, sources=False)
    ref = pd.Series(ref[ref.component == "neurons"].groupby(["layer", "neuron"])["effect"]
                    .mean()).sort_index()
    mine = ours.set_index(["layer", "neuron"])["effect"].sort_index()
    assert np.abs(ref.to_numpy()).max() > 1e-2
    np.testing.assert_allclose(mine.to_numpy(), ref.to_numpy(), atol=1e-6)
    assert list(ours.columns[:len(RESULT_COLUMNS)]) == list(RESULT_COLUMNS)
    # without pairs: the attribute against the mean of the relation's other attributes
    alone = neuron_dla(neox, facts, positions=[Role.SUBJECT_LAST, Role.RELATION])
    assert set(alone["role"]) == {"subject_last", "relation"}
    assert np.abs(alone["effect"].to_numpy()).max() > 1e-3
    assert (alone["n"].to_numpy() == len(facts)).all()


def test_nonlinearity(neox, facts):
    quads = swap_variants(facts, samples=2, seed=0)
    assert len(quads) == 2 * len(facts)
    for _, (ab, a2b, ab2, a2b2) in quads:
        a, b = ab.subject.split(" ", 1)
        assert a2b.subject.endswith(" " + b) and not a2b.subject.startswith(a + " ")
        assert ab2.subject.startswith(a + " ") and not ab2.subject.endswith(" " + b)
        assert a2b2.subject == a2b.subject.split(" ")[0] + " " + ab2.subject.split(" ", 1)[1]
    sites = [Site(Component.NEURONS, 0, neuron=n, position=Role.SUBJECT_LAST) for n in range(4)]
    sites.append(Site(Component.NEURONS, 1, neuron=7, position=Role.SUBJECT_LAST))
    df = neuron_nonlinearity(neox, facts, sites, samples=2)
    # GPT-NeoX blocks are parallel: layer 0's MLP reads only its own token's embedding, so a
    # layer-0 neuron at the last subject token cannot see the first name: no interaction
    l0 = df[df.layer == 0]
    np.testing.assert_allclose(l0["act_AB"], l0["act_A'B"], atol=1e-6)
    np.testing.assert_allclose(l0["effect"], 0.0, atol=1e-6)
    l1 = df[df.layer == 1].iloc[0]
    assert abs(l1["effect"]) > 1e-4 and np.isfinite(l1["and_score"])
    assert l1["effect"] == pytest.approx(l1["act_AB"] - l1["act_A'B"] - l1["act_AB'"]
                                         + l1["act_A'B'"], abs=1e-5)
    assert (df["n"].to_numpy() == len(quads)).all()


def test_resample_neurons(neox, facts):
    data = facts.corrupt(neox, seed=0, on_missing="skip").clean[:6]
    sites = [Site(Component.NEURONS, 1, neuron=3, position=Role.SUBJECT_LAST),
             Site(Component.NEURONS, 0, neuron=5, position=Role.SUBJECT_LAST),
             Site(Component.NEURONS, 1, neuron=5, position=Role.FINAL)]
    df = resample_neurons(neox, data, sites, k=2, pool=facts)
    assert list(df["method"].unique()) == ["neurons/resample"] and len(df) == 3
    # the last layer away from the final token cannot reach the answer
    assert df.iloc[0]["effect"] == pytest.approx(0.0, abs=1e-6)
    assert df.iloc[1:]["effect"].abs().max() > 1e-4
    frame = pd.DataFrame({"component": ["neurons", "head_out"], "layer": [1, 0],
                          "neuron": [3, pd.NA], "role": ["final", "final"]})
    assert neuron_sites(frame) == [Site(Component.NEURONS, 1, neuron=3, position=Role.FINAL)]
    with pytest.raises(ValueError, match="single neuron"):
        neuron_sites([Site(Component.MLP_OUT, 0)])


def test_cross_relation_streams(neox, two_relations):
    df = cross_relation_correlation(neox, two_relations, subjects_per_chunk=3, layers=[0])
    by_neuron = df[df.method == "neurons/cross_relation/neuron"].set_index("neuron")["effect"]
    by_subject = df[df.method == "neurons/cross_relation/subject"].iloc[0]
    # in memory: every prompt at once, then per-subject means
    effects = {}
    for r in ("sport", "country"):
        pairs = two_relations.by_relation(r).corrupt(neox, seed=0, on_missing="skip")
        est = estimate(neox, pairs, positions=["subject_last"], layers=[0], per_prompt=True)
        assert est.per_prompt is not None
        frame = pd.DataFrame(est.per_prompt.numpy())
        frame["subject"] = [f.subject for f in pairs.clean]
        effects[r] = frame.groupby("subject").mean()
    common = effects["sport"].index.intersection(effects["country"].index)
    x, y = effects["sport"].loc[common].to_numpy(), effects["country"].loc[common].to_numpy()
    assert by_subject["n"] == len(common) >= 3
    want = [np.corrcoef(x[:, n], y[:, n])[0, 1] for n in range(x.shape[1])]
    np.testing.assert_allclose(by_neuron.sort_index().to_numpy(), want, atol=1e-4)
    per_subject = [np.corrcoef(x[s], y[s])[0, 1] for s in range(len(common))]
    assert by_subject["effect"] == pytest.approx(np.mean(per_subject), abs=1e-4)
    with pytest.raises(ValueError, match="two relations"):
        cross_relation_correlation(neox, two_relations.by_relation("sport"))


def test_mlp_output_norms(neox, facts):
    df = mlp_output_norms(neox, {"a": facts[:5], "b": facts[5:]}, batch_size=3)
    assert len(df) == 2 * neox.n_layers and set(df["group"]) == {"a", "b"}
    batch = neox.tokenize(list(facts[:5]))
    run = neox.run(batch, save=[(Component.MLP_OUT, 1)])
    pos = batch.positions[Role.SUBJECT_LAST]
    want = run.acts[(Component.MLP_OUT, 1)][torch.arange(5), pos].norm(dim=-1).mean()
    got = df[(df.group == "a") & (df.layer == 1)]["effect"].item()
    assert got == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        mlp_output_norms(neox, {"none": facts[:0]})


# ----------------------------------------------------------------------------- organism


@pytest.fixture(scope="module")
def organism():
    from factfind.organism import CHECKPOINT_DIR

    if not (CHECKPOINT_DIR / "model.safetensors").is_file():
        pytest.skip(f"the organism checkpoint is not built yet ({CHECKPOINT_DIR})")
    from factfind import load_facts, load_model

    model = load_model("organism")
    return model, load_facts


@pytest.mark.slow
def test_neuron_analyses_on_organism(organism):
    """Every analysis runs end to end on the organism and gives report-ready frames."""
    model, load_facts = organism
    sport = load_facts("organism:sport").sample(400, seed=0).known_by(model)[:48]
    pairs = sport.corrupt(model, seed=0, on_missing="skip")[:32]
    est = estimate(model, pairs, positions=["subject_last"]).frame
    top = est.nlargest(6, "score")
    resampled = resample_neurons(model, pairs.clean[:16], top, k=4, pool=sport)
    nonlin = neuron_nonlinearity(model, pairs.clean[:16], top, samples=2)
    both = load_facts("organism").sample(600, seed=1)
    both = both.filter(lambda f: f.relation in ("sport", "country"))
    corr = cross_relation_correlation(model, both, relations=["sport", "country"])
    unknown = load_facts("organism:sport", split="unknown")[:32]
    norms = mlp_output_norms(model, {"known": sport[:32], "unknown": unknown})
    dla = neuron_dla(model, pairs, positions=[Role.SUBJECT_LAST, Role.FINAL])
    for df in (resampled, nonlin, corr, norms, dla):
        assert list(df.columns[:len(RESULT_COLUMNS)]) == list(RESULT_COLUMNS)
        assert len(df) and np.isfinite(df["effect"].to_numpy(dtype=float)).any()
    assert len(resampled) == len(nonlin) == 6
    assert set(norms["group"]) == {"known", "unknown"}
    assert len(dla) == 2 * model.n_layers * model.d_mlp


def _z(norms: pd.DataFrame) -> pd.Series:
    """Known minus unknown mean norm in pooled standard errors, per (layer, role)."""
    se = (norms["ci_high"] - norms["ci_low"]) / (2 * 1.959964)
    w = norms.assign(se=se).pivot_table(index=["layer", "role"], columns="group",
                                        values=["effect", "se"])
    return pd.Series((w["effect"]["known"] - w["effect"]["unknown"])
                     / np.sqrt(w["se"]["known"] ** 2 + w["se"]["unknown"] ** 2))


@pytest.mark.slow
def test_neuron_findings_on_organism(organism):
    """What the analyses find on the organism, as properties with generic thresholds (the
    checkpoint is retrained): AtP*-verified neurons matter under resampling too; some neurons
    are ANDs of the two names beyond chance; the known-vs-unknown MLP norms are calibrated."""
    model, load_facts = organism
    known = load_facts("organism:sport").sample(800, seed=0).known_by(model)
    # resample ablation of the strongest verified neurons agrees with exact noising
    pairs = known.corrupt(model, seed=0, on_missing="skip")[:24]
    est = estimate(model, pairs, positions=["subject_first", "subject_last"], qk_fix=True,
                   grad_drop=True)
    ver = verify(model, pairs, est, top_k=10, patience=8)
    top = ver.frame.iloc[np.argsort(-ver.frame["effect"].abs().to_numpy())].head(10)
    res = resample_neurons(model, pairs.clean, top, k=8, pool=known)
    exact = top.set_index(["layer", "neuron", "role"])["effect"]
    resampled = res.set_index(["layer", "neuron", "role"])["effect"].loc[exact.index]
    assert np.mean(np.sign(exact.to_numpy()) == np.sign(resampled.to_numpy())) > 0.5  # chance
    assert np.any((res["ci_low"].to_numpy() > 0) | (res["ci_high"].to_numpy() < 0))
    # the AND test over every neuron at the last subject token
    sites = [Site(Component.NEURONS, layer, neuron=n, position=Role.SUBJECT_LAST)
             for layer in range(model.n_layers) for n in range(model.d_mlp)]
    nl = neuron_nonlinearity(model, known[:48], sites, samples=4)
    if getattr(model.hf.config, "use_parallel_residual", False):  # MLP 0 sees one token
        np.testing.assert_allclose(nl.loc[nl.layer == 0, "effect"], 0.0, atol=1e-5)
    later = pd.DataFrame(nl.loc[(nl["layer"] > 0).to_numpy()])
    act = {k: later[k].to_numpy(dtype=float) for k in ("act_AB", "act_A'B", "act_AB'", "act_A'B'")}
    full = act["act_AB"] - act["act_A'B'"]
    parts = (act["act_AB'"] - act["act_A'B'"]) + (act["act_A'B"] - act["act_A'B'"])
    superadditive = later["ci_low"].to_numpy(dtype=float) > 0  # interaction beyond its 95% CI
    assert np.all((full - parts)[superadditive] > 0)  # the full name > the sum of its parts
    assert superadditive.mean() > 2 * 0.025  # twice the rate a one-sided 95% CI gives by chance
    # known vs unknown subjects: how much the MLP at the subject writes, per layer and role
    unknown = load_facts("organism:sport", split="unknown").sample(540, seed=0)
    wrong = (unknown.attribute_scores(model)["rank"] != 1).tolist()
    unknown = FactDataset([f for f, w in zip(unknown, wrong, strict=True) if w])[:384]
    norms = mlp_output_norms(model, {"known": known[:384], "unknown": unknown},
                             positions=["subject_first", "subject_last"])
    assert len(unknown) >= 256
    z = _z(norms)
    assert len(z) == model.n_layers * 2 and np.isfinite(z.to_numpy()).all()
    # Calibration: two halves of the same known population differ by no more than chance. (On
    # the shipped organism, known vs unknown differs at some (layer, role) by 2-5 standard
    # errors depending on the sample, with signs that flip between samples: not a stable
    # finding to assert, so the report shows it with its interval.)
    halves = mlp_output_norms(model, {"known": known[:384:2], "unknown": known[1:384:2]},
                              positions=["subject_first", "subject_last"])
    assert _z(halves).abs().max() < 3.5


def test_resample_partners_equal_pairing_the_whole_pool(facts):
    """Resample partners come from pairing only the measured prompts against the pool: the
    same partners as pairing the whole pool and keeping its first prompts (the old way)."""
    from factfind.data.pairs import FALLBACKS
    from factfind.localize.ablation import _partners
    from factfind.testing import tiny_model

    model = tiny_model("llama", n_layers=2)
    some, reference = facts[:4], facts[4:]
    new = _partners(model, some, reference, 3, 0)
    old = [(some + reference).corrupt(model, seed=r, on_missing="skip",
                                      fallback=FALLBACKS)[:len(some)] for r in range(3)]
    key = (lambda p: [(c.subject, x.subject, x.attribute)
                      for c, x in zip(p.clean, p.corrupt, strict=True)])
    assert [key(p) for p in new] == [key(p) for p in old]
    assert any(c != x for p in new for c, x, _ in key(p))
