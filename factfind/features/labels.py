"""What do features stand for? Scored against known labels, and labelled from their top tokens.

Two ways to say what a feature means, neither calling an external LLM:

* **Against ground truth** (:func:`attribute_features`). When the world's attributes are known
  (the model organism's people each have a sport, a country, ...; :mod:`factfind.organism.world`)
  a feature read at a token role is a binary classifier: it *fires* on a prompt when its
  activation there exceeds ``min_activation``. For an attribute value ``v`` (say
  ``basketball``), over prompts whose subject has a known value:

      precision = P(subject's value is v | feature fires)
      recall    = P(feature fires | subject's value is v)
      F1        = 2 precision recall / (precision + recall)

  ``base_rate = P(value is v)`` is the precision of a feature that fires at random. A feature
  "for the people of one sport" has precision near 1 and a recall well above 0 on subjects
  the dictionary was not trained on. (A neuron or a probe direction can be scored the same way:
  this is the feature-level version of Gurnee et al. 2023's sparse probing.)

* **From the top tokens** (:func:`auto_label`). Bills et al. 2023 and Neuronpedia label a
  feature with an LLM that reads its top-activating contexts; with no LLM the most telling
  words are the ones a feature fires on and the ones its decoder promotes through the
  unembedding. The label lists both: ``fires on ' Paris', ' France' -> promotes ' French'``.

Example::

    df = attribute_features(model, dicts, facts, attribute="sport", role="final")
    df.sort_values("f1", ascending=False).groupby("value").head(1)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.errors import ArgumentError, EmptyInputError
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.tokens import as_dictionaries
from factfind.localize.probing import _gather_role
from factfind.results import tidy
from factfind.types import Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset
    from factfind.model import Model


def role_feature_activations(model: Model, dicts: Dictionaries | Dictionary |
                             Iterable[Dictionary], facts: FactDataset | Sequence[Any], *,
                             role: Role | str = Role.SUBJECT_LAST, batch_size: int = 256
                             ) -> dict[str, Tensor]:
    """Each dictionary's feature activations at one token role of each prompt.

    The site a dictionary reads is saved in one run per batch (all dictionaries at once) and
    gathered at ``role`` (a group role: the mean over its tokens, as
    :func:`factfind.localize.probing` does), then encoded.

    Returns:
        ``{name: [prompt d_sae]}`` (float32, CPU).
    """
    ds = as_dictionaries(dicts)
    ds.check(model)
    r = Role(role)
    prompts = list(facts)
    if not prompts:
        raise EmptyInputError("no prompts: the dataset is empty")
    sites = sorted({(d.site, d.layer) for d in ds.values()}, key=str)
    parts: dict[str, list[Tensor]] = {name: [] for name in ds}
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = model.tokenize(prompts[start:start + batch_size])
            run = model.run(batch, save=sites)
            for d in ds.values():
                x = _gather_role(run.acts[(d.site, d.layer)], batch, r)
                parts[d.name].append(d.encode(x.to(d.W_enc.device)).float().cpu())
    return {name: torch.cat(v) for name, v in parts.items()}


def subject_labels(facts: FactDataset | Sequence[Any], attribute: str) -> dict[str, str]:
    """``{subject: value}`` of relation ``attribute`` among ``facts`` (e.g. each person's sport).

    Raises:
        ArgumentError: no fact of that relation, or a subject with two values.
    """
    out: dict[str, str] = {}
    for f in facts:
        if f.relation == attribute and out.setdefault(f.subject, f.attribute) != f.attribute:
            raise ArgumentError(f"subject {f.subject!r} has two values of {attribute!r}: "
                                f"{out[f.subject]!r} and {f.attribute!r}")
    if not out:
        rels = sorted({f.relation for f in facts})
        raise ArgumentError(f"no fact of relation {attribute!r} to label subjects with; the "
                            f"facts have {rels}")
    return out


@validated
def attribute_features(
    model: Model,
    dicts: Dictionaries | Dictionary | Iterable[Dictionary],
    facts: FactDataset | Sequence[Any],
    *,
    attribute: str = "sport",
    role: Role | str = Role.SUBJECT_LAST,
    labels: dict[str, str] | None = None,
    min_activation: float = 0.0,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Features that fire for the subjects of one attribute value, scored against the truth.

    Args:
        model, dicts: the model and its dictionaries.
        facts: the prompts to read the features on (any relation: a feature at the subject's
            last token may know the sport of a person asked about their country).
        attribute: the relation whose value labels each subject (``sport``); its facts in
            ``facts`` give the labels unless ``labels`` does.
        role: the token role read (``subject_last``, ``final``, ...).
        labels: ``{subject: value}``, e.g. from the organism's world; prompts whose subject has
            no label are skipped.
        min_activation: a feature fires on a prompt when its activation exceeds this.

    Returns:
        One row per (dictionary, feature that fired, value), ``method="features/attribute"``:
        ``dictionary``, ``layer``, ``feature``, ``feature_id`` (``L3.res.f12@final``),
        ``role``, ``attribute``, ``value``, ``precision``, ``recall``, ``effect`` = ``f1``,
        ``fired`` (prompts it fires on), ``positives`` (prompts of the value), ``hits``,
        ``base_rate`` (the precision of a random feature), ``n`` (labelled prompts).
        Sorted by ``f1``, best first.
    """
    r = Role(role)
    prompts = list(facts)
    lab = labels if labels is not None else subject_labels(prompts, attribute)
    keep = [p for p in prompts if p.subject in lab]
    if not keep:
        raise EmptyInputError(f"no prompt about a subject with a known {attribute!r}")
    ds = as_dictionaries(dicts)
    acts = role_feature_activations(model, ds, keep, role=r, batch_size=batch_size)
    values = sorted({lab[p.subject] for p in keep})
    y = torch.tensor([values.index(lab[p.subject]) for p in keep])
    onehot = torch.nn.functional.one_hot(y, len(values)).double()  # [prompt value]
    positives = onehot.sum(0)
    n = len(keep)
    frames = []
    for d in ds.values():
        fires = (acts[d.name] > min_activation).double()  # [prompt d_sae]
        fired = fires.sum(0)
        alive = torch.nonzero(fired > 0).flatten()
        if len(alive) == 0:
            continue
        hits = (fires[:, alive].T @ onehot)  # [alive value]
        prec = hits / fired[alive, None]
        rec = hits / positives[None]
        f1 = torch.where(hits > 0, 2 * prec * rec / (prec + rec).clamp(min=1e-12), 0.0)
        feat = alive.repeat_interleave(len(values))
        frames.append(pd.DataFrame({
            "method": "features/attribute", "dictionary": d.name, "layer": d.layer,
            "feature": feat.numpy(), "feature_id": [d.feature_id(int(i), r.value) for i in feat],
            "role": r.value, "attribute": attribute, "value": values * len(alive),
            "precision": prec.flatten().numpy(), "recall": rec.flatten().numpy(),
            "effect": f1.flatten().numpy(), "f1": f1.flatten().numpy(),
            "fired": fired[alive].repeat_interleave(len(values)).numpy().astype(int),
            "positives": positives.repeat(len(alive)).numpy().astype(int),
            "hits": hits.flatten().numpy().astype(int),
            "base_rate": (positives / n).repeat(len(alive)).numpy(), "n": n}))
    if not frames:
        raise EmptyInputError(f"no feature fires above {min_activation} on any of the {n} "
                              "prompts")
    out = pd.concat(frames, ignore_index=True).sort_values(
        ["f1", "precision"], ascending=False, kind="stable")
    return tidy(out.reset_index(drop=True))


def best_attribute_features(df: pd.DataFrame, *, max_density: float = 0.5) -> pd.DataFrame:
    """The best feature (by F1) for each value of :func:`attribute_features`' frame, among
    features that fire on at most ``max_density`` of the prompts (a feature that fires on
    nearly every prompt has recall 1 and the base rate as precision: an F1 near
    ``2 b / (1 + b)`` that says nothing about the value)."""
    sparse = np.asarray(df["fired"], dtype=float) <= max_density * np.asarray(df["n"],
                                                                                dtype=float)
    keep = pd.DataFrame(df[sparse])
    return keep.sort_values(["f1", "precision"], ascending=False, kind="stable") \
        .groupby("value", sort=True).head(1).sort_values("value").reset_index(drop=True)


def _clean(token: str) -> str:
    return token.replace("\n", "\\n")


def auto_label(activating: Sequence[str], promoted: Sequence[str], *, n: int = 3) -> str:
    """A short label from the tokens a feature fires on (most frequent first, as given) and
    the tokens its decoder promotes: ``fires on 'Paris', 'France' -> promotes 'French'``."""
    fire = [t for t, _ in Counter(_clean(t).strip() or _clean(t) for t in activating
                                  ).most_common(n)]
    prom = [_clean(t).strip() or _clean(t) for t in list(promoted)[:n]]
    parts = []
    if fire:
        parts.append("fires on " + ", ".join(repr(t) for t in fire))
    if prom:
        parts.append("promotes " + ", ".join(repr(t) for t in prom))
    return " -> ".join(parts) if parts else "(never fires)"


__all__ = ["attribute_features", "auto_label", "best_attribute_features",
           "role_feature_activations", "subject_labels"]
