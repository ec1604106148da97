"""The onnx_ir route: :class:`FoldBatchNormPass` and the working copy it edits.

:class:`FoldBatchNormPass` is an onnx_ir in-place pass: it walks the main graph and every If/Loop/Scan
subgraph once, in order, offering each BatchNormalization and each per-channel Mul/Add/Sub/Div to the
rules in :mod:`bnfold.onnx_fold.rules`, and records a fold or a skip (with its reason) for every BatchNorm.
:func:`fold_with_pass` is what :func:`bnfold.onnx_fold.fold_onnx` runs for a model the protobuf fast path
declines. Only this route imports onnx_ir (and sympy through it).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, ShapeInferencePass

from bnfold.errors import describe_error
from bnfold.onnx_fold.constants import computed_from_constants
from bnfold.onnx_fold.derived_shapes import derive_missing_shapes
from bnfold.onnx_fold.io import InputError, data_inputs, load_model, onnx_ir_logging_off, proto_graphs
from bnfold.onnx_fold.layers import LAYER_OPS, PASS_THROUGH_OPS
from bnfold.onnx_fold.rules import (
    ELEMENTWISE_OPS,
    FoldIntoConcatenated,
    FoldIntoFollowing,
    FoldIntoPreceding,
    GraphEditor,
    Refusal,
    batchnorm_channel_affine,
    labelled_graphs,
    node_label,
)
from bnfold.onnx_fold.shared import MalformedTensorError
from bnfold.report import Fold, FoldReport, Skip


def node_counts(model: ir.Model) -> dict[str, int]:
    ops = collections.Counter(node.op_type for _, graph in labelled_graphs(model) for node in graph)
    return {"total": sum(ops.values()), "batchnorm": ops.get("BatchNormalization", 0)}


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every BatchNormalization (and per-channel elementwise affine) that is provably safe."""

    rules = (FoldIntoPreceding(), FoldIntoConcatenated(), FoldIntoFollowing())

    def __init__(self) -> None:
        super().__init__()
        self.folds: list[Fold] = []
        self.skips: list[Skip] = []
        self.notes: list[str] = []
        self.lowered_left: list[str] = []  # Mul -> Add pairs by constants (a lowered BatchNorm) left, with why

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        editor = GraphEditor(model)
        before = len(self.folds)
        for label, graph in labelled_graphs(model):
            for node in list(graph):
                if node.graph is not graph or node.domain not in ("", "ai.onnx"):
                    continue  # removed by an earlier fold, or a custom op
                if node.op_type == "BatchNormalization":
                    self._fold_batchnorm(node, opset, editor, label)
                elif node.op_type in ELEMENTWISE_OPS:
                    self._fold_elementwise(node, opset, editor, label)
        if self.lowered_left:
            self.notes.append(
                f"left {len(self.lowered_left)} Mul -> Add pair(s) by constants, the form of a BatchNorm some converters "
                f"(tf2onnx for Keras 3) write, with no layer to fold into: {'; '.join(self.lowered_left[:3])}"
                + ("; ..." if len(self.lowered_left) > 3 else "")
            )
        if editor.removed_constants:
            ops = ", ".join(f"{op} x{count}" for op, count in sorted(editor.removed_constants.items()))
            total = sum(editor.removed_constants.values())
            self.notes.append(f"evaluated {total} constant node(s) computing folded weights or parameters, and removed them: {ops}")
        return ir.passes.PassResult(model, modified=len(self.folds) > before)

    def _fold_batchnorm(self, node: ir.Node, opset: int, editor: GraphEditor, graph_label: str) -> None:
        if node.inputs and node.inputs[0] is not None and computed_from_constants(node.inputs[0]):
            reason = (
                "it normalises a value computed from initializers alone, not data (weight standardisation, as in BiT's "
                "StdConv2d): a constant folder (onnxruntime's graph optimisations, onnxsim) evaluates it"
            )
            self.skips.append(Skip(node_label(node), "no-foldable-neighbour", reason, graph_label))
            return
        refusals = []
        try:
            batchnorm_channel_affine(node, opset)  # reasons that hold in both directions come first
            for rule in self.rules:
                try:
                    match = rule.check(node, opset)
                except Refusal as refusal:
                    refusals.append(refusal)
                    continue
                self._apply(rule, match, editor, graph_label)
                return
        except Refusal as refusal:
            refusals = [refusal]
        specific = [r for r in refusals if r.code != "no-foldable-neighbour"]
        if specific:
            code, reason = specific[0].code, specific[0].reason
        else:
            code = "no-foldable-neighbour"
            reason = "; ".join(r.reason for r in refusals)
            reason += " (only a Conv, ConvTranspose, Gemm or MatMul before it, or an unpadded Conv/Gemm/MatMul after it, can absorb it)"
        self.skips.append(Skip(node_label(node), code, reason, graph_label))

    def _fold_elementwise(self, node: ir.Node, opset: int, editor: GraphEditor, graph_label: str) -> None:
        rule = self.rules[0]
        try:
            match = rule.check(node, opset)
        except Refusal as refusal:
            # An ordinary elementwise op, nothing to report; unless a lowered BatchNorm, which a user looks for.
            if _lowered_batchnorm(node):
                self.lowered_left.append(f"{node_label(node)} ({refusal.reason})")
            return
        self._apply(rule, match, editor, graph_label)

    def _apply(self, rule, match, editor: GraphEditor, graph_label: str) -> None:
        folds = [
            Fold(
                batchnorm=node_label(match.anchor),
                layer=node_label(part.layer.node),
                layer_op=part.layer.node.op_type,
                direction=rule.direction,
                graph=graph_label,
                batchnorm_op=match.anchor.op_type,
                channels=None if part.channels is None else list(part.channels),
            )
            for part in match.parts
        ]
        notes = match.notes()  # (labels read before the rewrite renames anything)
        rule.rewrite(match, editor)
        self.folds += folds
        self.notes += notes


