"""Feature circuits at the dataset level (issue 24, Build 4, 5, 6): interventions, aggregation
and stability, and the bases side by side (features with and without error nodes, neurons,
heads/MLPs).

The planted truth: the planted circuit (factfind.testing.planted) read through planted SAEs
whose features are its own variables (factfind.testing.planted_features): the sport features
at the last subject token (L1) and the answer features at the final token (L2) carry the
attribute; every other feature changes between clean and corrupt prompts but is read by
nothing on the answer path. So swapping the attributed features must flip every answer, and
random features must flip none; the top-8 nodes of the aggregate are the 8 planted ones in
every half of the pairs. The basis engine is checked against the house's engine (the same
full and empty metric), against a literal spliced run (one feature ablated), and at the full
budget (F = 1 exactly; the features without error nodes fall short of 1 there).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import factfind as ff
from factfind.errors import ArgumentError, EmptyInputError, NotFoundError
from factfind.evaluate.bases import (
    BASES,
    _dict_means,
    basis_circuit,
    basis_comparison,
    basis_figure,
    basis_scores,
    evaluate_feature_circuits,
    feature_universe,
)
from factfind.features import Dictionaries, Dictionary, spliced_run
from factfind.features.circuits import aggregate_circuit, circuit_stability, jaccard, top_nodes
from factfind.features.interventions import feature_interventions
from factfind.testing.models import tiny_model
from factfind.testing.planted_features import (
    SPORT_FEATURES,
    planted_dictionaries,
    planted_feature_truth,
)
from factfind.types import ROLE_NAMES, Role


@pytest.fixture(scope="module")
def planted_setup(planted):
    dicts = planted_dictionaries(planted.model)
    est = ff.feature_atp(planted.model, planted.pairs, dicts, roles=["subject_last", "final"],
                         progress=False)
    return planted.model, planted.pairs, dicts, est


def _transcoders(model, *, d_sae=48, k=6) -> Dictionaries:
    return Dictionaries([Dictionary.random(kind="transcoder", activation="topk", layer=i,
                                           d_in=model.d_model, d_sae=d_sae, k=k, seed=i)
                         for i in range(model.n_layers)])


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, facts):
    torch.manual_seed(0)
    model = tiny_model(request.param)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    return model, pairs, _transcoders(model)


# ----------------------------------------------------------------------------- interventions


def test_swapping_the_planted_features_flips_every_answer_and_random_ones_none(planted_setup):
    model, pairs, dicts, est = planted_setup
    df = feature_interventions(model, pairs, dicts, est, top=4, scales=(1.0, 2.0),
                               progress=False)
    assert set(df["role"]) == {"subject_last", "final"}
    assert len(df) == 2 * 2 * 2  # roles x scales x (attributed, random)
    truth = planted_feature_truth(dicts)
    for row in df.to_dict("records"):
        assert row["n"] == len(pairs) and row["n_features"] == 4
        assert row["base_rate"] == 0.0 and row["source_rate"] == 1.0
        assert row["n_known"] == len(pairs) and row["success_known"] == row["success_rate"]
        if row["selection"] == "attributed":
            assert set(row["nodes"].split(";")) == set(truth[row["role"]])
            assert row["success_rate"] == 1.0, row
            assert row["success_low"] > 0.75  # Wilson interval of 16 of 16
            # the swap moves the logit difference by as much as running the corrupt prompt
            np.testing.assert_allclose(row["fraction"], row["scale"], rtol=1e-4)
        else:
            assert not set(row["nodes"].split(";")) & set(truth[row["role"]])
            assert row["success_rate"] == 0.0, row
            assert abs(row["effect"]) < 1e-4
            assert row["success_high"] < 0.25


def test_interventions_by_node_ids_and_per_prompt_rows(planted_setup):
    model, pairs, dicts, _ = planted_setup
    look = dicts.at(1)
    names = [look.feature_id(f, "subject_last") for f in range(4, 12)]  # name features
    sport = planted_feature_truth(dicts)["subject_last"]
    rows = feature_interventions(model, pairs, dicts, sport + names[:0], scales=[1.0],
                                 control=False, per_prompt=True, progress=False)
    assert len(rows) == len(pairs) and rows["success"].all()
    names_only = feature_interventions(model, pairs, dicts, names, scales=[1.0], control=False,
                                       progress=False)
    assert names_only["success_rate"].iloc[0] == 0.0  # active, changed, but read by nothing
    # one sport feature alone: only the pairs whose clean or corrupt sport it is move
    one = feature_interventions(model, pairs, dicts, [sport[0]], scales=[1.0], control=False,
                                per_prompt=True, progress=False)
    moved = one["effect"].abs() > 1e-3
    assert 0 < moved.sum() < len(pairs)


def test_stacked_interventions_equal_a_literal_spliced_run(tiny):
    """The stacked run == a spliced run with edit_features (error kept) clamping the features
    to clean + k (corrupt - clean), on a non-linear model, sets spanning both layers."""
    model, pairs, dicts = tiny
    est = ff.feature_atp(model, pairs, dicts, roles=["subject_last", "final"], progress=False)
    feats_only = est[est["feature"].notna()]
    ids = [n for (_, _), part in feats_only.groupby(["role", "dictionary"])
           for n in part.nlargest(2, "score")["node"]]  # two per layer and role
    df = feature_interventions(model, pairs, dicts, ids, scales=(2.0,), control=False,
                               per_prompt=True, progress=False)
    pb = ff.encode_pairs(model, pairs)
    base = pb.measure(model.run(pb.clean).logits).double().numpy()
    for role, part in df.groupby("role"):
        ids = part["nodes"].iloc[0].split(";")
        assert len({i.split(".f")[0] for i in ids}) == 2  # the set spans both layers
        feats: dict[str, list[int]] = {}
        for i in ids:
            name, f = i.split("@")[0].rsplit(".f", 1)
            feats.setdefault(name, []).append(int(f))
        src: dict[str, torch.Tensor] = {}
        clean: dict[str, torch.Tensor] = {}
        spliced_run(model, pb.corrupt, dicts, capture=src)
        spliced_run(model, pb.clean, dicts, capture=clean)
        mask = pb.clean.position_mask(Role(role)).bool()[..., None]

        def edit(a, idx, c, s, mask):
            out = a.clone()
            # clamped to the unpatched runs' values (not what an upstream edit makes)
            moved = c[..., idx] + 2.0 * (s[..., idx] - c[..., idx])
            out[..., idx] = torch.where(mask, moved, a[..., idx])
            return out

        ref = spliced_run(model, pb.clean, dicts, edit_features={
            n: (lambda a, i=i, c=clean[n], s=src[n], m=mask: edit(a, i, c, s, m))
            for n, i in feats.items()})
        want = pb.measure(ref.logits).double().numpy() - base
        got = part.sort_values("prompt")["effect"].to_numpy()
        assert np.abs(want).max() > 1e-3  # the edit does something
        np.testing.assert_allclose(got, want[part.sort_values("prompt")["prompt"].to_numpy()],
                                   rtol=1e-4, atol=1e-5)


def test_per_prompt_rows_give_the_rates(tiny):
    model, pairs, dicts = tiny
    est = ff.feature_atp(model, pairs, dicts, progress=False)
    agg = feature_interventions(model, pairs, dicts, est, top=5, progress=False)
    rows = feature_interventions(model, pairs, dicts, est, top=5, per_prompt=True,
                                 progress=False)
    for key, part in rows.groupby(["role", "scale", "selection"]):
        row = agg.set_index(["role", "scale", "selection"]).loc[key]
        assert row["success_rate"] == pytest.approx(part["success"].mean())
        assert row["effect"] == pytest.approx(part["effect"].mean())
        assert row["n"] == len(part)
        known = part[part["source_hit"]]
        assert row["n_known"] == len(known)
        if len(known):
            assert row["success_known"] == pytest.approx(known["success"].mean())
        assert row["success_low"] <= row["success_rate"] <= row["success_high"]


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_equals_the_attribution_frame_and_groups(planted_setup):
    model, pairs, dicts, est = planted_setup
    rows = ff.feature_atp(model, pairs, dicts, roles=["subject_last", "final"],
                          per_prompt=True, progress=False)
    groups = ["a" if i % 2 else "b" for i in range(len(pairs))]
    agg = aggregate_circuit(rows, groups=groups)
    assert set(agg["group"]) == {"all", "a", "b"}
    every = agg[agg["group"] == "all"].merge(est, on="node", suffixes=("", "_est"))
    assert len(every) == len(est)
    np.testing.assert_allclose(every["effect"], every["effect_est"], rtol=1e-9, atol=1e-12)
    assert (every["n"] == every["n_est"]).all()
    # P = R = 1 at the feature level: the top 8 nodes are the planted carriers
    truth = {n for ids in planted_feature_truth(dicts).values() for n in ids}
    assert set(top_nodes(agg[agg["group"] == "all"], 8)) == truth
    assert (agg[agg["group"] == "a"]["n"] == len(pairs) // 2).all()


def test_stability_of_identical_halves_is_one(planted_setup):
    model, pairs, dicts, _ = planted_setup
    rows = ff.feature_atp(model, pairs, dicts, roles=["subject_last", "final"],
                          per_prompt=True, progress=False)
    one = rows[rows["prompt"] == 3]
    same = pd.concat([one.assign(prompt=p) for p in range(8)], ignore_index=True)
    st = circuit_stability(same, k=(1, 5, 50), splits=5)
    assert (st["effect"] == 1.0).all() and (st["jaccard_min"] == 1.0).all()
    halves = circuit_stability(rows, k=(10, 50), halves=(range(8), range(8)))
    assert (halves["effect"] == 1.0).all()
    assert jaccard(["a", "b"], ["b", "c"]) == pytest.approx(1 / 3)


def test_stability_of_the_planted_circuit_is_high_and_not_everywhere(planted_setup):
    model, pairs, dicts, _ = planted_setup
    rows = ff.feature_atp(model, pairs, dicts, roles=["subject_last", "final"],
                          per_prompt=True, progress=False)
    st = circuit_stability(rows, k=(4, 8, 50), splits=20, seed=0).set_index("k")
    assert st.loc[8, "effect"] == 1.0  # the 8 planted carriers top every half
    assert st.loc[50, "effect"] > 0.9
    # at k = 4 the halves disagree on which four sports rank first: a sample property
    assert st.loc[4, "effect"] < 0.9
    assert st.loc[8, "n"] == 20 and st.loc[8, "n_prompts"] == 8


def test_fast_stability_equals_the_pandas_reference(tiny):
    model, pairs, dicts = tiny
    rows = ff.feature_atp(model, pairs, dicts, per_prompt=True, progress=False)
    fast = circuit_stability(rows, k=(1, 5, 20, 80), splits=6, seed=3)
    ref = circuit_stability(rows, k=(1, 5, 20, 80), splits=6, seed=3, reference=True)
    cols = ["effect", "jaccard_first", "jaccard_min", "jaccard_max"]
    np.testing.assert_allclose(fast[cols].to_numpy(float), ref[cols].to_numpy(float))
    assert (ref["effect"] > 0).all() and (ref["effect"] < 1).any()  # not trivially 0 or 1


def test_stability_works_on_head_and_neuron_frames(planted):
    rows = ff.atp(planted.model, planted.pairs, components=["head_out", "mlp_out"],
                  per_prompt=True, progress=False)
    agg = aggregate_circuit(rows)
    assert set(top_nodes(agg, 3)) == set(planted.truth.nodes)
    st = circuit_stability(rows, k=(3,), splits=10)
    assert st["effect"].iloc[0] == 1.0


# ----------------------------------------------------------------------------- three bases


def test_feature_engine_agrees_with_the_house_engine_and_is_exact_at_full(tiny):
    model, pairs, dicts = tiny
    for how in ("mean", "resample"):
        full_ids = [f"L{layer}.attn@all" for layer in range(model.n_layers)]
        full_ids += [d.feature_id(f) for d in dicts.values() for f in range(d.d_sae)]
        full_ids += [d.error_id() for d in dicts.values()]
        no_err = [i for i in full_ids if ".err@" not in i]
        res = evaluate_feature_circuits(model, pairs, dicts, [full_ids, no_err], how=how,
                                        progress=False)
        house = ff.evaluate_circuits(model, pairs, [["L0.h0@final"]], how=how)
        assert res["full"].iloc[0] == pytest.approx(house["full"].iloc[0], abs=1e-5)
        assert res["empty"].iloc[0] == pytest.approx(house["empty"].iloc[0], abs=1e-5)
        assert res["faithfulness"].iloc[0] == pytest.approx(1.0, abs=1e-5)
        # the random dictionaries explain little: dropping their error nodes costs
        assert abs(res["faithfulness"].iloc[1] - 1.0) > 0.05
        roles = ff.encode_pairs(model, pairs).clean.roles_present()
        assert res["n_nodes"].iloc[0] == feature_universe(model, dicts, roles)


def test_feature_engine_equals_a_spliced_run_with_one_dictionary_ablated(tiny):
    """Everything kept except L1's features at the final token, which take their mean: the
    engine's metric equals a spliced run whose L1 features are set to the mean there."""
    model, pairs, dicts = tiny
    d = dicts.at(1)
    kept = [f"L{layer}.attn@all" for layer in range(model.n_layers)]
    kept += [x.feature_id(f) for x in dicts.values() for f in range(x.d_sae) if x is not d]
    kept += [d.feature_id(f, r) for f in range(d.d_sae) for r in ROLE_NAMES if r != "final"]
    kept += [x.error_id() for x in dicts.values()]
    res = evaluate_feature_circuits(model, pairs, dicts, [kept], how="mean", progress=False)
    mean_a, _ = _dict_means(model, Dictionaries([d]), pairs.clean, 16)[d.name]
    pb = ff.encode_pairs(model, pairs)
    final = pb.clean.position_mask(Role.FINAL).bool()[..., None]
    fin = ROLE_NAMES.index("final")
    ref = spliced_run(model, pb.clean, dicts, edit_features={
        d.name: lambda a: torch.where(final, mean_a[fin].to(a.dtype), a)})
    want = float(pb.measure(ref.logits).double().mean())
    assert res["metric"].iloc[0] == pytest.approx(want, abs=1e-5)
    assert abs(want - res["full"].iloc[0]) > 1e-3  # the ablation does something


