"""Report sections for sparse dictionaries: how well each layer's dictionary stands in for its
site, what it was trained on, which features name an attribute, and what single features do.

A sparse dictionary (an SAE, a transcoder or a skip transcoder, :mod:`factfind.features`)
replaces a site of the model by a sparse code over many more features than the site has
dimensions. Before its features can be read as the model's variables the dictionary itself has
to be judged, and these sections show that judgement:

* :func:`dictionary_quality_section` (``dictionaries-quality``): per layer, SAELens' held-out
  measures - explained variance, L0, the dead and dense fractions - and CE- and KL-loss
  recovered with the dictionary spliced in and its error term dropped; :func:`quality_table`
  names the aims each dictionary misses (:data:`AIMS`, and L0 <= :data:`MAX_L0`).
* :func:`corpus_section` (``dictionaries-corpus``): the training corpus's recipe and size; a
  dictionary holds only the features its corpus exercises.
* :func:`attribute_features_section` (``dictionaries-attributes``): features at the subject's
  last token scored as classifiers of one attribute value against the world's own labels
  (precision, recall, F1).
* :func:`dashboards_section` (``dictionaries-dashboards``): per feature, its top-activating
  contexts, its logit lens (the decoder row read through the final norm and the unembedding)
  and a label made from them.

Each function takes the tidy frames of :mod:`factfind.features` and returns a :class:`Section`;
``analyses/dictionaries.py`` assembles them into ``reports/dictionaries-<model>.html``, and the
features step of the fact-finding run (``analyses/_features_step.py``) reuses the quality and
dashboard sections. The circuits read in these dictionaries' features are shown by
:mod:`factfind.report.feature_circuits`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from factfind.errors import ArgumentError
from factfind.report.document import Figure, Section, Table
from factfind.report.figures import line_plot
from factfind.report.tables import columns

EXPLAIN_QUALITY = (
    "A sparse dictionary replaces a site of the model by a sparse code over many more features "
    "than the site has dimensions. A transcoder reads the MLP's input and writes an "
    "approximation of its output; an SAE reads and writes one site. Each is measured on "
    "held-out tokens with SAELens' definitions: explained variance (1 - residual variance / "
    "variance of the target), L0 (features active per token), the dead fraction (features "
    "that never fired) and the dense fraction (features firing on more than 10% of tokens). "
    "CE-loss recovered splices the dictionary into the model with its error term dropped and "
    "compares next-token loss with the clean model (1) and with the site zero-ablated (0); KL "
    "recovered does the same with the KL divergence from the clean next-token distribution.\n\n"
    "The aims of the feature wave are explained variance >= 0.8 and CE-loss recovered >= 0.8 "
    "at L0 <= 64; the table flags each layer that misses one."
)
EXPLAIN_CORPUS = (
    "What the dictionaries were trained on (its recipe is below; 5% of its texts are held out "
    "for the measurements). The default corpus for a real model is built offline from the "
    "datasets that ship with factfind (every fact as a sentence) plus continuations sampled "
    "from the model with a fixed seed. It is about 10^5 tokens of short factual text, not a "
    "pretraining corpus: features of code, dialogue or long contexts are not in it, and "
    "dictionaries trained on it should be read as dictionaries of fact recall. The organism "
    "is trained on its own world's facts as sentences."
)
EXPLAIN_DASHBOARDS = (
    "One feature per table group: the contexts where it fires most (the activating token in "
    "[brackets]) at its maximum and at quantiles of its positive activations, the tokens its "
    "decoder direction promotes and suppresses when read through the final norm and the "
    "unembedding (the logit lens), how often it fires, and a label made from those tokens "
    "without an external language model."
)
EXPLAIN_ATTRIBUTES = (
    "Features at the subject's last token that fire for the subjects of one attribute value "
    "(e.g. the people of one sport), scored against the world's own labels: precision is the "
    "share of the prompts a feature fires on whose subject has the value, recall the share of "
    "that value's prompts it fires on."
)

#: the aims of the feature wave (issue 23): a layer that misses one is flagged
AIMS = {"explained_variance": 0.8, "ce_recovered": 0.8}
MAX_L0 = 64


def _mean(column: Any) -> float:
    return float(np.nanmean(np.asarray(column, dtype=float)))



def quality_table(quality: pd.DataFrame) -> pd.DataFrame:
    """The per-dictionary quality frame of :func:`~factfind.features.evaluate_dictionaries`,
    in layer order, with a ``misses`` column naming each aim the dictionary misses (empty
    when it meets them all)."""
    need = {"dictionary", "layer", "explained_variance", "l0"}
    if not need <= set(quality.columns):
        raise ArgumentError(f"a dictionary quality frame needs columns {sorted(need)}, got "
                            f"{sorted(quality.columns)}")
    df = quality.sort_values(["layer", "dictionary"]).reset_index(drop=True)

    def misses(row: Mapping[str, Any]) -> str:
        out = [f"{k} < {v}" for k, v in AIMS.items()
               if k in row and pd.notna(row[k]) and float(row[k]) < v]
        if float(row["l0"]) > MAX_L0:
            out.append(f"l0 > {MAX_L0}")
        return "; ".join(out)

    return df.assign(misses=[misses(r) for r in df.to_dict("records")])


def dictionary_quality_section(quality: pd.DataFrame, *, training: Mapping[str, Any] | None = None,
                               explanation: str = EXPLAIN_QUALITY) -> Section:
    """Section ``dictionaries-quality``: explained variance, CE- and KL-loss recovered and L0 /
    dead fraction per layer (figures), and the per-dictionary table with the missed aims."""
    df = quality_table(quality)
    long = df.melt(id_vars=["layer"], value_vars=[c for c in ("explained_variance",
                                                               "ce_recovered", "kl_recovered")
                                                  if c in df.columns],
                   var_name="measure", value_name="value").dropna()
    figs: list[Figure] = [line_plot(long, x="layer", y="value", hue="measure", band=None,
                                    reference=AIMS["explained_variance"],
                                    title="Reconstruction and loss recovered per layer",
                                    caption="Held-out explained variance, CE-loss recovered and "
                                            "KL recovered of each layer's dictionary (dashed: the "
                                            "0.8 aim).", alt="dictionary quality per layer")]
    sparse = df.melt(id_vars=["layer"], value_vars=[c for c in ("l0",) if c in df.columns],
                     var_name="measure", value_name="value")
    figs.append(line_plot(sparse, x="layer", y="value", hue="measure", band=None,
                          reference=float(MAX_L0), title="Active features per token (L0)",
                          caption="Mean number of active features per held-out token (dashed: "
                                  f"the L0 <= {MAX_L0} budget).", alt="L0 per layer"))
    if "dead_fraction" in df.columns:
        dead = df.melt(id_vars=["layer"], value_vars=[c for c in ("dead_fraction",
                                                                   "dense_fraction")
                                                      if c in df.columns],
                       var_name="measure", value_name="value")
        figs.append(line_plot(dead, x="layer", y="value", hue="measure", band=None,
                              title="Dead and dense features",
                              caption="Share of features that never fired on the held-out "
                                      "tokens, and of those firing on more than 10% of them.",
                              alt="dead and dense fractions"))
    table = Table(columns(df, ["dictionary", "layer", "kind", "activation", "width", "k",
                             "explained_variance", "l0", "dead_fraction", "dense_fraction",
                             "ce_recovered", "kl_recovered", "ce_clean", "ce_spliced",
                             "ce_zero", "tokens", "misses"]),
                  caption="Per-dictionary quality on held-out tokens (misses: the aims not met)",
                  max_rows=max(50, len(df)))
    met = sum(m == "" for m in df["misses"])
    facts: dict[str, Any] = {"dictionaries": len(df), "meet every aim": f"{met} of {len(df)}",
                             "mean explained variance": round(_mean(df["explained_variance"]),
                                                              3)}
    if "ce_recovered" in df.columns:
        facts["mean CE-loss recovered"] = round(_mean(df["ce_recovered"]), 3)
    facts["mean L0"] = round(_mean(df["l0"]), 1)
    facts.update(dict(training or {}))
    return Section(id="dictionaries-quality", title="Dictionary quality per layer",
                   explanation=explanation, figures=figs, tables=[table], facts=facts)


def corpus_section(provenance: Mapping[str, Any], *, explanation: str = EXPLAIN_CORPUS
                   ) -> Section:
    """Section ``dictionaries-corpus``: the training corpus's recipe and size."""
    facts = {k: v for k, v in provenance.items() if not isinstance(v, Mapping)}
    code = None
    nested = {k: v for k, v in provenance.items() if isinstance(v, Mapping)}
    if nested:
        import json

        code = json.dumps(nested, indent=2, sort_keys=True, default=str)
    return Section(id="dictionaries-corpus", title="Training corpus", explanation=explanation,
                   facts=facts, code=code)


