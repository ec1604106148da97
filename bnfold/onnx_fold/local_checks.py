"""Each fold checked on its own: the folded layer, run on the original's input to it, against the original
layer and BatchNorm channel by channel, and its parameters against the exact fold of the original's.

A :class:`LocalFold` says what to run and compare; two readers make them: :func:`plain_local_folds` reads the
plain pairs the fast path folds straight from the protobufs (no onnx_ir), and
:mod:`bnfold.onnx_fold.ir_local_checks` matches any other fold with the pass's rules.
:func:`append_local_checks` adds each checked layer to the original's graph, reading the original's own
values, so that one run of the original gives the reference and the folded layer's output together.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx

from bnfold.fold_math import ChannelAffine, UnfoldableStatisticsError, WeightLayout, batchnorm_affine, exact_fold
from bnfold.onnx_fold.fast_path import PlainPair, node_label, plain_pairs
from bnfold.onnx_fold.layers import LAYER_OPS
from bnfold.onnx_fold.runtime import RuntimeModel
from bnfold.onnx_fold.shared import FreshNames, MalformedTensorError
from bnfold.report import Fold
from bnfold.verification import FoldCheck, ParameterComparison, check_fold, compare_parameters, fold_not_checked

_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


@dataclasses.dataclass
class LayerParameters:
    """A Conv/ConvTranspose/Gemm's weight and bias as it applies them: ``alpha x W``, ``beta x bias``."""

    weight: np.ndarray
    bias: np.ndarray | None
    layout: WeightLayout
    alpha: float = 1.0
    beta: float = 1.0


@dataclasses.dataclass
class LocalFold:
    """A fold checked on its own: ``folded_layer`` (its op type, domain and attributes) with
    ``folded_weights`` (its inputs after the data), fed the original's ``data`` value, must reproduce the
    original's ``reference`` value per channel (axis 1)."""

    label: str
    data: str
    reference: str
    folded_layer: onnx.NodeProto
    folded_weights: list[np.ndarray | None]
    # The original layer and its constant inputs after the data, and the map folded into it, from which a
    # half-precision fold's reference is recomputed in float32.
    original_layer: onnx.NodeProto
    original_inputs: list[np.ndarray | None]
    affine: ChannelAffine
    preceding: bool
    parameters: ParameterComparison  # its weight and bias against the exact fold of the original's
    # The size of the terms summed into each element of the exact fold's bias, in the folded layer's terms
    # (ExactFold.bias_terms): the bias in its rounding scale (see append_local_checks).
    bias_terms: np.ndarray


def compare_layer_parameters(
    original: LayerParameters, folded: LayerParameters, affine: ChannelAffine, into_outputs: bool, rtol: float | None
) -> tuple[ParameterComparison, np.ndarray]:
    """The folded layer's weight and bias against the exact fold of the original's, as a Gemm applies them:
    alpha x weight, beta x C (C ignored at beta 0, the weight at alpha 0), then in the folded layer's own terms
    (over its alpha and beta) so that each is compared in its own dtype; and the exact fold's bias terms in those
    terms (see :attr:`LocalFold.bias_terms`)."""
    if {folded.layout.kind, original.layout.kind} == {"matrix_in_out", "matrix_out_in"}:  # (a Gemm's transB changed)
        folded = dataclasses.replace(folded, weight=folded.weight.T, layout=original.layout)
    if folded.layout != original.layout:
        raise LookupError(f"the folded layer has weight layout {folded.layout}, the original {original.layout}")
    bias = None if original.bias is None or original.beta == 0 else original.bias.astype(np.float64) * original.beta
    weight = original.weight if original.alpha == 1.0 else original.weight.astype(np.float64) * original.alpha  # (a weight may be large)
    exact = exact_fold(weight, bias, affine, original.layout, into_outputs)
    folded_bias = None if folded.bias is None or folded.beta == 0 else folded.bias
    bias_over = 1.0 if folded_bias is None else folded.beta
    # At alpha 0 the layer applies a zero weight, whatever its weight holds (in its own terms: 0 / 0).
    folded_weight, weight_over = (np.zeros_like(folded.weight), 1.0) if folded.alpha == 0 else (folded.weight, folded.alpha)
    if (weight_over, bias_over) != (1.0, 1.0):
        exact = exact.divided(weight_over, bias_over)
    return compare_parameters(exact, folded_weight, folded_bias, folded.layout, rtol), exact.bias_terms


