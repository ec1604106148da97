"""The finding registry: every code the check can report, its severity and its fix hint, in one place.

A :class:`Finding` carries only what differs between occurrences (which layer, the figures); its
severity and hint come from :data:`CODES`, so one code always means the same thing. The table of codes
is in the docstring of :mod:`bnfold.checks`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from bnfold.report import printable

Severity = Literal["error", "warning", "info"]

# BD001's K: samples in the batch that is compared with each sample alone.
DEFAULT_BATCH_SIZE = 4


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a code means: its severity, a short title (listed by ``bnfold check --help``) and the fix."""

    code: str
    severity: Severity
    title: str
    hint: str


CODES: dict[str, Rule] = {
    rule.code: rule
    for rule in (
        Rule("BN001", "error", "BatchNorm in training mode",
             "call model.eval() before saving or exporting the model"),
        Rule("BN002", "error", "BatchNorm without running statistics",
             "build the layer with track_running_stats=True and train it, or use a per-sample norm such as GroupNorm"),
        Rule("BN003", "error", "running statistics never trained",
             "load the trained weights, or run training or a statistics pass before saving"),
        Rule("BN004", "error", "broken running statistics",
             "retrain or recompute the statistics; check the checkpoint and any manual edits of the buffers"),
        Rule("BN005", "warning", "near-zero variance with a large scale",
             "check those channels: they amplify rounding errors, most of all after folding into the weights"),
        Rule("BN006", "info", "foldable BatchNorm left",
             "run `bnfold MODEL -o OUT` to fold it into its neighbour"),
        Rule("BN007", "warning", "fold would make int8 or float16 lossy",
             "quantize that layer per-channel (not per-tensor), keep the BatchNorm, or re-estimate its statistics"),
        Rule("DO001", "error", "Dropout active at inference",
             "call model.eval() before saving or exporting the model"),
        Rule("DO002", "error", "outputs random at inference",
             "pass training=self.training to F.dropout (its default is True), or take the random op out of inference; "
             "if sampling is intended, --ignore DO002"),
        Rule("BD001", "error", "outputs depend on the batch",
             "look for layers left in training mode: see the BN and DO findings; call model.eval()"),
        Rule("BD002", "info", "batch dependence not measured",
             "the message says what would make it measurable"),
    )
}  # fmt: skip

SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem in one model: ``code`` from :data:`CODES`, the layer or output ``name`` ("" for the
    whole model), a ``message`` with the figures, and the ``path`` of the model file once known."""

    code: str
    name: str
    message: str
    path: str = ""

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}")

    @property
    def severity(self) -> Severity:
        return CODES[self.code].severity

    @property
    def hint(self) -> str:
        return CODES[self.code].hint

    def describe(self, with_hint: bool = True) -> str:
        """``name: message (hint)``, the part every output format shows, on one line: the name and the
        message come from the model file, so what :func:`bnfold.report.printable` rejects is escaped."""
        hint = f" ({self.hint})" if with_hint else ""
        return printable(f"{self.name or '<model>'}: {self.message}{hint}")

    def at(self, path: str) -> Finding:
        return dataclasses.replace(self, path=path)

    def to_dict(self) -> dict[str, str]:
        return {
            "path": self.path,
            "code": self.code,
            "severity": self.severity,
            "name": self.name,
            "message": self.message,
            "hint": self.hint,
        }


def errors(findings: list[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.severity == "error"]


class UnknownCodeError(ValueError):
    """A --select/--ignore entry that is no code and no prefix of one."""


@dataclasses.dataclass(frozen=True)
class CodeSelection:
    """Which codes to report, ruff-style: entries are codes or prefixes (``BN``, ``BN00``, ``BN001``);
    a code is reported when it matches a selected entry (all codes when none are) and no ignored one."""

    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    @classmethod
    def parse(cls, select: str | None, ignore: str | None) -> CodeSelection:
        return cls(_parse_prefixes(select), _parse_prefixes(ignore))

    def reports(self, code: str) -> bool:
        selected = not self.select or code.startswith(self.select)
        return selected and not code.startswith(self.ignore)

    def reports_any(self, prefix: str) -> bool:
        """Whether some code starting with ``prefix`` is reported (so the work behind it is worth doing)."""
        return any(self.reports(code) for code in CODES if code.startswith(prefix))

    def apply(self, findings: list[Finding]) -> list[Finding]:
        return [finding for finding in findings if self.reports(finding.code)]


def _parse_prefixes(entries: str | None) -> tuple[str, ...]:
    prefixes = tuple(entry.strip().upper() for entry in (entries or "").split(",") if entry.strip())
    for prefix in prefixes:
        if not any(code.startswith(prefix) for code in CODES):
            raise UnknownCodeError(f"{prefix!r} is not a finding code or a prefix of one (codes: {', '.join(CODES)})")
    return prefixes
