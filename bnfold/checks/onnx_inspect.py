"""The ONNX inspector: describe every BatchNormalization and Dropout node (main graph and subgraphs),
ask the fold pass which BatchNorms it would remove, and measure batch dependence in onnxruntime.

Training mode, per the ONNX operator versions: BatchNormalization with ``training_mode=1`` (opset 14+),
``is_test=0`` (before opset 7), or running-statistics outputs that are read, or declared before opset
14 (where their presence is what selects training); Dropout with a true constant ``training_mode``
input (opset 12+) or ``is_test=0`` (before opset 7). Opsets 7-11 have no Dropout training mode.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass

from bnfold.checks.batch_dependence import (
    NotMeasurable,
    Output,
    measure_batch_dependence,
    measurement_sizes,
    not_measured,
)
from bnfold.checks.findings import DEFAULT_BATCH_SIZE, Finding
from bnfold.checks.layer_rules import (
    BatchNormState,
    DropoutState,
    LayerState,
    Statistics,
    layer_findings,
    with_measured_quantization,
)
from bnfold.errors import describe_error
from bnfold.onnx_fold import fold_onnx
from bnfold.onnx_fold.constants import MalformedTensorError, computed_from_constants, constant_array
from bnfold.onnx_fold.io import InputError, data_inputs, load_model
from bnfold.onnx_fold.rules import batchnorm_training_mode, node_label
from bnfold.onnx_fold.shared import BATCHNORM_DEFAULT_EPSILON
from bnfold.onnx_fold.verify import VerificationUnavailableError, model_runner, random_inputs
from bnfold.quantization import LayerQuantization

# Dropout's ratio when the input (opset 12+) or attribute (before opset 7) is absent.
DEFAULT_DROPOUT_RATIO = 0.5


def check_onnx(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    measure_batch: bool = True,
) -> list[Finding]:
    """Every finding for an ONNX model (a path, an ``onnx_ir.Model`` or a ``ModelProto``; not modified).

    ``input_shapes`` gives the shape of inputs by name for the batch-dependence measurement (their first,
    batch, dimension is replaced by the batch size); ``measure_batch=False`` skips that measurement.
    """
    label = str(model) if isinstance(model, (str, os.PathLike)) else "<model>"
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    elif isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    elif model.functions:
        model = model.clone()  # (the caller's, inlined below)
    if model.functions:
        # A BatchNorm or Dropout in a model-local function (torch.onnx.export's export_modules_as_functions) is one
        # in each graph that calls it: inlined, the inspection and the fold see it there.
        InlinePass()(model)
    fed = data_inputs(model.graph)
    unknown = sorted(set(input_shapes or {}) - {value.name for value in fed})
    if unknown:
        raise InputError(label, f"--input-shape names unknown input(s): {', '.join(unknown)}")
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    try:
        foldable, measured = _fold_findings(model)
        findings = with_measured_quantization([*layer_findings(_layer_states(model, opset)), *foldable], measured)
    except MalformedTensorError as error:
        raise InputError(label, str(error)) from None
    except InputError as error:  # from the fold, which labels the in-memory model "<model>"
        raise InputError(label, error.problem) from None
    if measure_batch:
        findings += _batch_dependence(model, fed, input_shapes or {}, batch_size, seed)
    return findings


def _layer_states(model: ir.Model, opset: int) -> list[LayerState]:
    states: list[LayerState] = []
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx"):
            continue
        version = node.version or opset
        if node.op_type == "BatchNormalization":
            # (one of a value computed from initializers alone normalises no data: BiT's weight standardisation)
            if not (node.inputs and node.inputs[0] is not None and computed_from_constants(node.inputs[0])):
                states.append(_batchnorm_state(node, version))
        elif node.op_type == "Dropout":
            states.append(_dropout_state(node, version))
    return states


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _constant_input(node: ir.Node, index: int) -> np.ndarray | None:
    value = _input(node, index)
    return None if value is None else constant_array(value)


def _batchnorm_state(node: ir.Node, version: int) -> BatchNormState:
    # (torch.onnx's dynamo exporter writes track_running_stats=False as a BatchNormalization fed the batch's
    # own mean and variance: ReduceMean and friends of its input)
    batch_statistics = any(_computed_from(node.inputs[index], node.inputs[0]) for index in (3, 4) if index < len(node.inputs))
    return BatchNormState(node_label(node), _batchnorm_training(node, version), not batch_statistics, _statistics(node))


def _computed_from(value: ir.Value | None, source: ir.Value | None) -> bool:
    """Whether ``value`` is computed, through any nodes of its graph, from ``source``."""
    seen, pending = set(), [value]
    while pending:
        current = pending.pop()
        if current is None or current in seen:
            continue
        if current is source:
            return True
        seen.add(current)
        producer = current.producer()
        if producer is not None:
            pending.extend(producer.inputs)
    return False


def _batchnorm_training(node: ir.Node, version: int) -> str | None:
    training = batchnorm_training_mode(node, version)
    return None if training is None else training.fact


def _statistics(node: ir.Node) -> Statistics | None:
    """The node's scale, bias, mean and variance when all four are constants."""
    arrays = [_constant_input(node, index) for index in range(1, 5)]
    if any(array is None for array in arrays):
        return None
    for index, array in enumerate(arrays, start=1):
        if array.dtype.kind not in "biuf":  # (the checker lets a string or complex tensor through)
            kind = "complex" if array.dtype.kind == "c" else "string"
            raise MalformedTensorError(f"BatchNorm {node_label(node)}: input {node.inputs[index].name!r} holds {kind} values, not numbers")
    weight, bias, mean, var = (np.asarray(array, dtype=np.float64) for array in arrays)
    return Statistics(weight, bias, mean, var, node.attributes.get_float("epsilon", BATCHNORM_DEFAULT_EPSILON))


