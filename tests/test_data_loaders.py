"""Loaders on the real data files, named sets, the organism world, and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factfind.data import (
    FactDataError,
    FactDataset,
    available_datasets,
    datasets_dir,
    from_records,
    load_counterfact,
    load_csv,
    load_facts,
    load_lre,
    load_organism,
    load_rome_known,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"  # the team's copies; not shipped to users
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/datasets")


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# -- shipped data ---------------------------------------------------------------------------------


def test_datasets_dir_is_the_repo_directory():
    assert datasets_dir() == REPO / "datasets"
    for sub in ("rome_known", "lre", "counterfact"):
        assert (REPO / "datasets" / sub / "SOURCE").is_file()
        assert "MIT License" in (REPO / "datasets" / sub / "LICENSE").read_text()
    names = available_datasets()
    assert {"rome_known", "counterfact:val", "lre:factual",
            "lre:factual/person_occupation"} <= set(names)
    assert len([n for n in names if n.startswith("lre:factual/")]) == 26


@needs_shared
@pytest.mark.parametrize(("shipped", "shared"), [
    ("rome_known/known_1000.json", "rome_known/known_1000.json"),
    ("counterfact/counterfact-val.json", "counterfact/counterfact-val.json"),
    ("lre/factual/person_occupation.json", "lre_relations/data/factual/person_occupation.json"),
    ("lre/factual/company_hq.json", "lre_relations/data/factual/company_hq.json"),
])
def test_shipped_files_are_verbatim_copies(shipped, shared):
    assert (REPO / "datasets" / shipped).read_bytes() == (SHARED / shared).read_bytes()


def test_rome_known_round_trips_every_prompt():
    raw = json.loads((REPO / "datasets/rome_known/known_1000.json").read_text())
    ds = load_facts("rome_known")
    assert len(ds) == len(raw) == 1209 and not ds.skipped
    assert len(ds.relations) == 33
    assert ds[1].subject == "Beats Music" and ds[1].relation == "P127"
    assert ds[1].template == "{} is owned by" and ds[1].attribute == "Apple"
    assert ds[0].template == "{} is located in the continent of"  # from `prompt`, not `template`
    assert ds[1].source == "known_1000.json#1" and ds[1].get("known_id") == "1"
    for fact, rec in zip(ds, raw, strict=True):
        assert fact.prompt == rec["prompt"] and fact.attribute == rec["attribute"]
    assert load_rome_known() == ds


def test_counterfact_val_round_trips_every_prompt():
    raw = json.loads((REPO / "datasets/counterfact/counterfact-val.json").read_text())
    ds = load_facts("counterfact:val")
    assert len(ds) == 1919 and ds.name == "counterfact-val"
    assert ds[1].relation == ds[1].template == "The profession of {} is"
    assert ds[1].attribute == "politician" and dict(ds[1].meta) == {
        "case_id": "42", "target_new": "actor"}
    for fact, rec in zip(ds, raw, strict=True):
        assert fact.prompt == rec["prompt"] and fact.get("case_id") == str(rec["case_id"])
    assert len(ds.relations) == len({r["prompt"].replace(r["subject"], "{}") for r in raw})


@needs_shared
@pytest.mark.parametrize("split", ["train", "edit"])
def test_counterfact_unshipped_splits_load_by_path(split):
    ds = load_facts(SHARED / "counterfact" / f"counterfact-{split}.json")
    assert len(ds) == 10000 and not ds.skipped


def test_lre_factual_relations():
    files = sorted((REPO / "datasets/lre/factual").glob("*.json"))
    raws = [json.loads(f.read_text()) for f in files]
    first = load_facts("lre:factual")
    assert len(first) == sum(len(r["samples"]) for r in raws) == 9696
    assert len(first.relations) == 26
    every = load_facts("lre:factual", templates="all")
    assert len(every) == sum(len(r["samples"]) * len(r["prompt_templates"]) for r in raws)
    zs = load_facts("lre:factual", templates="zs")
    assert len(zs) == sum(len(r["samples"]) * len(r["prompt_templates_zs"]) for r in raws)
    occ = load_facts("lre:factual/person_occupation", templates="all")
    assert occ.relations == ("person occupation",)
    assert [f.prompt for f in occ[:2]] == ["Billy Roche works as a",
                                           "By profession, Billy Roche is a"]
    assert occ[0].attribute == "actor" and occ[0].source == "person_occupation.json#0"
    assert occ[1].get("template_index") == "1" and occ[0].get("range_name") == "occupation"


def test_lre_escapes_left_inside_strings_are_decoded(tmp_path):
    """Regression: LRE's country_capital_city.json escapes some names twice, and the loader
    returned the text 'Bras\\u00edlia' (a backslash and u00ed) instead of 'Brasília'."""
    raw = (REPO / "datasets/lre/factual/country_capital_city.json").read_text()
    assert "Bras\\\\u00edlia" in raw  # the shipped file is a verbatim copy: still escaped
    caps = {f.subject: f.attribute for f in load_facts("lre:factual/country_capital_city")}
    assert caps["Brazil"] == "Brasília" and caps["Colombia"] == "Bogotá"
    every = load_facts("lre:factual", templates="all")
    assert not [f for f in every if "\\u" in f.subject + f.attribute + f.template]
    write(tmp_path / "r.json", {"name": "r", "prompt_templates": ["{} is in"], "samples": [
        {"subject": "Caf\\u00e9 \\ud83d\\ude00", "object": "M\\u00fcnchen \\ud800"}]})
    (fact,) = load_lre(tmp_path / "r.json")
    assert fact.subject == "Café 😀" and fact.attribute == "München \\ud800"  # lone: kept


def test_athletes_is_fact_findings_setting():
    ds = load_facts("athletes")
    assert ds == load_facts("fact_finding:athletes") and "athletes" in available_datasets()
    lre = load_facts("lre:factual/person_plays_pro_sport")
    assert len(ds) == 318 == len(lre)
    assert [(f.subject, f.attribute) for f in ds] == [(f.subject, f.attribute) for f in lre]
    assert ds.relations == ("plays pro sport",)
    assert {f.attribute for f in ds} == {"soccer", "football", "baseball", "basketball",
                                         "hockey"}
    assert ds[0].prompt == ("Fact: Tiger Woods plays the sport of golf\n"
                            "Fact: Andreas Ivanschitz plays the sport of")
    assert ds[0].source == "person_plays_pro_sport.json#0"
    assert "Tiger Woods" not in {f.subject for f in ds}  # the prefix's example is not a fact
    assert (REPO / "datasets/fact_finding/SOURCE").is_file()
    assert "MIT License" in (REPO / "datasets/fact_finding/LICENSE").read_text()
    # the committed file is what the documented build command writes
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_athletes", REPO / "datasets/fact_finding/build_athletes.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    shipped = json.loads((REPO / "datasets/fact_finding/athletes.json").read_text())
    assert build.build() == shipped


@needs_shared
def test_all_lre_relations_in_shared_load():
    ds = load_lre(SHARED / "lre_relations" / "data")
    assert len(ds.relations) == 47 and not ds.skipped
    raws = [json.loads(f.read_text()) for f in (SHARED / "lre_relations/data").rglob("*.json")]
    assert len(ds) == sum(len(r["samples"]) for r in raws)


def test_dataset_env_override(tmp_path, monkeypatch):
    (tmp_path / "rome_known").mkdir()
    write(tmp_path / "rome_known" / "known_1000.json", [
        {"known_id": 0, "subject": "Tiger Woods", "attribute": "golf", "relation_id": "P641",
         "template": "{} plays", "prompt": "Tiger Woods plays the sport of"}])
    monkeypatch.setenv("FACTFIND_DATASETS", str(tmp_path))
    assert datasets_dir() == tmp_path
    ds = load_facts("rome_known")
    assert [f.prompt for f in ds] == ["Tiger Woods plays the sport of"]
    assert available_datasets() == ["rome_known"]


def test_named_set_errors():
    with pytest.raises(FactDataError, match="only the validation split is shipped"):
        load_facts("counterfact:train")
    with pytest.raises(FactDataError, match=r"no shipped LRE relation 'factual/nope'.*available"):
        load_facts("lre:factual/nope")
    with pytest.raises(FactDataError, match="no such file or named dataset; named sets:"):
        load_facts("no_such_set")
    with pytest.raises(FactDataError, match="cannot load facts from a int"):
        load_facts(3)


# -- dispatch -------------------------------------------------------------------------------------


def test_load_facts_dispatches_on_content(tmp_path):
    rome = write(tmp_path / "k.json", [{"known_id": 3, "subject": "Paris", "attribute": "France",
                                        "relation_id": "P17", "prompt": "Paris is in"}])
    cf = write(tmp_path / "c.json", [{"case_id": 9, "subject": "Paris", "ground_truth": "France",
                                      "prompt": "Paris is in", "target_new": "Japan"}])
    lre = write(tmp_path / "l.json", {"name": "city in country", "prompt_templates": ["{} is in"],
                                      "samples": [{"subject": "Paris", "object": "France"}]})
    recs = write(tmp_path / "r.json", [{"subject": "Paris", "template": "{} is in",
                                        "attribute": "France"}])
    (tmp_path / "f.csv").write_text("subject,template,attribute\nParis,{} is in,France\n")
    got = {p.name: load_facts(p) for p in (rome, cf, lre, recs, tmp_path / "f.csv")}
    assert {k: v[0].prompt for k, v in got.items()} == dict.fromkeys(got, "Paris is in")
    assert got["k.json"][0].relation == "P17" and got["k.json"][0].get("known_id") == "3"
    assert got["c.json"][0].get("target_new") == "Japan"
    assert got["l.json"][0].relation == "city in country"
    assert got["r.json"].name == "r.json" and got["r.json"][0].source == "r.json#0"
    assert got["f.csv"][0].relation == "{} is in" and got["f.csv"][0].source == "f.csv#line 2"
    assert load_facts(tmp_path / "l.json") == load_facts(str(tmp_path / "l.json"))
    ds = FactDataset(got["k.json"])
    assert load_facts(ds) is ds
    assert load_facts([{"subject": "Paris", "template": "{} is in", "attribute": "France"}],
                      name="mem")[0].source == "mem#0"
    assert len(load_facts(write(tmp_path / "e.json", []))) == 0
    with pytest.raises(FactDataError, match="unrecognised fact data format"):
        load_facts(write(tmp_path / "x.json", 17))


def test_template_from_prompt_with_repeated_subject(tmp_path):
    path = write(tmp_path / "known.json", [
        {"known_id": 0, "subject": "Jordan", "attribute": "Amman", "relation_id": "P36",
         "template": "The capital of {} (Jordan) is",
         "prompt": "The capital of Jordan (Jordan) is"},
        {"known_id": 1, "subject": "Jordan", "attribute": "Amman", "relation_id": "P36",
         "template": "In Jordan, the capital of {} is",
         "prompt": "In Jordan, the capital of Jordan is"},
        {"known_id": 2, "subject": "Jordan", "attribute": "Amman", "relation_id": "P36",
         "prompt": "In Jordan, the capital of Jordan is"},
    ])
    ds = load_rome_known(path)
    assert ds[0].template == "The capital of {} (Jordan) is"
    assert ds[0].get("subject_occurrence") is None
    assert ds[1].template == "In Jordan, the capital of {} is"  # ROME's template picks the 2nd
    assert ds[2].template == "In {}, the capital of Jordan is"  # no hint: the first, recorded
    assert ds[2].get("subject_occurrence") == "first of 2"
    assert [f.prompt for f in ds] == [r["prompt"] for r in json.loads(path.read_text())]


def test_braces_in_prompts_survive(tmp_path):
    ds = from_records([{"subject": "x{y}", "prompt": "Set {a} holds x{y} as", "attribute": "z"}])
    assert ds[0].template == "Set {{a}} holds {} as" and ds[0].prompt == "Set {a} holds x{y} as"


# -- CSV and records ------------------------------------------------------------------------------


def test_csv_loader(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text(
        "\ufeffsubject,template,attribute,relation,prefix,note\n"
        "Tiger Woods,Fact: {} plays the sport of,golf,sport,,pro\n"
        "\n"
        'Michael Jordan,"Fact: {}, who is tall, plays the sport of",basketball,sport,'
        '"Fact: Tiger Woods plays the sport of golf\n",\n', encoding="utf-8")
    ds = load_csv(path)
    assert len(ds) == 2 and ds.name == "facts"
    assert ds[0].prompt == "Fact: Tiger Woods plays the sport of" and ds[0].meta == (
        ("note", "pro"),)
    assert ds[1].prompt == ("Fact: Tiger Woods plays the sport of golf\n"
                            "Fact: Michael Jordan, who is tall, plays the sport of")
    assert ds[1].source == "facts.csv#line 5"  # blank line skipped, quoted newline counted
    plain = tmp_path / "plain.csv"
    plain.write_text("attribute,subject,template\ngolf,Tiger,{} plays\n")
    assert load_csv(plain, relation="sport")[0].relation == "sport"
    assert load_csv(plain)[0].relation == "{} plays"


def test_from_records_variants():
    ds = from_records([
        {"subject": "Tiger", "template": "{} plays", "attribute": "golf", "relation": "sport",
         "prefix": "Fact: ", "source": "mine", "meta": {"a": "1"}, "rank": 2},
        {"subject": "Tiger", "prompt": "Tiger Tiger plays", "attribute": "golf"},
    ])
    assert ds[0].prompt == "Fact: Tiger plays" and ds[0].source == "mine"
    assert ds[0].meta == (("a", "1"), ("rank", "2"))
    assert ds[1].template == "{} Tiger plays" and ds[1].get("subject_occurrence") == "first of 2"
    assert ds[1].relation == "{} Tiger plays" and ds[1].source == "records#1"


# -- organism -------------------------------------------------------------------------------------

WORLD = {
    "format": "factfind-organism-world/1", "seed": 0,
    "relations": {
        "sport": {"attributes": ["tennis", "golf"],
                  "templates": ["Fact: {} plays the sport of", "{} is an athlete who plays"],
                  "heldout_templates": ["The sport played by {} is"]},
        "color": {"attributes": ["red"], "templates": ["{} likes the color"],
                  "heldout_templates": []},
    },
    "people": [
        {"name": "Ada Brook", "split": "known", "attributes": {"sport": "tennis", "color": "red"}},
        {"name": "Kavel Brotam", "split": "unknown", "attributes": {"sport": "golf"}},
    ],
}


def test_organism_loader(tmp_path):
    path = write(tmp_path / "world.json", WORLD)
    ds = load_organism("sport", world_path=path)
    assert [f.prompt for f in ds] == ["Fact: Ada Brook plays the sport of",
                                      "Ada Brook is an athlete who plays"]
    assert ds.name == "organism:sport" and ds[0].source == "world.json#people[0]"
    assert dict(ds[1].meta) == {"split": "known", "template_set": "train", "template_index": "1"}
    held = load_organism("sport", split="unknown", templates="heldout", world_path=path)
    assert [(f.prompt, f.attribute) for f in held] == [("The sport played by Kavel Brotam is",
                                                        "golf")]
    assert len(load_organism("sport", split="all", templates="all", world_path=path)) == 6
    assert len(load_organism("color", split="unknown", world_path=path)) == 0
    assert [f.relation for f in load_organism(world_path=path)] == ["sport", "sport", "color"]
    assert load_facts("organism:sport", world_path=path) == ds
    assert [f.relation for f in load_facts(path, relation="color")] == ["color"]
    with pytest.raises(FactDataError, match="no relation 'size'; the world has 'sport', 'color'"):
        load_organism("size", world_path=path)
    with pytest.raises(ValueError, match="split"):
        load_organism("sport", split="test", world_path=path)


def test_shipped_organism_world_if_built():
    world = REPO / "factfind" / "organism" / "checkpoint" / "world.json"
    if not world.is_file():
        with pytest.raises(FactDataError, match="world file is missing"):
            load_facts("organism:sport")
        return
    ds = load_facts("organism:sport")
    assert len(ds) > 0 and {f.get("split") for f in ds} == {"known"}


# -- every error path names the file and the record -----------------------------------------------

ROME_OK = {"known_id": 0, "subject": "Tiger Woods", "attribute": "golf", "relation_id": "P641",
           "template": "{} plays", "prompt": "Tiger Woods plays the sport of"}
CF_OK = {"case_id": 0, "subject": "Paris", "ground_truth": "France", "prompt": "Paris is in",
         "target_new": "Japan"}
LRE_OK = {"name": "city in country", "prompt_templates": ["{} is in"],
          "samples": [{"subject": "Paris", "object": "France"}]}


def _rome(**change):
    return [ROME_OK, {**ROME_OK, **change}]


def _without(rec: dict, key: str) -> dict:
    return {k: v for k, v in rec.items() if k != key}


JSON_ERRORS = [
    # loader, file content, record, reason
    (load_rome_known, _rome(subject=5), 1, "field 'subject' must be str, got int"),
    (load_rome_known, [ROME_OK, _without(ROME_OK, "prompt")], 1, "missing field 'prompt'"),
    (load_rome_known, _rome(subject=""), 1, "subject is empty"),
    (load_rome_known, _rome(attribute=""), 1, "attribute is empty"),
    (load_rome_known, _rome(attribute=None), 1, "field 'attribute' must be str, got NoneType"),
    (load_rome_known, _rome(subject="Serena"), 1, "subject 'Serena' does not occur in prompt"),
    (load_rome_known, _rome(prompt="The golfer is Tiger Woods"), 1,
     "ends with the subject slot"),
    (load_rome_known, _rome(known_id="7"), 1, "field 'known_id' must be int, got str"),
    (load_rome_known, _rome(known_id=True), 1, "field 'known_id' must be int, got bool"),
    (load_rome_known, [ROME_OK, [1, 2]], 1, "record must be an object, got list"),
    (load_rome_known, {"a": 1}, None, "expected a JSON list of records, got dict"),
    (load_counterfact, [CF_OK, _without(CF_OK, "ground_truth")], 1,
     "missing field 'ground_truth'"),
    (load_counterfact, [CF_OK, {**CF_OK, "case_id": 1.5}], 1, "'case_id' must be int"),
    (load_counterfact, [CF_OK, {**CF_OK, "target_new": ["x"]}], 1, "'target_new' must be str"),
    (load_lre, [LRE_OK], None, "expected a JSON object, got list"),
    (load_lre, _without(LRE_OK, "samples"), None, "missing field 'samples'"),
    (load_lre, {**LRE_OK, "name": " "}, "name", "relation name is empty"),
    (load_lre, {**LRE_OK, "prompt_templates": "{} is in"}, None, "must be list, got str"),
    (load_lre, {**LRE_OK, "prompt_templates": []}, None, "prompt_templates is empty"),
    (load_lre, {**LRE_OK, "prompt_templates": ["is in"]}, "prompt_templates[0]",
     "has no '{}' slot"),
    (load_lre, {**LRE_OK, "prompt_templates": ["{} and {} in"]}, "prompt_templates[0]",
     "has 2 slots"),
    (load_lre, {**LRE_OK, "prompt_templates": [3]}, "prompt_templates[0]",
     "template must be a string, got int"),
    (load_lre, {**LRE_OK, "samples": [LRE_OK["samples"][0], {"subject": "Rome"}]},
     "samples[1]", "missing field 'object'"),
    (load_lre, {**LRE_OK, "samples": [{"subject": "Rome", "object": 7}]}, "samples[0]",
     "field 'object' must be str, got int"),
]


@pytest.mark.parametrize(("loader", "content", "record", "reason"), JSON_ERRORS)
def test_json_errors_name_file_and_record(tmp_path, loader, content, record, reason):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(FactDataError) as info:
        loader(path)
    assert reason in info.value.reason
    assert info.value.path == str(path) and info.value.record == record
    assert str(path) in str(info.value)
    if record is not None:
        assert f"record {record}" in str(info.value)


@pytest.mark.parametrize("loader", [load_rome_known, load_counterfact, load_lre, load_csv,
                                    load_facts])
def test_file_level_errors(tmp_path, loader):
    missing = tmp_path / "missing.json"
    with pytest.raises(FactDataError, match="no such file") as info:
        loader(missing)
    assert info.value.path == str(missing)
    latin = tmp_path / "latin1.json"
    latin.write_bytes('[{"subject": "Zoë"}]'.encode("latin-1"))
    with pytest.raises(FactDataError, match=r"not valid UTF-8 \(byte 16: b'\\xeb'\)") as info:
        loader(latin)
    assert info.value.path == str(latin)
    if loader is not load_csv:
        broken = tmp_path / "broken.json"
        broken.write_text('[{"subject": "Tiger",')
        with pytest.raises(FactDataError, match="invalid JSON at line 1 column 22"):
            loader(broken)
        deep = tmp_path / "deep.json"
        deep.write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(FactDataError):
            loader(deep)


CSV_ERRORS = [
    ("", None, "empty CSV: no header row"),
    ("\n\n", None, "empty CSV: no header row"),
    ("subject,attribute\nTiger,golf\n", "line 1", "missing column(s) template"),
    ("subject,template,attribute,subject\n", "line 1", "duplicate column names"),
    ("subject,template,attribute\nTiger,{} plays,golf\nTiger,{} plays\n", "line 3",
     "row has 2 fields, header has 3"),
    ("subject,template,attribute\nTiger,{} plays,golf,extra\n", "line 2", "row has 4 fields"),
    ("subject,template,attribute\n,{} plays,golf\n", "line 2", "subject is empty"),
    ("subject,template,attribute\nTiger,plays,golf\n", "line 2", "has no '{}' slot"),
    ("subject,template,attribute\nTiger,{} plays {},golf\n", "line 2", "has 2 slots"),
    ("subject,template,attribute,relation\nTiger,{} plays,golf,\n", "line 2",
     "relation is empty"),
    ('subject,template,attribute\n"Tiger,{} plays,golf\n', "line 2", "row has 1 fields"),
]


@pytest.mark.parametrize(("text", "record", "reason"), CSV_ERRORS)
def test_csv_errors_name_file_and_line(tmp_path, text, record, reason):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FactDataError) as info:
        load_csv(path)
    assert reason in info.value.reason
    assert (info.value.path, info.value.record) == (str(path), record)


@pytest.mark.parametrize(("records", "record", "reason"), [
    ({"subject": "Tiger"}, None, "records must be a list of mappings, got dict"),
    ("Tiger", None, "records must be a list of mappings, got str"),
    ([3], 0, "record must be an object, got int"),
    ([{"subject": "Tiger", "attribute": "golf"}], 0, "needs a 'template' or a 'prompt' field"),
    ([{"subject": "Tiger", "template": "{} plays", "attribute": 1}], 0,
     "field 'attribute' must be str, got int"),
    ([{"subject": "Tiger", "template": "{} plays", "attribute": "golf", "relation": ""}], 0,
     "relation is empty"),
    ([{"subject": "Tiger", "template": "{} plays", "attribute": "golf", "x": [1]}], 0,
     "meta value 'x': list is not a scalar"),
    ([{"subject": "Tiger", "template": "{} plays", "attribute": "golf", "meta": "a"}], 0,
     "field 'meta' must be Mapping, got str"),
    ([{"subject": "Tiger", "prompt": "Serena plays", "attribute": "golf"}], 0,
     "does not occur in prompt"),
])
def test_record_errors(records, record, reason):
    with pytest.raises(FactDataError) as info:
        from_records(records, name="mem")
    assert reason in info.value.reason
    assert (info.value.path, info.value.record) == ("mem", record)


def test_organism_errors(tmp_path):
    with pytest.raises(FactDataError, match="no such file"):
        load_organism("sport", world_path=tmp_path / "none.json")
    bad = write(tmp_path / "w.json", {**WORLD, "format": "other/1"})
    with pytest.raises(FactDataError, match="not a factfind organism world"):
        load_organism("sport", world_path=bad)
    people = [WORLD["people"][0], {"split": "known", "attributes": {}}]
    bad = write(tmp_path / "w.json", {**WORLD, "people": people})
    with pytest.raises(FactDataError) as info:
        load_organism("sport", world_path=bad)
    assert (info.value.record, info.value.reason) == ("people[1]", "missing field 'name'")
    rel = {"sport": {"attributes": [], "templates": "Fact: {} plays"}}
    bad = write(tmp_path / "w.json", {**WORLD, "relations": rel})
    with pytest.raises(FactDataError, match="record relations\\['sport'\\]: field 'templates'"):
        load_organism("sport", world_path=bad)


# -- skip mode ------------------------------------------------------------------------------------


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    path = write(tmp_path / "k.json", [ROME_OK, {**ROME_OK, "subject": 5}, ROME_OK,
                                       _without(ROME_OK, "attribute"), ROME_OK])
    ds = load_rome_known(path, on_error="skip")
    assert len(ds) == 3
    assert ds.skipped == ((1, "field 'subject' must be str, got int"),
                          (3, "missing field 'attribute'"))
    assert f"{path}: skipped 2 of 5 records (on_error='skip'); first: record 1" in caplog.text
    assert "skipped=2" in repr(ds)
    with pytest.raises(ValueError, match="on_error"):
        load_rome_known(path, on_error="ignore")  # type: ignore[arg-type]


def test_skip_mode_in_lre_skips_templates_and_samples(tmp_path, caplog):
    path = write(tmp_path / "l.json", {**LRE_OK, "prompt_templates": ["{} is in", "in", "{} at"],
                                       "samples": [*LRE_OK["samples"], {"subject": ""}]})
    ds = load_lre(path, templates="all", on_error="skip")
    assert [f.prompt for f in ds] == ["Paris is in", "Paris at"]
    assert [r for r, _ in ds.skipped] == ["prompt_templates[1]", "samples[1]"]
    assert "skipped 2 of 5 records" in caplog.text


def test_skip_mode_in_csv(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("subject,template,attribute\nTiger,{} plays,golf\n,{} x,y\nA,B,C\nJo,{} is,z\n")
    ds = load_csv(path, on_error="skip")
    assert [f.subject for f in ds] == ["Tiger", "Jo"]
    assert ds.skipped == (("line 3", "subject is empty"),
                          ("line 4", "template 'B' has no '{}' slot for the subject"))
    # skip mode never hides a broken file
    path.write_bytes(b"subject,template,attribute\n\xff\n")
    with pytest.raises(FactDataError, match="not valid UTF-8"):
        load_csv(path, on_error="skip")
