"""The ONNX front-end: load -> find foldable pairs -> fold -> verify -> report (-> save, in the CLI).

:class:`FoldBatchNormPass` is an onnx_ir in-place pass: it walks the main graph and every If/Loop/Scan
subgraph once, in order, offering each BatchNormalization and each per-channel Mul/Add/Sub/Div to the
rules in :mod:`bnfold.onnx_fold.rules`, and records a fold or a skip (with its reason) for every BatchNorm.
:func:`fold_onnx` wraps it with loading, node counts and onnxruntime verification, and sends a
``ModelProto`` made only of plain pairs down the fast path of :mod:`bnfold.onnx_fold.fast_path` instead.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import os

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from bnfold.errors import describe_error
from bnfold.onnx_fold import verify as onnx_verify
from bnfold.onnx_fold.constants import MalformedTensorError
from bnfold.onnx_fold.fast_path import fold_plain_pairs
from bnfold.onnx_fold.io import InputError, data_inputs, load_model, scratch_directory
from bnfold.onnx_fold.quantization import measure_onnx_folds
from bnfold.onnx_fold.rules import (
    ELEMENTWISE_OPS,
    FoldIntoFollowing,
    FoldIntoPreceding,
    GraphEditor,
    Refusal,
    batchnorm_channel_affine,
    labelled_graphs,
    node_label,
)
from bnfold.quantization import check_target_dtype
from bnfold.report import Fold, FoldReport, Skip
from bnfold.verification import VerificationError


def node_counts(model: ir.Model) -> dict[str, int]:
    ops = collections.Counter(node.op_type for _, graph in labelled_graphs(model) for node in graph)
    return {"total": sum(ops.values()), "batchnorm": ops.get("BatchNormalization", 0)}


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every BatchNormalization (and per-channel elementwise affine) that is provably safe."""

    rules = (FoldIntoPreceding(), FoldIntoFollowing())

    def __init__(self) -> None:
        super().__init__()
        self.folds: list[Fold] = []
        self.skips: list[Skip] = []
        self.notes: list[str] = []

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
        if editor.removed_constants:
            ops = ", ".join(f"{op} x{count}" for op, count in sorted(editor.removed_constants.items()))
            total = sum(editor.removed_constants.values())
            self.notes.append(f"evaluated {total} constant node(s) computing folded weights or parameters, and removed them: {ops}")
        return ir.passes.PassResult(model, modified=len(self.folds) > before)

    def _fold_batchnorm(self, node: ir.Node, opset: int, editor: GraphEditor, graph_label: str) -> None:
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
        except Refusal:
            return  # an ordinary elementwise op: nothing to report
        self._apply(rule, match, editor, graph_label)

    def _apply(self, rule, match, editor: GraphEditor, graph_label: str) -> None:
        fold = Fold(
            batchnorm=node_label(match.anchor),
            layer=node_label(match.layer.node),
            layer_op=match.layer.node.op_type,
            direction=rule.direction,
            graph=graph_label,
            batchnorm_op=match.anchor.op_type,
        )
        notes = match.notes()  # (labels read before the rewrite renames anything)
        rule.rewrite(match, editor)
        self.folds.append(fold)
        self.notes += notes


@dataclasses.dataclass
class _WorkingCopy:
    model: ir.Model  # what the pass edits
    original: str | bytes | None  # what onnxruntime runs as the original (only when verifying)
    label: str
    notes: list[str]


def _working_copy(model: str | os.PathLike | ir.Model | onnx.ModelProto, scratch: str | None) -> _WorkingCopy:
    """A working copy of ``model``, with inferred shapes when it has a MatMul (MatMul folds need the data's
    rank). The original for onnxruntime is kept only with a ``scratch`` directory, i.e. when verifying:
    serializing a large model costs time and memory."""
    if isinstance(model, onnx.ModelProto):
        # Inferred on the protobuf, before the conversion: onnx_ir's pass would convert back and forth.
        label, notes = _label(model.graph.name), []
        shaped = model
        if _proto_has_matmul(model):
            try:
                shaped = onnx.shape_inference.infer_shapes(model)
            except Exception as error:
                notes.append(_SHAPES_FAILED.format(type(error).__name__))
        try:
            working = ir.from_proto(shaped)
        except Exception as error:  # onnx_ir's SerdeError and friends, on a malformed graph
            raise InputError(label, f"not a usable ONNX model ({_innermost(error)})") from None
        _require_text(working, label)
        return _WorkingCopy(working, model.SerializeToString() if scratch else None, label, notes)
    if isinstance(model, (str, os.PathLike)):
        copy = _WorkingCopy(load_model(model), str(model), str(model), [])
        _require_text(copy.model, copy.label)
    else:
        label = _label(model.graph.name)
        _require_text(model, label)
        # An onnx_ir model may hold external tensors: clone it (tensors are shared, never modified) and let
        # onnxruntime read the original from a file that carries its data.
        try:
            clone = model.clone()
        except Exception as error:  # onnx_ir refuses to copy a graph that reads values nothing defines
            raise InputError(label, f"not a usable ONNX model ({_innermost(error)})") from None
        original = onnx_verify.model_source(model, scratch) if scratch else None
        copy = _WorkingCopy(clone, original, label, [])
    if _needs_shapes(copy.model):
        try:
            ShapeInferencePass()(copy.model)
        except Exception as error:
            copy.notes.append(_SHAPES_FAILED.format(type(error).__name__))
    return copy


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