def attribute_features_section(scores: pd.DataFrame, *, top: int = 3,
                               explanation: str = EXPLAIN_ATTRIBUTES) -> Section:
    """Section ``dictionaries-attributes``: per attribute value, its best features by F1 with
    precision and recall against the world's labels."""
    need = {"value", "precision", "recall", "f1"}
    if not need <= set(scores.columns):
        raise ArgumentError(f"attribute scores need columns {sorted(need)}, got "
                            f"{sorted(scores.columns)}")
    best = (scores.sort_values("f1", ascending=False).groupby("value", sort=True).head(top)
            .sort_values(["value", "f1"], ascending=[True, False]).reset_index(drop=True))
    per_value = best.groupby("value", sort=True).head(1)
    facts = {"attribute values": len(set(scores["value"])),
             "best F1 (mean over values)": round(_mean(per_value["f1"]), 3)}
    shown = columns(best, ["value", "feature_id", "role", "precision", "recall", "f1", "fired",
                         "positives", "hits", "base_rate", "n"]).round(3)
    return Section(id="dictionaries-attributes", title="Features that name an attribute",
                   explanation=explanation, facts=facts,
                   tables=[Table(shown, caption=f"Top {top} features per attribute value by F1 "
                                                "(fired: prompts it fires on; positives: prompts "
                                                "of the value; base_rate: a random feature's "
                                                "precision)", max_rows=max(50, len(shown)))])


