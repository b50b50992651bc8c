"""Feature dashboards: what a feature fires on, what it writes, how often, and a label.

A dictionary feature is a direction the model reads (its encoder column) and a direction it
writes (its decoder row). Bricken et al. 2023 ("Towards monosemanticity") read each feature from
a *dashboard*, which SAELens' ``sae_dashboard`` and Neuronpedia now draw for every published
dictionary. :func:`feature_dashboard` builds the same panels as tidy frames:

* **top-activating contexts**: the tokens where the feature is largest, with a window of context
  and the activating token marked, from the facts and from a corpus, plus samples at quantiles
  of its non-zero activations (Neuronpedia's "activation intervals": the maximum says what the
  feature is most sure of, the quantiles whether the weaker firings mean the same);
* **the decoder's logit lens**: the decoder row ``W_dec[f]`` read through the final norm (its
  gain and centring, the scale frozen at 1 since only the ranking matters) and the unembedding
  ``W_U`` (nostalgebraist 2020; the direct logit effect of the feature's write, as
  :mod:`factfind.localize.dla` reads components): the tokens it promotes and suppresses most;
* **activation density**: the fraction of tokens it fires on (``log10`` density, SAELens'
  histogram axis) and a histogram of its non-zero activations;
* **an automatic label** from the top tokens it fires on and the tokens it promotes
  (:func:`factfind.features.labels.auto_label`), without an external LLM.

Evaluated tokens exclude padding and special tokens, as in :mod:`.evaluation`. Cost: one forward
per batch of the facts and of the corpus (all features of one call share it), plus one
``[d_model] @ [d_model d_vocab]`` product per feature.

Example::

    dash = feature_dashboard(model, dicts, "L3.tc.f120", facts=facts, corpus=texts)
    dash.label                  # "fires on 'Jordan', 'Bryant' -> promotes 'basketball'"
    dash.contexts.head()        # source, kind, activation, context with the token in [[...]]
    dash                        # in a notebook: the HTML panels
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.errors import ArgumentError, NotFoundError
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.labels import auto_label
from factfind.features.tokens import as_dictionaries, special_ids, token_batches
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.model import Model

_FEATURE = re.compile(r"(?P<dict>L\d+\.[a-z]+)\.f(?P<index>\d+)(?:@(?P<role>\w+))?")

FeatureRef = str | tuple[str, int] | int


def resolve_feature(dicts: Dictionaries, feature: FeatureRef) -> tuple[Dictionary, int]:
    """The dictionary and index a feature reference names.

    Args:
        feature: a node id (``"L3.tc.f120@final"`` or ``"L3.tc.f120"``), a pair
            ``("L3.tc", 120)``, or an index when ``dicts`` holds one dictionary.

    Raises:
        NotFoundError: the id is malformed, names no dictionary of ``dicts``, or an index past
            its width.
    """
    if isinstance(feature, tuple):
        name, index = feature
    elif isinstance(feature, (int, np.integer)) and not isinstance(feature, bool):
        if len(dicts) != 1:
            raise NotFoundError(f"feature {feature} is an index, but the set has {len(dicts)} "
                                f"dictionaries ({', '.join(dicts)}); pass 'L3.tc.f{feature}' or "
                                f"('L3.tc', {feature})")
        name, index = next(iter(dicts)), int(feature)
    else:
        m = _FEATURE.fullmatch(str(feature))
        if m is None:
            raise NotFoundError(f"{feature!r} names no feature: expected a node id such as "
                                "'L3.tc.f120@final', a pair ('L3.tc', 120) or an index")
        name, index = m["dict"], int(m["index"])
    if name not in dicts:
        raise NotFoundError(f"{feature!r} names no feature: no dictionary {name!r} in this set "
                            f"({', '.join(dicts)})")
    d = dicts[name]
    if not 0 <= int(index) < d.d_sae:
        raise NotFoundError(f"{feature!r} names no feature: {name} has features 0..{d.d_sae - 1}")
    return d, int(index)


def _role_of(feature: FeatureRef) -> str:
    """The role a node id names (``"all"`` for pairs, indices and ids without one)."""
    m = _FEATURE.fullmatch(str(feature)) if isinstance(feature, str) else None
    return m["role"] if m is not None and m["role"] else "all"


def logit_lens(model: Model, d: Dictionary, feature: int, *, n: int = 10) -> pd.DataFrame:
    """The tokens a feature's decoder row promotes and suppresses through the final norm.

    Returns:
        ``2 n`` rows: ``direction`` (``promoted``/``suppressed``), ``rank`` (0 = strongest),
        ``token_id``, ``token``, ``logit`` (the row's direct logit effect per unit activation,
        with the final norm's scale frozen at 1).
    """
    w = d.W_dec[feature].to(model.device, model.dtype)[None]  # [1 d_model]
    one = torch.ones(1, 1, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        read = model.final_norm_frozen(w, one, bias=False)  # [1 d_model]
        logits = (read.float() @ model.W_U.float())[0].cpu()  # [d_vocab]
    n = min(n, logits.numel())
    rows = []
    for direction, vals in (("promoted", logits.topk(n)), ("suppressed", (-logits).topk(n))):
        for rank, (v, i) in enumerate(zip(vals.values.tolist(), vals.indices.tolist(),
                                          strict=True)):
            rows.append({"direction": direction, "rank": rank, "token_id": i,
                         "token": model.tokenizer.decode([i]),
                         "logit": v if direction == "promoted" else -v})
    return pd.DataFrame(rows)


@dataclass
class FeatureDashboard:
    """One feature's panels (see the module docstring); every panel is a tidy frame.

    Attributes:
        feature_id: ``L3.tc.f120@all``; dictionary: ``L3.tc``; layer; feature: the index.
        label: the automatic label.
        density: the fraction of evaluated tokens it fires on (the corpus's, else the facts');
            tokens: how many were evaluated.
        contexts: one row per shown context: ``source`` (``facts``/``corpus``), ``kind``
            (``top`` or ``quantile 0.50``), ``activation``, ``row``, ``position``, ``token``,
            ``left``, ``right`` (the text around it) and ``context`` (the token in ``[[...]]``).
        logit_lens: :func:`logit_lens`'s frame.
        histogram: ``bin_low``, ``bin_high``, ``count`` of its non-zero activations.
        stats: per source: ``tokens``, ``fired``, ``density``, ``max``, ``mean_active``.
    """

    feature_id: str
    dictionary: str
    layer: int
    feature: int
    label: str
    density: float
    tokens: int
    contexts: pd.DataFrame
    logit_lens: pd.DataFrame
    histogram: pd.DataFrame
    stats: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def log10_density(self) -> float:
        return math.log10(self.density) if self.density > 0 else -math.inf

    def to_html(self) -> str:
        """An HTML fragment (no ``<html>``/``<head>``; classes ``ff-dash*``) for reports."""
        e = html.escape
        out = [f'<div class="ff-dash" id="{e(self.feature_id)}">',
               f"<h4>{e(self.feature_id)} <small>{e(self.label)}</small></h4>",
               f"<p>density {self.density:.4g} (log10 {self.log10_density:.2f}) over "
               f"{self.tokens} tokens</p>"]
        for direction in ("promoted", "suppressed"):
            part = self.logit_lens[self.logit_lens["direction"] == direction]
            toks = ", ".join(f"<code>{e(repr(t))}</code> {v:+.2f}"
                             for t, v in zip(part["token"], part["logit"], strict=True))
            out.append(f"<p class='ff-dash-lens'><b>{direction}</b>: {toks}</p>")
        if len(self.contexts):
            out.append("<table class='ff-dash-contexts'><tr><th>source</th><th>kind</th>"
                       "<th>activation</th><th>context</th></tr>")
            for r in self.contexts.to_dict("records"):
                ctx = f"{e(str(r['left']))}<mark>{e(str(r['token']))}</mark>{e(str(r['right']))}"
                out.append(f"<tr><td>{e(str(r['source']))}</td><td>{e(str(r['kind']))}</td>"
                           f"<td>{float(r['activation']):.3g}</td><td>{ctx}</td></tr>")
            out.append("</table>")
        else:
            out.append("<p>never fires on the evaluated tokens</p>")
        out.append("</div>")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        return self.to_html()


@dataclass
class _Hits:
    """The non-zero activations of the asked features on one source."""

    ids: list[Tensor] = field(default_factory=list)  # per row: its token ids
    found: dict[int, list[tuple[float, int, int]]] = field(default_factory=dict)
    tokens: int = 0
    fired: dict[int, int] = field(default_factory=dict)


def _scan(model: Model, wanted: Sequence[tuple[Dictionary, int]], data: Any, *,
          batch_size: int, max_length: int, max_tokens: int | None, progress: bool,
          desc: str) -> _Hits:
    hits = _Hits(found={i: [] for i in range(len(wanted))},
                 fired={i: 0 for i in range(len(wanted))})
    by_dict: dict[str, list[int]] = {}
    for i, (d, _) in enumerate(wanted):
        by_dict.setdefault(d.name, []).append(i)
    dicts = {d.name: d for d, _ in wanted}
    sites = sorted({(d.site, d.layer) for d in dicts.values()}, key=str)
    bar = tqdm(desc=desc, unit="tok", total=max_tokens, disable=not progress)
    with torch.no_grad():
        for tb in token_batches(model, data, batch_size=batch_size, max_length=max_length,
                                max_tokens=max_tokens):
            run = model.run(tb.batch, save=sites)
            ids = tb.input_ids.cpu()
            base = len(hits.ids)
            hits.ids.extend(ids.unbind(0))
            valid = tb.valid
            hits.tokens += int(valid.sum())
            for name, idx in by_dict.items():
                d = dicts[name]
                x = run.acts[(d.site, d.layer)].to(d.W_enc.device)
                acts = d.encode(x).float().cpu()  # [b pos d_sae]
                for i in idx:
                    a = acts[..., wanted[i][1]] * valid  # [b pos]
                    nz = torch.nonzero(a > 0)
                    hits.fired[i] += len(nz)
                    hits.found[i].extend((float(a[b, p]), base + int(b), int(p))
                                         for b, p in nz.tolist())
            bar.update(int(valid.sum()))
    bar.close()
    return hits


def _context(model: Model, ids: Tensor, pos: int, window: tuple[int, int],
             special: set[int]) -> tuple[str, str, str]:
    dec = model.tokenizer.decode
    lo, hi = max(0, pos - window[0]), min(len(ids), pos + window[1] + 1)
    keep = [int(t) for t in ids[lo:pos].tolist() if int(t) not in special]
    right = [int(t) for t in ids[pos + 1:hi].tolist() if int(t) not in special]
    return dec(keep), dec([int(ids[pos])]), dec(right)


def _pick(found: list[tuple[float, int, int]], n_top: int, quantiles: Sequence[float],
          n_per_quantile: int) -> list[tuple[str, float, int, int]]:
    if not found:
        return []
    order = sorted(found, key=lambda t: (-t[0], t[1], t[2]))
    out = [("top", *t) for t in order[:n_top]]
    used = {(t[1], t[2]) for t in order[:n_top]}
    vals = np.array([t[0] for t in order])
    for q in quantiles:
        target = float(np.quantile(vals, q))
        near = sorted(order, key=lambda t: (abs(t[0] - target), t[1], t[2]))
        got = 0
        for t in near:
            if got == n_per_quantile:
                break
            if (t[1], t[2]) not in used:
                out.append((f"quantile {q:.2f}", *t))
                used.add((t[1], t[2]))
                got += 1
    return out


@validated
def feature_dashboards(
    model: Model,
    dicts: Dictionaries | Dictionary | Iterable[Dictionary],
    features: Sequence[FeatureRef],
    *,
    facts: Any = None,
    corpus: Any = None,
    n_top: int = 10,
    quantiles: Sequence[float] = (0.25, 0.5, 0.75),
    n_per_quantile: int = 2,
    window: tuple[int, int] = (10, 3),
    n_logits: int = 10,
    n_label: int = 3,
    bins: int = 20,
    batch_size: int = 16,
    max_length: int = 128,
    max_tokens: int | None = 50_000,
    progress: bool = True,
) -> list[FeatureDashboard]:
    """Dashboards of several features, sharing one pass over the facts and the corpus.

    See :func:`feature_dashboard` for the arguments.
    """
    ds = as_dictionaries(dicts)
    ds.check(model)
    if facts is None and corpus is None:
        raise ArgumentError("feature_dashboard needs facts=, corpus= or both to find "
                            "activating contexts in")
    if not features:
        raise ArgumentError("no features asked for")
    wanted = [resolve_feature(ds, f) for f in features]
    roles = [_role_of(f) for f in features]
    special = set(special_ids(model.tokenizer))
    sources = {name: _scan(model, wanted, data, batch_size=batch_size, max_length=max_length,
                           max_tokens=max_tokens, progress=progress, desc=f"dashboard {name}")
               for name, data in (("facts", facts), ("corpus", corpus)) if data is not None}
    out = []
    for i, (d, f) in enumerate(wanted):
        rows, stats, all_vals = [], [], []
        for name, hits in sources.items():
            found = hits.found[i]
            vals = [t[0] for t in found]
            all_vals += vals
            stats.append({"source": name, "tokens": hits.tokens, "fired": hits.fired[i],
                          "density": hits.fired[i] / max(hits.tokens, 1),
                          "max": max(vals) if vals else 0.0,
                          "mean_active": float(np.mean(vals)) if vals else 0.0})
            for kind, act, row, pos in _pick(found, n_top, quantiles, n_per_quantile):
                left, tok, right = _context(model, hits.ids[row], pos, window, special)
                rows.append({"source": name, "kind": kind, "activation": act, "row": row,
                             "position": pos, "token": tok, "left": left, "right": right,
                             "context": f"{left}[[{tok}]]{right}"})
        contexts = pd.DataFrame(rows, columns=["source", "kind", "activation", "row",
                                               "position", "token", "left", "right",
                                               "context"])
        lens = logit_lens(model, d, f, n=n_logits)
        top_tokens = list(contexts[contexts["kind"] == "top"]["token"])
        promoted = list(lens[lens["direction"] == "promoted"]["token"])
        density_src = sources.get("corpus") or sources["facts"]
        if all_vals:
            counts, edges = np.histogram(np.asarray(all_vals), bins=bins)
            hist = pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:], "count": counts})
        else:
            hist = pd.DataFrame({"bin_low": [], "bin_high": [], "count": []})
        out.append(FeatureDashboard(
            feature_id=d.feature_id(f, roles[i]), dictionary=d.name, layer=d.layer, feature=f,
            label=auto_label(top_tokens, promoted, n=n_label) if top_tokens else
            "never fires on the evaluated tokens; " + auto_label([], promoted, n=n_label),
            density=density_src.fired[i] / max(density_src.tokens, 1),
            tokens=density_src.tokens, contexts=contexts, logit_lens=lens, histogram=hist,
            stats=pd.DataFrame(stats),
            meta={"n_top": n_top, "quantiles": list(quantiles), "window": list(window),
                  "max_tokens": max_tokens, "fingerprint": d.fingerprint()}))
    return out


@validated
def feature_dashboard(
    model: Model,
    dicts: Dictionaries | Dictionary | Iterable[Dictionary],
    feature: FeatureRef,
    *,
    facts: Any = None,
    corpus: Any = None,
    n_top: int = 10,
    quantiles: Sequence[float] = (0.25, 0.5, 0.75),
    n_per_quantile: int = 2,
    window: tuple[int, int] = (10, 3),
    n_logits: int = 10,
    n_label: int = 3,
    bins: int = 20,
    batch_size: int = 16,
    max_length: int = 128,
    max_tokens: int | None = 50_000,
    progress: bool = True,
) -> FeatureDashboard:
    """One feature's dashboard: top contexts, logit lens, density and a label.

    Args:
        model, dicts: the model and its dictionaries.
        feature: a node id (``"L3.tc.f120@final"``, ``"L3.tc.f120"``), a pair ``("L3.tc",
            120)``, or an index when ``dicts`` holds one dictionary.
        facts: prompts to find contexts in (a ``FactDataset`` or list of ``FactPrompt``).
        corpus: text to find contexts in (strings, a corpus object or a token batch); its tokens
            give the density (else the facts' do).
        n_top: contexts at the maximum per source; quantiles, n_per_quantile: contexts near
            these quantiles of the non-zero activations per source.
        window: tokens shown before and after the activating one.
        n_logits: promoted and suppressed tokens in the logit lens; n_label: tokens in the
            label; bins: histogram bins.
        batch_size, max_length, max_tokens: how the sources are read (``max_tokens`` per
            source, whole batches).

    Returns:
        A :class:`FeatureDashboard`.

    Raises:
        NotFoundError: ``feature`` names no feature of ``dicts``.
        ArgumentError: neither facts nor corpus given.
    """
    return feature_dashboards(
        model, dicts, [feature], facts=facts, corpus=corpus, n_top=n_top, quantiles=quantiles,
        n_per_quantile=n_per_quantile, window=window, n_logits=n_logits, n_label=n_label,
        bins=bins, batch_size=batch_size, max_length=max_length, max_tokens=max_tokens,
        progress=progress)[0]


__all__ = ["FeatureDashboard", "feature_dashboard", "feature_dashboards", "logit_lens",
           "resolve_feature"]