def _needs_shapes(model: ir.Model) -> bool:
    """Only MatMul folds need inferred shapes (the data's rank); inference is superlinear in graph size."""
    return any(node.op_type == "MatMul" for _, graph in labelled_graphs(model) for node in graph)


def _proto_has_matmul(model: onnx.ModelProto) -> bool:
    """:func:`_needs_shapes` of a protobuf model (subgraphs included)."""
    graphs = [model.graph]
    while graphs:
        for node in graphs.pop().node:
            if node.op_type == "MatMul":
                return True
            for attribute in node.attribute:
                graphs.extend([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs)
    return False


def fold_onnx(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    *,
    verify: bool = True,
    input_shapes: dict[str, list[int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    freeze_initializer_inputs: bool = False,
    quantization: bool = False,
    target_dtype: str | None = None,
):
    """Fold every eval-mode BatchNorm that is safe to fold; return ``(folded_model, report)``.

    ``model`` is a path, an ``onnx_ir.Model`` or an ``onnx.ModelProto``; it is never modified. The folded
    model is returned as the same kind (``onnx_ir.Model`` for a path). With ``verify`` the
    original and folded models run in onnxruntime on seeded random inputs and every output is compared;
    a mismatch raises :class:`bnfold.VerificationError` carrying the report.

    ``freeze_initializer_inputs`` removes from the main graph's inputs every input that has an initializer
    (IR version < 4 models declare every initializer an input, which makes their weights overridable, so
    not constants), raising the IR version to 4 where needed; the report names them. This changes the
    model's interface: those inputs can no longer be fed.

    A ``ModelProto`` whose BatchNorms all sit in plain Conv/ConvTranspose/Gemm pairs is folded on the
    protobuf by :mod:`bnfold.onnx_fold.fast_path`, with the same result as :class:`FoldBatchNormPass`.

    With ``quantization`` (implied by ``target_dtype``, "float16" or "bfloat16"), ``report.quantization``
    measures what each BatchNorm fold did to int8 quantization of the layer and to a cast to the target dtype
    (:mod:`bnfold.quantization`). It is off by default: on ResNet-50 it costs about twice the fold (five times with a target dtype).
    """
    check_target_dtype(target_dtype)
    with _gc_paused():
        folded, report = _fold_onnx(
            model, verify, freeze_initializer_inputs, input_shapes=input_shapes, atol=atol, rtol=rtol, seed=seed
        )
        if quantization or target_dtype is not None:
            report.quantization = measure_onnx_folds(model, folded, report.folds, target_dtype)
    return folded, report


@contextlib.contextmanager
def _gc_paused():
    """Folding makes many objects and no cycles worth collecting on the way: the collector's full passes
    over them would cost more than the fold itself (2000 Conv->BN pairs: 95 ms folding, 230 ms with them)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fold_onnx(model, verify: bool, freeze: bool, *, input_shapes, atol, rtol, seed):
    # The fast path reads initializer-backed inputs as not constant: freezing goes through the pass.
    use_fast = isinstance(model, onnx.ModelProto) and not (freeze and _proto_initializer_inputs(model))
    fast = fold_plain_pairs(model) if use_fast else None
    if fast is not None:
        folded, folds = fast
        label = model.graph.name or "<model>"
        report = FoldReport(model=label, frontend="onnx", nodes_before=_proto_node_counts(model), folds=folds)
        report.nodes_after = _proto_node_counts(folded)
        original = model.SerializeToString() if verify and folds else None
        _verify(report, verify, original, folded, input_shapes=input_shapes, atol=atol, rtol=rtol, seed=seed)
        return folded, report
    # A scratch directory only for verification (creating and removing one costs about a millisecond).
    with scratch_directory("original") if verify else contextlib.nullcontext() as scratch:
        copy = _working_copy(model, scratch)
        working, original = copy.model, copy.original
        if freeze:
            copy.notes += _freeze_initializer_inputs(working)
        report = FoldReport(model=copy.label, frontend="onnx", nodes_before=node_counts(working), notes=copy.notes)
        fold_pass = FoldBatchNormPass()
        try:
            fold_pass(working)
        except MalformedTensorError as error:
            raise InputError(copy.label, str(error)) from None
        report.folds, report.skips = fold_pass.folds, fold_pass.skips
        report.notes += fold_pass.notes
        report.nodes_after = node_counts(working)
        _verify(report, verify, original, working, input_shapes=input_shapes, atol=atol, rtol=rtol, seed=seed)
    if isinstance(model, onnx.ModelProto):
        return ir.to_proto(working), report
    return working, report


def _proto_initializer_inputs(model: onnx.ModelProto) -> bool:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return any(value.name in initializers for value in model.graph.input)


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
    if model.ir_version < 4:  # before IR version 4 every initializer had to be a graph input
        notes.append(f"IR version {model.ir_version} -> 4, the first that allows initializers that are not inputs")
        model.ir_version = 4
    return notes


def _verify(report: FoldReport, verify: bool, original, folded, **options) -> None:
    """Run the verification into ``report`` (raising when it fails), or note why there is none."""
    if verify and report.folds:
        report.verification = onnx_verify.verify(original, folded, folds=report.folds, **options)
        if not report.verification.passed:
            raise VerificationError(report.verification, report, folded)
    elif verify:
        report.notes.append("nothing folded, so nothing to verify")


def _proto_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """:func:`node_counts` of a model without subgraphs, read from the protobuf."""
    batchnorms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    return {"total": len(model.graph.node), "batchnorm": batchnorms}