def plain_folds(original: onnx.ModelProto, folds: list[Fold]) -> dict[str, PlainPair] | None:
    """The plain pairs of ``original`` (see :func:`bnfold.onnx_fold.fast_path.plain_pairs`) by BatchNorm
    label, when each of ``folds`` folded one; None otherwise."""
    pairs = plain_pairs(original)
    if any(fold.graph or fold.direction != "into-preceding" or fold.batchnorm not in pairs for fold in folds):
        return None
    return pairs


def plain_local_folds(
    original: RuntimeModel, folded: RuntimeModel, pairs: dict[str, PlainPair], folds: list[Fold], rtol: float | None
) -> tuple[list[LocalFold], list[FoldCheck]]:
    """The local checks of ``folds``, each folding one of the original's ``pairs`` (from :func:`plain_folds`),
    and a not-compared entry for each that cannot be checked. Both models are read from the ``ModelProto``
    they were made from, their tensors' values from the arrays they hold for onnxruntime."""
    in_folded: dict[str, list[onnx.NodeProto]] = {}
    for node in folded.source.graph.node:
        in_folded.setdefault(node_label(node), []).append(node)
    initializers = {tensor.name: tensor for tensor in folded.source.graph.initializer}
    normalized = {node.input[0] for node in folded.source.graph.node if node.op_type == "BatchNormalization" and node.input}
    local, unchecked = [], []
    for fold in folds:
        pair = pairs[fold.batchnorm]
        label = fold.describe()
        try:
            # An unnamed layer whose output became a graph output took the BatchNorm's output name.
            candidates = [in_folded.get(name, []) for name in (fold.layer, f"{pair.layer.op_type}->{pair.batchnorm.output[0]}")]
            nodes = next((found for found in candidates if found), [])
            if len(nodes) != 1:
                raise LookupError(f"{len(nodes)} nodes are labelled {fold.layer!r} in the folded model")
            folded_layer = nodes[0]
            if folded_layer.op_type != pair.layer.op_type:
                raise LookupError(f"{fold.layer!r} is a {folded_layer.op_type} in the folded model")
            if folded_layer.output and folded_layer.output[0] in normalized:
                raise LookupError(f"the folded model keeps a BatchNorm after {fold.layer!r}")  # (renamed, maybe)
            if any(name and name not in initializers for name in folded_layer.input[1:]):
                raise LookupError(f"the folded {fold.layer!r} reads a weight that is not an initializer")
            folded_weights = [folded.array(initializers[name]) if name else None for name in folded_layer.input[1:]]
            original_inputs = [original.array(tensor) for tensor in (pair.weight, pair.bias) if tensor is not None]
            statistics = [original.array(tensor) for tensor in pair.statistics]
            affine = batchnorm_affine(*statistics, pair.epsilon)
            parameters, bias_terms = compare_layer_parameters(
                _parameters(pair.layer, original_inputs), _parameters(folded_layer, folded_weights), affine, True, rtol
            )  # fmt: skip
        except (LookupError, MalformedTensorError, UnfoldableStatisticsError) as why:
            unchecked.append(fold_not_checked(label, f"{why}: checked through the model's outputs only"))
            continue
        local.append(LocalFold(
            label, pair.layer.input[0], pair.batchnorm.output[0], folded_layer, folded_weights,
            pair.layer, original_inputs, affine, True, parameters, bias_terms,
        ))  # fmt: skip
    return local, unchecked