def _lowered_batchnorm(node: ir.Node) -> bool:
    """Whether ``node`` is a Mul of a tensor by a constant of more than one value, read only by an Add (or Sub) of a
    constant of the same shape: a BatchNorm as ``x * scale + shift`` (as tf2onnx writes Keras 3's)."""
    if node.op_type != "Mul" or len(node.inputs) != 2 or len(node.outputs) != 1:
        return False
    scales = [value for value in node.inputs if value is not None and value.const_value is not None]
    uses = list(node.outputs[0].uses())
    if len(scales) != 1 or len(uses) != 1 or scales[0].shape is None or scales[0].const_value.size < 2:
        return False
    reader = uses[0].node
    shifts = [value for value in reader.inputs if value is not None and value is not node.outputs[0] and value.const_value is not None]
    return reader.op_type in ("Add", "Sub") and len(shifts) == 1 and shifts[0].shape == scales[0].shape


@dataclasses.dataclass
class _WorkingCopy:
    model: ir.Model  # what the pass edits
    original: str | ir.Model | onnx.ModelProto  # what verification runs as the original: the input, untouched
    label: str
    notes: list[str]
    # Puts back the shapes the model declared where inference set its own: those serve the analysis only (onnx's
    # and onnx_ir's give a SplitToSequence's parts one symbolic size, which onnxruntime then holds them to).
    restore_declared_shapes: Callable[[], None] = lambda: None


def _working_copy(model: str | os.PathLike | ir.Model | onnx.ModelProto, label: str | None) -> _WorkingCopy:
    """A working copy of ``model``, with inferred shapes when its folds may need them (see :func:`needs_shapes`).
    The shapes the file declares for the values between nodes are not taken on trust: a value declared 2-D that
    is 3-D would fold a BatchNorm across the wrong axis; inference computes them from the graph's inputs."""
    if isinstance(model, onnx.ModelProto):
        # Inferred on the protobuf, before the conversion: onnx_ir's pass would convert back and forth.
        label, notes = label or _label(model.graph.name), []
        shaped = model
        if _proto_needs_shapes(model):
            undeclared = onnx.ModelProto()
            undeclared.CopyFrom(model)  # (byte for byte: a name that is not UTF-8 is refused later, with the file named)
            del undeclared.graph.value_info[:]
            shaped = undeclared
            try:
                shaped = onnx.shape_inference.infer_shapes(undeclared, data_prop=True)
            except Exception as error:
                notes.append(_SHAPES_FAILED.format(type(error).__name__))
        try:
            working = ir.from_proto(shaped)
        except Exception as error:  # onnx_ir's SerdeError and friends, on a malformed graph
            raise InputError(label, f"not a usable ONNX model ({_innermost(error)})") from None
        _require_text(working, label)
        copy = _WorkingCopy(working, model, label, notes)
        if shaped is not model:
            derive_missing_shapes(working.graph)
            declared = {info.name: info for info in model.graph.value_info}
            copy.restore_declared_shapes = functools.partial(_declare_main_graph_values, working, declared)
        return copy
    if isinstance(model, (str, os.PathLike)):
        copy = _WorkingCopy(load_model(model), str(model), label or str(model), [])
        _require_text(copy.model, copy.label)
    else:
        label = label or _label(model.graph.name)
        _require_text(model, label)
        # Clone it: tensors are shared, never modified.
        try:
            clone = model.clone()
        except Exception as error:  # onnx_ir refuses to copy a graph that reads values nothing defines
            raise InputError(label, f"not a usable ONNX model ({_innermost(error)})") from None
        copy = _WorkingCopy(clone, model, label, [])
    if needs_shapes(copy.model):
        declared = _forget_declared_shapes(copy.model)
        copy.restore_declared_shapes = functools.partial(_set_types_and_shapes, declared)
        try:
            with onnx_ir_logging_off():
                ShapeInferencePass()(copy.model)
        except Exception as error:
            copy.notes.append(_SHAPES_FAILED.format(type(error).__name__))
        derive_missing_shapes(copy.model.graph)
    return copy


