"""The literature's findings about fact recall, measured on a model's own results.

Three papers make claims about *where* a fact travels in a transformer, each with its own
method; :mod:`factfind` runs those methods, and this module reads their aggregated tables back
into the claims, so a report can say "this holds on this model" or "it differs, by this much":

* **ROME's early site** (Meng et al. 2022, causal tracing): restoring the MLP output at the
  *last subject token* restores the answer most in early-to-middle layers (GPT-2 XL: a window
  of 10 MLPs centred on layers ~15 of 48).
* **ROME's late site**: restoring attention output at the *final token* matters in later layers.
* **Geva et al. (2023), attention knockout**: blocking the edges final -> subject hurts in
  middle-upper layers ("attribute extraction"), while information from the relation tokens
  reaches the final token *earlier*.
* **Fact Finding** (Nanda, Rajamanoharan, Kramár, Shah 2023, Pythia 2.8B): the subject's
  tokens need attention only in the first couple of layers (heads in layers 0-1 gather the
  first name; MLPs 2-6 look the fact up), so mean-ablating attention at the subject from a
  small ``k`` on keeps accuracy; and the attribute becomes linearly decodable at the last
  subject token early (probe accuracy by layer).

Each finding is reduced to a few numbers with a stated rule (a peak layer and its relative
depth, a centroid of knockout damage, the smallest ``k`` keeping 90% of clean accuracy, the
first layer a probe reaches 90% of its best accuracy) and a ``holds`` flag, so differences
from the papers come with numbers, not adjectives. Relative depth is ``layer / (L - 1)``.

Example::

    rows = literature_findings(n_layers=30, tracing=ff.aggregate(tracing),
                               knockout=ff.aggregate(knockout), effective=eff, probes=probes)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from factfind.errors import ArgumentError
from factfind.results import aggregate

COLUMNS = ("finding", "source", "claim", "measured", "holds", "layer", "depth", "value",
           "contrast", "n")
"""One row per finding: ``layer``/``depth`` (relative depth) locate it, ``value`` is its size,
``contrast`` the number it is compared with (see each function) and ``n`` the prompts behind
it (held-out prompts for the probe)."""


def _depth(layer: float, n_layers: int) -> float:
    return float(layer) / max(1, n_layers - 1)


def _curve(df: pd.DataFrame, *, method: str | None = None, role: str | None = None,
           value: str = "effect", weighted: bool = False) -> pd.Series:
    """Mean ``value`` by layer (index: layer, sorted) of the rows matching ``method`` and
    ``role``. ``weighted``: rows are means over ``n`` prompts each (``ff.aggregate`` keeps one
    row per token position, and the last subject token sits at different positions in
    different prompts), so the layer's value is their ``n``-weighted mean: the mean over
    prompts, as if aggregated by role."""
    keep = _rows(df, method=method, role=role)
    layers = df["layer"].to_numpy()[keep].astype(int)
    values = df[value].to_numpy()[keep].astype(float)
    weights = np.ones(len(values))
    if weighted and "n" in df.columns:
        n = _floats(df["n"])[keep]
        if np.isfinite(n).all():
            weights = n
    index = np.unique(layers)
    means = []
    for layer in index:
        at = (layers == layer) & np.isfinite(values)
        w = weights[at]
        means.append(float((values[at] * w).sum() / w.sum()) if w.sum() > 0 else float("nan"))
    return pd.Series(means, index=index, dtype=float)


def _floats(values: Any) -> np.ndarray:
    """A column as float64, missing values (``<NA>``, ``None``) as NaN."""
    return pd.Series(values, dtype="Float64").to_numpy(dtype=float, na_value=np.nan)


def _rows(df: pd.DataFrame, *, method: str | None = None, role: str | None = None
          ) -> np.ndarray:
    keep = np.ones(len(df), dtype=bool)
    if method is not None:
        keep &= (df["method"] == method).to_numpy(dtype=bool, na_value=False)
    if role is not None:
        keep &= (df["role"].astype(str) == role).to_numpy(dtype=bool, na_value=False)
    return keep


def _prompts(df: pd.DataFrame, *, method: str | None = None, role: str | None = None) -> int:
    """How many prompts stand behind one layer of a curve: the largest per-layer sum of ``n``
    (aggregated rows), else the largest per-layer count of rows (one row per prompt)."""
    keep = _rows(df, method=method, role=role)
    layers = df["layer"].to_numpy()[keep].astype(int)
    if not len(layers):
        return 0
    if "n" in df.columns:
        n = _floats(df["n"])[keep]
        if np.isfinite(n).all():
            return int(max(n[layers == layer].sum() for layer in np.unique(layers)))
    return int(max((layers == layer).sum() for layer in np.unique(layers)))


def _argmax(curve: pd.Series) -> int:
    return int(curve.index.to_numpy()[int(np.argmax(curve.to_numpy()))])


def _argmin(curve: pd.Series) -> int:
    return int(curve.index.to_numpy()[int(np.argmin(curve.to_numpy()))])


def _row(finding: str, source: str, claim: str, measured: str, holds: bool | None, *,
         layer: float | None = None, n_layers: int, value: float | None = None,
         contrast: float | None = None, n: int | None = None) -> dict[str, Any]:
    return {"finding": finding, "source": source, "claim": claim, "measured": measured,
            "holds": holds, "layer": layer,
            "depth": None if layer is None else round(_depth(layer, n_layers), 3),
            "value": value, "contrast": contrast, "n": n}


def _share(curve: pd.Series, n_layers: int, *, late: bool, cut: float) -> float:
    """The share of a curve's positive mass at relative depth ``<= cut`` (``>= cut`` if
    ``late``)."""
    mass = np.clip(curve.to_numpy(), 0, None)
    depth = curve.index.to_numpy() / max(1, n_layers - 1)
    where = depth >= cut if late else depth <= cut
    return float(mass[where].sum() / mass.sum()) if mass.sum() > 0 else float("nan")


def tracing_sites(tracing: pd.DataFrame, n_layers: int, *, early_max_depth: float = 0.6,
                  late_min_depth: float = 0.4, share: float = 0.75,
                  min_peak: float = 0.02) -> list[dict[str, Any]]:
    """ROME's two sites from aggregated causal tracing (columns ``method``, ``layer``,
    ``role``, ``effect``), and whether the subject's MLPs dominate the final token's.

    Early site: restoring the MLP window at ``subject_last``; holds when the peak indirect
    effect is at least ``min_peak`` and at least ``share`` of the curve's positive mass lies
    at relative depth ``<= early_max_depth``. Late site: attention at ``final``, with the
    mass at depth ``>= late_min_depth``. Third row: ROME's GPT-2 XL shows the subject's MLP
    peak above the final token's MLP peak (``value`` vs ``contrast``).
    """
    rows = []
    specs = (("ROME early site", "causal_tracing/mlp", "subject_last", False, early_max_depth,
              "MLP output at the last subject token matters in early-to-middle layers"),
             ("ROME late site", "causal_tracing/attn", "final", True, late_min_depth,
              "attention output at the final token matters in later layers"))
    for name, method, role, late, cut, claim in specs:
        curve = _curve(tracing, method=method, role=role, weighted=True)
        if curve.empty:
            rows.append(_row(name, "Meng et al. 2022", claim, "not measured", None,
                             n_layers=n_layers))
            continue
        layer, peak = _argmax(curve), float(curve.max())
        part = _share(curve, n_layers, late=late, cut=cut)
        holds = bool(peak >= min_peak and part >= share)
        measured = (f"peak indirect effect {peak:.3f} at layer {layer} of {n_layers} (depth "
                    f"{_depth(layer, n_layers):.2f}); {part:.0%} of the positive effect at "
                    f"depth {'>=' if late else '<='} {cut} (rule: >= {share:.0%}, peak >= "
                    f"{min_peak})")
        rows.append(_row(name, "Meng et al. 2022", claim, measured, holds, layer=layer,
                         n_layers=n_layers, value=peak, contrast=part,
                         n=_prompts(tracing, method=method, role=role)))
    subject = _curve(tracing, method="causal_tracing/mlp", role="subject_last", weighted=True)
    final = _curve(tracing, method="causal_tracing/mlp", role="final", weighted=True)
    claim = "the subject's MLPs matter more than the final token's MLPs"
    if subject.empty or final.empty:
        rows.append(_row("ROME: subject MLPs over final MLPs", "Meng et al. 2022", claim,
                         "not measured", None, n_layers=n_layers))
    else:
        s_peak, f_peak = float(subject.max()), float(final.max())
        measured = (f"MLP peak at subject_last {s_peak:.3f} (layer {_argmax(subject)}), at "
                    f"final {f_peak:.3f} (layer {_argmax(final)})")
        rows.append(_row("ROME: subject MLPs over final MLPs", "Meng et al. 2022", claim,
                         measured, s_peak > f_peak, layer=_argmax(final), n_layers=n_layers,
                         value=s_peak, contrast=f_peak,
                         n=_prompts(tracing, method="causal_tracing/mlp", role="final")))
    return rows


def knockout_flow(knockout: pd.DataFrame, n_layers: int, *, min_drop: float = 0.05,
                  middle_min_depth: float = 0.25) -> list[dict[str, Any]]:
    """Geva et al.'s attention knockout from an aggregated knockout table (``role`` is the
    blocked source, ``effect`` the relative change in p, negative = damage).

    For each source the *damage centroid* is the damage-weighted mean window-start layer
    (damage = ``max(0, -effect)``). Final -> subject holds when its largest drop is at least
    ``min_drop`` and its centroid sits at relative depth ``>= middle_min_depth``; relation
    before subject holds when the relation centroid is earlier than the subject centroid.
    """
    curves = {role: _curve(knockout, role=role) for role in ("subject", "relation")}
    rows = []
    cents: dict[str, float] = {}
    for role, curve in curves.items():
        damage = np.clip(-curve.to_numpy(), 0, None)
        if damage.sum() > 0:
            cents[role] = float((damage * curve.index.to_numpy()).sum() / damage.sum())
    subj = curves["subject"]
    claim = "blocking final -> subject hurts in middle and upper layers"
    if subj.empty:
        rows.append(_row("Geva knockout: final -> subject", "Geva et al. 2023", claim,
                         "not measured", None, n_layers=n_layers))
    else:
        worst = _argmin(subj)
        drop = -float(subj.min())
        cent = cents.get("subject")
        holds = bool(drop >= min_drop and cent is not None
                     and _depth(cent, n_layers) >= middle_min_depth)
        measured = (f"largest drop {drop:.1%} of p(answer) when blocking from layer {worst}; "
                    f"damage centroid at layer {cent if cent is None else round(cent, 1)} "
                    f"(rule: drop >= {min_drop:.0%}, centroid depth >= {middle_min_depth})")
        rows.append(_row("Geva knockout: final -> subject", "Geva et al. 2023", claim,
                         measured, holds, layer=cent, n_layers=n_layers, value=drop,
                         contrast=None, n=_prompts(knockout, role="subject")))
    claim = "information from the relation tokens reaches the final token earlier"
    if "relation" in cents and "subject" in cents:
        rel, sub = cents["relation"], cents["subject"]
        measured = (f"damage centroid of final -> relation at layer {rel:.1f}, of final -> "
                    f"subject at layer {sub:.1f}")
        rows.append(_row("Geva knockout: relation before subject", "Geva et al. 2023", claim,
                         measured, bool(rel < sub), layer=rel, n_layers=n_layers, value=rel,
                         contrast=sub, n=_prompts(knockout, role="relation")))
    else:
        rows.append(_row("Geva knockout: relation before subject", "Geva et al. 2023", claim,
                         "no damage from one of the two knockouts", None, n_layers=n_layers))
    return rows


def effective_model_depth(effective: pd.DataFrame, n_layers: int, *, keep: float = 0.9,
                          max_depth: float = 0.35) -> dict[str, Any]:
    """Fact Finding's effective model from :func:`~factfind.localize.ablation.effective_model` (one
    row per ``k`` = ``layer`` with ``accuracy`` and ``clean_accuracy``): the smallest ``k``
    such that ablating attention at the subject from layer ``k`` on keeps ``>= keep`` of the
    clean accuracy. Holds when ``k`` is at relative depth ``<= max_depth`` (Pythia 2.8B:
    ``k = 2`` of 32)."""
    claim = ("the subject's tokens need attention only in the first few layers (Pythia 2.8B: "
             "layers 0-1, then MLPs 2-6 look the fact up)")
    if effective.empty:
        return _row("Fact Finding effective model", "Nanda et al. 2023", claim,
                    "not measured", None, n_layers=n_layers)
    eff = effective.sort_values("layer")
    clean = float(eff["clean_accuracy"].to_numpy(dtype=float).mean())
    # the smallest k from which every larger k also keeps the accuracy
    k = n_layers
    for layer, acc in zip(eff["layer"].to_numpy()[::-1], eff["accuracy"].to_numpy()[::-1],
                          strict=True):
        if acc < keep * clean:
            break
        k = int(layer)
    acc0 = float(eff["accuracy"].to_numpy()[eff["layer"].to_numpy() == 0].mean())
    measured = (f"attention at the subject can be mean-ablated from layer {k} of {n_layers} "
                f"on keeping >= {keep:.0%} of the clean accuracy {clean:.2f} (depth "
                f"{_depth(k, n_layers):.2f}; ablating from layer 0 leaves {acc0:.2f})")
    ns = _floats(eff["n"]) if "n" in eff.columns else np.array([np.nan])
    n = None if np.isnan(ns).all() else int(np.nanmax(ns))
    return _row("Fact Finding effective model", "Nanda et al. 2023", claim, measured,
                bool(_depth(k, n_layers) <= max_depth), layer=k, n_layers=n_layers,
                value=clean, contrast=acc0, n=n)


def _held_out(probes: pd.DataFrame, role: str) -> tuple[int, int] | None:
    """Held-out prompts behind each layer's probe accuracy at ``role``, summed over relations,
    and the number of relations (``None`` without ``n`` and ``relation`` columns)."""
    if "n" not in probes.columns or "relation" not in probes.columns:
        return None
    rows = probes.loc[(probes["role"].astype(str) == role).to_numpy()]
    per = rows.groupby("relation")["n"].max()
    return int(per.sum()), len(per)


def probe_onset(probes: pd.DataFrame, n_layers: int, *, role: str = "subject_last",
                reach: float = 0.9, max_depth: float = 0.5, min_held_out: int = 20
                ) -> dict[str, Any]:
    """The first layer where the linear probe at ``role`` reaches ``reach`` of its best
    held-out accuracy (above chance: ``chance + reach * (best - chance)``). Holds when that is
    at relative depth ``<= max_depth`` and the best beats chance by 0.1 (Fact Finding: the
    sport is decodable at the last name token after the early MLPs).

    Not measurable (``holds`` None) with fewer than ``min_held_out`` held-out prompts over all
    relations (when the frame has ``n`` and ``relation``): below 20 one prompt moves the
    accuracy by more than 5 points, so the rule's 0.1 margin is two prompts, and the best of
    the layers beats chance by that much on noise alone. ROME's known facts, a handful per
    relation, leave SmolLM2's 59 known facts 8 held-out prompts in 2 relations."""
    claim = f"the attribute becomes linearly decodable at {role} in early-to-middle layers"
    curve = _curve(probes, role=role)
    if curve.empty:
        return _row("Fact Finding probe by layer", "Nanda et al. 2023", claim,
                    "not measured", None, n_layers=n_layers)
    chance = float(_curve(probes, role=role, value="chance").mean())
    best = float(curve.max())
    held = _held_out(probes, role)
    if held is not None and held[0] < min_held_out:
        return _row("Fact Finding probe by layer", "Nanda et al. 2023", claim,
                    f"not measurable: {held[0]} held-out prompts in {held[1]} relation(s) "
                    f"with enough subjects to split, fewer than {min_held_out} (best held-out "
                    f"accuracy {best:.2f} vs chance {chance:.2f})", None, n_layers=n_layers,
                    value=best, contrast=chance, n=held[0])
    if not best > chance:  # never above chance (or NaN): there is no onset
        return _row("Fact Finding probe by layer", "Nanda et al. 2023", claim,
                    f"held-out accuracy never exceeds chance ({best:.2f} vs {chance:.2f})",
                    False, n_layers=n_layers, value=best, contrast=chance,
                    n=None if held is None else held[0])
    bar = chance + reach * (best - chance)
    onset = int(curve.index.to_numpy()[curve.to_numpy() >= bar].min())
    measured = (f"held-out accuracy rises from {float(curve.iloc[0]):.2f} (layer 0) to "
                f"{best:.2f} (chance {chance:.2f}); {reach:.0%} of the way at layer {onset} "
                f"(depth {_depth(onset, n_layers):.2f})")
    holds = bool(best - chance >= 0.1 and _depth(onset, n_layers) <= max_depth)
    return _row("Fact Finding probe by layer", "Nanda et al. 2023", claim, measured, holds,
                layer=onset, n_layers=n_layers, value=best, contrast=chance,
                n=None if held is None else held[0])


