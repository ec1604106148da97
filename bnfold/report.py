"""The fold report both front-ends return and the CLI prints (text or JSON)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: this module stays free of numpy for the check's text output
    from bnfold.quantization import LayerQuantization
    from bnfold.verification import OutputComparison, Verification

# The JSON report's schema. /2 added "quantization": one entry per measured fold (bnfold.quantization); /3 its
# target_dtype's "error" (bnfold.half_precision_error); /4 writes a figure that is not finite as the string "inf",
# "-inf" or "nan" (JSON has no such numbers: /3's Infinity failed strict parsers).
SCHEMA = "bnfold.fold-report/6"


def json_text(document) -> str:
    """``document`` as strict JSON, each float that is not finite as the string "inf", "-inf" or "nan"."""
    return json.dumps(_finite(document), indent=2, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def printable(text: str) -> str:
    """``text`` with every character that ``str.isprintable`` rejects written as its escape (``\\n``,
    ``\\x1b``, ``\\u2028``), for names and messages that come from model files: a node named
    ``"bn\\nall good"`` must not print a line of its own, nor a terminal escape sequence."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


# Stable codes for BatchNorms left in place. The text of each skip says what the user can do.
SKIP_CODES = {
    "training-mode": "the BatchNorm normalises with batch statistics (training mode)",
    "extra-outputs-used": "the BatchNorm's running-statistics outputs are read",
    "no-foldable-neighbour": "no Conv/ConvTranspose/Gemm/MatMul/Linear next to it that can absorb it",
    "layer-output-shared": "the layer's output is also read by something other than the BatchNorm",
    "weight-not-constant": "the layer's weight or bias is not a constant",
    "parameters-not-constant": "the BatchNorm's scale, bias, mean or variance is not a constant",
    "padded-conv": "folding forward into a Conv that pads would shift its padding values",
    "unfoldable-statistics": "the statistics have no finite per-channel scale and shift",
    "fold-overflows": "the folded weight or bias would be NaN/Inf or past the range of its dtype",
    "channel-mismatch": "the BatchNorm's channel axis does not match the layer's channels",
    "quantized-weight": "the layer's weight is quantized (DequantizeLinear) and cannot absorb the fold exactly",
    "module-reused": "the layer module is called more than once",
    "batch-statistics": "track_running_stats=False: the BatchNorm always uses batch statistics",
    "hooked-module": "the layer or BatchNorm module has hooks, which would see other values or be dropped",
    "read-elsewhere": "forward() reads the BatchNorm module's parameters or buffers outside its call",
}

Direction = Literal["into-preceding", "into-following"]

# Ops that fold like a BatchNorm without being one: the ONNX front-end's per-channel elementwise folds.
ELEMENTWISE_AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


@dataclasses.dataclass
class Fold:
    batchnorm: str
    layer: str
    layer_op: str
    direction: Direction
    graph: str = ""
    batchnorm_op: str = "BatchNormalization"  # or BatchNorm2d, F.batch_norm, or a Mul/Add/Sub/Div standing for one
    # The BatchNorm's channels [start, stop) the layer took, when a concatenation of layers' outputs precedes the
    # BatchNorm (PyTorch: each layer takes its part); None: all of them.
    channels: list[int] | None = None

    def describe(self) -> str:
        where = f" (in {self.graph})" if self.graph else ""
        into = "preceding" if self.direction == "into-preceding" else "following"
        part = "" if self.channels is None else f" (channels {self.channels[0]}-{self.channels[1] - 1})"
        return f"{self.batchnorm} [{self.batchnorm_op}]{part} into {into} {self.layer} [{self.layer_op}]{where}"


@dataclasses.dataclass
class Skip:
    batchnorm: str
    code: str
    reason: str
    graph: str = ""

    def __post_init__(self) -> None:
        if self.code not in SKIP_CODES:
            raise ValueError(f"unknown skip code {self.code!r}")

    def describe(self) -> str:
        where = f" (in {self.graph})" if self.graph else ""
        return f"{self.batchnorm}{where}: [{self.code}] {self.reason}"


@dataclasses.dataclass
class FoldReport:
    """What a fold did: folds, BatchNorms left with reasons, node counts, verification figures, and what
    each BatchNorm fold did to int8 quantization and half precision (``quantization``)."""

    model: str
    frontend: Literal["onnx", "pytorch"]
    folds: list[Fold] = dataclasses.field(default_factory=list)
    skips: list[Skip] = dataclasses.field(default_factory=list)
    nodes_before: dict[str, int] = dataclasses.field(default_factory=dict)
    nodes_after: dict[str, int] = dataclasses.field(default_factory=dict)
    verification: Verification | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    output: str | None = None
    quantization: list[LayerQuantization] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain data for JSON: every field, verification figures included."""
        return {
            "schema": SCHEMA,
            "model": self.model,
            "frontend": self.frontend,
            "output": self.output,
            "folds": [dataclasses.asdict(f) for f in self.folds],
            "skips": [dataclasses.asdict(s) for s in self.skips],
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "verification": None if self.verification is None else self.verification.to_dict(),
            "notes": self.notes,
            "quantization": [layer.to_dict() for layer in self.quantization],
        }

    def to_json(self) -> str:
        """The report as ``--format json`` prints it (schema in the README)."""
        return json_text(self.to_dict())

    def __str__(self) -> str:
        return self.format_text()

    def format_text(self) -> str:
        """The report as the command line prints it: one line per fold and skip, then the verification."""
        lines = [f"bnfold: {self.model}"]
        # (a BatchNorm after a concatenation folds into each concatenated layer: one BatchNorm, several folds)
        batchnorm_folds = len({(f.graph, f.batchnorm) for f in self.folds if f.batchnorm_op not in ELEMENTWISE_AFFINE_OPS})
        other_folds = sum(f.batchnorm_op in ELEMENTWISE_AFFINE_OPS for f in self.folds)
        also = f" and {other_folds} per-channel Mul/Add/Sub/Div" if other_folds else ""
        lines.append(
            f"  folded {batchnorm_folds} of {batchnorm_folds + len(self.skips)} BatchNorm(s){also}; "
            f"nodes {self.nodes_before.get('total', 0)} -> {self.nodes_after.get('total', 0)}"
        )
        for fold in self.folds:
            lines.append(f"  folded  {fold.describe()}")
        for skip in self.skips:
            lines.append(f"  left    {skip.describe()}")
        for note in self.notes:
            lines.append(f"  note    {note}")
        if self.quantization:
            from bnfold.quantization import format_table  # (numpy: imported only when there are figures)

            lines += [f"  {line}" for line in format_table(self.quantization)]
        if self.verification is not None:
            lines.append(f"  {self.verification.summary()}")
            lines += [f"    {_describe_output(output)}" for output in self.verification.outputs]
        else:
            lines.append("  verification skipped")
        if self.output:
            lines.append(f"  wrote {self.output}")
        return "\n".join(printable(line) for line in lines)


def _describe_output(output: OutputComparison) -> str:
    if output.status == "not compared":
        return f"--   {output.name}: not compared: {output.reason}"
    mark = "ok" if output.passed else "FAIL"
    left_out = output.elements - output.elements_compared
    counted = f"{output.elements_compared} element(s)" + (f", {left_out} where the original is NaN or Inf left out" if left_out else "")
    because = f"; {output.reason}" if output.reason else ""
    return (
        f"{mark:4} {output.name}: max abs {output.max_abs_error:.3g}, max rel {output.max_rel_error:.3g} "
        f"(atol {output.atol:g}, rtol {output.rtol:g}) over {counted}{because}"
    )
