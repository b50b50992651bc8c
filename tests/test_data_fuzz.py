"""Property-based fuzzing of the loaders: malformed input raises FactDataError and nothing else.

In skip mode every record is accounted for: it became a fact or is listed in ``skipped``.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factfind.data import (
    FactDataError,
    FactDataset,
    from_records,
    load_counterfact,
    load_csv,
    load_facts,
    load_lre,
    load_rome_known,
)

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TEXT = st.one_of(
    st.sampled_from(["", " ", "Tiger", "Tiger Woods", "golf", " golf", "{}", "{} plays",
                     "Fact: {} plays the sport of", "Tiger plays", "{} {}", "{0}", "{", "}",
                     "{{}} {}", "\ud800", "Zoë", "北京", "\n", "Tiger Woods plays the sport of"]),
    st.text(max_size=12),
)
SCALAR = st.one_of(TEXT, st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())
JSON = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)
FIELDS = ["subject", "attribute", "template", "prompt", "relation", "prefix", "source", "meta",
          "known_id", "relation_id", "case_id", "ground_truth", "target_new", "object", "x"]
RECORD = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(SCALAR, JSON), max_size=8),
    JSON,
)


def only_fact_data_errors(fn, *args, **kw) -> FactDataset | None:
    try:
        out = fn(*args, **kw)
    except FactDataError as e:
        assert str(e)  # a message naming what is wrong
        return None
    assert isinstance(out, FactDataset)
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(records=st.lists(RECORD, max_size=6))
def test_from_records_fuzz(records):
    only_fact_data_errors(from_records, records)
    ds = from_records(records, on_error="skip")
    assert len(ds) + len(ds.skipped) == len(records)
    assert [r for r, _ in ds.skipped] == sorted(r for r, _ in ds.skipped)


@FUZZ
@given(records=JSON)
def test_from_records_rejects_any_non_list(records):
    only_fact_data_errors(from_records, records)


@FUZZ
@given(data=st.binary(max_size=200))
def test_load_csv_random_bytes(scratch, data):
    path = scratch / "random.csv"
    path.write_bytes(data)
    only_fact_data_errors(load_csv, path)
    only_fact_data_errors(load_csv, path, on_error="skip")


HEADER = st.lists(st.sampled_from(["subject", "template", "attribute", "relation", "prefix",
                                   "note", "subject"]), min_size=1, max_size=6)
ROW = st.lists(TEXT.filter(lambda s: "\ud800" not in s and "\x00" not in s and "\r" not in s),
               max_size=6)


@FUZZ
@given(header=HEADER, rows=st.lists(ROW, max_size=6))
def test_load_csv_malformed_rows(scratch, header, rows):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    path = scratch / "rows.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    only_fact_data_errors(load_csv, path)
    ds = only_fact_data_errors(load_csv, path, on_error="skip")
    if ds is not None:  # the header was usable: every non-blank row is accounted for
        assert len(ds) + len(ds.skipped) == sum(1 for r in rows if r)


@FUZZ
@given(data=JSON)
def test_json_loaders_on_any_json(scratch, data):
    path = scratch / "any.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    for loader in (load_rome_known, load_counterfact, load_lre, load_facts):
        only_fact_data_errors(loader, path)
        only_fact_data_errors(loader, path, on_error="skip")


ROME = {"known_id": 1, "subject": "Tiger Woods", "attribute": "golf", "relation_id": "P641",
        "template": "{} plays", "prompt": "Tiger Woods plays the sport of"}
CF = {"case_id": 1, "subject": "Tiger Woods", "ground_truth": "golf", "target_new": "tennis",
      "prompt": "Tiger Woods plays the sport of"}


def damaged(base: dict) -> st.SearchStrategy[object]:
    """Records that are ``base`` with fields dropped or replaced by anything."""
    return st.one_of(
        st.builds(lambda drop, change: {**{k: v for k, v in base.items() if k not in drop},
                                        **change},
                  st.sets(st.sampled_from(sorted(base)), max_size=3),
                  st.dictionaries(st.sampled_from(sorted(base)), st.one_of(SCALAR, JSON),
                                  max_size=2)),
        JSON,
    )


@FUZZ
@given(records=st.lists(damaged(ROME), max_size=5), which=st.sampled_from(["rome", "cf"]))
def test_rome_and_counterfact_malformed_records(scratch, records, which):
    if which == "cf":
        records = [{**CF, **{k: v for k, v in r.items() if k in CF}} if isinstance(r, dict)
                   else r for r in records]
    loader = load_rome_known if which == "rome" else load_counterfact
    path = scratch / f"{which}.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    only_fact_data_errors(loader, path)
    ds = loader(path, on_error="skip")
    assert len(ds) + len(ds.skipped) == len(records)


LRE = {"name": "sport", "prompt_templates": ["{} plays the sport of", "Fact: {} plays"],
       "samples": [{"subject": "Tiger Woods", "object": "golf"}]}


@FUZZ
@given(top=damaged(LRE), samples=st.lists(damaged(LRE["samples"][0]), max_size=4),
       templates=st.lists(st.one_of(TEXT, SCALAR), max_size=3),
       which=st.sampled_from(["first", "all", "zs"]))
def test_lre_malformed(scratch, top, samples, templates, which):
    if isinstance(top, dict):
        top = {**top, "samples": samples}
        if templates:
            top["prompt_templates"] = templates
    path = scratch / "lre.json"
    path.write_text(json.dumps(top), encoding="utf-8")
    only_fact_data_errors(load_lre, path, templates=which)
    only_fact_data_errors(load_lre, path, templates=which, on_error="skip")


# ---- sparse dictionaries' files (factfind.features.formats): damaged files and configs raise
# DictionaryFileError naming the file, nothing else (more in tests/test_features_formats.py)

DICT_FILES = {"saelens/standard": ["cfg.json", "sae_weights.safetensors"],
              "sparsify/transcoder/layers.3.mlp": ["cfg.json", "sae.safetensors"],
              "circuit_tracer/jumprelu": ["config.yaml", "layer_1.safetensors"],
              "gemmascope/gemma-scope-2b-pt-transcoders/layer_3/width_16k/average_l0_5":
                  ["params.npz"]}
DICT_CASES = [(folder, name) for folder, names in DICT_FILES.items() for name in names]


@FUZZ
@given(case=st.sampled_from(DICT_CASES), data=st.one_of(
    st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
def test_dictionary_files_random_bytes(scratch, case, data):
    import shutil
    from pathlib import Path

    from factfind.errors import DictionaryFileError
    from factfind.features import load_dictionaries

    folder, name = case
    src = Path(__file__).parent / "data" / "formats" / folder
    dst = scratch / "dict" / folder.replace("/", "_")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    (dst / name).write_bytes(data)
    try:
        load_dictionaries(dst, format=folder.split("/")[0])
    except DictionaryFileError as e:  # UnknownHookError is one too
        assert str(e) and "\n" not in str(e) and e.path


def _dict_config(folder: str, name: str) -> dict:
    from pathlib import Path

    import yaml

    text = (Path(__file__).parent / "data" / "formats" / folder / name).read_text()
    return yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)


DICT_CONFIGS = [("saelens/jumprelu_skip_transcoder", "cfg.json"),
                ("sparsify/skip_transcoder/layers.1.mlp", "cfg.json"),
                ("circuit_tracer/relu_skip", "config.yaml"),
                ("gemmascope/gemma-scope-2-270m-pt/transcoder/layer_5_width_16k_l0_small_affine",
                 "config.json")]


@FUZZ
@given(data=st.data(), case=st.sampled_from(DICT_CONFIGS))
def test_dictionary_configs_damaged(scratch, data, case):
    """Fields of each format's config dropped or replaced by anything (SAELens' metadata too)."""
    import shutil
    from pathlib import Path

    from factfind.errors import DictionaryFileError
    from factfind.features import load_dictionaries

    folder, name = case
    base = _dict_config(folder, name)
    cfg = data.draw(damaged(base))
    if isinstance(cfg, dict) and isinstance(base.get("metadata"), dict) and data.draw(
            st.booleans()):
        cfg["metadata"] = data.draw(damaged(base["metadata"]))
    src = Path(__file__).parent / "data" / "formats" / folder
    dst = scratch / "dictcfg" / folder.replace("/", "_")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    (dst / name).write_text(json.dumps(cfg), encoding="utf-8")
    try:
        load_dictionaries(dst, format=folder.split("/")[0])
    except DictionaryFileError as e:
        assert str(e) and "\n" not in str(e) and e.path