def dashboards_section(dashboards: Sequence[Any], *, contexts: int = 8,
                       explanation: str = EXPLAIN_DASHBOARDS) -> Section:
    """Section ``dictionaries-dashboards``: per feature (a
    :class:`~factfind.features.FeatureDashboard`), its label and density as facts, and two
    tables: its top contexts (the activating token in ``[brackets]``) and its logit lens."""
    if not dashboards:
        raise ArgumentError("a dashboards section needs at least one feature dashboard")
    tables: list[Table] = []
    facts: dict[str, Any] = {}
    for b in dashboards:
        facts[b.feature_id] = f"{b.label} (density {b.density:.3g} over {b.tokens} tokens)"
        ctx = b.contexts.head(contexts)
        if len(ctx):
            shown = pd.DataFrame({
                "source": ctx["source"], "kind": ctx["kind"],
                "activation": [round(float(v), 3) for v in ctx["activation"]],
                "context": [f"{left}[{tok}]{right}" for left, tok, right in
                            zip(ctx["left"], ctx["token"], ctx["right"], strict=True)]})
            tables.append(Table(shown, caption=f"{b.feature_id}: top-activating contexts",
                                max_rows=contexts))
        lens = b.logit_lens
        if len(lens):
            wide = pd.DataFrame({
                "rank": lens.loc[lens["direction"] == "promoted", "rank"].to_numpy(),
                "promoted": lens.loc[lens["direction"] == "promoted", "token"].map(repr)
                .to_numpy(),
                "promoted logit": lens.loc[lens["direction"] == "promoted", "logit"].round(3)
                .to_numpy(),
                "suppressed": lens.loc[lens["direction"] == "suppressed", "token"].map(repr)
                .to_numpy(),
                "suppressed logit": lens.loc[lens["direction"] == "suppressed", "logit"]
                .round(3).to_numpy()})
            tables.append(Table(wide, caption=f"{b.feature_id}: logit lens (decoder row "
                                              "through the final norm and the unembedding)",
                                max_rows=len(wide)))
    return Section(id="dictionaries-dashboards", title="Feature dashboards",
                   explanation=explanation, facts=facts, tables=tables)


__all__ = ["AIMS", "MAX_L0", "attribute_features_section", "corpus_section", "dashboards_section",
           "dictionary_quality_section", "quality_table"]
