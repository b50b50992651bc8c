"""The package's architecture: data flows one way down the tree, and nothing imports in a cycle.

Every module of ``factfind`` belongs to a *unit* (a subpackage such as ``factfind.localize``, or a
top-level module such as ``factfind.metrics``), and every unit sits at a *layer*. A module may
import its own unit and units of lower layers, never a unit of its own or a higher layer. Imports
inside ``if TYPE_CHECKING:`` are annotations, not dependencies, and do not count; imports inside
functions do (a lazy import hides a dependency, it does not remove it). The module graph of the
counted imports has no cycle. The README's layout table names exactly the folders of the tree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "factfind"

#: lowest first; a unit imports only units of lower layers (and itself)
LAYERS: list[tuple[str, ...]] = [
    ("errors",),                                 # typed errors a user can fix
    ("types", "integrity"),                      # the vocabulary; verified cache files
    ("validation", "metrics", "results", "console", "cache", "graph", "organism"),
    ("streaming",),
    ("data",),                                   # facts -> pairs -> token batches
    ("model",),                                  # the only nnsight user
    ("localize",),                               # patching, tracing, knockout, ablation, ...
    ("attribute",),                              # AtP, exact patching, verification, neurons
    ("features",),                               # sparse dictionaries: SAEs, transcoders
    ("edges",),                                  # placement, path patching, EAP
    ("evaluate",),                               # faithfulness, pruning, search
    ("concepts",),
    ("report",),
    ("testing", "cli", "__init__"),              # fixtures, the command line, the facade
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_only_nodes(tree: ast.Module) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def imports(path: Path, known: set[str], this: str | None = None) -> list[tuple[str, int]]:
    """``(imported factfind module, line)`` for every counted import of the file of module
    ``this`` (by default the module the path names)."""
    tree = ast.parse(path.read_text())
    skip = _type_only_nodes(tree)
    this = this or module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("factfind")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("factfind"):
                continue
            for a in node.names:  # `from factfind import graph` imports the submodule
                sub = f"{base}.{a.name}"
                found.append((sub if sub in known else base, node.lineno))
    return found


def dependency_graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for target, line in imports(path, set(mods)):
            if target != name:
                g.add_edge(name, target, line=line)
    return g


def test_every_module_has_a_layer():
    missing = sorted({unit_of(m) for m in modules()} - set(LAYER))
    assert not missing, f"give these units a layer in LAYERS: {missing}"


def test_imports_point_down_the_layers():
    g = dependency_graph()
    bad = []
    for src, dst, data in g.edges(data=True):
        us, ud = unit_of(src), unit_of(dst)
        if us != ud and LAYER[ud] >= LAYER[us]:
            bad.append(f"{src}:{data['line']} imports {dst} ({us} is layer {LAYER[us]}, "
                       f"{ud} layer {LAYER[ud]})")
    assert not bad, "imports against the data flow:\n" + "\n".join(sorted(bad))
    assert g.number_of_edges() > 100  # the walk found the imports


def test_no_import_cycles():
    g = dependency_graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_the_checker_sees_lazy_imports_and_skips_type_only_ones(tmp_path):
    src = ("from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from factfind.report import document\n"
           "def f():\n    from factfind.localize import patching\n")
    path = tmp_path / "probe.py"
    path.write_text(src)
    found = [m for m, _ in imports(path, set(modules()), "factfind.data.probe")]
    assert "factfind.localize.patching" in found and "factfind.report.document" not in found


def test_only_the_adapter_imports_nnsight():
    users = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "nnsight" or n.startswith("nnsight.") for n in names):
                users.append(name)
    assert set(users) == {"factfind.model.adapter"}


def _readme_layout() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `factfind/([a-z_]+)/` \|", section, flags=re.M))


def test_readme_layout_names_every_subpackage():
    tree = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    listed = _readme_layout()
    assert listed, "README.md has no `## Layout` table with `factfind/<name>/` rows"
    assert listed == tree, (f"README layout lists {sorted(listed - tree)} that do not exist and "
                            f"misses {sorted(tree - listed)}")


@pytest.mark.parametrize("name", [
    "ArchSpec", "Component", "FactDataError", "FactDataset", "FactPairs", "FactPrompt", "Model",
    "Role", "Site", "activation_patching", "aggregate", "attention_knockout", "causal_tracing",
    "direct_logit_attribution", "eap", "from_records", "graph", "load_facts", "load_model",
    "register_spec", "stream",
])
def test_v0_1_public_names_still_import(name):
    import factfind

    assert name in factfind.__all__
    assert getattr(factfind, name) is not None


def test_every_module_logger_is_used():
    """A module that creates ``log = logging.getLogger(__name__)`` logs something with it."""
    unused = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        made = any(isinstance(node, ast.Assign) and "getLogger" in ast.unparse(node.value)
                   and any(ast.unparse(t) == "log" for t in node.targets)
                   for node in tree.body)
        used = any(isinstance(node, ast.Attribute) and ast.unparse(node.value) == "log"
                   for node in ast.walk(tree))
        if made and not used:
            unused.append(name)
    assert unused == []


def test_importing_the_package_leaves_plotting_and_scipy_stats_for_later():
    """``import factfind`` is paid by every command, ``--help`` included: seaborn, matplotlib
    and scipy.stats (1.3 s of its 5 s) load where a figure is drawn or a test needs them; the
    confidence intervals use scipy.special's t quantile (``results.t_quantile``), equal to
    scipy.stats'."""
    import subprocess
    import sys

    code = ("import sys, factfind\n"
            "heavy = [m for m in ('seaborn', 'matplotlib', 'scipy.stats') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import numpy as np
    from scipy import stats

    from factfind.results import t_quantile

    count = np.array([0, 1, 2, 3, 6, 31, 1001])  # fewer than two values: 1 degree of freedom
    np.testing.assert_allclose(t_quantile(count, 0.95),
                               stats.t.ppf(0.975, np.maximum(count - 1, 1)), rtol=1e-12)
    np.testing.assert_allclose(t_quantile(count, 0.9), stats.t.ppf(0.95, np.maximum(count - 1, 1)),
                               rtol=1e-12)
