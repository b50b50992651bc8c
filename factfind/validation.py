"""Argument checks for the public entry points: a bad argument is a typed error that names it.

Every analysis takes the same kinds of arguments - a model, facts or clean/corrupt pairs, sizes,
lists of layers, positions or components, a direction, an ablation, real-valued knobs - and
each kind can be wrong in the same few ways. :func:`validated` checks them *by name and
annotation* before the function runs, so that every entry point refuses the same mistakes
with the same message, instead of failing deep inside a forward pass with an internal
``RuntimeError`` or returning a frame of NaNs:

* ``model``: a :class:`~factfind.model.Model` (anything with ``n_layers`` and ``tokenize``);
* ``pairs`` annotated ``FactPairs``: clean/corrupt pairs, not a ``FactDataset`` (call
  ``facts.corrupt(model)``), and not empty; ``facts``/``dataset`` annotated ``FactDataset``:
  a dataset, not pairs (use ``pairs.clean``), and not empty;
* sizes (:data:`POSITIVE_INTS`: ``batch_size``, ``samples``, ``k``, ...): integers >= 1 (not
  ``True``, not ``2.5``); :data:`NON_NEGATIVE_INTS` (``seed``, ``steps`` of EAP, ...) >= 0;
* any real number: finite (no NaN or infinity), and in ``(0, 1]`` for :data:`FRACTIONS`;
* ``layers``, ``positions``, ``components``, ``roles``, ``heads``: when given, non-empty, each
  layer in ``0 .. n_layers - 1``, each component a :class:`~factfind.types.Component`, each
  role a :class:`~factfind.types.Role`;
* ``direction`` one of :data:`~factfind.types.DIRECTIONS`, ``how`` one of
  :data:`~factfind.types.ABLATIONS`, ``metric`` a function (a :data:`~factfind.types.Metric`).

Errors are :class:`~factfind.errors.ArgumentError` (or
:class:`~factfind.errors.EmptyInputError` for empty data), whose message names the function,
the argument, what it accepts and what it got. This module imports only the vocabulary, so
any layer can use it; data and model types are recognised by their class names.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence, Set
from typing import Any, ParamSpec, TypeVar

from factfind.errors import ArgumentError, EmptyInputError, OutOfRangeError
from factfind.types import ABLATIONS, DIRECTIONS, Component, Role

P = ParamSpec("P")
R = TypeVar("R")

#: integer arguments that count something and must be >= 1 (``None`` allowed when it is the
#: default)
POSITIVE_INTS = frozenset({
    "batch_size", "chunk", "samples", "k", "top_k", "copies", "resamples", "n", "window",
    "max_receivers", "max_rounds", "max_nodes", "min_nodes", "rank", "n_samples", "top",
    "min_subjects", "per_relation", "n_prompts",
})
#: integer arguments that must be >= 0
NON_NEGATIVE_INTS = frozenset({"seed", "steps", "epochs", "min_count"})
#: real arguments that are fractions in (0, 1]
FRACTIONS = frozenset({"target", "step", "keep", "cumulative"})
#: annotations of arguments that hold sites: every item must be a :class:`~factfind.types.Site`
SITE_LISTS = frozenset({"Sequence[Site]", "list[Site]", "Sequence[Site]|None",
                        "list[Site]|None", "Iterable[Site]"})
#: list arguments that must not be empty when given
NON_EMPTY = frozenset({"layers", "positions", "components", "roles", "heads", "sizes",
                       "kinds", "relations", "sites", "nodes", "senders"})


def _kind(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _describe(value: Any) -> str:
    names = _kind(value)
    if names & {"FactDataset", "FactPairs"}:
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | numbers.Integral)


def check_argument(where: str, name: str, value: Any, annotation: str, default: Any,
                   model: Any = None) -> None:
    """Check one argument (see the module docstring); raise a typed error naming it."""
    def bad(accepts: str) -> ArgumentError:
        return ArgumentError(f"{where}: {name} must be {accepts}, got {_describe(value)}")

    if name == "model":
        if not (hasattr(value, "n_layers") and hasattr(value, "tokenize")):
            raise bad("a factfind Model (ff.load_model(...))")
        return
    if value is None:
        return  # None means "the default" wherever the signature allows it
    kinds = _kind(value)
    # a bare union such as "FactPairs | FactDataset" (not a container like dict[str, ...])
    parts = {part.strip() for part in annotation.split("|")} if "[" not in annotation else set()
    wants_pairs, wants_facts = "FactPairs" in parts, "FactDataset" in parts
    if wants_pairs or wants_facts:
        if wants_pairs and not wants_facts and not kinds & {"FactPairs", "PairBatch"}:
            hint = (" (call facts.corrupt(model) to pair each fact with a corrupt partner)"
                    if "FactDataset" in kinds else "")
            raise bad("FactPairs: clean and corrupt prompts" + hint)
        if wants_facts and not wants_pairs and "FactDataset" not in kinds:
            hint = " (use pairs.clean for the clean facts)" if "FactPairs" in kinds else ""
            raise bad("a FactDataset" + hint)
        if wants_facts and wants_pairs and not kinds & {"FactPairs", "PairBatch", "FactDataset"}:
            raise bad("a FactDataset or FactPairs")
        if len(value) == 0:
            raise EmptyInputError(f"{where}: {name} is empty: check the filters that produced "
                                  "it (known_by, corrupt(on_missing='skip'), sample)")
        return
    counts = name in POSITIVE_INTS or name in NON_NEGATIVE_INTS
    if isinstance(value, bool):
        if counts:
            raise bad("an integer, not a bool")
        return
    if counts and isinstance(value, numbers.Real | str):
        low = 1 if name in POSITIVE_INTS else 0
        if not isinstance(value, numbers.Integral) or value < low:
            raise bad(f"an integer >= {low}")
        return
    if _real(value):
        if not math.isfinite(float(value)):
            raise bad("a finite number")
        if name in FRACTIONS and not 0 < float(value) <= 1:
            raise bad("a fraction in (0, 1]")
        return
    if name == "direction":
        if value not in DIRECTIONS:
            raise bad(f"one of {', '.join(map(repr, DIRECTIONS))}")
        return
    if name == "how":
        if value not in ABLATIONS:
            raise bad(f"one of {', '.join(map(repr, ABLATIONS))}")
        return
    if name == "metric":
        if value is not None and not callable(value):
            raise bad("a function metric(logits, correct, wrong) -> one number per row "
                      "(e.g. factfind.metrics.logit_diff), or None")
        return
    # only materialised collections: iterating a generator would empty it for the function
    listed = isinstance(value, Sequence | Set) and not isinstance(value, str | bytes)
    if listed and annotation.replace(" ", "") in SITE_LISTS:
        for item in value:
            if "Site" not in _kind(item):
                raise bad("a list of Site (e.g. Site('mlp_out', 3, position='subject_last')), "
                          f"not of {type(item).__name__}")
    if name in NON_EMPTY and listed:
        items = list(value)
        if not items:
            raise bad("a non-empty list (or None for every one)")
        if name == "layers":
            n = getattr(model, "n_layers", None)
            for layer in items:
                if not isinstance(layer, numbers.Integral) or isinstance(layer, bool) or \
                        int(layer) < 0 or (n is not None and int(layer) >= n):
                    top = f"0 .. {n - 1}" if n is not None else ">= 0"
                    raise OutOfRangeError(f"{where}: layer {layer!r} does not exist: layers "
                                          f"must be {top}")
        elif name == "components":
            allowed = [c.value for c in Component]
            for c in items:
                if c not in allowed:
                    raise ArgumentError(f"{where}: components must be among {allowed}, "
                                        f"got {c!r}")
        elif name == "roles":
            allowed = [r.value for r in Role]
            for r in items:
                if r not in allowed:
                    raise ArgumentError(f"{where}: roles must be among {allowed}, got {r!r}")
        elif name == "positions":
            allowed = [r.value for r in Role]
            for p in items:
                if isinstance(p, bool) or not (isinstance(p, numbers.Integral) or p in allowed):
                    raise ArgumentError(f"{where}: positions must be roles {allowed} or token "
                                        f"indices, got {p!r}")


def validated(fn: Callable[P, R]) -> Callable[P, R]:
    """Check a public entry point's arguments before it runs (see the module docstring).

    Example::

        @validated
        def activation_patching(model, pairs: FactPairs, *, batch_size: int = 16): ...

        activation_patching(model, facts)   # ArgumentError: activation_patching: pairs must
                                            # be FactPairs ... (call facts.corrupt(model) ...)
    """
    sig = inspect.signature(fn)
    where = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise ArgumentError(f"{where}: {e}") from None
        model = bound.arguments.get("model")
        for name, value in bound.arguments.items():
            param = sig.parameters[name]
            if param.kind is param.VAR_KEYWORD:  # options passed on: checked by name alone
                for key, item in value.items():
                    check_argument(where, key, item, "", None, model)
                continue
            if param.kind is param.VAR_POSITIONAL:
                continue
            check_argument(where, name, value, str(param.annotation), param.default, model)
        return fn(*args, **kwargs)

    return wrapper


__all__ = ["FRACTIONS", "NON_EMPTY", "NON_NEGATIVE_INTS", "POSITIVE_INTS", "check_argument",
           "validated"]
