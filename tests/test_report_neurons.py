"""The neuron report sections: a verification survives its cached frame, and every section
renders from real (tiny-model) frames."""

import numpy as np
import pandas as pd
import pytest

from factfind import report as rp
from factfind.attribute.atp import estimate
from factfind.attribute.neurons import (
    mlp_output_norms,
    neuron_dla,
    neuron_nonlinearity,
    resample_neurons,
)
from factfind.attribute.verification import missed_effect_bound, verify
from factfind.report import neurons as rn
from factfind.testing.models import tiny_model


@pytest.fixture(scope="module")
def searched(facts):
    """A tiny GPT-NeoX, its pairs, and verified AtP* searches over neurons and heads."""
    neox = tiny_model("gpt_neox")
    pairs = facts.corrupt(neox, seed=0, on_missing="skip")
    est = estimate(neox, pairs, components=["neurons"], positions=["subject_last", "final"],
                   layers=[0, 1], qk_fix=True, grad_drop=True)
    ver = verify(neox, pairs, est, top_k=3, patience=4)
    heads = verify(neox, pairs, estimate(neox, pairs, components=["head_out", "q", "k"],
                                         positions=["final"], qk_fix=True, grad_drop=True),
                   top_k=2, patience=2)
    return neox, pairs, ver, heads


def test_cached_candidates_give_back_the_verification(searched, tmp_path):
    neox, pairs, ver, _ = searched
    cands = rn.verified_candidates(ver, search="neurons")
    assert len(cands) == len(ver.candidates) and cands["verified"].sum() == ver.n_verified
    path = tmp_path / "cands.parquet"
    cands.to_parquet(path)  # as the analysis caches it
    again = rn.verification_of(pd.read_parquet(path))
    assert (again.n_verified, again.stopped, again.threshold) == (
        ver.n_verified, ver.stopped, pytest.approx(ver.threshold))
    assert np.abs(ver.frame["effect"].to_numpy()).max() > 1e-4
    np.testing.assert_allclose(again.frame["effect"].to_numpy(), ver.frame["effect"].to_numpy())
    np.testing.assert_allclose(again.frame["estimate"].to_numpy(),
                               ver.frame["estimate"].to_numpy())
    # the bound computed from the cached frame is the bound of the original
    a = missed_effect_bound(neox, pairs, ver, subset_size=8, max_nodes=64).buckets
    b = missed_effect_bound(neox, pairs, again, subset_size=8, max_nodes=64).buckets
    assert np.nanmax(a["effect"].to_numpy(dtype=float)) > 0
    np.testing.assert_allclose(a["effect"].to_numpy(), b["effect"].to_numpy())
    with pytest.raises(ValueError, match="one search"):
        rn.verification_of(pd.concat([cands, cands.assign(search="other")]))


def test_every_section_renders(facts, searched):
    neox, pairs, ver, heads = searched
    cands = pd.concat([rn.verified_candidates(ver, search="neurons"),
                       rn.verified_candidates(heads, search="heads")], ignore_index=True)
    bound = missed_effect_bound(neox, pairs, ver, subset_size=8, max_nodes=64).buckets
    top = ver.frame[ver.frame["component"] == "neurons"].head(3)
    frames = {
        "atp": cands, "bound": bound.assign(search="neurons"),
        "resample": resample_neurons(neox, pairs.clean[:6], top, k=2, pool=facts),
        "and": neuron_nonlinearity(neox, facts, top, samples=2),
        "norms": mlp_output_norms(neox, {"known": facts[:6], "unknown": facts[6:]},
                                  positions=["subject_last", "final"]),
        "dla": neuron_dla(neox, pairs, positions=["subject_last", "final"]),
    }
    sections = rn.neuron_sections(frames)
    ids = [s.id for s in sections]
    assert ids == ["atp-star", "neuron-resample", "neuron-and", "mlp-norms", "neuron-dla"]
    for s in sections:
        assert s.explanation and (s.figures or s.tables)
    assert len(sections[0].figures) == 3  # scatter, then a bar chart per search
    assert len(sections[3].figures) == 2  # known - unknown, and both groups' norms
    atp = sections[0]
    assert atp.facts["neurons: verified"] == ver.n_verified
    assert atp.facts["heads: verified"] == heads.n_verified
    neurons, shown = (t.data for t in atp.tables[:2])  # one table per search
    assert set(neurons["component"]) == {"neurons"} and len(neurons) == ver.n_verified
    assert len(shown) == heads.n_verified and "neurons" not in set(shown["component"])
    for comp, site, layer, head in zip(shown["component"], shown["site"], shown["layer"],
                                       shown["head"], strict=True):
        want = {"q": f"L{layer}.h{head}.q@final", "k": f"L{layer}.h{head}.k@final",
                "head_out": f"L{layer}.h{head}@final"}[comp]
        assert site == want, (comp, site)
    html = rp.render_report(rp.ReportData(title="neurons", sections=sections))
    for i in ids:
        assert f'id="{i}"' in html
    assert html.count("<svg") >= sum(len(s.figures) for s in sections)
    # an empty frame (no two-word subjects for the AND test) leaves its section out
    no_and = rn.neuron_sections(dict(frames, **{"and": pd.DataFrame()}))
    assert "neuron-and" not in [s.id for s in no_and] and len(no_and) == 4


def test_scatter_plot():
    df = pd.DataFrame({"x": [0.0, 1.0, -2.0], "y": [0.1, 0.9, np.nan], "g": ["a", "b", "a"]})
    fig = rp.scatter_plot(df, x="x", y="y", hue="g", caption="c")
    assert fig.svg is not None and fig.svg.count("<path") > 2 and fig.caption == "c"
    with pytest.raises(ValueError, match="no rows"):
        rp.scatter_plot(df.assign(y=np.nan), x="x", y="y")