def _parameters(layer: onnx.NodeProto, inputs: list[np.ndarray | None]) -> LayerParameters:
    """A layer read from the protobuf: its weight and bias, its layout (from its own attributes), and a
    Gemm's alpha and beta."""
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in layer.attribute}
    layout = LAYER_OPS[layer.op_type].layout(lambda name, default: attributes.get(name, default))
    weight, bias = inputs[0], inputs[1] if len(inputs) > 1 else None
    alpha, beta = (float(attributes.get(name, 1.0)) for name in ("alpha", "beta")) if layer.op_type == "Gemm" else (1.0, 1.0)
    return LayerParameters(weight, bias, layout, alpha, beta)


@dataclasses.dataclass
class _CheckOutputs:
    """The names of a check's outputs in the original's run: the folded layer's output, its rounding
    scale, and for a half-precision fold the float32 reference (else None: the original's value)."""

    folded: str
    magnitude: str
    reference: str | None


def append_local_checks(model: RuntimeModel, local: list[LocalFold]) -> list[_CheckOutputs]:
    """Add to ``model`` (the original) a copy of each checked folded layer reading the original's input to
    it, its output ``y``, and beside it ``n``, each element's rounding scale sqrt(sum (w x)^2 + c^2), c the size
    of the terms summed into its bias element (see LOCAL_UNITS): where the original's BatchNorm sums large terms
    that cancel, it rounds at their size, whatever the folded bias; expose them and the original's reference
    values as outputs.

    A float16/bfloat16 layer runs in float32 (its input and folded weights upcast exactly), beside a float32
    reference ``r``: the original layer, with its own weights upcast, and the folded map. Both then carry
    float32 rounding only, so what is left between them is the folded weights' rounding to the half dtype
    (half an ulp each), and a wrong channel stands out from it; the half-precision original's own rounding
    of the layer's sums would hide a relative error of 1e-2. This also runs bfloat16 layers, which
    onnxruntime's CPU kernels lack."""
    fresh = FreshNames(model.names())
    graph = model.proto.graph
    # Declared shapes are hints onnxruntime's memory planner trusts, for the values these nodes read too: an
    # exporter's wrong ones (jax2onnx declares NHWC shapes for NCHW values) made it reuse a buffer of another size
    # for a check ("Shape mismatch attempting to re-use buffer"), where the original alone runs. It infers them.
    del graph.value_info[:]
    names = []
    for check in local:
        model.add_output(check.reference)
        weight = check.folded_weights[0]
        half = weight.dtype in _HALF
        data = check.data
        if half:
            data = fresh("check_input")
            graph.node.append(onnx.helper.make_node("Cast", [check.data], [data], to=onnx.TensorProto.FLOAT))
        weights = _initializers(model, fresh, [None if w is None else w.astype(np.float32) if half else w for w in check.folded_weights])
        folded = _layer_copy(model, fresh, check.folded_layer, data, weights)
        # The size of the rounding at each element: the same layer with every term squared (a Gemm's alpha
        # and beta too; the squares computed in the graph, the bias's terms' here), then the square root.
        squared_data, squared_weight = (_square(model, fresh, name) for name in (data, weights[0]))
        squared_weights = [squared_weight, *_initializers(model, fresh, [_squared_bias_terms(check, half)] if weights[1:] else [])]
        squares = _layer_copy(model, fresh, check.folded_layer, squared_data, squared_weights, squared_gemm_terms=True)
        magnitude = fresh("check_magnitude")
        graph.node.append(onnx.helper.make_node("Sqrt", [squares], [magnitude]))
        reference = _float32_reference(model, fresh, check, data) if half else None
        for name in (folded, magnitude, reference):
            if name is not None:
                model.add_output(name)
        names.append(_CheckOutputs(folded, magnitude, reference))
    return names


