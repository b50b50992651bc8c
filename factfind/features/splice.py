"""Splicing dictionaries into a forward pass.

A *spliced* run replaces the activation a dictionary writes by the dictionary's reconstruction
plus an error term::

    site  <-  reconstruct(x) + error,      error = site - reconstruct(x)

With the error included the run is the model's own (to float rounding: the logits agree to
~1e-6), and every quantity downstream can be split into the features' share and the error's.
With the error *excluded* the model runs on what the dictionary reconstructs, which is what
measures a dictionary (CE-loss recovered, :mod:`factfind.features.evaluation`) and what a
circuit over features claims to explain (Marks et al. 2024; Ameisen et al. 2025).

An SAE reads and writes one site, so its edit sees everything it needs. A transcoder reads
``mlp_in[l]`` and writes ``mlp_out[l]``: its splice is two edits of one run, the first keeping
the MLP's input unchanged (and remembering it), the second replacing the MLP's output. Both go
through :meth:`factfind.model.Model.run` like any other patch, so nnsight stays in the adapter.

Example::

    run = spliced_run(model, batch, dicts, error=False, capture=feats)
    feats["L3.tc"]              # [batch pos d_sae] feature activations of the run
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from factfind.errors import ArgumentError
from factfind.features.dictionary import Dictionaries, Dictionary, DictKind
from factfind.types import Component, SiteKey

Edit = Callable[[Tensor], Tensor]


def _then(first: Edit | None, second: Edit) -> Edit:
    return second if first is None else (lambda a: second(first(a)))


def splice_edits(dicts: Dictionaries | Iterable[Dictionary], *, error: bool | Mapping[str, bool]
                 = True, capture: dict[str, Tensor] | None = None,
                 edit_features: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                 ) -> dict[SiteKey, Edit]:
    """The edits that splice ``dicts`` into a run of :meth:`Model.run`.

    Args:
        dicts: the dictionaries to splice (a :class:`Dictionaries` or any iterable of them).
        error: include each dictionary's error term (``True``: the run is the model's own),
            drop it (``False``: the run is the dictionaries'), or per dictionary name.
        capture: if given, filled with each dictionary's feature activations ``[batch pos
            d_sae]`` by name (``L3.tc``), as the run computed them.
        edit_features: per dictionary name, a function applied to its feature activations
            before decoding (steering, ablating or swapping features). The error term stays the
            one of the *unedited* features, so an edit changes the run by exactly its decoded
            difference.

    Returns:
        ``{(component, layer): edit}`` to pass as ``Model.run(edits=...)``; two dictionaries
        writing one site are applied in the order given.
    """
    items = list(dicts.values()) if isinstance(dicts, Dictionaries) else list(dicts)
    edit_features = dict(edit_features or {})
    names = {d.name for d in items}
    for name in [*edit_features, *(error if isinstance(error, Mapping) else {})]:
        if name not in names:
            raise ArgumentError(f"no dictionary named {name!r} to splice; have "
                                f"{', '.join(sorted(names))}")
    edits: dict[SiteKey, Edit] = {}
    for d in items:
        keep = error.get(d.name, True) if isinstance(error, Mapping) else bool(error)
        write = _writer(d, keep, capture, edit_features.get(d.name))
        if d.kind is DictKind.SAE:
            key = (d.site, d.layer)
            edits[key] = _then(edits.get(key), _sae_edit(write))
        else:
            seen: dict[str, Tensor] = {}
            key_in, key_out = (Component.MLP_IN, d.layer), (Component.MLP_OUT, d.layer)
            edits[key_in] = _then(edits.get(key_in), _remember(seen))
            edits[key_out] = _then(edits.get(key_out), _transcoder_edit(write, seen))
    return edits


def _writer(d: Dictionary, keep: bool, capture: dict[str, Tensor] | None,
            edit: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, target) -> what the site becomes``: reconstruction of ``x`` (features edited), plus
    the error of the unedited reconstruction against ``target`` when ``keep``."""

    def write(x: Tensor, target: Tensor) -> Tensor:
        acts = d.encode(x)
        if capture is not None:
            capture[d.name] = acts
        skip = d.skip(x) if d.W_skip is not None else 0.0
        recon = d.decode(acts) + skip
        out = recon if edit is None else d.decode(edit(acts)) + skip
        if keep:
            out = out + (target.to(recon.dtype) - recon)
        return out.to(target.dtype)

    return write


def _sae_edit(write: Callable[[Tensor, Tensor], Tensor]) -> Edit:
    return lambda a: write(a, a)


def _remember(seen: dict[str, Tensor]) -> Edit:
    def remember(x: Tensor) -> Tensor:
        seen["x"] = x
        return x

    return remember


def _transcoder_edit(write: Callable[[Tensor, Tensor], Tensor], seen: dict[str, Tensor]) -> Edit:
    def replace(y: Tensor) -> Tensor:
        return write(seen.pop("x"), y)

    return replace


def spliced_run(model: Any, batch: Any, dicts: Dictionaries | Iterable[Dictionary], *,
                error: bool | Mapping[str, bool] = True, capture: dict[str, Tensor] | None = None,
                edit_features: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                **run_kwargs: Any) -> Any:
    """One forward of ``model`` on ``batch`` with ``dicts`` spliced in (see
    :func:`splice_edits`); ``run_kwargs`` go to :meth:`Model.run` (``save``, ``logits``...).
    A dictionary that does not fit the model raises a one-line :class:`ArgumentError`."""
    ds = dicts if isinstance(dicts, Dictionaries) else Dictionaries(list(dicts))
    ds.check(model)
    edits = splice_edits(ds, error=error, capture=capture, edit_features=edit_features)
    clash = set(edits) & set(run_kwargs.get("edits") or {})
    if clash:
        raise ArgumentError(f"edits at {sorted(str(c) for c, _ in clash)} clash with the "
                            "spliced dictionaries; splice and edit different sites")
    edits.update(run_kwargs.pop("edits", None) or {})
    return model.run(batch, edits=edits, **run_kwargs)


__all__ = ["splice_edits", "spliced_run"]
