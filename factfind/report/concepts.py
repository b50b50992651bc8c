"""Report sections for the seed's concepts: linear representations, polysemanticity,
superposition and universality (:mod:`factfind.concepts.representation`,
:mod:`factfind.concepts.polysemanticity`, :mod:`factfind.concepts.superposition`,
:mod:`factfind.concepts.universality`).

Each builder takes the tidy frames those modules return and gives a
:class:`~factfind.report.Section` with a one-paragraph explanation of the concept and of how
its numbers are defined, figures drawn by :mod:`factfind.report` and sortable tables. Section
ids start with ``concepts-`` so they never collide with the standard sections.

Example::

    sections = [representation_section(dirs.decodability, direction_agreement(dirs), ratios)]
    write_report(ReportData(title="Concepts", sections=sections), "reports/concepts.html")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import networkx as nx
import pandas as pd

from factfind.report.document import Section, Table
from factfind.report.explorer import graph_view
from factfind.report.figures import bar_plot, heatmap, line_plot
from factfind.report.tables import columns

EXPLAIN_REPRESENTATION = (
    "Linear representation hypothesis: the model stores which attribute a subject has as a "
    "direction in the residual stream. For each layer and token role, three directions per "
    "attribute are fitted on training subjects: a logistic probe's weights (probe), the class "
    "mean minus the mean of class means (mean), and the attribute token's unembedding through "
    "the final norm (unembed). Decodability is the held-out-subject accuracy of reading the "
    "attribute as the direction with the largest projection (chance: the majority class). "
    "Agreement is the mean cosine between two methods' directions for the same attribute "
    "(random directions: about 0.07 in 128 dimensions). The patch ratio is the effect of "
    "patching only the activation's component along the clean-minus-corrupt attribute "
    "direction (rank 1) or in the span of all attribute directions (rank k), divided by the "
    "effect of patching the whole activation (corrupt run, clean activation; logit difference): "
    "1 means the direction carries everything the activation does about the fact."
)
EXPLAIN_POLYSEMANTICITY = (
    "Privileged basis and polysemantic neurons: if MLP neurons were monosemantic, each of the "
    "neurons that matter for the lookup would respond to one attribute (or subject, or "
    "relation). For a neuron read at the last subject token, its selectivity for a value v is "
    "its mean activation over prompts with that value minus its overall mean; it is selective "
    "when the largest selectivity exceeds half its standard deviation, and it responds to every "
    "value whose selectivity is at least half the largest. Polysemanticity is the number of "
    "values it responds to (1 = monosemantic); the effective number is exp(entropy) of the "
    "positive selectivities. The basis comparison patches, at the lookup MLP, only the top-k "
    "neurons by attribution, or only the top-k principal directions of the MLP output (ranked by "
    "variance or by attribution), and reports the share of the full MLP patch's effect each "
    "carries: the basis that reaches 1 with fewer dimensions concentrates the lookup."
)
EXPLAIN_SUPERPOSITION = (
    "Superposition: a layer of d dimensions can hold d features without interference; storing "
    "more forces directions to overlap. Capacity compares the facts stored (distinct subject and "
    "relation pairs; bits = log2 of the number of attributes per fact) with the neurons and "
    "residual dimensions of the lookup layers. Interference is the distribution of off-diagonal "
    "|cosine| between attribute directions (all relations, or only pairs from different "
    "relations), against the Welch bound (the least possible worst overlap of n unit vectors in d "
    "dimensions, 0 when n <= d) and the random-direction mean sqrt(2 / (pi d)). Effective rank of "
    "the lookup MLP's output over subjects is the participation ratio (sum of covariance "
    "eigenvalues squared over the sum of their squares) and the entropy rank exp(H): both equal k "
    "for variance spread evenly over k dimensions."
)
EXPLAIN_UNIVERSALITY = (
    "Universality: do two models (here organisms trained from different seeds, or any two "
    "checkpoints) recall facts through the same circuit? Unit indices do not carry across models, "
    "so nodes are compared by their role signature (depth as a quarter of the model, component "
    "kind, token role). The table gives the Jaccard overlap of node and edge ids, the weighted "
    "Jaccard of signature counts (sum of minima over sum of maxima) overall and by each part, and "
    "a graph edit similarity, 1 - GED / (nodes + edges of both), where the edit distance may only "
    "match nodes of the same signature: identical circuits score 1, circuits with no signature "
    "in common 0."
)


def _site_label(df: pd.DataFrame, *parts: str) -> list[str]:
    cols = [df[p].astype(str).tolist() for p in parts]
    return [" · ".join(values) for values in zip(*cols, strict=True)]


def representation_section(decodability: pd.DataFrame, agreement: pd.DataFrame,
                           ratios: pd.DataFrame, *,
                           explanation: str = EXPLAIN_REPRESENTATION) -> Section:
    """Section ``concepts-representation``: decodability, agreement and patch-ratio heatmaps
    (layer × role · method) and their tables."""
    dec = decodability.assign(site=_site_label(decodability, "role", "direction"))
    figs = [heatmap(dec, x="layer", y="site", title="Held-out decodability",
                       caption="Held-out accuracy of reading the attribute along each direction "
                               "(rows: role · direction method).", alt="decodability")]
    meth = agreement[agreement["kind"] == "methods"]
    if not meth.empty:
        meth = meth.assign(site=meth["role"] + " · " + meth["method_a"] + "~" + meth["method_b"])
        figs.append(heatmap(meth, x="layer", y="site", title="Agreement across methods",
                               caption="Mean cosine between two methods' attribute directions.",
                               alt="agreement across methods"))
    rat = pd.DataFrame(ratios[ratios["subspace"] != "full"])
    rat = rat.assign(site=_site_label(rat, "role", "subspace"))
    figs.append(heatmap(rat, x="layer", y="site", value="ratio",
                           title="Subspace patch / full patch",
                           caption="Effect of patching along the direction(s) over the full "
                                   "activation patch's effect.", alt="patch ratios"))
    tables = [
        Table(columns(decodability, ["relation", "layer", "role", "direction", "effect",
                                      "train_accuracy", "chance", "n"]),
                 caption="Held-out decodability (effect = accuracy)", max_rows=60),
        Table(columns(agreement, ["relation", "kind", "layer", "role", "method_a", "method_b",
                                   "direction", "layer_b", "effect"]),
                 caption="Cosine agreement across methods and layers", max_rows=80),
        Table(columns(ratios, ["layer", "role", "subspace", "rank", "effect", "full_effect",
                                "ratio", "n"]),
                 caption="Subspace patching: effect and ratio to the full patch", max_rows=80)]
    return Section(id="concepts-representation", title="Linear representation of attributes",
                      explanation=explanation, figures=figs, tables=tables)


def polysemanticity_section(selectivity: pd.DataFrame, fractions: pd.DataFrame,
                            basis: pd.DataFrame, *,
                            explanation: str = EXPLAIN_POLYSEMANTICITY) -> Section:
    """Section ``concepts-polysemanticity``: share-vs-k curves per basis, the monosemantic
    fractions and the per-neuron scores."""
    curve = pd.DataFrame(basis[basis["basis"] != "full"]).astype({"k": "float64"})
    figs = [line_plot(curve, x="k", y="ratio", hue="basis", reference=1.0, band=None,
                         title="Share of the lookup MLP's patching effect",
                         caption="Patching the top-k neurons or top-k principal directions of "
                                 "the MLP output, over patching the whole output.",
                         alt="basis comparison")]
    sel = selectivity.assign(unit=selectivity["layer"].astype(str).radd("L") + ".n"
                             + selectivity["neuron"].astype(str))
    tables = [
        Table(columns(fractions, ["key", "neurons", "selective", "effect",
                                   "mean_polysemanticity", "mean_effective_values",
                                   "n_values"]),
                 caption="Fraction of selective neurons that are monosemantic (effect)"),
        Table(columns(basis, ["group", "basis", "k", "effect", "full_effect", "ratio", "n"]),
                 caption="Top-k neurons vs top-k PCA directions", max_rows=60),
        Table(columns(sel, ["unit", "role", "key", "effect", "effective_values", "max_z",
                             "top_value", "n_values"]),
                 caption="Polysemanticity per neuron and key (effect = values responded to)",
                 max_rows=90)]
    return Section(id="concepts-polysemanticity", title="Neuron basis vs feature basis",
                      explanation=explanation, figures=figs, tables=tables)


def superposition_section(capacity: pd.DataFrame, interference: pd.DataFrame,
                          effective_rank: pd.DataFrame, *, by_world: pd.DataFrame | None = None,
                          explanation: str = EXPLAIN_SUPERPOSITION) -> Section:
    """Section ``concepts-superposition``: capacity, interference and effective-rank tables, an
    effective-rank bar chart, and (``by_world``) the table across organisms of different size."""
    er = effective_rank.assign(site=_site_label(effective_rank, "component", "layer", "role"))
    figs = [bar_plot(er, label="site", value="effect", k=len(er), sort=False,
                        title="Effective rank (participation ratio)",
                        caption="Participation ratio of each lookup activation over the dataset.",
                        alt="effective rank")]
    tables = [
        Table(columns(capacity, ["facts", "subjects", "relations", "bits", "lookup_layers",
                                  "neurons", "d_model", "effect", "facts_per_dim",
                                  "bits_per_neuron", "bits_per_dim"]),
                 caption="Capacity (effect = facts per lookup neuron)"),
        Table(columns(interference, ["component", "layer", "role", "pairs", "effect", "median",
                                      "p90", "max", "n_features", "d", "welch_bound",
                                      "random_mean", "worst_pair"]),
                 caption="Interference between attribute directions (effect = mean |cos|)",
                 max_rows=60),
        Table(columns(effective_rank, ["component", "layer", "role", "effect", "entropy_rank",
                                        "dims_90", "dims", "n", "subjects"]),
                 caption="Effective rank (effect = participation ratio)")]
    if by_world is not None and not by_world.empty:
        tables.append(Table(by_world, caption="Superposition against world size", max_rows=40))
    return Section(id="concepts-superposition", title="Superposition diagnostics",
                      explanation=explanation, figures=figs, tables=tables)


def universality_section(comparison: pd.DataFrame, counts: pd.DataFrame,
                         graphs: Sequence[tuple[str, Any]] = (), *,
                         explanation: str = EXPLAIN_UNIVERSALITY) -> Section:
    """Section ``concepts-universality``: the similarity measures, the side-by-side signature
    counts and a drawing of each circuit."""
    figs = [bar_plot(comparison, label="measure", value="effect", k=len(comparison),
                        sort=False, xlim=(0.0, 1.0), title="Circuit similarity",
                        caption="Similarity of the two circuits by each measure.",
                        alt="circuit similarity")]
    views = []
    for name, g in graphs:
        nxg = g if isinstance(g, nx.DiGraph) else g.graph
        views.append(graph_view(nxg, caption=f"{name}: {nxg.number_of_nodes()} nodes, "
                                                f"{nxg.number_of_edges()} edges"))
    tables = [Table(columns(comparison, ["graph_a", "graph_b", "measure", "effect", "count_a",
                                          "count_b", "shared", "ged", "ged_exact"]),
                       caption="Similarity measures (effect in [0, 1])"),
              Table(counts, caption="Nodes per role signature, side by side", max_rows=80)]
    return Section(id="concepts-universality", title="Universality of the circuit",
                      explanation=explanation, figures=figs, tables=tables, graphs=views)


