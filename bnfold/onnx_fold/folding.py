"""The ONNX front-end: load -> find foldable pairs -> fold -> verify -> report (-> save, in the CLI).

:func:`fold_onnx` sends a ``ModelProto`` made only of plain Conv/Gemm -> BatchNorm pairs down the fast path
of :mod:`bnfold.onnx_fold.fast_path`, and any other model through onnx_ir and
:class:`bnfold.onnx_fold.ir_pass.FoldBatchNormPass`; :func:`fold_onnx_file` is the command line's entry,
which loads a model without external data as a protobuf, so that such a model is loaded, folded and saved
without onnx_ir (whose import alone costs more than folding a ResNet-50). Verification and quantization
import their modules when asked for.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import TYPE_CHECKING

import onnx

from bnfold.errors import VerificationError
from bnfold.onnx_fold.fast_path import fold_plain_pairs
from bnfold.onnx_fold.io import load_inline_model
from bnfold.onnx_fold.protobuf_writer import fill_pending_data
from bnfold.report import FoldReport

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir


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
    source: str | os.PathLike | None = None,
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

    ``source`` is the file a ``ModelProto`` was read from: it names the model in the report and in errors
    (default: the graph's name).
    """
    folded, report, _ = _fold_measured(
        model, source, False, verify=verify, freeze_initializer_inputs=freeze_initializer_inputs, quantization=quantization,
        target_dtype=target_dtype, input_shapes=input_shapes, atol=atol, rtol=rtol, seed=seed,
    )  # fmt: skip
    return folded, report


def fold_onnx_file(path: str | os.PathLike, **options) -> tuple[onnx.ModelProto | ir.Model, FoldReport, dict[str, np.ndarray]]:
    """:func:`fold_onnx` of the model file ``path`` (``options`` are its keywords), as the command line folds it,
    to be written with :func:`bnfold.onnx_fold.io.save_model` and the third value it returns. A model whose
    tensors are all in the file is loaded as a protobuf and folded into one (the fast path's input), whose large
    new tensors come without their data, held by name in that third value (``pending``, see
    :func:`bnfold.onnx_fold.fast_path.fold_plain_pairs`); one with external data is loaded with onnx_ir, which
    keeps the data on disk, and folded into an onnx_ir model."""
    proto = load_inline_model(path)
    model, source = (path, None) if proto is None else (proto, path)
    return _fold_measured(model, source, True, **options)


def _fold_measured(
    model, source, leave_data_pending: bool, *, verify: bool = True, freeze_initializer_inputs: bool = False,
    quantization: bool = False, target_dtype: str | None = None, **verification,
):  # fmt: skip
    """:func:`_fold_onnx`, then the quantization measure if asked (on the folded model's data: none pending)."""
    if verify:  # (refused before the fold, not after it)
        from bnfold.verification import tolerance

        for name in ("atol", "rtol"):
            verification[name] = tolerance(name, verification.get(name))
    if target_dtype is not None:
        from bnfold.quantization import check_target_dtype

        check_target_dtype(target_dtype)
    measure = quantization or target_dtype is not None
    with _gc_paused():
        folded, report, pending = _fold_onnx(
            model, source, verify, freeze_initializer_inputs, leave_data_pending and not measure, **verification
        )
        if measure:
            from bnfold.onnx_fold.quantization import measure_onnx_folds

            report.quantization = measure_onnx_folds(model, folded, report.folds, target_dtype)
    return folded, report, pending


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


def _fold_onnx(model, source: str | os.PathLike | None, verify: bool, freeze: bool, leave_data_pending: bool, **verification):
    """The folded model, its report and the data the fast path left pending (see fold_onnx_file)."""
    # The fast path reads initializer-backed inputs as not constant: freezing goes through the pass.
    use_fast = isinstance(model, onnx.ModelProto) and not (freeze and _proto_initializer_inputs(model))
    fast = fold_plain_pairs(model, keep_arrays=verify, leave_data_pending=leave_data_pending) if use_fast else None
    if fast is not None:
        folded, folds, arrays, pending = fast
        label = str(source) if source is not None else model.graph.name or "<model>"
        report = FoldReport(model=label, frontend="onnx", nodes_before=_proto_node_counts(model), folds=folds)
        report.nodes_after = _proto_node_counts(folded)
        try:
            _verify(report, verify, model, folded, known_arrays=arrays, **verification)
        except VerificationError:
            fill_pending_data(folded, pending)  # the error carries the folded model, whole
            raise
        return folded, report, pending
    from bnfold.onnx_fold.ir_pass import fold_with_pass

    def verify_into(report: FoldReport, original, folded, restructured: bool) -> None:
        _verify(report, verify, original, folded, restructured=restructured, **verification)

    return *fold_with_pass(model, None if source is None else str(source), freeze, verify_into), {}


def _proto_initializer_inputs(model: onnx.ModelProto) -> bool:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return any(value.name in initializers for value in model.graph.input)


def _verify(report: FoldReport, verify: bool, original, folded, restructured: bool = False, **options) -> None:
    """Run the verification into ``report`` (raising when it fails), or note why there is none: when something
    was folded, or the model ``restructured`` otherwise (its functions inlined)."""
    if verify and (report.folds or restructured):
        from bnfold.onnx_fold import verify as onnx_verify

        report.verification = onnx_verify.verify(original, folded, folds=report.folds, **options)
        if not report.verification.passed:
            raise VerificationError(report.verification, report, folded)
    elif verify:
        report.notes.append("nothing folded, so nothing to verify")


def _proto_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """:func:`bnfold.onnx_fold.ir_pass.node_counts` of a model without subgraphs, read from the protobuf."""
    batchnorms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    return {"total": len(model.graph.node), "batchnorm": batchnorms}
