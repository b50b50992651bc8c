"""The model card's reproducibility section: comparisons of retrained checkpoints."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from factfind.organism import CHECKPOINT_DIR
from factfind.organism.card import compare_checkpoints, write_model_card

OTHER_THREADS = {1: 2, 2: 1}  # a thread count other than the shipped run's


def _other_threads():
    return OTHER_THREADS[json.loads((CHECKPOINT_DIR / "metrics.json").read_text())["threads"]]


@pytest.fixture
def copies(tmp_path):
    """The shipped checkpoint, an exact retrain, and a retrain with other threads and weights."""
    dirs = []
    for name in ("shipped", "same", "threads2"):
        d = tmp_path / name
        shutil.copytree(CHECKPOINT_DIR, d)
        (d / "reproduction.json").unlink(missing_ok=True)
        dirs.append(d)
    other = dirs[2]
    weights = load_file(other / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3  # a different reduction order, in miniature
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["threads"] = OTHER_THREADS[metrics["threads"]]
    metrics["tables"]["known_train"][0]["accuracy"] -= 0.01
    (other / "metrics.json").write_text(json.dumps(metrics))
    return dirs


def test_compare_checkpoints(copies):
    shipped, same, other = copies
    exact = compare_checkpoints(shipped, same)
    assert exact["identical"] and exact["max_abs_weight_diff"] == 0.0
    assert exact["max_abs_accuracy_diff"] == 0.0 and all(exact["files_identical"].values())
    moved = compare_checkpoints(shipped, other)
    assert not moved["identical"]
    assert moved["max_abs_weight_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["max_abs_accuracy_diff"] == pytest.approx(0.01)
    assert moved["threads"][1] == _other_threads() != moved["threads"][0]


def test_card_lists_every_reproduction(copies):
    shipped, same, other = copies
    card = write_model_card(shipped, reproduction=[same, other]).read_text()
    section = card.split("## Reproducibility")[1]
    assert "same command, seed and thread count" in section
    assert "**bitwise identical weights**" in section
    n = _other_threads()
    assert f"with {n} thread{'s' if n > 1 else ''} instead of" in section
    assert "max abs weight difference 0.001" in section
    assert len(json.loads((shipped / "reproduction.json").read_text())) == 2
