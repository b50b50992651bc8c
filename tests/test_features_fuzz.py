"""Fuzzing the dictionary stage's inputs: every bad size, knob, corpus or activation is one typed
line (a :class:`~factfind.errors.FactfindError` without a newline), never a ``TypeError`` or
``ValueError`` from inside torch; and a dictionary that does not fit the model is refused before
any forward."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factfind.errors import FactfindError
from factfind.features import Dictionaries, Dictionary, fit_dictionary, load_corpus, spliced_run
from factfind.testing.models import tiny_model

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

BAD_INT = st.one_of(st.integers(-10, 0), st.floats(allow_nan=True), st.booleans(),
                    st.text(max_size=3), st.none())
BAD_RATE = st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf),
                     st.booleans(), st.text(max_size=3))


def _one_line(err: BaseException) -> None:
    assert isinstance(err, FactfindError), f"{type(err).__name__}: {err}"
    assert str(err) and "\n" not in str(err)


@FUZZ
@given(name=st.sampled_from(["width", "k", "batch_size", "epochs", "dead_after", "seed",
                             "aux_k"]), value=BAD_INT)
def test_fit_dictionary_refuses_bad_sizes_in_one_line(name: str, value: object) -> None:
    if name == "aux_k" and value is None:  # None is aux_k's default (d_out // 2)
        return
    if name == "seed" and value is not None and not isinstance(value, bool) \
            and isinstance(value, int) and value == 0:
        return  # seed 0 is valid
    kw = {"width": 16, "k": 4, name: value}
    with pytest.raises(Exception) as info:
        fit_dictionary(torch.randn(32, 8), kind="sae", progress=False, **kw)  # type: ignore[arg-type]
    _one_line(info.value)


@FUZZ
@given(name=st.sampled_from(["lr", "lr_scale", "aux_alpha", "decay"]), value=BAD_RATE)
def test_fit_dictionary_refuses_bad_rates_in_one_line(name: str, value: object) -> None:
    if name in ("aux_alpha", "decay") and isinstance(value, float) and value == 0.0:
        return  # 0 disables AuxK / the decay: valid
    with pytest.raises(Exception) as info:
        fit_dictionary(torch.randn(32, 8), kind="sae", width=16, k=4, progress=False,
                       **{name: value})  # type: ignore[arg-type]
    _one_line(info.value)


@FUZZ
@given(where=st.sampled_from(["nan", "inf", "empty", "vector", "mismatch"]),
       kind=st.sampled_from(["sae", "transcoder", "skip_transcoder"]))
def test_fit_dictionary_refuses_bad_activations_in_one_line(where: str, kind: str) -> None:
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    if kind == "sae" and where == "mismatch":
        return  # an SAE has no targets to mismatch
    if where == "nan":
        x[3, 2] = math.nan
    elif where == "inf":
        (x if kind == "sae" else y)[0, 0] = math.inf
    elif where == "empty":
        x, y = x[:0], y[:0]
    elif where == "vector":
        x = x[:, 0]
    else:
        y = y[:5]
    with pytest.raises(Exception) as info:
        fit_dictionary(x, None if kind == "sae" else y, kind=kind, width=16, k=4,
                       progress=False)
    _one_line(info.value)


@FUZZ
@given(texts=st.lists(st.text(alphabet=" \t\n\r", max_size=4), max_size=5))
def test_an_empty_corpus_is_one_line(texts: list[str]) -> None:
    with pytest.raises(Exception) as info:
        load_corpus(texts)
    _one_line(info.value)


@pytest.fixture(scope="module")
def llama() -> object:
    return tiny_model("llama")


@FUZZ
@given(layer=st.integers(-3, 8), d_in=st.integers(1, 80))
def test_a_dictionary_that_does_not_fit_is_refused_before_any_forward(llama: object,
                                                                     layer: int,
                                                                     d_in: int) -> None:
    model = llama
    fits = 0 <= layer < model.n_layers and d_in == model.d_model  # type: ignore[attr-defined]
    try:
        d = Dictionary.random(kind="transcoder", layer=layer, d_in=d_in, d_sae=8, k=2)
    except FactfindError as e:  # a negative layer is refused by the type itself
        assert layer < 0
        _one_line(e)
        return
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long),
             "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    if fits:
        assert spliced_run(model, batch, Dictionaries([d])).logits.isfinite().all()
        return
    with pytest.raises(Exception) as info:
        spliced_run(model, batch, Dictionaries([d]))
    _one_line(info.value)
