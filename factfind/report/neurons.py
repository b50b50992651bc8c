"""Report sections for neuron-level attribution: AtP* with exact verification, and Fact
Finding's neuron analyses (:mod:`factfind.attribute.atp`, :mod:`factfind.attribute.verification`,
:mod:`factfind.attribute.neurons`).

Each builder takes the tidy frames those modules return and gives a
:class:`~factfind.report.Section` with a one-paragraph explanation of the method and of how
its numbers are defined, figures drawn by :mod:`factfind.report` and sortable tables:

* :func:`atp_section` - AtP* candidates verified by exact patching: estimate against exact
  effect, the strongest verified nodes, the stopping rule and the subsampling bound;
* :func:`resample_section` - resample ablation of single neurons against other subjects;
* :func:`and_section` - the nonlinearity (AND) test of neurons at the last subject token;
* :func:`mlp_norms_section` - MLP output norms for known against unknown subjects;
* :func:`neuron_dla_section` - each neuron's direct logit attribution to the attribute;

and :func:`neuron_sections` all of them from a dict of those frames.

:func:`verified_candidates` turns a :class:`~factfind.attribute.verification.Verification` into the
one frame :func:`atp_section` reads (and an analysis caches).

Example::

    ver = verify(model, pairs, atp_star(model, pairs, positions=["subject_last"]), top_k=20)
    sections = [atp_section(verified_candidates(ver, search="neurons"))]
    write_report(ReportData(title="Neurons", sections=sections), "reports/neurons.html")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from factfind.errors import ArgumentError
from factfind.report.document import Section, Table
from factfind.report.figures import bar_plot, line_plot, scatter_plot
from factfind.report.tables import site_label, top_units

if TYPE_CHECKING:
    from factfind.attribute.verification import Verification

EXPLAIN_ATP = (
    "Attribution patching (AtP; Nanda 2023, Syed et al. 2023) estimates the effect of patching "
    "every node at once - every MLP neuron at the subject tokens, every attention head's output, "
    "query, key and value at each token role - as (corrupt activation - clean activation) times "
    "the gradient of the logit difference, from two forward passes and one backward pass. AtP* "
    "(Kramár et al. 2024) fixes its two failure modes: the attention softmax of a patched query "
    "or key is recomputed exactly (QK fix), and GradDrop reruns the backward pass with each "
    "layer's gradient blocked, so that effects cancelling across paths still get a high score. "
    "Candidates are then patched exactly (noising: the corrupt subject's activation in the clean "
    "run) in order of score until a top-k stopping rule fires: the search stops once 'patience' "
    "candidates in a row fail to enter the current top k. Effects are changes of the logit "
    "difference (negative: the fact needs the node). The bound is AtP*'s subsampling diagnostic: "
    "unverified candidates are patched in random subsets, and under the assumption that effects "
    "inside a subset do not cancel, no unverified node in a rank bucket has an effect larger than "
    "the bucket's bound."
)
EXPLAIN_RESAMPLE = (
    "Resample ablation (Fact Finding, post 3): each of the strongest verified neurons alone takes "
    "its activation from K other subjects of the same relation and token length (with another "
    "attribute), averaged over the K; the effect is the change of the logit difference between "
    "the attribute and the relation's other attributes. Unlike noising with one corrupt partner, "
    "this asks how much the fact depends on the neuron's value for this subject compared with a "
    "typical other subject. Negative: the neuron helps recall the fact."
)
EXPLAIN_AND = (
    "Is a neuron an AND of the subject's tokens (single-step detokenization, Fact Finding post 3)? "
    "Its activation at the last subject token is read on the real name (AB), with the first name "
    "swapped for another subject's (A'B), the last name swapped (AB') and both swapped (A'B'). The "
    "interaction f(AB) - f(A'B) - f(AB') + f(A'B') is zero for a neuron additive in the two names; "
    "it is positive when the full name moves the neuron more than the sum of its parts, "
    "f(AB) - f(A'B') > [f(AB') - f(A'B')] + [f(A'B) - f(A'B')]. The AND score divides the "
    "interaction by f(AB) - f(A'B'): 1 for a pure AND, 0 for an additive neuron, negative for an "
    "OR. Neurons tested: per layer, those at the last subject token with the largest AtP* score. "
    "In a parallel-residual block (GPT-NeoX) the first layer's MLP sees only its own token, so its "
    "interaction is exactly zero."
)
EXPLAIN_NORMS = (
    "Does the MLP write more for subjects the model knows? The L2 norm of each layer's MLP output "
    "at a token role, averaged over prompts about known subjects (facts the model gets right) and "
    "unknown ones (subjects it has no fact for, or gets wrong), with 95% intervals. Fact Finding "
    "found the subject-token MLP outputs of early-middle layers larger for known names - the trace "
    "of a lookup that only fires for names it has stored."
)
EXPLAIN_DLA = (
    "Direct logit attribution of single neurons: a neuron's activation times its output weight, "
    "through the final layer norm (scale frozen at the run's value), onto the unembedding "
    "difference between the correct and the counterfactual attribute. At the final token this is "
    "the neuron's direct contribution to the logit difference; at the last subject token it asks "
    "whether the neuron's output already points at the answer before attention moves it to the "
    "final token. Means over prompts with 95% intervals."
)

#: columns of :func:`verified_candidates` that describe the exact patch of a verified node
EXACT_COLUMNS = ("exact", "exact_ci_low", "exact_ci_high", "exact_n")


def verified_candidates(ver: Verification, *, search: str) -> pd.DataFrame:
    """Every candidate of a verification in rank order, with its AtP* ``effect``, ``score``,
    ``rank`` and ``verified``, the exact effect of the verified ones (``exact`` with
    ``exact_ci_low``, ``exact_ci_high``, ``exact_n``; NaN where not patched), and the search's
    name, stopping reason and final threshold (``search``, ``stopped``, ``theta``)."""
    names = dict(zip(["effect", "ci_low", "ci_high", "n"], EXACT_COLUMNS, strict=True))
    exact = pd.DataFrame(ver.frame[["rank", *names]]).rename(columns=names)
    out = ver.candidates.merge(exact, on="rank", how="left")
    return out.assign(search=search, stopped=ver.stopped, theta=ver.threshold)


def verification_of(candidates: pd.DataFrame) -> Verification:
    """The :class:`~factfind.attribute.verification.Verification` that :func:`verified_candidates`
    (one search) was made from, e.g. to bound what it missed after a cached run."""
    from factfind.attribute.verification import Verification

    if len(set(candidates["search"].tolist())) != 1:
        raise ArgumentError("pass the candidates of one search")
    cand = candidates.sort_values("rank").reset_index(drop=True)
    done = cand.loc[cand["verified"].to_numpy(dtype=bool)].copy()
    done["estimate"] = done["effect"]
    for col, src in zip(("effect", "ci_low", "ci_high", "n"), EXACT_COLUMNS, strict=True):
        done[col] = done[src]
    done["method"] = "exact"
    direction = str(cand["direction"].iloc[0]) if "direction" in cand.columns else "noise"
    return Verification(done.drop(columns=list(EXACT_COLUMNS)).reset_index(drop=True),
                        cand.drop(columns=list(EXACT_COLUMNS)), float(cand["theta"].iloc[0]),
                        str(cand["stopped"].iloc[0]), direction)


def _label(row: dict[str, Any]) -> str:
    """``L0.n57@subject_last`` for a neuron, ``L3.h1@final`` for a head's output and
    ``L2.h1.k@subject_last`` for its query, key or value."""
    label = site_label(row)
    if row.get("component") in ("q", "k", "v"):
        unit, _, where = label.partition("@")
        label = f"{unit}.{row['component']}@{where}"
    return label


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    out = df.reset_index(drop=True)
    out.insert(0, "site", [_label(r) for r in out.to_dict("records")])
    return out


def _cols(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """The named columns that exist, in order."""
    return pd.DataFrame(df[[c for c in cols if c in df.columns]]).reset_index(drop=True)


def atp_section(candidates: pd.DataFrame, bound: pd.DataFrame | None = None, *, k: int = 20,
                explanation: str = EXPLAIN_ATP) -> Section:
    """Section ``atp-star`` from :func:`verified_candidates` frames (one or several searches,
    told apart by ``search``) and optionally the bound's rank buckets
    (:attr:`~factfind.attribute.verification.Bound.buckets` with a ``search`` column)."""
    ver = _labelled(candidates.loc[candidates["verified"].to_numpy(dtype=bool)])
    if ver.empty:
        raise ArgumentError("no verified candidates to show")
    facts: dict[str, Any] = {}
    for name, g in candidates.groupby("search", sort=False):
        facts[f"{name}: candidates"] = len(g)
        facts[f"{name}: verified"] = int(g["verified"].to_numpy(dtype=bool).sum())
        facts[f"{name}: stopped by"] = f"{g['stopped'].iloc[0]} (θ = {g['theta'].iloc[0]:.3g})"
    figures = [
        scatter_plot(ver, x="effect", y="exact", hue="search", xlabel="AtP* estimate",
                        ylabel="exact effect (noising)", title="AtP* estimate vs exact patch",
                        caption="Every verified candidate: its AtP* estimate against the effect "
                        "of patching it exactly (dashed: equal)."),
    ]
    for name, g in ver.groupby("search", sort=False):
        figures.append(bar_plot(
            g.assign(ci_low=g["exact_ci_low"], ci_high=g["exact_ci_high"]), label="site",
            value="exact", k=k, title=f"Strongest verified {name}",
            caption=f"The {min(k, len(g))} verified {name} of largest exact |effect| (95% "
            "interval over prompts)."))
    tables = []
    for name, g in ver.groupby("search", sort=False):
        shown = _cols(g.iloc[np.argsort(-g["exact"].abs().to_numpy(), kind="stable")],
                      ["site", "component", "layer", "head", "neuron", "role", "rank", "effect",
                       "grad_drop", "score", "exact", "exact_ci_low", "exact_ci_high",
                       "exact_n"]).rename(columns={"effect": "atp*"}).dropna(axis=1, how="all")
        tables.append(Table(shown, caption=f"Verified {name} by exact |effect| (atp*: the "
                               "estimate; rank: the order AtP* proposed them in)",
                               max_rows=max(k, 20)))
    if bound is not None and not bound.empty:
        for name, g in bound.groupby("search", sort=False) if "search" in bound.columns \
                else [("all", bound)]:
            facts[f"{name}: bound on unverified"] = f"{g['effect'].max():.3g}"
        tables.append(Table(_cols(bound, ["search", "rank_start", "rank_stop", "nodes",
                                             "covered", "effect"]).rename(
            columns={"effect": "bound"}), caption="Subsampling bound by rank bucket: no "
            "unverified node of the bucket has a larger |effect| (if no cancellation)"))
    return Section(id="atp-star", title="Neurons and heads: AtP* with exact verification",
                      explanation=explanation, facts=facts, figures=figures, tables=tables)


def resample_section(df: pd.DataFrame, *, explanation: str = EXPLAIN_RESAMPLE) -> Section:
    """Section ``neuron-resample`` from :func:`~factfind.attribute.neurons.resample_neurons`."""
    top = _labelled(df)
    fig = bar_plot(top, label="site", value="effect", k=len(top), sort=True,
                      title="Resample ablation of single neurons",
                      caption="Change of the logit difference when the neuron takes other "
                      "subjects' values (95% interval over prompts).")
    return Section(id="neuron-resample", title="Resample ablation of top neurons",
                      explanation=explanation, figures=[fig], tables=[Table(
                          _cols(top, ["site", "layer", "neuron", "role", "effect", "ci_low",
                                      "ci_high", "n"]), caption="Resample ablation, per neuron")])


def and_section(df: pd.DataFrame, *, explanation: str = EXPLAIN_AND) -> Section:
    """Section ``neuron-and`` from :func:`~factfind.attribute.neurons.neuron_nonlinearity`."""
    top = _labelled(df)
    full = top["act_AB"] - top["act_A'B'"]
    parts = (top["act_AB'"] - top["act_A'B'"]) + (top["act_A'B"] - top["act_A'B'"])
    top = top.assign(full_name=full, sum_of_parts=parts)
    figures = [
        bar_plot(top, label="site", value="effect", k=len(top), sort=False,
                    title="Interaction f(AB) - f(A'B) - f(AB') + f(A'B')",
                    caption="Positive: the full name moves the neuron more than the sum of its "
                    "parts (95% interval over prompts and swaps)."),
        scatter_plot(top, x="sum_of_parts", y="full_name", hue="layer",
                        xlabel="sum of parts [f(AB')-f(A'B')] + [f(A'B)-f(A'B')]",
                        ylabel="full name f(AB) - f(A'B')", title="Full name vs its parts",
                        caption="Above the dashed line: superadditive (AND-like)."),
    ]
    table = _cols(top, ["site", "layer", "neuron", "role", "effect", "ci_low", "ci_high",
                        "and_score", "full_name", "sum_of_parts", "act_AB", "act_A'B",
                        "act_AB'", "act_A'B'", "n"]).rename(columns={"effect": "interaction"})
    return Section(id="neuron-and", title="Neuron nonlinearity: AND of name tokens?",
                      explanation=explanation, figures=figures,
                      tables=[Table(table, caption="Interaction and AND score per neuron")])


def mlp_norms_section(df: pd.DataFrame, *, explanation: str = EXPLAIN_NORMS) -> Section:
    """Section ``mlp-norms`` from :func:`~factfind.attribute.neurons.mlp_output_norms`: the mean
    norms per group, and (with groups ``known`` and ``unknown``) their difference per layer and
    role with a 95% interval (normal approximation from the two groups' intervals)."""
    where = df["role"].astype(object).where(df["role"].notna(), df["position"].astype(object))
    lines = df.assign(where=where.astype(str))
    figures = []
    if {"known", "unknown"} <= set(lines["group"]):
        se = (lines["ci_high"] - lines["ci_low"]) / (2 * 1.959964)
        w = lines.assign(se=se).pivot_table(index=["layer", "where"], columns="group",
                                            values=["effect", "se"])
        diff = w["effect"]["known"] - w["effect"]["unknown"]
        half = 1.959964 * np.sqrt(w["se"]["known"] ** 2 + w["se"]["unknown"] ** 2)
        d = pd.DataFrame({"effect": diff, "ci_low": diff - half, "ci_high": diff + half})
        figures.append(line_plot(
            d.reset_index(), x="layer", y="effect", hue="where", reference=0.0,
            ylabel="known - unknown ||mlp_out||", title="MLP output norm: known - unknown",
            caption="Mean norm for known subjects minus unknown ones, per layer and role "
            "(95% interval); above 0: the MLP writes more for known subjects."))
    figures.append(line_plot(
        lines.assign(series=[f"{g} @ {r}" for g, r in zip(lines["group"], lines["where"],
                                                           strict=True)]),
        x="layer", y="effect", hue="series", ylabel="||mlp_out||", title="MLP output norm",
        caption="Mean L2 norm of each layer's MLP output (95% interval)."))
    table = _cols(lines, ["group", "layer", "role", "position", "effect", "ci_low", "ci_high",
                          "n"]).dropna(axis=1, how="all")
    return Section(id="mlp-norms", title="MLP output norms: known vs unknown subjects",
                      explanation=explanation, figures=figures, tables=[
                          Table(table, caption="Mean ||mlp_out|| per group, layer and role")])


def neuron_dla_section(df: pd.DataFrame, *, k: int = 15,
                       explanation: str = EXPLAIN_DLA) -> Section:
    """Section ``neuron-dla`` from :func:`~factfind.attribute.neurons.neuron_dla`: per role, the
    ``k`` neurons of largest |DLA|."""
    figures, tables = [], []
    for role, g in df.groupby("role", sort=False):
        top = top_units(g, "neuron", k=k)
        if top.empty:
            continue
        figures.append(bar_plot(top, label="site", k=k, title=f"Neuron DLA at {role}",
                                   caption=f"The {len(top)} neurons at {role} of largest "
                                   "|direct logit attribution| (95% interval)."))
        tables.append(Table(top, caption=f"Top neurons by |DLA| at {role}", max_rows=k))
    return Section(id="neuron-dla", title="Direct logit attribution of neurons",
                      explanation=explanation, figures=figures, tables=tables)



def neuron_sections(frames: Mapping[str, pd.DataFrame]) -> list[Section]:
    """Every section above, in order, from the frames named ``atp`` (with ``bound``),
    ``resample``, ``and``, ``norms`` and ``dla``; a missing or empty frame skips its section
    (e.g. no AND test when no subject has two names)."""
    builders: list[tuple[str, Callable[[pd.DataFrame], Section]]] = [
        ("atp", lambda df: atp_section(df, frames.get("bound"))),
        ("resample", resample_section), ("and", and_section), ("norms", mlp_norms_section),
        ("dla", neuron_dla_section)]
    return [build(frames[name]) for name, build in builders
            if name in frames and not frames[name].empty]