def test_basis_table_shape_full_budget_and_figure(tiny):
    model, pairs, dicts = tiny
    table = basis_comparison(model, pairs, dicts, budgets=(5, 20, None),
                             hows=("mean", "resample"), neuron_method="atp", progress=False)
    assert len(table) == len(BASES) * 3 * 2
    assert list(table.columns[:6]) == ["basis", "budget", "how", "n_nodes", "fraction",
                                       "faithfulness"]
    for (_how, budget), part in table.groupby(["how", "budget"], dropna=False):
        assert set(part["basis"]) == set(BASES)
        assert part["full"].nunique() == 1 or np.ptp(part["full"]) < 1e-5
        if pd.isna(budget):
            mask = (part["basis"] == "features_no_errors").to_numpy()
            whole = part["faithfulness"].to_numpy(dtype=float)
            np.testing.assert_allclose(whole[~mask], 1.0, atol=1e-5)
            np.testing.assert_allclose(part["fraction"], 1.0)
            # every head and feature but no error node: what the random features carry
            assert mask.sum() == 1 and abs(float(whole[mask][0]) - 1.0) > 0.05
        else:
            assert (part["n_nodes"] <= budget).all() and (part["n_nodes"] > 0).all()
    feats = table[(table["basis"] == "features") & table["budget"].notna()]
    assert (feats["n_heads"] + feats["n_units"] + feats["n_errors"] <= feats["n_nodes"]).all()
    assert (table["n_errors"].to_numpy()[(table["basis"] == "features_no_errors")
                                         .to_numpy()] == 0).all()
    fig = basis_figure(table, labels={"features_no_errors": "features, no error nodes"})
    assert len(fig.axes) == 2
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [
        "features", "features, no error nodes", "neurons", "heads_mlps"]
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert styles["features, no error nodes"] == "--" and styles["features"] == "-"


