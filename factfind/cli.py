"""The ``factfind`` command line: thin subcommands over the API and the analyses scripts.

    factfind fact-finding [--model M] [--facts F] ...   the whole workflow -> reports/<run>.html
    factfind train-organism --seed 0 --out DIR          retrain the model organism
    factfind info [--model M]                           architecture and sites of a model
    factfind datasets                                   the shipped fact datasets
    factfind train-dictionaries [--layers ...] ...      sparse dictionaries at every layer

The analyses are top-to-bottom scripts in the repository's ``analyses/`` folder; a subcommand
runs the script of the same name with the remaining arguments.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from factfind.console import run_cli

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def _run_analysis(name: str, argv: list[str]) -> int:
    script = ANALYSES / f"{name.replace('-', '_')}.py"
    if not script.exists():
        print(f"factfind: analysis script {script} not found; the analyses ship with the "
              "factfind repository (install it with `pip install -e .` from a checkout)",
              file=sys.stderr)
        return 2
    module = runpy.run_path(str(script), run_name="factfind_analysis")
    return run_cli(module["main"], argv)


def _info(source: str) -> None:
    from factfind.model import load_model

    model = load_model(source)
    print(model)
    print(f"revision: {model.revision}\nfingerprint: {model.fingerprint()}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    summary = (__doc__ or "factfind").splitlines()[0]
    parser = argparse.ArgumentParser(prog="factfind", description=summary)
    sub = parser.add_subparsers(dest="command", required=True)
    analyses = sorted(p.stem.replace("_", "-") for p in ANALYSES.glob("*.py")
                      if not p.stem.startswith("_")) if ANALYSES.exists() else ["fact-finding"]
    for name in analyses:
        sub.add_parser(name, help=f"run analyses/{name.replace('-', '_')}.py", add_help=False)
    if "train-organism" not in analyses:
        sub.add_parser("train-organism", help="retrain the model organism", add_help=False)
    info = sub.add_parser("info", help="describe a model's architecture and sites")
    info.add_argument("--model", default="organism")
    sub.add_parser("datasets", help="list the shipped fact datasets")
    sub.add_parser("train-dictionaries", help="train sparse dictionaries (transcoders) at "
                   "every layer", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in analyses and command != "train-organism":
        return _run_analysis(command, rest)
    if command == "train-organism":
        from factfind.organism.train import main as train_main

        return run_cli(train_main, rest)
    if command == "train-dictionaries":
        from factfind.features.training import cli_main

        return run_cli(cli_main, rest)
    args = parser.parse_args(argv)
    if args.command == "info":
        return run_cli(_info, args.model)
    if args.command == "datasets":
        from factfind.data.loaders import available_datasets

        print("\n".join(available_datasets()))
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