def literature_findings(*, n_layers: int, tracing: pd.DataFrame | None = None,
                        knockout: pd.DataFrame | None = None,
                        effective: pd.DataFrame | None = None,
                        probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every finding above from the tables given (aggregated over prompts), one row each with
    :data:`COLUMNS`."""
    rows: list[dict[str, Any]] = []
    if tracing is not None:
        rows += tracing_sites(tracing, n_layers)
    if knockout is not None:
        rows += knockout_flow(knockout, n_layers)
    if effective is not None:
        rows.append(effective_model_depth(effective, n_layers))
    if probes is not None:
        rows.append(probe_onset(probes, n_layers))
    return pd.DataFrame(rows, columns=list(COLUMNS))


# ----------------------------------------------------------------------------- findings first

SUMMARY_COLUMNS = ("topic", "text", "layer", "depth", "value", "ci_low", "ci_high", "n",
                   "holds")
"""One row per line of :func:`findings_summary`: the ``text`` a reader sees and the numbers
it cites (``value`` with its 95% interval ``ci_low``/``ci_high`` over ``n`` prompts, at
``layer``/``depth``), so another report (e.g. a comparison across models) can table them."""


def _num(v: float) -> str:
    """A number as a reader wants it: two decimals, or two significant digits if small."""
    return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.2g}"


def _ci(lo: Any, hi: Any, fmt: Any = _num) -> str:
    """`` [lo, hi]``, or nothing when the interval is not defined (one prompt)."""
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return ""
    return f" [{fmt(float(lo))}, {fmt(float(hi))}]"


def _zero(lo: Any, hi: Any) -> str:
    """A warning when a 95% interval includes 0: the sign of the effect is not resolved."""
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return ""
    return " (the interval includes 0)" if float(lo) <= 0 <= float(hi) else ""


def _n(n: Any, noun: str = "prompts") -> str:
    return "" if n is None or pd.isna(n) else f", n={int(n)} {noun}"


def _finding(findings: pd.DataFrame, name: str) -> dict[str, Any] | None:
    rows = findings.loc[(findings["finding"] == name).to_numpy()]
    return None if rows.empty else rows.iloc[0].to_dict()


def _holds(row: dict[str, Any] | None) -> bool | None:
    if row is None:
        return None
    h = row.get("holds")
    return None if h is None or pd.isna(h) else bool(h)


def _per_prompt(df: pd.DataFrame, what: str) -> None:
    if "prompt" not in df.columns or bool(df["prompt"].isna().to_numpy().all()):
        raise ArgumentError(f"findings_summary needs the per-prompt {what} results (one row per "
                            f"prompt, before ff.aggregate) to give intervals over prompts; "
                            f"pass the frame the analysis returned")


def _by_role(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over prompts per (method, layer, role), pooling token positions (the last subject
    token sits at different positions in different prompts)."""
    return aggregate(df, by=[c for c in ("method", "component", "layer", "role")
                             if c in df.columns])


def _span(curve: pd.Series, peak: int, *, frac: float = 0.5) -> tuple[int, int]:
    """The run of consecutive layers around ``peak`` whose value is at least ``frac`` of the
    peak's."""
    layers = curve.index.to_numpy().astype(int)
    values = curve.to_numpy(dtype=float)
    bar = frac * float(curve.loc[peak])
    i = int(np.flatnonzero(layers == peak)[0])
    lo = hi = i
    while lo > 0 and values[lo - 1] >= bar and layers[lo - 1] == layers[lo] - 1:
        lo -= 1
    while hi < len(layers) - 1 and values[hi + 1] >= bar and layers[hi + 1] == layers[hi] + 1:
        hi += 1
    return int(layers[lo]), int(layers[hi])


def _layers(a: int, b: int) -> str:
    return f"layer {a}" if a == b else f"layers {a}–{b}"


def _line(topic: str, text: str, *, layer: float | None = None, n_layers: int,
          value: float | None = None, ci: tuple[Any, Any] = (None, None), n: Any = None,
          holds: bool | None = None) -> dict[str, Any]:
    return {"topic": topic, "text": text, "layer": layer,
            "depth": None if layer is None else round(_depth(layer, n_layers), 3),
            "value": value, "ci_low": ci[0], "ci_high": ci[1],
            "n": None if n is None or pd.isna(n) else int(n), "holds": holds}


def _site_line(topic: str, tracing_by_role: pd.DataFrame, row: dict[str, Any] | None, *,
               method: str, role: str, n_layers: int, lead: tuple[str, str], rule: str,
               extra: str = "") -> dict[str, Any] | None:
    """A line about one of ROME's sites: where its tracing curve peaks, the effect there with
    its interval, the run of layers above half the peak, and the verdict."""
    keep = _rows(tracing_by_role, method=method, role=role)
    site = tracing_by_role.loc[keep]
    if site.empty or row is None or row.get("layer") is None or pd.isna(row["layer"]):
        return None
    curve = _curve(site, method=method, role=role)
    peak = int(row["layer"])
    at = site.loc[(site["layer"].astype(int) == peak).to_numpy()].iloc[0]
    a, b = _span(curve, peak) if float(curve.loc[peak]) > 0 else (peak, peak)
    holds = _holds(row)
    why = str(row.get("measured", "")).partition("; ")[2]  # "58% of the ... (rule: ...)"
    verdict = (f"{rule} holds" if holds else f"unlike {rule}: {why}" if holds is False
               else f"{rule}: not judged")
    effect = float(at["effect"])
    text = (f"{lead[0] if holds else lead[1]}, {_layers(a, b)}: causal tracing peaks at layer "
            f"{peak} of {n_layers} (depth {_depth(peak, n_layers):.2f}), indirect effect "
            f"{_num(effect)}{_ci(at['ci_low'], at['ci_high'])}{_n(at['n'])}"
            f"{_zero(at['ci_low'], at['ci_high'])}{extra}; {verdict}.")
    return _line(topic, text, layer=peak, n_layers=n_layers, value=effect,
                 ci=(at["ci_low"], at["ci_high"]), n=at["n"], holds=holds)


def _strongest_head(heads: pd.DataFrame, role: str) -> str:
    """``"; the strongest head there is L3.h2 (patching 0.45 [0.30, 0.60], n=16 pairs)"`` from
    per-prompt head results at ``role`` (empty without any)."""
    from factfind.report.tables import site_label

    _per_prompt(heads, "head")
    rows = heads.loc[_rows(heads, role=role) & heads["head"].notna().to_numpy()]
    if rows.empty:
        return ""
    agg = aggregate(rows, by=[c for c in ("method", "component", "layer", "head", "role")
                              if c in rows.columns])
    best = agg.iloc[int(np.argmax(np.abs(agg["effect"].to_numpy(dtype=float))))]
    return (f"; the strongest single head there is {site_label(best.to_dict())} (activation "
            f"patching {_num(float(best['effect']))}{_ci(best['ci_low'], best['ci_high'])}"
            f"{_n(best['n'], 'pairs')}{_zero(best['ci_low'], best['ci_high'])})")


def _knows_line(accuracy: pd.DataFrame, pairs: int | None, L: int) -> dict[str, Any]:
    every = accuracy.iloc[-1]  # accuracy_table's last row pools every prompt
    groups = len(accuracy) - 1
    of = f" over {groups} relations" if groups > 1 else ""
    text = (f"The model knows {int(every['n_correct']):,} of {int(every['n']):,} scored "
            f"facts{of} ({float(every['accuracy']):.0%}"
            f"{_ci(every['ci_low'], every['ci_high'], _pct)})"
            + (f"; the analyses below use {pairs:,} clean/corrupt pairs of them"
               if pairs is not None else "") + ".")
    return _line("knows", text, n_layers=L, value=float(every["accuracy"]),
                 ci=(every["ci_low"], every["ci_high"]), n=every["n"])


def _pct(v: float) -> str:
    return f"{v:.0%}"


def _knockout_line(knockout: pd.DataFrame, findings: pd.DataFrame, L: int
                   ) -> dict[str, Any] | None:
    _per_prompt(knockout, "knockout")
    by_role = _by_role(knockout)
    subject = by_role.loc[_rows(by_role, role="subject")]
    if subject.empty:
        return None
    row = _finding(findings, "Geva knockout: final -> subject")
    order = _finding(findings, "Geva knockout: relation before subject")
    worst = subject.iloc[int(np.argmin(subject["effect"].to_numpy(dtype=float)))]
    drop, ci = -float(worst["effect"]), (-float(worst["ci_high"]), -float(worst["ci_low"]))
    layer = int(worst["layer"])
    verdicts = [r for r in (row, order) if _holds(r) is not None]
    held = sum(bool(_holds(r)) for r in verdicts)
    rel = ""
    if order is not None and _holds(order) is not None:
        rel = (f"; the relation's tokens are read {'earlier' if _holds(order) else 'no earlier'}"
               f" (damage centroid at layer {float(order['value']):.1f} vs "
               f"{float(order['contrast']):.1f})")
    lead = ("The final token reads the subject through attention" if _holds(row) else
            "Attention from the final token to the subject")
    what = (f"cuts p(answer) by {_pct(drop)}{_ci(*ci, _pct)}" if drop > 0 else
            f"never lowers p(answer) (at most {_pct(-drop)}{_ci(-ci[1], -ci[0], _pct)} higher)")
    text = (f"{lead}: blocking final → subject at layer {layer} (depth {_depth(layer, L):.2f}) "
            f"{what}{_n(worst['n'])}{_zero(*ci)}{rel}; {held} of {len(verdicts)} of Geva et "
            f"al.'s findings "
            f"hold.")
    return _line("knockout", text, layer=layer, n_layers=L, value=drop, ci=ci, n=worst["n"],
                 holds=None if not verdicts else held == len(verdicts))


def _effective_line(eff: dict[str, Any] | None, L: int) -> dict[str, Any] | None:
    if eff is None or eff.get("layer") is None or pd.isna(eff["layer"]):
        return None
    k = int(eff["layer"])
    needs = ("no attention at all" if k == 0 else "attention in every layer" if k >= L
             else f"attention only in {_layers(0, k - 1)}")
    text = (f"The subject's tokens need {needs}: mean-ablating their attention from layer {k} "
            f"on keeps >= 90% of the clean accuracy {float(eff['value']):.2f} (from layer 0 on: "
            f"{float(eff['contrast']):.2f}){_n(eff.get('n'))}; Fact Finding's effective model "
            f"{'holds' if _holds(eff) else 'differs'} (rule: depth <= 0.35, here "
            f"{_depth(k, L):.2f}).")
    return _line("effective model", text, layer=k, n_layers=L, value=float(eff["value"]),
                 n=eff.get("n"), holds=_holds(eff))


def _probe_line(probe: dict[str, Any] | None, L: int) -> dict[str, Any] | None:
    if probe is None or probe.get("value") is None or pd.isna(probe["value"]):
        return None
    best, chance = float(probe["value"]), float(probe["contrast"])
    held = _n(probe.get("n"), "held-out prompts")
    if _holds(probe) is None:
        text = f"Where the attribute becomes linearly readable is not judged: {probe['measured']}."
    elif probe.get("layer") is None or pd.isna(probe["layer"]):
        text = (f"No linear probe reads the attribute at the last subject token: held-out "
                f"accuracy {best:.2f} vs chance {chance:.2f}{held}.")
    else:
        onset = int(probe["layer"])
        text = (f"A linear probe reads the attribute at the last subject token from layer "
                f"{onset} (depth {_depth(onset, L):.2f}): held-out accuracy up to {best:.2f} vs "
                f"chance {chance:.2f}{held}; Fact Finding's probe finding "
                f"{'holds' if _holds(probe) else 'differs'}.")
    return _line("probe", text, layer=probe.get("layer"), n_layers=L, value=best,
                 n=probe.get("n"), holds=_holds(probe))


def _circuit_line(circuit: pd.DataFrame, n: int | None, L: int) -> dict[str, Any] | None:
    if circuit.empty or not {"size", "faithfulness"} <= set(circuit.columns):
        return None
    path = circuit.loc[circuit["accepted"].to_numpy(dtype=bool)] \
        if "accepted" in circuit.columns else circuit
    if path.empty:
        return None
    first, last = path.iloc[0], path.iloc[-1]
    size, total = int(last["size"]), int(first["size"])
    kinds = _kinds(str(last["nodes"])) if "nodes" in path.columns else ""
    f = float(last["faithfulness"])
    over = (" (above 1: with everything else ablated the circuit overshoots the full model's "
            "logit difference, so some ablated nodes pushed against the answer)") if f > 1.1 \
        else ""
    text = (f"A circuit of {size:,} of {total:,} nodes ({size / total:.1%}{kinds}) has "
            f"faithfulness {f:.2f} (its share of the model's logit difference over the fully "
            f"ablated model's) with every other node ablated{_n(n, 'pairs')}{over}.")
    return _line("circuit", text, n_layers=L, value=float(last["faithfulness"]), n=n)


def _kinds(nodes: str) -> str:
    """``": 20 neurons, 8 heads"``: the kinds of ``;``-separated node ids, most common first."""
    from factfind.graph.node import Node

    counts: dict[str, int] = {}
    for node_id in filter(None, nodes.split(";")):
        try:
            kind = Node.parse(node_id).kind
        except ArgumentError:  # an id of another grammar: count it as a node
            kind = "other"
        counts[kind] = counts.get(kind, 0) + 1
    plural = {"mlp": "MLPs", "attn": "attention layers", "resid": "residual streams"}
    parts = [f"{c} {plural.get(k, k + 's')}" for k, c in
             sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f": {', '.join(parts)}" if parts else ""


def _verdict_line(findings: pd.DataFrame, L: int) -> dict[str, Any] | None:
    judged = [r for r in findings.to_dict("records") if _holds(r) is not None]
    if not judged:
        return None
    differ = [str(r["finding"]) for r in judged if not _holds(r)]
    open_ = len(findings) - len(judged)
    text = (f"{len(judged) - len(differ)} of {len(judged)} findings of the papers hold on this "
            f"model" + (f"; differs: {', '.join(differ)}" if differ else "")
            + (f"; {open_} could not be judged" if open_ else "") + ".")
    return _line("verdict", text, n_layers=L, value=(len(judged) - len(differ)) / len(judged),
                 n=len(judged))


def findings_summary(findings: pd.DataFrame, *, n_layers: int,
                     accuracy: pd.DataFrame | None = None, pairs: int | None = None,
                     tracing: pd.DataFrame | None = None, heads: pd.DataFrame | None = None,
                     knockout: pd.DataFrame | None = None,
                     circuit: pd.DataFrame | None = None, circuit_n: int | None = None,
                     ) -> pd.DataFrame:
    """"Findings first": five to eight lines that open a report, each a sentence and the
    numbers behind it: what the model knows, where it looks the fact up, how the answer
    reaches the final token, how much attention the subject needs, where the attribute becomes
    readable, how small a circuit does it, and how many of the papers' findings hold. Nothing
    is written by hand: every sentence is built from the run's tables, and a line whose table
    is missing is left out.

    Args:
        findings: :func:`literature_findings` of the run (the verdicts and the peak layers).
        n_layers: the model's layers (for depth = layer / (layers - 1)).
        accuracy: :func:`factfind.report.accuracy_table` of the scored facts (its ``all`` row).
        pairs: how many clean/corrupt pairs the analyses use.
        tracing: per-prompt :func:`factfind.causal_tracing` results (intervals are over
            prompts, token positions pooled by role).
        heads: per-prompt activation patching of heads (``head`` set), for the strongest head
            at the final token.
        knockout: per-prompt :func:`factfind.attention_knockout` results.
        circuit: the path of :func:`factfind.prune_circuit` (``size``, ``faithfulness``,
            ``accepted``): its last accepted circuit against the first (every node).
        circuit_n: the pairs the circuit was measured on.

    Returns:
        One row per line with :data:`SUMMARY_COLUMNS` (``text`` is the sentence).

    Raises:
        ArgumentError: ``tracing``, ``heads`` or ``knockout`` already aggregated (the
            intervals need the prompts).

    Example::

        lines = findings_summary(findings, n_layers=30, tracing=tracing, knockout=knockout)
        print("\\n".join(lines["text"]))
    """
    L = n_layers
    rows: list[dict[str, Any] | None] = []
    if accuracy is not None and not accuracy.empty:
        rows.append(_knows_line(accuracy, pairs, L))
    if tracing is not None and not tracing.empty:
        _per_prompt(tracing, "causal tracing")
        by_role = _by_role(tracing)
        rows.append(_site_line(
            "lookup", by_role, _finding(findings, "ROME early site"),
            method="causal_tracing/mlp", role="subject_last", n_layers=L,
            lead=("The fact is looked up by MLPs at the last subject token",
                  "Restoring MLPs at the last subject token helps most"),
            rule="ROME's early site"))
        rows.append(_site_line(
            "readout", by_role, _finding(findings, "ROME late site"),
            method="causal_tracing/attn", role="final", n_layers=L,
            lead=("Attention at the final token moves it to the answer",
                  "Restoring attention at the final token helps most"),
            rule="ROME's late site",
            extra="" if heads is None else _strongest_head(heads, "final")))
    if knockout is not None and not knockout.empty:
        rows.append(_knockout_line(knockout, findings, L))
    rows.append(_effective_line(_finding(findings, "Fact Finding effective model"), L))
    rows.append(_probe_line(_finding(findings, "Fact Finding probe by layer"), L))
    if circuit is not None:
        rows.append(_circuit_line(circuit, circuit_n, L))
    rows.append(_verdict_line(findings, L))
    return pd.DataFrame([r for r in rows if r is not None], columns=list(SUMMARY_COLUMNS))
