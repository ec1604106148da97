"""The README's examples run as written on a fresh clone and print what the README shows.

Every ``$ bnfold ...`` line of a ``text`` block runs (from a folder holding a copy of ``examples/``); the lines
shown after it must appear in its output, in order, with numbers free to differ and ``...`` standing for any
lines. The fold report's JSON block must have the keys a real ``--format json`` report has, at every level.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
BNFOLD = Path(sys.executable).with_name("bnfold")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def text_blocks() -> list[str]:
    return re.findall(r"```text\n(.*?)```", README, flags=re.DOTALL)


def command_examples() -> list[tuple[str, list[str]]]:
    """(command, lines shown after it) for every ``$ bnfold`` line of the README's text blocks."""
    examples = []
    for block in text_blocks():
        for chunk in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, *shown = chunk.rstrip("\n").split("\n")
            examples.append((command, shown))
    return examples


def normalised(line: str) -> str:
    return NUMBER.sub("N", line.rstrip())


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    program, *arguments = shlex.split(command)
    assert program == "bnfold", command
    return subprocess.run([BNFOLD, *arguments], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def fresh_clone(tmp_path) -> Path:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path


def test_the_readme_shows_commands():
    assert len(command_examples()) >= 2


@pytest.mark.parametrize("command, shown", command_examples(), ids=lambda value: value if isinstance(value, str) else "")
def test_readme_command_prints_what_the_readme_shows(fresh_clone, command, shown):
    completed = run(command, fresh_clone)
    assert completed.returncode == 0, completed.stderr
    actual = [normalised(line) for line in completed.stdout.splitlines()]
    position = 0
    for line in shown:
        if line.strip() == "...":
            continue
        expected = normalised(line)
        assert expected in actual[position:], f"README line not printed (in order): {line!r}\n{completed.stdout}"
        position = actual.index(expected, position) + 1


def key_structure(value):
    """The keys at every level; a list stands for its first element's structure."""
    if isinstance(value, dict):
        return {key: key_structure(item) for key, item in value.items()}
    if isinstance(value, list):
        return [key_structure(value[0])] if value and isinstance(value[0], (dict, list)) else []
    return None


def test_fold_report_json_block_has_the_real_reports_keys(fresh_clone):
    (shown,) = re.findall(r"### JSON report.*?```json\n(.*?)```", README, flags=re.DOTALL)
    completed = run("bnfold examples/small_cnn.onnx -o small_cnn.folded.onnx --format json --quantization", fresh_clone)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    report["skips"] = [{"batchnorm": "", "code": "", "reason": "", "graph": ""}]  # the example folds everything
    assert key_structure(json.loads(shown)) == key_structure(report)


def test_check_report_json_block_has_the_real_reports_keys(fresh_clone):
    (shown,) = re.findall(r"`--format json` prints\s*```json\n(.*?)```", README, flags=re.DOTALL)
    completed = run("bnfold check examples/small_cnn.onnx --format json", fresh_clone)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    report["unreadable"] = [{"path": "", "message": ""}]  # the example reads
    assert report["schema"] == "bnfold.check-report/1"
    assert key_structure(json.loads(shown)) == key_structure(report)


def test_readme_skip_table_names_every_skip_code():
    from bnfold.report import SKIP_CODES

    table = README[README.index("| code | meaning |") :].split("\n\n")[0]
    listed = set(re.findall(r"^\| `([a-z-]+)`(?:, `([a-z-]+)`)?", table, flags=re.MULTILINE))
    assert {code for pair in listed for code in pair if code} == set(SKIP_CODES)
