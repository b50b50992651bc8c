"""A tool's manners: repeated log lines collapse; a user's mistake is one line, exit 2, no
traceback (first contact with a real model: "knows 2 of 318" then a raw ValueError traceback
from knockout; dozens of identical "receiver ... has no upstream sender" lines)."""

import csv
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from factfind.console import configure_logging, run_cli
from factfind.errors import EmptyInputError, FactfindError, NotEnoughFactsError, require_prompts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = configure_logging(stream=stream)
    yield stream, handler
    logging.getLogger().removeHandler(handler)


def test_repeated_log_lines_collapse(captured):
    stream, handler = captured
    log = logging.getLogger("factfind.test")
    for _ in range(30):
        log.info("receiver head at layer %d has no upstream sender", 4)
    log.info("a different message")
    log.info("receiver head at layer %d has no upstream sender", 4)  # a new run of it
    for layer in (1, 2):  # lines that differ are all kept
        log.info("finding %d: %s", layer, "holds")
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6, lines
    assert lines[0].endswith("receiver head at layer 4 has no upstream sender")
    assert lines[1].endswith("(the previous message repeated 29 more times)")
    assert lines[2].endswith("a different message")
    assert lines[3].endswith("layer 4 has no upstream sender")
    assert lines[4].endswith("finding 1: holds") and lines[5].endswith("finding 2: holds")


def test_configure_logging_twice_does_not_duplicate(captured):
    stream, _ = captured
    second = configure_logging(stream=stream)
    try:
        logging.getLogger("factfind.test").info("once")
        assert stream.getvalue().count("once") == 1
    finally:
        logging.getLogger().removeHandler(second)


def test_run_cli_prints_one_line(capsys):
    def main():
        raise NotEnoughFactsError("the model knows 2 of 318 facts.\nFix: use --facts athletes.")

    assert run_cli(main) == 2
    err = capsys.readouterr().err
    assert err == "factfind: error: the model knows 2 of 318 facts. Fix: use --facts athletes.\n"
    assert run_cli(lambda: None) == 0


def test_run_cli_keeps_tracebacks_of_bugs():
    def main():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        run_cli(main)


def test_require_prompts():
    with pytest.raises(EmptyInputError, match="no pairs"):
        require_prompts([], "pairs")
    assert issubclass(EmptyInputError, ValueError) and issubclass(EmptyInputError, FactfindError)
    require_prompts([1])


def test_fact_finding_unknown_facts_is_one_line_error(tmp_path):
    """Facts the model does not know: a one-line error naming cause and fix, exit 2."""
    import factfind as ff

    real = ff.load_facts("organism:sport")[:40]
    sports = sorted({f.attribute for f in real})
    wrong = [sports[(sports.index(f.attribute) + 1) % len(sports)] for f in real[:12]]
    facts = tmp_path / "facts.csv"  # real subjects, each with another sport than its own
    with facts.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["subject", "template", "attribute"])
        writer.writerows([f.subject, f.template, w] for f, w in zip(real, wrong, strict=False))
    cmd = [sys.executable, "-m", "factfind.cli", "fact-finding", "--facts", str(facts),
           "--out", str(tmp_path / "reports"), "--cache", str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("factfind: error: "), done.stderr[-2000:]
    assert "knows 0 of 12" in errors[0] and "Fix:" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "reports").exists()
