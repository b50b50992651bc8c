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

COLUMNS = ("finding", "source", "claim", "measured", "holds", "layer", "depth", "value",
           "contrast")
"""One row per finding: ``layer``/``depth`` (relative depth) locate it, ``value`` is its size
and ``contrast`` the number it is compared with (see each function)."""


def _depth(layer: float, n_layers: int) -> float:
    return float(layer) / max(1, n_layers - 1)


def _curve(df: pd.DataFrame, *, method: str | None = None, role: str | None = None,
           value: str = "effect") -> pd.Series:
    """Mean ``value`` by layer (index: layer, sorted) of the rows matching ``method`` and
    ``role``."""
    keep = np.ones(len(df), dtype=bool)
    if method is not None:
        keep &= (df["method"] == method).to_numpy()
    if role is not None:
        keep &= (df["role"].astype(str) == role).to_numpy()
    layers = df["layer"].to_numpy()[keep].astype(int)
    values = df[value].to_numpy()[keep].astype(float)
    index = np.unique(layers)
    means = [float(values[layers == layer].mean()) for layer in index]
    return pd.Series(means, index=index, dtype=float)


def _argmax(curve: pd.Series) -> int:
    return int(curve.index.to_numpy()[int(np.argmax(curve.to_numpy()))])


def _argmin(curve: pd.Series) -> int:
    return int(curve.index.to_numpy()[int(np.argmin(curve.to_numpy()))])


def _row(finding: str, source: str, claim: str, measured: str, holds: bool | None, *,
         layer: float | None = None, n_layers: int, value: float | None = None,
         contrast: float | None = None) -> dict[str, Any]:
    return {"finding": finding, "source": source, "claim": claim, "measured": measured,
            "holds": holds, "layer": layer,
            "depth": None if layer is None else round(_depth(layer, n_layers), 3),
            "value": value, "contrast": contrast}


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
        curve = _curve(tracing, method=method, role=role)
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
                         n_layers=n_layers, value=peak, contrast=part))
    subject = _curve(tracing, method="causal_tracing/mlp", role="subject_last")
    final = _curve(tracing, method="causal_tracing/mlp", role="final")
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
                         value=s_peak, contrast=f_peak))
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
                         contrast=None))
    claim = "information from the relation tokens reaches the final token earlier"
    if "relation" in cents and "subject" in cents:
        rel, sub = cents["relation"], cents["subject"]
        measured = (f"damage centroid of final -> relation at layer {rel:.1f}, of final -> "
                    f"subject at layer {sub:.1f}")
        rows.append(_row("Geva knockout: relation before subject", "Geva et al. 2023", claim,
                         measured, bool(rel < sub), layer=rel, n_layers=n_layers, value=rel,
                         contrast=sub))
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
    return _row("Fact Finding effective model", "Nanda et al. 2023", claim, measured,
                bool(_depth(k, n_layers) <= max_depth), layer=k, n_layers=n_layers,
                value=clean, contrast=acc0)


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
                    value=best, contrast=chance)
    if not best > chance:  # never above chance (or NaN): there is no onset
        return _row("Fact Finding probe by layer", "Nanda et al. 2023", claim,
                    f"held-out accuracy never exceeds chance ({best:.2f} vs {chance:.2f})",
                    False, n_layers=n_layers, value=best, contrast=chance)
    bar = chance + reach * (best - chance)
    onset = int(curve.index.to_numpy()[curve.to_numpy() >= bar].min())
    measured = (f"held-out accuracy rises from {float(curve.iloc[0]):.2f} (layer 0) to "
                f"{best:.2f} (chance {chance:.2f}); {reach:.0%} of the way at layer {onset} "
                f"(depth {_depth(onset, n_layers):.2f})")
    holds = bool(best - chance >= 0.1 and _depth(onset, n_layers) <= max_depth)
    return _row("Fact Finding probe by layer", "Nanda et al. 2023", claim, measured, holds,
                layer=onset, n_layers=n_layers, value=best, contrast=chance)


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