def test_the_no_error_basis_is_the_feature_ranking_without_its_error_nodes(tiny):
    """basis_circuit skips the error nodes of the features' ranking and fills the budget from
    further down it; the other bases read their own ranking."""
    model, pairs, dicts = tiny
    scores = basis_scores(model, pairs, dicts, neuron_method="atp", progress=False)
    feats = pd.DataFrame(scores[(scores["basis"] == "features").to_numpy()]).sort_values(
        by=["score", "node"], ascending=[False, True], kind="stable")["node"].tolist()
    errors = [n for n in feats if ".err@" in n]
    assert errors and feats.index(errors[0]) < 20  # the filter matters at 20 nodes
    for budget in (1, 5, 20, 10**6):
        got = basis_circuit(scores, "features_no_errors", budget)
        assert got == [n for n in feats if ".err@" not in n][:budget]
        assert basis_circuit(scores, "features", budget) == feats[:budget]
    assert basis_circuit(scores, "features_no_errors", None) is None
    with pytest.raises(ArgumentError, match="basis must be one of"):
        basis_circuit(scores, "feature", 5)


# ----------------------------------------------------------------------------- errors


def test_bad_input_is_a_typed_one_line_error(planted_setup, tiny):
    model, pairs, dicts, est = planted_setup
    other = Dictionary.random(kind="transcoder", activation="topk", layer=1, d_in=32, d_sae=16,
                              k=2)
    cases = [
        (ArgumentError, lambda: feature_interventions(model, pairs, [other], est,
                                                      progress=False)),
        (NotFoundError, lambda: feature_interventions(model, pairs, dicts,
                                                      ["L1.res.f999@final"], progress=False)),
        (NotFoundError, lambda: feature_interventions(model, pairs, dicts,
                                                      ["L0.tc.f1@final"], progress=False)),
        (ArgumentError, lambda: feature_interventions(model, pairs, dicts, ["L1.res.err@final"],
                                                      progress=False)),
        (ArgumentError, lambda: feature_interventions(model, pairs, dicts, ["L1.h0@final"],
                                                      progress=False)),
        (ArgumentError, lambda: feature_interventions(model, pairs, dicts, [], progress=False)),
        (ArgumentError, lambda: feature_interventions(model, pairs.clean, dicts, est,
                                                      progress=False)),
        (ArgumentError, lambda: feature_interventions(model, pairs, dicts, est, scales=[0.0],
                                                      progress=False)),
        (EmptyInputError, lambda: feature_interventions(model, pairs, dicts, est,
                                                        roles=["relation"], progress=False)),
        (ArgumentError, lambda: circuit_stability(est)),
        (ArgumentError, lambda: aggregate_circuit(pd.DataFrame({"x": [1]}))),
    ]
    one = ff.feature_atp(model, pairs[:1], dicts, per_prompt=True, progress=False)
    cases.append((ArgumentError, lambda: circuit_stability(one)))
    tmodel, tpairs, tdicts = tiny
    sae = Dictionary.random(kind="sae", activation="topk", layer=0, site="resid_post",
                            d_in=tmodel.d_model, d_sae=16, k=2)
    wide = Dictionary.random(kind="transcoder", activation="topk", layer=0,
                             d_in=tmodel.d_model + 16, d_sae=16, k=2)
    cases += [
        (ArgumentError, lambda: basis_comparison(tmodel, tpairs, [sae], progress=False)),
        (ArgumentError, lambda: evaluate_feature_circuits(tmodel, tpairs, [wide],
                                                          [["L0.h0@final"]], progress=False)),
        (ArgumentError, lambda: evaluate_feature_circuits(
            tmodel, tpairs, [tdicts.at(0), Dictionary.random(
                kind="sae", activation="topk", layer=0, site="mlp_out", d_in=tmodel.d_model,
                d_sae=8, k=2)], [["L0.h0@final"]], progress=False)),
        (ArgumentError, lambda: evaluate_feature_circuits(tmodel, tpairs, tdicts,
                                                          [["L1.mlp@final"]], progress=False)),
        (NotFoundError, lambda: evaluate_feature_circuits(tmodel, tpairs, tdicts,
                                                          [["L1.tc.f4800@final"]],
                                                          progress=False)),
        (ArgumentError, lambda: evaluate_feature_circuits(tmodel, tpairs, tdicts, [],
                                                          progress=False)),
        (ArgumentError, lambda: evaluate_feature_circuits(tmodel, tpairs.clean, tdicts,
                                                          [["L0.h0@final"]], progress=False)),
        (ArgumentError, lambda: basis_comparison(tmodel, tpairs, tdicts, budgets=[0],
                                                 progress=False)),
    ]
    for err, call in cases:
        with pytest.raises(err) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)
    assert SPORT_FEATURES  # the planted sport features exist