def _dropout_state(node: ir.Node, version: int) -> DropoutState:
    label = node_label(node)
    if version < 7:
        training = None if node.attributes.get_int("is_test", 0) else f"is_test=0 at opset {version}"
        return DropoutState(label, training, node.attributes.get_float("ratio", DEFAULT_DROPOUT_RATIO))
    if version < 12:
        return DropoutState(label, None, None)
    mode = _constant_input(node, 2)
    training = "its training_mode input is true" if mode is not None and bool(np.any(mode)) else None
    default = _input(node, 2)
    if training is None and default is not None and default.is_graph_input() and default.const_value is not None:
        # An initializer that is also a graph input: true unless the caller feeds false, as a deployment will not.
        if bool(np.any(default.const_value.numpy())):
            training = f"its training_mode input {default.name!r} defaults to true"
    if _input(node, 1) is None:
        return DropoutState(label, training, DEFAULT_DROPOUT_RATIO)
    ratio = _constant_input(node, 1)
    return DropoutState(label, training, None if ratio is None else float(ratio.reshape(-1)[0]))


def _fold_findings(model: ir.Model) -> tuple[list[Finding], list[LayerQuantization]]:
    """BN006 for each BatchNorm the fold removes, and the fold's figures for BN007 (float16 as the target)."""
    _, report = fold_onnx(model, verify=False, target_dtype="float16")
    foldable = [
        Finding(
            "BN006",
            fold.batchnorm,
            f"`bnfold` would fold it into the {fold.direction.removeprefix('into-')} {fold.layer} [{fold.layer_op}]"
            f"{f' (in {fold.graph})' if fold.graph else ''} and remove it",
        )
        for fold in report.folds
        if fold.batchnorm_op == "BatchNormalization"
    ]
    return foldable, report.quantization


def _batch_dependence(
    model: ir.Model, fed: list[ir.Value], input_shapes: dict[str, list[int]], batch_size: int, seed: int
) -> list[Finding]:
    try:
        if not fed:
            raise NotMeasurable("the model has no inputs")
        batch_dims = [_batch_dim(value) for value in fed]
        batch_size, alone_size = measurement_sizes(batch_dims, batch_size)
        shapes = {
            value.name: [batch_size, *_sample_dims(value, input_shapes.get(value.name))]
            for value in fed
            if value.shape is not None or value.name in input_shapes
        }
        feeds = random_inputs(model, shapes, seed)
    except (NotMeasurable, VerificationUnavailableError) as reason:
        return [not_measured(str(reason))]
    try:
        run_session = model_runner(model)
    except Exception as error:  # whatever onnxruntime raises on a model it will not load
        return [not_measured(f"onnxruntime cannot load the model ({describe_error(error)})")]

    def run(indices: list[int]) -> dict[str, Output]:
        outputs = run_session({name: array[indices] for name, array in feeds.items()})
        return {name: Output(values, str(values.dtype)) for name, values in outputs.items()}

    return measure_batch_dependence(run, batch_size, alone_size)


def _batch_dim(value: ir.Value) -> int | None:
    """The input's fixed batch size, or None when it is free (symbolic, or the shape is unknown)."""
    if value.shape is None:
        return None
    if len(value.shape) == 0:
        return 1  # a scalar input: no batch axis, like a batch fixed at 1
    first = value.shape[0]
    return first if isinstance(first, int) else None


def _sample_dims(value: ir.Value, given_shape: list[int] | None) -> list[int]:
    """The shape of one sample: the user's, else the model's with symbolic dimensions at 1."""
    if given_shape is not None:
        return list(given_shape[1:])
    dims = [dim if isinstance(dim, int) else 1 for dim in value.shape[1:]]
    if any(dim < 1 for dim in dims):
        raise NotMeasurable(f"input {value.name!r} declares a size below 1 ({value.shape}); give one with --input-shape")
    return dims
