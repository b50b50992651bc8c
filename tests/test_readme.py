"""The README's API section runs as written (on the shipped organism)."""

import re
from pathlib import Path

import pytest

from factfind.organism import CHECKPOINT_DIR

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(),
                    reason="organism checkpoint not built")
@pytest.mark.slow
def test_api_section_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## The API in ten lines"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    assert len(env["facts"]) > 100 and len(env["pairs"]) > 10
    for name in ("trace", "patch", "knock", "dla"):
        assert len(env[name]) > 0 and env[name]["effect"].abs().max() > 0
    assert (tmp_path / "circuit.graphml").exists()
    assert env["graph"].graph.number_of_nodes() > 2
