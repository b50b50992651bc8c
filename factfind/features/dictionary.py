"""Sparse dictionaries: a learned, overcomplete, sparse basis to read a model's activations in.

A model represents more features than it has dimensions (superposition), so its neurons are
polysemantic and the standard basis is not the one to read circuits in. A *sparse dictionary*
learns a better one from the model's own activations:

* an **SAE** (sparse autoencoder; Bricken et al. 2023, Cunningham et al. 2023) reads one site
  ``x`` (e.g. ``resid_post[l]``) and writes its reconstruction of the same site;
* a **transcoder** (Dunefsky et al. 2024) reads the MLP's input ``mlp_in[l]`` and writes an
  approximation of the MLP's output ``mlp_out[l]``: a sparse, wide stand-in for the MLP;
* a **skip transcoder** (Paulo et al. 2025) adds a dense linear path ``x @ W_skip``, which
  carries the MLP's linear part so that the features need only carry the rest.

All three share one computation::

    pre   = (x - b_dec if subtract_b_dec else x) @ W_enc + b_enc      [... d_sae]
    acts  = activation(pre)                                            [... d_sae], sparse
    out   = acts @ W_dec + b_dec  (+ x @ W_skip for a skip transcoder) [... d_out]

and differ in the activation that makes ``acts`` sparse:

* ``relu``: ``max(pre, 0)``, sparsity from an L1 penalty in training (Bricken et al.);
* ``topk``: the ``k`` largest of ``max(pre, 0)`` per token, the rest 0 (Gao et al. 2024);
* ``batchtopk``: the ``k * batch`` largest over a training batch (Bussmann et al. 2024); at
  inference a single learned ``threshold`` replaces the batch: ``pre * (pre > threshold)``;
* ``jumprelu``: ``pre * (pre > threshold)`` with one threshold per feature (Rajamanoharan et
  al. 2024, Gemma Scope).

The *error* of a dictionary on an activation is ``target - reconstruction``. Splicing a
dictionary into a run (:mod:`factfind.features.splice`) replaces the site by reconstruction plus
error, which is the model exactly; dropping the error is what measures the dictionary.

A :class:`Dictionary` is data (the weights and a few fields) plus pure functions; the formats it
is read from and written to, its training and its evaluation live in sibling modules.

Example::

    d = Dictionary.random(kind="transcoder", activation="topk", layer=3, d_in=64, d_sae=512, k=8)
    acts = d.encode(x)              # [batch pos 512], at most 8 non-zero per token
    y_hat = d.reconstruct(x)        # [batch pos 64], the dictionary's mlp_out
    d.error(x, y)                   # y - y_hat
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor

from factfind.errors import ArgumentError, NotFoundError
from factfind.types import Component


class DictKind(StrEnum):
    """What a dictionary reads and writes."""

    SAE = "sae"                          # reads and writes one site
    TRANSCODER = "transcoder"            # reads mlp_in, writes mlp_out
    SKIP_TRANSCODER = "skip_transcoder"  # a transcoder with a dense linear skip path


class Activation(StrEnum):
    """The non-linearity that makes the feature activations sparse (see the module docstring)."""

    RELU = "relu"
    TOPK = "topk"
    BATCHTOPK = "batchtopk"
    JUMPRELU = "jumprelu"


#: the short name of a dictionary in node ids (``L5.tc.f1234@final``), by kind and, for SAEs,
#: by the site it reads (Gemma Scope's names: res, mlp, att)
SHORT_NAMES: dict[tuple[DictKind, Component], str] = {
    (DictKind.TRANSCODER, Component.MLP_IN): "tc",
    (DictKind.SKIP_TRANSCODER, Component.MLP_IN): "stc",
    (DictKind.SAE, Component.RESID_POST): "res",
    (DictKind.SAE, Component.RESID_PRE): "rpre",
    (DictKind.SAE, Component.MLP_OUT): "mlp",
    (DictKind.SAE, Component.ATTN_OUT): "att",
}
SAE_SITES: tuple[Component, ...] = (Component.RESID_POST, Component.RESID_PRE,
                                    Component.MLP_OUT, Component.ATTN_OUT)


@dataclass(eq=False)
class Dictionary:
    """One sparse dictionary at one layer (see the module docstring for the computation).

    Attributes:
        kind: :class:`DictKind`.
        activation: :class:`Activation`.
        layer: the layer whose site it reads.
        site: the component it reads: ``mlp_in`` for transcoders, the SAE's site otherwise.
        W_enc: ``[d_in d_sae]``; ``b_enc``: ``[d_sae]``.
        W_dec: ``[d_sae d_out]``, one row per feature; ``b_dec``: ``[d_out]``.
        threshold: ``[d_sae]`` for JumpReLU, a scalar tensor for BatchTopK at inference,
            else ``None``.
        W_skip: ``[d_in d_out]`` for skip transcoders, else ``None``.
        k: active features per token for TopK (and the training ``k`` of BatchTopK).
        subtract_b_dec: whether the encoder reads ``x - b_dec`` (SAEs, as in SAELens and
            sparsify) or ``x`` (transcoders, whose ``b_dec`` lives in the output space).
        model: the model the dictionary was trained on (name or fingerprint), if known.
        meta: anything else worth keeping (training config, corpus, source files).
    """

    kind: DictKind
    activation: Activation
    layer: int
    site: Component
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None = None
    W_skip: Tensor | None = None
    k: int | None = None
    subtract_b_dec: bool | None = None
    model: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = _enum(DictKind, self.kind, "kind")
        self.activation = _enum(Activation, self.activation, "activation")
        self.site = _enum(Component, self.site, "site")
        if self.subtract_b_dec is None:
            self.subtract_b_dec = self.kind is DictKind.SAE
        self.layer = int(self.layer)
        if self.layer < 0:
            raise ArgumentError(f"dictionary layer must be >= 0, got {self.layer}")
        if self.kind is DictKind.SAE and self.site not in SAE_SITES:
            raise ArgumentError(f"an SAE reads one of {[s.value for s in SAE_SITES]}, "
                                f"got {self.site}")
        if self.kind is not DictKind.SAE and self.site is not Component.MLP_IN:
            raise ArgumentError(f"a {self.kind} reads mlp_in, got {self.site}")
        self._check_shapes()

    def _check_shapes(self) -> None:
        if self.W_enc.dim() != 2 or self.W_dec.dim() != 2:
            raise ArgumentError(f"{self.name}: W_enc and W_dec must be matrices, got "
                                f"{tuple(self.W_enc.shape)} and {tuple(self.W_dec.shape)}")
        d_in, d_sae = self.W_enc.shape
        if d_sae <= 0 or d_in <= 0:
            raise ArgumentError(f"{self.name}: width and d_in must be > 0, got W_enc "
                                f"{tuple(self.W_enc.shape)}")
        want = {"b_enc": (d_sae,), "W_dec": (d_sae, self.W_dec.shape[1]),
                "b_dec": (self.W_dec.shape[1],)}
        if self.kind is DictKind.SAE and self.W_dec.shape[1] != d_in:
            raise ArgumentError(f"{self.name}: an SAE writes what it reads, but W_dec is "
                                f"{tuple(self.W_dec.shape)} for d_in {d_in}")
        if self.kind is DictKind.SKIP_TRANSCODER:
            if self.W_skip is None:
                raise ArgumentError(f"{self.name}: a skip transcoder needs W_skip")
            want["W_skip"] = (d_in, self.W_dec.shape[1])
        elif self.W_skip is not None:
            raise ArgumentError(f"{self.name}: only a skip transcoder has W_skip")
        if self.activation is Activation.JUMPRELU:
            if self.threshold is None:
                raise ArgumentError(f"{self.name}: a JumpReLU dictionary needs a threshold")
            want["threshold"] = (d_sae,)
        if self.activation is Activation.BATCHTOPK and self.threshold is None:
            raise ArgumentError(f"{self.name}: a BatchTopK dictionary needs its inference "
                                "threshold (a scalar)")
        if self.activation in (Activation.TOPK, Activation.BATCHTOPK) and \
                (self.k is None or not 0 < self.k <= d_sae):
            raise ArgumentError(f"{self.name}: k must be in 1..{d_sae}, got {self.k}")
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ArgumentError(f"{self.name}: {name} must be {shape}, got "
                                    f"{tuple(t.shape)}")
        for f in self.tensor_fields():
            t = getattr(self, f)
            if t is not None and not torch.isfinite(t).all():
                raise ArgumentError(f"{self.name}: {f} holds NaN or infinite values")

    # ------------------------------------------------------------------ what it is

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """The width: the number of features."""
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def short(self) -> str:
        """The dictionary's name in node ids: ``tc``, ``stc``, ``res``, ``rpre``, ``mlp``,
        ``att``."""
        return SHORT_NAMES[(self.kind, self.site)]

    @property
    def name(self) -> str:
        """``L5.tc``: layer and short name."""
        try:
            return f"L{self.layer}.{self.short}"
        except (KeyError, AttributeError):
            return f"L{getattr(self, 'layer', '?')}.{getattr(self, 'kind', '?')}"

    @property
    def out_site(self) -> Component:
        """The component it writes: ``mlp_out`` for transcoders, its own site for SAEs."""
        return Component.MLP_OUT if self.kind is not DictKind.SAE else self.site

    @staticmethod
    def tensor_fields() -> tuple[str, ...]:
        return ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")

    def feature_id(self, feature: int, role: str = "all") -> str:
        """The node id of one feature: ``L5.tc.f1234@subject_last``."""
        return f"{self.name}.f{int(feature)}@{role}"

    def error_id(self, role: str = "all") -> str:
        """The node id of this dictionary's error term: ``L5.tc.err@subject_last``."""
        return f"{self.name}.err@{role}"

    def fingerprint(self) -> str:
        """A hash of the weights and fields (what a cache of results over it is keyed by)."""
        h = hashlib.sha256()
        h.update(f"{self.kind}|{self.activation}|{self.layer}|{self.site}|{self.k}|"
                 f"{self.subtract_b_dec}".encode())
        for f in self.tensor_fields():
            t = getattr(self, f)
            if t is not None:
                h.update(f.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ the four functions

    def pre_acts(self, x: Tensor) -> Tensor:
        """``[... d_in] -> [... d_sae]``: the encoder's pre-activations."""
        self._check_input(x)
        x = x.to(self.W_enc.dtype)
        if self.subtract_b_dec:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """``[... d_in] -> [... d_sae]``: the sparse feature activations."""
        return self.activate(self.pre_acts(x))

    def activate(self, pre: Tensor) -> Tensor:
        """The sparse activation of pre-activations ``[... d_sae]`` (at inference: BatchTopK
        uses its threshold here; its training batch rule is in :mod:`.training`)."""
        if self.activation is Activation.RELU:
            return torch.relu(pre)
        if self.activation is Activation.TOPK:
            assert self.k is not None
            vals, idx = torch.relu(pre).topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        assert self.threshold is not None  # JumpReLU (per feature) and BatchTopK (one value)
        return pre * (pre > self.threshold) * (pre > 0)

    def decode(self, acts: Tensor) -> Tensor:
        """``[... d_sae] -> [... d_out]``: the features' write (without the skip path)."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def skip(self, x: Tensor) -> Tensor:
        """The dense linear path of a skip transcoder (zero for the other kinds)."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_out, dtype=self.W_dec.dtype,
                               device=x.device)
        return x.to(self.W_skip.dtype) @ self.W_skip

    def reconstruct(self, x: Tensor) -> Tensor:
        """``[... d_in] -> [... d_out]``: what the dictionary writes for input ``x``."""
        out = self.decode(self.encode(x))
        return out + self.skip(x) if self.W_skip is not None else out

    def error(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """``target - reconstruct(x)``; the target of an SAE is its input."""
        target = x if target is None else target
        return target.to(self.W_dec.dtype) - self.reconstruct(x)

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ArgumentError(f"{self.name} reads d_in={self.d_in} but the activation has "
                                f"{x.shape[-1]} dimensions (a dictionary of another model "
                                "or site?)")

    # ------------------------------------------------------------------ conveniences

    def to(self, *args: Any, **kwargs: Any) -> Dictionary:
        """A copy with every tensor moved/cast like ``Tensor.to``."""
        moved = {f: (None if getattr(self, f) is None else getattr(self, f).to(*args, **kwargs))
                 for f in self.tensor_fields()}
        return replace(self, **moved)

    @classmethod
    def random(cls, *, kind: str = "sae", activation: str = "topk", layer: int = 0,
               d_in: int, d_sae: int, d_out: int | None = None, k: int | None = 8,
               site: Component | str | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Dictionary:
        """A randomly initialised dictionary (tests, and training's starting point): unit-norm
        decoder rows, the encoder their transpose (Conerly et al. 2024's initialisation),
        zero biases, thresholds at 0."""
        dk = _enum(DictKind, kind, "kind")
        d_out = d_in if dk is DictKind.SAE else (d_out or d_in)
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_out, generator=g, dtype=torch.float64)
        W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(dtype)
        W_enc = W_dec.T.clone() if d_out == d_in else \
            (torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / d_in ** 0.5).to(dtype)
        act = _enum(Activation, activation, "activation")
        threshold = None
        if act is Activation.JUMPRELU:
            threshold = torch.zeros(d_sae, dtype=dtype)
        elif act is Activation.BATCHTOPK:
            threshold = torch.zeros((), dtype=dtype)
        return cls(kind=dk, activation=act, layer=layer,
                   site=Component(site) if site else
                   (Component.MLP_IN if dk is not DictKind.SAE else Component.RESID_POST),
                   W_enc=W_enc, b_enc=torch.zeros(d_sae, dtype=dtype), W_dec=W_dec,
                   b_dec=torch.zeros(d_out, dtype=dtype), threshold=threshold,
                   W_skip=(torch.zeros(d_in, d_out, dtype=dtype)
                           if dk is DictKind.SKIP_TRANSCODER else None),
                   k=k if act in (Activation.TOPK, Activation.BATCHTOPK) else None)

    def config(self) -> dict[str, Any]:
        """The non-tensor fields, JSON-ready."""
        skip = set(self.tensor_fields())
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        for key in ("kind", "activation", "site"):
            out[key] = str(out[key])
        return out


def _enum(cls: Any, value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ArgumentError(f"dictionary {what} must be one of "
                            f"{[v.value for v in cls]}, got {value!r}") from None


class Dictionaries(Mapping[str, Dictionary]):
    """A set of dictionaries over layers and sites, keyed by name (``L5.tc``).

    Iterates in (layer, name) order. ``dicts.at(layer, "tc")`` finds one; ``dicts.check(model)``
    verifies that every dictionary fits the model's sites.
    """

    def __init__(self, items: Mapping[str, Dictionary] | list[Dictionary] | tuple[Dictionary, ...],
                 *, model: str | None = None, meta: Mapping[str, Any] | None = None) -> None:
        values = list(items.values()) if isinstance(items, Mapping) else list(items)
        if not values:
            raise ArgumentError("an empty set of dictionaries: pass at least one Dictionary")
        self._d: dict[str, Dictionary] = {}
        for d in sorted(values, key=lambda d: (d.layer, d.short)):
            if not isinstance(d, Dictionary):
                raise ArgumentError(f"Dictionaries holds Dictionary objects, got "
                                    f"{type(d).__name__}")
            if d.name in self._d:
                raise ArgumentError(f"two dictionaries named {d.name}: one per layer and site")
            self._d[d.name] = d
        self.model = model if model is not None else values[0].model
        self.meta = dict(meta or {})

    def __getitem__(self, name: str) -> Dictionary:
        try:
            return self._d[name]
        except KeyError:
            raise NotFoundError(f"no dictionary {name!r}; this set has "
                                f"{', '.join(self._d)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        first = next(iter(self._d.values()))
        return (f"Dictionaries({len(self)} x {first.kind}/{first.activation}, "
                f"layers {self.layers}, width {first.d_sae}, model {self.model})")

    @property
    def layers(self) -> list[int]:
        return sorted({d.layer for d in self._d.values()})

    def at(self, layer: int, short: str | None = None) -> Dictionary:
        """The dictionary at ``layer`` (with short name ``short``, when several sites)."""
        hits = [d for d in self._d.values() if d.layer == layer and short in (None, d.short)]
        if len(hits) != 1:
            raise NotFoundError(f"{len(hits)} dictionaries at layer {layer}"
                                f"{'' if short is None else f' named {short!r}'}; "
                                f"this set has {', '.join(self._d)}")
        return hits[0]

    def check(self, model: Any) -> None:
        """Raise a one-line :class:`ArgumentError` unless every dictionary fits ``model``:
        its layer exists and its input and output widths are the model's ``d_model``."""
        for d in self._d.values():
            if not 0 <= d.layer < model.n_layers:
                raise ArgumentError(f"{d.name}: layer {d.layer} does not exist in "
                                    f"{model.name} ({model.n_layers} layers); dictionaries of "
                                    "another model?")
            if d.d_in != model.d_model or d.d_out != model.d_model:
                raise ArgumentError(f"{d.name} reads {d.d_in} and writes {d.d_out} dimensions, "
                                    f"but {model.name}'s {d.site} has {model.d_model}; "
                                    "dictionaries of another model?")

    def to(self, *args: Any, **kwargs: Any) -> Dictionaries:
        return Dictionaries([d.to(*args, **kwargs) for d in self._d.values()], model=self.model,
                            meta=self.meta)

    def fingerprint(self) -> str:
        h = hashlib.sha256("|".join(d.fingerprint() for d in self._d.values()).encode())
        return h.hexdigest()[:16]

    def save(self, path: Any, *, format: str = "saelens", overwrite: bool = False) -> Any:
        """Write every dictionary to ``path`` in ``format`` (``"saelens"``, ``"sparsify"``,
        ``"circuit_tracer"``, ``"gemmascope"``; see :mod:`factfind.features.formats`, which
        imports this module and registers its writer in :data:`SAVERS`, so no import cycle)."""
        if "save" not in SAVERS:
            raise ArgumentError("no dictionary writer registered: import factfind.features")
        return SAVERS["save"](self, path, format=format, overwrite=overwrite)


#: the writer ``Dictionaries.save`` calls, registered by :mod:`factfind.features.formats` (which
#: imports this module; importing it back would be a cycle)
SAVERS: dict[str, Callable[..., Any]] = {}


__all__ = ["SAE_SITES", "SHORT_NAMES", "Activation", "DictKind", "Dictionaries", "Dictionary"]
