"""The check's results as linters print them: text lines, one JSON document, or GitHub annotations.

JSON schema (``--format json``)::

    {
      "schema": "bnfold.check-report/1",
      "findings": [{"path": str, "code": str, "severity": "error" | "warning" | "info",
                    "name": str,   # node, module or output; "" for the whole model
                    "message": str, "hint": str}, ...],
      "unreadable": [{"path": str, "message": str}, ...],   # inputs that could not be checked
      "summary": {"checked": int, "unreadable": int, "error": int, "warning": int, "info": int}
    }

GitHub (``--format github``): one workflow command per finding,
``::error file=PATH,title=CODE::NAME: MESSAGE (HINT)`` (NAME ``<model>`` for whole-model findings), with ``::warning`` and ``::notice`` for the
other severities, so findings appear as annotations on the pull request.

Names and messages come from model files: the text and GitHub formats escape every character that
``str.isprintable`` rejects (``\\n``, ``\\x1b``; :func:`bnfold.report.printable`), so a node named
``"bn\\nall good: no findings"`` cannot print a line of its own; JSON carries them exactly, escaped by JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from bnfold.checks.findings import CODES, SEVERITIES, Finding
from bnfold.report import printable

CHECK_REPORT_SCHEMA = "bnfold.check-report/1"
_GITHUB_COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}
_TALLY_LABELS = {"error": "error(s)", "warning": "warning(s)", "info": "info"}


@dataclasses.dataclass
class CheckResults:
    findings: list[Finding] = dataclasses.field(default_factory=list)
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why it was not checked
    checked: int = 0

    def counts(self) -> dict[str, int]:
        by_severity = collections.Counter(finding.severity for finding in self.findings)
        return {severity: by_severity[severity] for severity in SEVERITIES}


def format_text(results: CheckResults) -> str:
    """A line per finding, then each code's hint once (20 BatchNorms left in training mode share one fix)."""
    lines = [
        f"{printable(finding.path)}: {finding.code} {finding.severity} {finding.describe(with_hint=False)}"
        for finding in results.findings
    ]
    per_code = collections.Counter(finding.code for finding in results.findings)
    lines += [f"{code} ({count}): {CODES[code].hint}" for code, count in per_code.items()]
    counts = results.counts()
    tally = ", ".join(f"{count} {_TALLY_LABELS[severity]}" for severity, count in counts.items() if count) or "no findings"
    unreadable = f", {len(results.unreadable)} unreadable" if results.unreadable else ""
    lines.append(f"{tally} in {results.checked} checked model(s){unreadable}")
    return "\n".join(lines)


def format_json(results: CheckResults) -> str:
    document = {
        "schema": CHECK_REPORT_SCHEMA,
        "findings": [finding.to_dict() for finding in results.findings],
        "unreadable": [{"path": path, "message": message} for path, message in results.unreadable.items()],
        "summary": {"checked": results.checked, "unreadable": len(results.unreadable), **results.counts()},
    }
    return json.dumps(document, indent=2)


def format_github(results: CheckResults) -> str:
    lines = [
        _workflow_command(_GITHUB_COMMANDS[finding.severity], finding.path, finding.code, finding.describe())
        for finding in results.findings
    ]
    lines += [_workflow_command("error", path, "unreadable", message) for path, message in results.unreadable.items()]
    return "\n".join(lines)


def _workflow_command(command: str, path: str, title: str, message: str) -> str:
    # A --model spec (module:callable) is no file of the repository for GitHub to annotate: it goes in the title.
    if not os.path.isfile(path):
        return f"::{command} title={_escape_property(f'{title} in {path}')}::{_escape_data(message)}"
    return f"::{command} file={_escape_property(path)},title={_escape_property(title)}::{_escape_data(message)}"


def _escape_data(text: str) -> str:
    # Control characters are escaped as in the text format, so no CR or LF is left for GitHub's %0D/%0A
    # (a newline would end the command); its own escape character still needs escaping.
    return printable(text).replace("%", "%25")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


FORMATTERS = {"text": format_text, "json": format_json, "github": format_github}
