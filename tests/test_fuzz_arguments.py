"""Property-based fuzzing of the analyses' arguments: a bad argument is a typed factfind error.

Hypothesis picks an analysis, one of its arguments and a bad value for it (a size <= 0 or not
an integer, an empty or out-of-range list of layers, positions or components, a NaN or
infinite knob, a direction or ablation that does not exist, facts where pairs are needed and
the reverse, empty data, a model that is not a model). The call must raise a
:class:`~factfind.errors.FactfindError` whose message names the argument - never an internal
``RuntimeError``/``AttributeError``/``IndexError`` from deep inside a forward pass. A second
property runs the analyses with random *valid* arguments and degenerate data (clean and
corrupt prompts with the same answer): the result is either a frame with finite effects or a
:class:`~factfind.errors.DegenerateResultError`, never a silently all-NaN frame.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factfind as ff
from factfind.attribute import neurons
from factfind.attribute.atp import atp, atp_star
from factfind.data import FactPairs
from factfind.edges.eap import eap, eap_ig
from factfind.edges.path_patching import path_patching_sweep
from factfind.errors import DegenerateResultError, FactfindError
from factfind.evaluate import faithfulness
from factfind.features import Dictionary
from factfind.localize.ablation import effective_model
from factfind.localize.probing import mechanistic_probes
from factfind.types import Role, Site

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
#: bad values are refused before any forward runs: cheap, so enough examples to draw each case
CHEAP = settings(FUZZ, max_examples=400)

#: analysis -> (function, what its data argument holds, cheap valid options)
ANALYSES: dict[str, tuple[Callable[..., Any], str, dict[str, Any]]] = {
    "activation_patching": (ff.activation_patching, "pairs",
                            {"components": ["resid_pre"], "positions": ["final"], "layers": [0]}),
    "causal_tracing": (ff.causal_tracing, "facts", {"kinds": ("hidden",), "samples": 1,
                                                    "roles": ["final"]}),
    "attention_knockout": (ff.attention_knockout, "facts", {}),
    "direct_logit_attribution": (ff.direct_logit_attribution, "pairs", {}),
    "effective_model": (effective_model, "facts", {}),
    "mechanistic_probes": (mechanistic_probes, "facts", {"layers": [1]}),
    "atp": (atp, "pairs", {}),
    "atp_star": (atp_star, "pairs", {}),
    "neuron_dla": (neurons.neuron_dla, "facts", {"layers": [1]}),
    "eap": (eap, "pairs", {}),
    "eap_ig": (eap_ig, "pairs", {"steps": 2}),
    "path_patching_sweep": (path_patching_sweep, "pairs",
                            {"senders": [Site("mlp_out", 0, position=Role.FINAL)]}),
    "faithfulness": (faithfulness, "data", {"circuit": ["L1.mlp@final"]}),
    # a transcoder of the tiny GPT-2 (d_model 32) at layer 1
    "feature_atp": (ff.feature_atp, "pairs",
                    {"dicts": [Dictionary.random(kind="transcoder", layer=1, d_in=32, d_sae=32,
                                                 k=4)], "roles": ["final"]}),
}

NAN, INF = math.nan, math.inf
#: argument -> values every analysis that takes it must refuse
BAD: dict[str, list[Any]] = {
    "batch_size": [0, -4, 2.5, True, NAN, "8"],
    "chunk": [0, -1],
    "samples": [0, -1, 1.5],
    "window": [0, -2],
    "steps": [-1, 0.5],
    "seed": [-1, 0.25],
    "k": [0],
    "layers": [[], [-1], [99], ["L1"], [True]],
    "positions": [[], ["nowhere"], [1.5]],
    "components": [[], ["bogus"]],
    "senders": [[], ["L0.mlp@final"]],
    "roles": [[], ["nowhere"]],
    "kinds": [[], ()],
    "direction": ["sideways", ""],
    "how": ["median", ""],
    "noise": [NAN, INF, -INF],
    "target": [NAN, 0.0, 1.5],
    "test_fraction": [NAN],
}


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _own(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _data_arg(fn: Callable[..., Any]) -> str:
    return next(n for n in inspect.signature(fn).parameters if n != "model")


def _call(name: str, model: Any, data: Any, **override: Any) -> Any:
    fn, _, options = ANALYSES[name]
    kwargs = {**options, **override}
    if _own(fn, "progress"):
        kwargs.setdefault("progress", False)
    return fn(model, **{_data_arg(fn): data}, **kwargs)


def _takes(fn: Callable[..., Any], arg: str) -> bool:
    """Its own argument, or the batch size that ``**kwargs`` forwarders (atp, eap) pass on."""
    return _own(fn, arg) or (arg == "batch_size" and _accepts(fn, arg))


CASES = [(a, arg, i) for a, (fn, _, _) in ANALYSES.items() for arg, vals in BAD.items()
         if _takes(fn, arg) for i in range(len(vals))]


@pytest.fixture(scope="module")
def inputs(gpt2_model, facts, pairs):
    return gpt2_model, facts, pairs


def _good_data(kind: str, facts: Any, pairs: Any) -> Any:
    return pairs if kind in ("pairs", "data") else facts


def test_every_analysis_has_bad_values_to_refuse():
    assert {a for a, _, _ in CASES} == set(ANALYSES)
    assert len(CASES) > 80


@CHEAP
@given(case=st.sampled_from(CASES))
def test_bad_arguments_raise_typed_errors_naming_them(inputs, case):
    model, facts, pairs = inputs
    analysis, arg, i = case
    value = BAD[arg][i]
    _, kind, _ = ANALYSES[analysis]
    with pytest.raises(FactfindError) as err:
        _call(analysis, model, _good_data(kind, facts, pairs), **{arg: value})
    assert arg in str(err.value) or "layer" in str(err.value) or "position" in str(err.value), (
        f"{analysis}({arg}={value!r}): the message does not name the argument: {err.value}")


@CHEAP
@given(analysis=st.sampled_from(sorted(ANALYSES)),
       wrong=st.sampled_from(["swap", "empty", "string", "none_model", "json_model"]))
def test_wrong_data_and_model_raise_typed_errors(inputs, analysis, wrong):
    model, facts, pairs = inputs
    _, kind, _ = ANALYSES[analysis]
    good = _good_data(kind, facts, pairs)
    if wrong == "swap":
        annotation = str(inspect.signature(ANALYSES[analysis][0]).parameters[
            _data_arg(ANALYSES[analysis][0])].annotation)
        if "FactDataset" in annotation and "FactPairs" in annotation:
            return  # it takes facts or pairs: both are right
        data, who = (facts if kind == "pairs" else pairs), model
    elif wrong == "empty":
        data, who = good[:0], model
    elif wrong == "string":
        data, who = "rome_known", model
    elif wrong == "none_model":
        data, who = good, None
    else:
        data, who = good, '{"model": "gpt2"}'
    with pytest.raises(FactfindError):
        _call(analysis, who, data)


def _degenerate(pairs: FactPairs) -> FactPairs:
    """Pairs whose corrupt prompt is the clean one: every normalised effect is 0 / 0."""
    return FactPairs(pairs.clean, pairs.clean)


def _effects_finite_somewhere(out: Any) -> None:
    frames = [out] if isinstance(out, pd.DataFrame) else [
        v for v in (vars(out).values() if hasattr(out, "__dict__") else [])
        if isinstance(v, pd.DataFrame)]
    for df in frames:
        if "effect" in df.columns and len(df):
            assert np.isfinite(pd.to_numeric(df["effect"], errors="coerce")).any(), df.head()


@FUZZ
@given(analysis=st.sampled_from(sorted(ANALYSES)), degenerate=st.booleans(),
       batch_size=st.integers(1, 12), seed=st.integers(0, 3))
def test_valid_arguments_never_give_an_all_nan_frame(inputs, analysis, degenerate, batch_size,
                                                     seed):
    model, facts, pairs = inputs
    fn, kind, _ = ANALYSES[analysis]
    data = _good_data(kind, facts, pairs)
    if degenerate:
        if kind == "facts":
            return
        data = _degenerate(pairs)
    extra: dict[str, Any] = {}
    if _takes(fn, "batch_size"):
        extra["batch_size"] = batch_size
    if _own(fn, "seed"):
        extra["seed"] = seed
    try:
        out = _call(analysis, model, data, **extra)
    except DegenerateResultError as e:
        assert degenerate, f"{analysis} refused good pairs: {e}"
        return
    if isinstance(out, float):
        assert math.isfinite(out), f"{analysis} returned {out}"
        return
    _effects_finite_somewhere(out)


def test_site_and_source_errors_are_typed(gpt2_model, pairs):
    with pytest.raises(FactfindError, match="layer"):
        Site("resid_pre", -1)
    with pytest.raises(FactfindError, match="JSON"):
        ff.load_facts('[{"subject": "Tiger Woods"}]')
    with pytest.raises(FactfindError, match="characters"):
        ff.load_facts("x" * 10_000)
    with pytest.raises(FactfindError, match="empty"):
        ff.load_facts("")
    with pytest.raises(FactfindError, match="role"):
        ff.activation_patching(gpt2_model, pairs, positions=[Role("final"), "middle"],
                               progress=False)