def analysis_copy(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with the shapes the rules need inferred (as the pass sees it), for reading only."""
    return _working_copy(model, None).model


def _label(graph_name) -> str:
    return graph_name if graph_name and isinstance(graph_name, str) else "<model>"


def _innermost(error: BaseException) -> str:
    """The root cause's type and first line (onnx_ir wraps errors in a SerdeError per level)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return describe_error(error)


def _require_text(model: ir.Model, label: str) -> None:
    """Refuse a model with a name that is not UTF-8: protobuf hands such strings over as bytes, which
    neither the report nor onnx_ir's writer can take."""
    texts = [("model field", text) for text in (model.producer_name, model.producer_version, model.domain, model.doc_string)]
    for _, graph in labelled_graphs(model):
        texts += [("graph name", graph.name), ("graph doc string", graph.doc_string)]
        values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
        for node in graph:
            texts += [("node name", node.name), ("op type", node.op_type), ("domain", node.domain), ("doc string", node.doc_string)]
            texts += [("attribute name", name) for name in node.attributes]
            values += [value for value in (*node.inputs, *node.outputs) if value is not None]
        texts += [("value name", value.name) for value in values]
    for what, text in texts:
        if isinstance(text, bytes):
            raise InputError(label, f"{what} {text!r} is not UTF-8 text")


# Shapes only make MatMul folds provable; folding goes on without them.
_SHAPES_FAILED = "shape inference failed ({}); 2-D MatMul folds may be refused"


def _forget_declared_shapes(model: ir.Model) -> dict[ir.Value, tuple]:
    """Clear the shapes declared for the values between nodes (a graph's outputs keep theirs: the interface);
    each value's type and shape as declared."""
    declared = {}
    for _, graph in labelled_graphs(model):
        outputs = set(graph.outputs)
        for node in graph:
            for value in node.outputs:
                if value not in outputs:
                    declared[value] = (value.type, value.shape)
                    value.shape = None
    return declared


def _set_types_and_shapes(types_and_shapes: dict[ir.Value, tuple]) -> None:
    for value, (kind, shape) in types_and_shapes.items():
        value.type, value.shape = kind, shape


def _declare_main_graph_values(model: ir.Model, declared: dict[str, onnx.ValueInfoProto]) -> None:
    """The main graph's values between nodes as ``declared`` says, by name (neither type nor shape where it says nothing)."""
    graph = model.graph
    outputs = set(graph.outputs)
    for node in graph:
        for value in node.outputs:
            if value in outputs:
                continue
            value.type, value.shape = None, None
            if value.name in declared:
                with contextlib.suppress(Exception):  # (a type no ONNX version defines: declared as nothing)
                    ir.serde.deserialize_value_info_proto(declared[value.name], value)


def needs_shapes(model: ir.Model) -> bool:
    """Only MatMul folds (the data's rank) and folds through a Reshape or Flatten of a layer's output (the shapes it
    gives) need inferred shapes; inference is superlinear in graph size."""
    return any(node.op_type == "MatMul" for _, graph in labelled_graphs(model) for node in graph) or reshapes_a_layer(model)


def reshapes_a_layer(model: ir.Model) -> bool:
    """Whether a Reshape or Flatten reads a layer's output, directly or through passthroughs and elementwise ops
    (a bias Add), each read only by the next: a fold through it reads the shapes it gives."""
    for _, graph in labelled_graphs(model):
        for node in graph:
            value = node.inputs[0] if node.op_type in _RESHAPING and node.inputs else None
            producer = value.producer() if value is not None else None
            while producer is not None and producer.op_type in _LEADING and len(value.uses()) == 1 and producer.inputs:
                value = producer.inputs[0]
                producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type in LAYER_OPS:
                return True
    return False


def _proto_needs_shapes(model: onnx.ModelProto) -> bool:
    """:func:`needs_shapes` of a protobuf model (subgraphs included)."""
    for graph in proto_graphs(model.graph):
        reaching: set[str] = set()  # the outputs of layers, and of passthroughs and elementwise ops after them
        for node in graph.node:
            if node.op_type == "MatMul" or (node.op_type in _RESHAPING and node.input and node.input[0] in reaching):
                return True
            if node.op_type in LAYER_OPS or (node.op_type in _LEADING and node.input and node.input[0] in reaching):
                reaching.update(node.output)
    return False


_RESHAPING = ("Reshape", "Flatten")
_LEADING = (*PASS_THROUGH_OPS, *ELEMENTWISE_OPS)  # (between a layer and a Reshape it folds through)


def fold_with_pass(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    label: str | None,
    freeze: bool,
    verify_into: Callable[[FoldReport, str | ir.Model | onnx.ModelProto, ir.Model, bool], None],
) -> tuple[ir.Model | onnx.ModelProto, FoldReport]:
    """Fold a working copy of ``model`` with :class:`FoldBatchNormPass`; ``verify_into`` verifies the result
    into the report against ``model`` itself (told whether functions were inlined: then even with no fold).
    ``label`` names the model in the report and errors (default: its path or graph name)."""
    copy = _working_copy(model, label)
    working = copy.model
    inlined = inline_fold_functions(working)
    copy.notes += inlined
    if freeze:
        copy.notes += _freeze_initializer_inputs(working)
    report = FoldReport(model=copy.label, frontend="onnx", nodes_before=node_counts(working), notes=copy.notes)
    fold_pass = FoldBatchNormPass()
    try:
        fold_pass(working)
    except MalformedTensorError as error:
        raise InputError(copy.label, str(error)) from None
    report.folds, report.skips = fold_pass.folds, fold_pass.skips
    report.notes += fold_pass.notes + _allow_initializers_without_inputs(
        working, "the folded parameters are initializers, not inputs, constants as the values they replace were"
    )
    report.nodes_after = node_counts(working)
    copy.restore_declared_shapes()
    verify_into(report, copy.original, working, bool(inlined))
    if isinstance(model, onnx.ModelProto):
        return ir.to_proto(working), report
    return working, report


def inline_fold_functions(model: ir.Model) -> list[str]:
    """Inline the calls of each model-local function (torch.onnx.export's ``export_modules_as_functions``) that
    holds a BatchNormalization or a layer that may absorb one, or calls such a function: the fold sees graphs,
    not function bodies, so a BatchNorm nested in functions, or a BatchNorm beside a Conv that is a function of its
    own, is folded in the graph that calls them. The note that says which."""
    # (each function's nodes, those of its If/Loop branches included)
    nodes = {key: list(ir.traversal.RecursiveGraphIterator(function)) for key, function in model.functions.items()}
    if not any(node.op_type == "BatchNormalization" for inside in nodes.values() for node in inside):
        return []
    relevant = {key for key, inside in nodes.items() if any(node.op_type in _FOLD_OPS and node.domain in ("", "ai.onnx") for node in inside)}
    callers = {key: {(node.domain, node.op_type, node.overload) for node in inside} for key, inside in nodes.items()}
    while True:  # (then the functions that call them, up to the graphs)
        more = {key for key, called in callers.items() if key not in relevant and called & relevant}
        if not more:
            break
        relevant |= more
    before = set(model.functions)
    InlinePass(criteria=lambda function: function.identifier() in relevant)(model)  # (nested calls too)
    inlined = before - set(model.functions)  # (a function nothing calls stays as it is)
    if not inlined:
        return []
    names = ", ".join(f"{domain}.{name}" for domain, name, _ in sorted(inlined))
    return [f"inlined the model-local function(s) {names}, which hold BatchNorms or layers, into the graphs that call them"]


# What a fold reads or rewrites: a function holding one is inlined (see inline_fold_functions).
_FOLD_OPS = frozenset({"BatchNormalization", *LAYER_OPS})


def _freeze_initializer_inputs(model: ir.Model) -> list[str]:
    """Drop the main graph's initializer-backed inputs, so their initializers are constants; the notes
    that say so. Verification then feeds only the remaining inputs (the original runs on the stored values
    of the others)."""
    graph = model.graph
    frozen = [value.name for value in graph.inputs if value.name in graph.initializers]
    if not frozen:
        return []
    graph.inputs[:] = data_inputs(graph)
    notes = [f"froze {len(frozen)} initializer-backed graph input(s), no longer inputs of the model: {', '.join(frozen)}"]
    return notes + _allow_initializers_without_inputs(model, "")


def _allow_initializers_without_inputs(model: ir.Model, why: str) -> list[str]:
    """Raise the IR version to 4 when the main graph has an initializer that is not a graph input, which
    earlier versions forbid (onnx's checker refuses such a model); the note that says so, ending with ``why``."""
    graph = model.graph
    if model.ir_version >= 4 or set(graph.initializers.values()) <= set(graph.inputs):
        return []
    note = f"IR version {model.ir_version} -> 4, the first that allows initializers that are not inputs"
    model.ir_version = 4
    return [f"{note}; {why}" if why else note]
