"""Verification of an ONNX fold: run the original and the folded model in onnxruntime on the same seeded
random inputs, with the runtime's graph optimisations off (so its own fusions cannot hide a wrong fold)."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from bnfold.fold_math import ChannelAffine, ExactFold, exact_fold
from bnfold.onnx_fold.constants import constant_array
from bnfold.onnx_fold.io import EXTERNAL_DATA_THRESHOLD, data_inputs, scratch_directory, tensor_bytes, uses_external_data
from bnfold.onnx_fold.rules import (
    FoldIntoFollowing,
    FoldIntoPreceding,
    Layer,
    Refusal,
    batchnorm_channel_affine,
    elementwise_channel_affine,
    layer_view,
    node_label,
)
from bnfold.report import Fold, printable
from bnfold.verification import (
    RANDOM_INPUT_BUDGET_BYTES,
    FoldCheck,
    OutputComparison,
    ParameterComparison,
    Verification,
    VerificationUnavailableError,
    check_fold,
    compare_output,
    compare_parameters,
    fold_not_checked,
    gib,
    not_compared,
    over_random_input_budget,
)

# Elements drawn at a time when making a random input (8 MiB of float64).
_DRAW_CHUNK = 2**20


def random_inputs(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, seed: int = 0, fixed_remedy: str = ""
) -> dict[str, np.ndarray]:
    """Seeded inputs shaped from the model's inputs; symbolic dimensions are 1 unless overridden. Shapes
    with a size below 1, or inputs past :data:`RANDOM_INPUT_BUDGET_BYTES` in all, are refused before
    anything is allocated; ``fixed_remedy`` is the caller's advice when the model's fixed sizes alone
    are past the budget."""
    input_shapes = dict(input_shapes or {})
    planned: dict[str, tuple[list[int], np.dtype]] = {}
    for value in data_inputs(model.graph):
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        planned[value.name] = (_input_shape(value, input_shapes.pop(value.name, None)), dtype)
    if input_shapes:
        raise VerificationUnavailableError(f"--input-shape names unknown input(s): {', '.join(sorted(input_shapes))}")
    _refuse_past_budget(model, planned, fixed_remedy)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in planned.items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = _drawn(shape, dtype, rng.standard_normal)
        else:  # integer inputs are usually indices: stay within the smallest plausible range (bool: 0 or 1)
            feeds[name] = _drawn(shape, dtype, lambda size: rng.integers(0, 2, size))
    return feeds


def _drawn(shape: list[int], dtype: np.dtype, draw: Callable[[int], np.ndarray]) -> np.ndarray:
    """An array of ``dtype`` filled with ``draw``'s values a chunk at a time: the draws come in float64 or
    int64, and whole they would take up to four times the budget beside the input. The values are those
    of one whole draw (the generator's stream does not depend on the chunking)."""
    array = np.empty(shape, dtype)
    flat = array.reshape(-1)
    for start in range(0, flat.size, _DRAW_CHUNK):
        flat[start : start + _DRAW_CHUNK] = draw(min(_DRAW_CHUNK, flat.size - start))
    return array


def _refuse_past_budget(model: ir.Model, planned: dict[str, tuple[list[int], np.dtype]], fixed_remedy: str) -> None:
    too_large = over_random_input_budget({name: (shape, str(dtype), dtype.itemsize) for name, (shape, dtype) in planned.items()})
    if too_large is None:
        return
    largest, problem = too_large
    declared = next(value for value in model.graph.inputs if value.name == largest)
    fixed_bytes = math.prod(_smallest_shape(declared)) * planned[largest][1].itemsize
    if fixed_bytes <= RANDOM_INPUT_BUDGET_BYTES:
        raise VerificationUnavailableError(f"{problem}; give a smaller shape with --input-shape {largest}=D1,D2,...")
    fixed = f"{problem}, and the model fixes sizes that take {gib(fixed_bytes)} at the least, so no --input-shape brings it within"
    raise VerificationUnavailableError(f"{fixed}; {fixed_remedy}" if fixed_remedy else fixed)


def _input_shape(value: ir.Value, given: list[int] | None) -> list[int]:
    """The shape to make ``value``'s random input in: the given one, else the declared one with symbolic
    dimensions at 1; every size at least 1."""
    if given is not None:
        if any(dim < 1 for dim in given):
            raise VerificationUnavailableError(
                f"--input-shape {value.name}={','.join(map(str, given))}: every size must be at least 1"
            )
        return list(given)
    if value.shape is None:
        raise VerificationUnavailableError(f"input {value.name!r} has no shape; give one with --input-shape {value.name}=...")
    shape = _smallest_shape(value)
    if any(dim < 1 for dim in shape):
        raise VerificationUnavailableError(
            f"input {value.name!r} declares shape {shape}, with a size below 1; give one with --input-shape {value.name}=D1,D2,..."
        )
    return shape


def _smallest_shape(value: ir.Value) -> list[int]:
    """The declared shape with its symbolic dimensions at 1 (no dimensions when there is no shape)."""
    return [dim if isinstance(dim, int) else 1 for dim in value.shape or []]


def _session(source: str | os.PathLike | bytes, optimised: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimised else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = str(source) if isinstance(source, Path) else source
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def model_runner(
    source: str | os.PathLike | bytes, optimised: bool = False
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """One onnxruntime session (optimisations off unless ``optimised``), as a function from feeds to named outputs."""
    session = _session(source, optimised)
    names = [output.name for output in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


def run_model(source: str | os.PathLike | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return model_runner(source)(feeds)


def model_source(model: ir.Model, scratch: str) -> str | bytes:
    """Something onnxruntime can open: serialized bytes, or a file with its external data when the
    model has external tensors (bytes would point at data relative to the working directory) or
    passes the 2 GiB protobuf limit."""
    if not uses_external_data(model) and tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        return ir.to_proto(model).SerializeToString()
    path = Path(scratch) / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return str(path)


def _cannot_run_original(error: Exception) -> str:
    """onnxruntime's whole message on one line (escaped: it quotes names from the model), and the option
    that fixes it: input shapes for a shape complaint, --no-verify only where a kernel is missing."""
    message = " / ".join(line.strip() for line in str(error).strip().splitlines() if line.strip()) or type(error).__name__
    if "NOT_IMPLEMENTED" in message or "Could not find an implementation" in message:
        remedy = "onnxruntime has no kernel for it here: use --no-verify to fold without verification"
    elif any(word in message for word in ("dimension", "rank", "shape", "Shape")):
        remedy = "give each input a shape the model accepts with --input-shape NAME=D1,D2,..."
    else:
        remedy = "check the input shapes (--input-shape NAME=D1,D2,...), or use --no-verify to fold without verification"
    return f"onnxruntime cannot run the original model ({printable(message)}); {remedy}"


def _progress(message: str, started: float) -> None:
    """Progress on stderr when a person is watching it: verification of a large model takes a while."""
    if sys.stderr.isatty():
        print(f"bnfold: verifying: {message} ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)


def verify(
    original: str | os.PathLike | bytes,
    folded: ir.Model | onnx.ModelProto,
    *,
    folds: list[Fold] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> Verification:
    """Compare every output of ``folded`` with ``original`` (a path or serialized model), and check each of
    ``folds`` on its own: the folded layer, run on the original's input to it, against the original layer
    and BatchNorm, channel by channel (see :data:`bnfold.verification.LOCAL_UNITS`)."""
    started = time.perf_counter()
    folded_source = None
    if isinstance(folded, onnx.ModelProto):  # the fast path's result: in memory, no external data
        folded_source, folded = folded.SerializeToString(), ir.from_proto(folded)
    feeds = random_inputs(folded, input_shapes, seed, fixed_remedy="use --no-verify to fold without verification")
    with scratch_directory("verify") as scratch:
        local, checks, original_source = [], [], original
        if folds:
            # The original runs once, with each checked layer's input and output exposed as extra outputs.
            original_model = _load(original)
            local, checks = _local_folds(original_model, folded, folds, rtol)
            outputs = {value.name for value in original_model.graph.outputs}
            values = {value.name: value for node in original_model.graph for value in node.outputs}
            values.update((value.name, value) for value in original_model.graph.inputs)
            for name in dict.fromkeys(name for check in local for name in check.needs):
                if name not in outputs:
                    original_model.graph.outputs.append(values[name])
            original_source = model_source(original_model, scratch)
            del original_model, values
        _progress("running the original model in onnxruntime", started)
        try:
            expected = run_model(original_source, feeds)
        except Exception as error:
            raise VerificationUnavailableError(_cannot_run_original(error)) from None
        if local:
            _progress(f"running {len(local)} folded layer(s) on their own", started)
            checks += _check_locally(folded, local, expected, rtol)
        _progress("running the folded model in onnxruntime", started)
        actual = run_model(folded_source or model_source(folded, scratch), feeds)
    _progress("comparing outputs", started)
    output_types = {value.name: value.dtype for value in folded.graph.outputs}
    comparisons = []
    for name, reference in expected.items():
        if name not in output_types:
            continue  # a value exposed for the per-fold checks
        if not isinstance(reference, np.ndarray):  # a sequence or map output: onnxruntime returns a list or dict
            kind = type(reference).__name__
            comparisons.append(not_compared(name, kind, f"onnxruntime returned a {kind}, not a tensor"))
            continue
        dtype = output_types.get(name)
        dtype_name = str(dtype.numpy()) if dtype is not None else str(reference.dtype)
        comparisons.append(compare_output(name, reference, actual[name], dtype_name, atol, rtol))
    if any(comparison.failed and comparison.magnitude is not None for comparison in comparisons):
        _measure_noise(original, feeds, comparisons)
    return Verification(comparisons, {name: list(array.shape) for name, array in feeds.items()}, folds=checks)


def _load(original: str | os.PathLike | bytes) -> ir.Model:
    if isinstance(original, bytes):
        return ir.from_proto(onnx.load_from_string(original))
    return ir.load(original)


def _check_locally(folded: ir.Model, local: list[_LocalFold], values: dict[str, np.ndarray], rtol: float | None) -> list[FoldCheck]:
    outputs = run_model(_local_model(folded, local, values), {f"x{i}": values[check.data] for i, check in enumerate(local)})
    checks = []
    for index, check in enumerate(local):
        dtype_name = str(values[check.reference].dtype)
        # A half-precision fold's reference is recomputed in float32 beside the folded layer (see _local_model).
        reference = outputs.get(f"r{index}", values[check.reference])
        checks.append(check_fold(
            check.label, dtype_name, reference, outputs[f"y{index}"], outputs[f"n{index}"], check.channel_axis, rtol, check.parameters,
        ))  # fmt: skip
    return checks


def _measure_noise(original: str | os.PathLike | bytes, feeds: dict[str, np.ndarray], comparisons: list[OutputComparison]) -> None:
    """Set each failed output's ``noise``: how far onnxruntime's optimised run of the original (its own
    fusions and kernel choices) is from the plain one, the float noise a user can compare the error with."""
    try:
        optimised = model_runner(original, optimised=True)(feeds)
        plain = run_model(original, feeds)
    except Exception:
        return  # the figure is a help to the reader, never a reason to fail differently
    for comparison in comparisons:
        if comparison.failed and comparison.magnitude is not None and comparison.name in optimised:
            noise = np.abs(np.asarray(optimised[comparison.name], np.float64) - np.asarray(plain[comparison.name], np.float64))
            comparison.noise = float(np.nanmax(noise)) if noise.size else 0.0


@dataclasses.dataclass
class _LocalFold:
    """A fold checked on its own: ``nodes`` of the folded model, fed the original's ``data`` value, must
    reproduce the original's ``reference`` value per channel."""

    label: str
    data: str
    reference: str
    nodes: list[ir.Node]
    channel_axis: int
    needs: tuple[str, ...]  # the original's values the check reads
    # The original layer (its node and its constant inputs after the data) and the map folded into it,
    # from which a half-precision fold's reference is recomputed in float32.
    original_layer: ir.Node
    original_inputs: list[np.ndarray | None]
    affine: ChannelAffine
    preceding: bool
    parameters: ParameterComparison  # its weight and bias against the exact fold of the original's


def _by_label(graph: ir.Graph) -> dict[str, list[ir.Node]]:
    labelled: dict[str, list[ir.Node]] = {}
    for node in graph:
        labelled.setdefault(node_label(node), []).append(node)
    return labelled


def _layers_by_position(graph: ir.Graph) -> dict[str, list[ir.Node]]:
    """The graph's nodes of each op type, in graph order."""
    by_op: dict[str, list[ir.Node]] = {}
    for node in graph:
        by_op.setdefault(node.op_type, []).append(node)
    return by_op


def _local_folds(
    original: ir.Model, folded: ir.Model, folds: list[Fold], rtol: float | None
) -> tuple[list[_LocalFold], list[FoldCheck]]:
    """The folds that can be checked on their own, and a not-compared entry (with the reason) for each other."""
    opset = original.opset_imports.get("", original.opset_imports.get("ai.onnx", 1))
    in_original, in_folded = _by_label(original.graph), _by_label(folded.graph)
    positions = (_layers_by_position(original.graph), _layers_by_position(folded.graph))
    per_layer = collections.Counter((fold.graph, fold.layer) for fold in folds)
    local, unchecked = [], []
    for fold in folds:
        label = fold.describe()
        if fold.graph:
            unchecked.append(fold_not_checked(label, "in a subgraph: checked through the model's outputs only"))
        elif per_layer[(fold.graph, fold.layer)] > 1:
            unchecked.append(fold_not_checked(label, "the layer absorbs more than one fold: checked through the model's outputs only"))
        else:
            try:
                local.append(_local_fold(fold, label, opset, in_original, in_folded, positions, rtol))
            except (Refusal, LookupError) as why:
                reason = why.reason if isinstance(why, Refusal) else why.args[0]
                unchecked.append(fold_not_checked(label, f"{reason}: checked through the model's outputs only"))
    return local, unchecked


def _only(labelled: dict[str, list[ir.Node]], label: str, what: str) -> ir.Node:
    nodes = labelled.get(label, [])
    if len(nodes) != 1:
        raise LookupError(f"{len(nodes)} nodes are labelled {label!r} in the {what} model")
    return nodes[0]


def _local_fold(fold: Fold, label: str, opset: int, in_original, in_folded, positions, rtol: float | None) -> _LocalFold:
    anchor = _only(in_original, fold.batchnorm, "original")
    preceding = fold.direction == "into-preceding"
    rule = FoldIntoPreceding() if preceding else FoldIntoFollowing()
    match = rule.check(anchor, opset)  # read-only: the original's layer and the map that was folded
    layer = match.layer
    if layer.node.op_type == "MatMul":
        raise LookupError("a MatMul fold")
    channels = layer.layout.out_channels(layer.weight.shape)
    if anchor.op_type == "BatchNormalization":
        affine = batchnorm_channel_affine(anchor, opset)
    else:
        affine = elementwise_channel_affine(anchor, layer.output, channels, layer.output_rank)
    if in_folded.get(fold.batchnorm):
        raise LookupError(f"the folded model keeps {fold.batchnorm!r}")  # another tool left it: nothing folded
    folded_layer = _corresponding_layer(fold, layer, anchor, in_folded, positions)
    if folded_layer.op_type != layer.node.op_type:
        raise LookupError(f"{fold.layer!r} is a {folded_layer.op_type} in the folded model")
    if any(value is not None and value.const_value is None for value in folded_layer.inputs[1:]):
        raise LookupError(f"the folded {fold.layer!r} reads a weight that is not an initializer")
    original_inputs = [None if value is None else constant_array(value) for value in layer.node.inputs[1:]]
    if any(array is None and value is not None for array, value in zip(original_inputs, layer.node.inputs[1:])):
        raise LookupError(f"the original {fold.layer!r} reads a weight that is not constant")
    parameters = _compare_parameters(layer, layer_view(folded_layer, opset), affine, preceding, rtol)
    if preceding:
        data, reference = layer.node.inputs[0].name, anchor.outputs[0].name
    else:
        data, reference = anchor.inputs[0].name, layer.output.name
    return _LocalFold(
        label, data, reference, [folded_layer], 1, (data, reference), layer.node, original_inputs, affine, preceding, parameters,
    )  # fmt: skip


def _corresponding_layer(fold: Fold, layer: Layer, anchor: ir.Node, in_folded, positions) -> ir.Node:
    """The folded model's node for the original's ``layer``: by label, else (a model from another tool may
    rename nodes) by position among the nodes of its op type when both models have as many of them."""
    labels = [fold.layer]
    if fold.direction == "into-preceding":
        # An unnamed layer whose output became a graph output took the BatchNorm's output name.
        labels.append(f"{layer.node.op_type}->{anchor.outputs[0].name}")
    for label in labels:
        if in_folded.get(label):
            return _only(in_folded, label, "folded")
    in_original, in_candidate = (by_op.get(layer.node.op_type, []) for by_op in positions)
    if len(in_original) != len(in_candidate):
        raise LookupError(f"no node is labelled {fold.layer!r} in the folded model, and it has {len(in_candidate)} "
                          f"{layer.node.op_type} nodes where the original has {len(in_original)}")  # fmt: skip
    return in_candidate[in_original.index(layer.node)]


def _compare_parameters(original: Layer, folded: Layer, affine: ChannelAffine, into_outputs: bool, rtol: float | None):
    """The folded layer's weight and bias against the exact fold of the original's, as a Gemm applies them:
    alpha x weight, beta x C (C ignored at beta 0), then in the folded layer's own terms (over its alpha and
    beta) so that each is compared in its own dtype."""
    if folded.layout != original.layout:
        raise LookupError(f"the folded {node_label(folded.node)} has weight layout {folded.layout}, the original {original.layout}")
    alpha, beta = original.gemm_alpha_beta
    bias = None if original.bias is None or beta == 0 else original.bias.astype(np.float64) * beta
    weight = original.weight if alpha == 1.0 else original.weight.astype(np.float64) * alpha  # (a weight may be large)
    exact = exact_fold(weight, bias, affine, original.layout, into_outputs)
    folded_alpha, folded_beta = folded.gemm_alpha_beta
    folded_bias = None if folded.bias is None or folded_beta == 0 else folded.bias
    bias_over = 1.0 if folded_bias is None else folded_beta
    if (folded_alpha, bias_over) != (1.0, 1.0):
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero alpha or beta: infinitely far, as it is
            exact = ExactFold(exact.weight / folded_alpha, exact.bias / bias_over, exact.bias_terms / abs(bias_over))
    return compare_parameters(exact, folded.weight, folded_bias, folded.layout, rtol)


_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _local_model(folded: ir.Model, local: list[_LocalFold], values: dict[str, np.ndarray]) -> bytes:
    """One model holding a copy of each checked folded layer, its data input fed as ``x<i>``, its output ``y<i>``,
    and beside it ``n<i>``, each element's rounding scale sqrt(sum (w x)^2 + b^2) (see LOCAL_UNITS).

    A float16/bfloat16 layer runs in float32 (its input and folded weights upcast exactly), beside a float32
    reference ``r<i>``: the original layer, with its own weights upcast, and the folded map. Both then carry
    float32 rounding only, so what is left between them is the folded weights' rounding to the half dtype
    (half an ulp each), and a wrong channel stands out from it; the half-precision original's own rounding
    of the layer's sums would hide a relative error of 1e-2. This also runs bfloat16 layers, which
    onnxruntime's CPU kernels lack."""
    graph = ir.Graph([], [], nodes=[], opset_imports=dict(folded.opset_imports), name="bnfold_local_checks")
    for index, check in enumerate(local):
        (node,) = check.nodes
        data = values[check.data]
        x = ir.Value(name=f"x{index}", type=ir.TensorType(ir.DataType.from_numpy(data.dtype)), shape=ir.Shape(data.shape))
        graph.inputs.append(x)
        half = data.dtype in _HALF
        x32 = _append(graph, ir.node("Cast", [x], attributes={"to": ir.DataType.FLOAT})) if half else x
        weights = [None if value is None else value.const_value.numpy() for value in node.inputs[1:]]
        weights = [None if w is None else w.astype(np.float32) if half else w for w in weights]
        graph.outputs.append(_layer_copy(graph, node, x32, weights, f"{index}", f"y{index}"))
        # The size of the rounding at each element: sqrt(sum (w x)^2 + b^2), the same layer with every term
        # squared (a Gemm's alpha and beta too).
        squares = _layer_copy(
            graph, node, _append(graph, ir.node("Mul", [x32, x32])), [None if w is None else w * w for w in weights], f"{index}_squared", None,
            {name: ir.AttrFloat32(name, attribute.as_float() ** 2) if name in ("alpha", "beta") else attribute for name, attribute in node.attributes.items()},
        )  # fmt: skip
        graph.outputs.append(_append(graph, ir.node("Sqrt", [squares]), f"n{index}"))
        if not half:
            continue
        original = [None if array is None else _float32(array) for array in check.original_inputs]
        scale, shift = check.affine.scale, check.affine.shift
        if check.preceding:
            # A Conv's or Gemm's output has its input's rank, the channels on axis 1.
            out = _layer_copy(graph, check.original_layer, x32, original, f"{index}_original", None)
            graph.outputs.append(_channel_map(graph, out, scale, shift, data.ndim, f"r{index}"))
        else:
            mapped = _channel_map(graph, x32, scale, shift, data.ndim, None)
            graph.outputs.append(_layer_copy(graph, check.original_layer, mapped, original, f"{index}_original", f"r{index}"))
    model = ir.Model(graph, ir_version=folded.ir_version)
    return ir.to_proto(model).SerializeToString()


def _float32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _append(graph: ir.Graph, node: ir.Node, name: str | None = None) -> ir.Value:
    graph.append(node)
    if name:
        node.outputs[0].name = name
    return node.outputs[0]


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type, value.shape = ir.TensorType(ir.DataType.from_numpy(value.const_value.dtype.numpy())), ir.Shape(value.const_value.shape)
    graph.register_initializer(value)
    return value


def _layer_copy(graph: ir.Graph, node: ir.Node, data: ir.Value, weights: list, tag: str, name: str | None, attributes=None) -> ir.Value:
    """A copy of layer ``node`` reading ``data`` and ``weights`` (its inputs after the data: arrays or None),
    with ``node``'s attributes or ``attributes``."""
    inputs = [data] + [None if weight is None else _constant(graph, f"w{tag}_{position}", weight) for position, weight in enumerate(weights, 1)]
    attributes = list((attributes or node.attributes).values())
    return _append(graph, ir.Node(node.domain, node.op_type, inputs, attributes=attributes, name=f"layer{tag}"), name)


def _channel_map(graph: ir.Graph, value: ir.Value, scale: np.ndarray, shift: np.ndarray, rank: int, name: str | None) -> ir.Value:
    """``value * scale + shift`` in float32 on channel axis 1 of a ``rank``-D value."""
    shape = (scale.shape[0],) + (1,) * (rank - 2)
    tag = f"{len(graph)}"
    scaled = _append(graph, ir.node("Mul", [value, _constant(graph, f"s{tag}", _float32(scale).reshape(shape))]))
    return _append(graph, ir.node("Add", [scaled, _constant(graph, f"t{tag}", _float32(shift).reshape(shape))]), name)