def read_local_checks(local: list[LocalFold], names: list[_CheckOutputs], values: dict[str, np.ndarray], rtol: float | None) -> list[FoldCheck]:
    """Each check's verdict from the original's run (``values``, by name)."""
    checks = []
    for check, outputs in zip(local, names, strict=True):
        dtype_name = str(values[check.reference].dtype)
        reference = values[outputs.reference] if outputs.reference else values[check.reference]
        checks.append(check_fold(
            check.label, dtype_name, reference, values[outputs.folded], values[outputs.magnitude], 1, rtol, check.parameters,
        ))  # fmt: skip
    return checks


def _squared_bias_terms(check: LocalFold, half: bool) -> np.ndarray | None:
    """The square of the check's bias terms, shaped and typed as the folded bias (None: the folded layer has
    none, as a Gemm at beta 0 ignores its C)."""
    bias = check.folded_weights[1]
    if bias is None:
        return None
    squares = np.broadcast_to(np.square(check.bias_terms), np.broadcast_shapes(check.bias_terms.shape, bias.shape))
    return squares.astype(np.float32 if half else bias.dtype)


def _float32_reference(model: RuntimeModel, fresh: FreshNames, check: LocalFold, data: str) -> str:
    """The original layer and the folded map in float32 on ``data`` (the layer's input, upcast)."""
    original = [None if array is None else np.asarray(array, np.float32) for array in check.original_inputs]
    # A Conv's or Gemm's output has its input's rank, the channels on axis 1.
    rank = 2 if check.original_layer.op_type == "Gemm" else original[0].ndim
    original = _initializers(model, fresh, original)
    if check.preceding:
        out = _layer_copy(model, fresh, check.original_layer, data, original)
        return _channel_map(model, fresh, out, check.affine, rank)
    mapped = _channel_map(model, fresh, data, check.affine, rank)
    return _layer_copy(model, fresh, check.original_layer, mapped, original)


def _initializers(model: RuntimeModel, fresh: FreshNames, arrays: list[np.ndarray | None]) -> list[str]:
    """Each array as a new initializer of ``model``: their names ("" for None, an absent optional input)."""
    return ["" if array is None else model.add_initializer(fresh("check_weight"), array) for array in arrays]


def _square(model: RuntimeModel, fresh: FreshNames, name: str) -> str:
    """A node computing ``name`` times itself; its output ("" for an absent input)."""
    if not name:
        return ""
    squared = fresh("check_squared")
    model.proto.graph.node.append(onnx.helper.make_node("Mul", [name, name], [squared]))
    return squared


def _layer_copy(
    model: RuntimeModel, fresh: FreshNames, node: onnx.NodeProto, data: str, weights: list[str], squared_gemm_terms: bool = False
) -> str:
    """A copy of layer ``node`` reading ``data`` and ``weights`` (the names of its inputs after the data; ""
    for an absent one); with ``squared_gemm_terms``, a Gemm's alpha and beta squared. Returns its output's name."""
    inputs = [data, *weights]
    output = fresh("check_layer")
    copy = onnx.helper.make_node(node.op_type, inputs, [output], domain=node.domain)
    for attribute in node.attribute:
        if squared_gemm_terms and attribute.name in ("alpha", "beta"):
            copy.attribute.append(onnx.helper.make_attribute(attribute.name, attribute.f**2))
        else:
            copy.attribute.append(attribute)
    model.proto.graph.node.append(copy)
    return output


def _channel_map(model: RuntimeModel, fresh: FreshNames, value: str, affine: ChannelAffine, rank: int) -> str:
    """``value * scale + shift`` in float32 on channel axis 1 of a ``rank``-D value."""
    shape = (affine.scale.shape[0],) + (1,) * (rank - 2)
    scale = model.add_initializer(fresh("check_scale"), np.asarray(affine.scale, np.float32).reshape(shape))
    shift = model.add_initializer(fresh("check_shift"), np.asarray(affine.shift, np.float32).reshape(shape))
    scaled, mapped = fresh("check_scaled"), fresh("check_mapped")
    model.proto.graph.node.append(onnx.helper.make_node("Mul", [value, scale], [scaled]))
    model.proto.graph.node.append(onnx.helper.make_node("Add", [scaled, shift], [mapped]))
    return mapped
