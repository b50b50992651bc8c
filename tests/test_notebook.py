"""The example notebook runs top to bottom on the organism, and its stored outputs are current.

``examples/fact_finding.ipynb`` walks the Fact Finding workflow (tracing, patching, EAP-IG and
the circuit, faithfulness) with ``ff.show`` and the circuit explorer. The test runs it in a
fresh kernel with nbclient, as a reader who opens it and picks "Run all" would, and checks what
each step shows: the figures as SVG, the circuit as the explorer with as many nodes as the
circuit has, the edge table in the API's words.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install nbformat (dev extra)")
nbclient = pytest.importorskip("nbclient", reason="pip install nbclient (dev extra)")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "fact_finding.ipynb"


def _html(cell: dict) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell["outputs"]
                   if o["output_type"] == "execute_result")


def _check(nb: dict) -> None:
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] for c in code), "every code cell shows something"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, errors
    shown = [_html(c) for c in code]
    assert shown[1].count('<figure class="plot"') >= 2 and "<svg" in shown[1]  # tracing
    assert shown[2].count('<figure class="plot"') == 3  # patching: 3 components
    explorer = shown[3]
    data = json.loads(re.search(r'class="ffx-data">(.*?)</script>', explorer,
                                re.DOTALL).group(1))  # type: ignore[union-attr]
    text = code[3]["outputs"][0]["data"]["text/plain"]
    n_nodes = int(re.search(r"CircuitGraph\((\d+) nodes", text).group(1))  # type: ignore[union-attr]
    assert len(data["nodes"]["id"]) == n_nodes and "d3 7.9.0 | ISC licence" in explorer
    assert re.search(r"<th>sender</th>\s*<th>receiver</th>\s*<th>effect</th>", shown[4])
    assert "Faithfulness" in shown[5] or "faithfulness" in shown[5]


def test_the_stored_outputs_are_there() -> None:
    _check(nbformat.read(NOTEBOOK, as_version=4))  # multi-line strings joined


@pytest.mark.slow
def test_the_notebook_runs_on_the_organism() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    _check(nb)
