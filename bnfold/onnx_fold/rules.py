"""Fold rules for ONNX graphs, in the style of onnxscript's rewriter: a pattern, a check, a rewrite.

Three rules, each anchored at a per-channel affine node (a BatchNormalization, or a Mul/Add/Sub/Div by a
per-channel constant, the form some exporters give a BatchNorm or a Caffe Scale layer):

- :class:`FoldIntoPreceding` (backward): ``Layer -> affine`` becomes ``Layer'`` with scaled output
  channels. Layer = Conv, ConvTranspose, Gemm, or a 2-D MatMul with an optional Add of a constant bias.
  A BatchNorm may also read a Gemm/MatMul (of any data rank) through a Flatten/Reshape/Transpose that
  :mod:`.layout` proves keeps the features on its channel axis (LeViT's ``MatMul -> Flatten -> BN``). A
  weight stored as ``DequantizeLinear(W_q, scale, zero_point)`` (:mod:`.qdq`) takes the fold in its scales.
- :class:`FoldIntoConcatenated` (backward, BatchNorm only): ``Concat(Layer_1, ..., Layer_n) -> BatchNorm`` along the
  channels becomes the Concat of the ``Layer_i'``, each with its part of the channels scaled.
- :class:`FoldIntoFollowing` (forward, BatchNorm only): ``BatchNorm -> Layer`` becomes ``Layer'`` with
  scaled input channels. Layer = Conv that pads nothing, Gemm with transA=0, or a 2-D MatMul.

Both see through Identity and inference-mode Dropout between the two, and ignore readers of a value's
shape alone (``Shape``, ``Size``).

``check`` returns a :class:`Match` or raises :class:`Refusal` with a stable code and a sentence the user
can act on; ``rewrite`` edits the graph. All arithmetic goes through :mod:`bnfold.fold_math`.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from bnfold.fold_math import (
    ChannelAffine,
    FoldOverflowError,
    InexactQuantizedFoldError,
    QuantizedOutputFold,
    UnfoldableStatisticsError,
    WeightLayout,
    batchnorm_affine,
    fold_into_inputs,
    fold_into_outputs,
    fold_into_quantized_outputs,
)
from bnfold.onnx_fold.constants import constant_array, drop_if_unread, not_constant_reason
from bnfold.onnx_fold.layers import CHANNEL_MOVING_OPS, LAYER_OPS, reads_elements
from bnfold.onnx_fold.layout import LAYOUT_OPS, features_on_channel_axis, moved_channel_axis
from bnfold.onnx_fold.qdq import (
    FOLD_FIRST,
    QuantizedWeight,
    QuantizedWeightError,
    dequantizer,
    quantized_bias_reason,
    quantized_weight,
)
from bnfold.onnx_fold.shared import BATCHNORM_DEFAULT_EPSILON, FreshNames
from bnfold.report import ELEMENTWISE_AFFINE_OPS

ELEMENTWISE_OPS = ELEMENTWISE_AFFINE_OPS


class Refusal(Exception):
    """Why a fold cannot be done: a code from :data:`bnfold.report.SKIP_CODES` and a sentence."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def node_label(node: ir.Node) -> str:
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type}->{output}"


def labelled_graphs(model: ir.Model) -> list[tuple[str, ir.Graph]]:
    """The main graph (label "") and every subgraph, labelled by the node that owns it."""
    labelled = [("", model.graph)]
    for graph in model.graph.subgraphs():
        owner = graph.parent if hasattr(graph, "parent") else None
        labelled.append((graph.name or (node_label(owner) if owner is not None else "subgraph"), graph))
    return labelled


def _attr(node: ir.Node, name: str, default):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


_INT = (ir.AttributeType.INT,)
_NUMBER = (ir.AttributeType.FLOAT, ir.AttributeType.INT)


def _typed_attr(node: ir.Node, name: str, default, types: tuple[ir.AttributeType, ...], code: str):
    """An attribute the fold computes with, or a refusal when a malformed model gives it another type."""
    attribute = node.attributes.get(name)
    if attribute is None:
        return default
    if attribute.type not in types:
        raise Refusal(code, f"the {name} attribute of {node_label(node)} is {attribute.type.name}, not {types[0].name}")
    return attribute.value


def _only_consumer(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value``'s elements (readers of its shape or type alone aside), if only one does."""
    uses = [use for use in value.uses() if reads_elements(use)]
    if value.is_graph_output() or len(uses) != 1:
        return None
    return uses[0].node


def _is_floating(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


def _const_input(node: ir.Node, index: int, what: str, optional: bool = False) -> np.ndarray | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        if optional:
            return None
        raise Refusal("weight-not-constant", f"{node_label(node)} has no {what}")
    array = constant_array(value)
    if array is None:
        raise Refusal("weight-not-constant", f"the {what} of {node_label(node)} ({value.name}) is {not_constant_reason(value)}")
    if not _is_floating(array):
        raise Refusal("weight-not-constant", f"the {what} of {node_label(node)} is {array.dtype}, not floating point")
    return array


@dataclasses.dataclass
class Layer:
    """A Conv/ConvTranspose/Gemm/MatMul seen as ``y = W x + b`` with a known weight layout."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    layout: WeightLayout
    output_rank: int
    bias_add: ir.Node | None = None  # MatMul's bias lives in a following Add
    # A weight stored as DequantizeLinear(integers, scale, zero point); ``weight`` then holds the integers.
    quantized: QuantizedWeight | None = None

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]

    @property
    def bias_slot(self) -> tuple[ir.Node, int] | None:
        """The node and input index that hold the bias: input 2, or the MatMul's bias Add (None without one)."""
        if self.node.op_type != "MatMul":
            return self.node, 2
        if self.bias_add is None:
            return None
        return self.bias_add, 1 if self.bias_add.inputs[0] is self.node.outputs[0] else 0

    @property
    def gemm_alpha_beta(self) -> tuple[float, float]:
        if self.node.op_type != "Gemm":
            return 1.0, 1.0
        alpha, beta = (float(_typed_attr(self.node, name, 1.0, _NUMBER, "channel-mismatch")) for name in ("alpha", "beta"))
        return alpha, beta


def matmul_bias_add(matmul: ir.Node) -> tuple[ir.Node, np.ndarray] | None:
    """The ``Add(MatMul(...), constant)`` that serves as the MatMul's bias, if any."""
    add = _only_consumer(matmul.outputs[0])
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    bias = constant_array(other)
    if bias is None or not _is_floating(bias) or bias.ndim > 2:
        return None
    # (A quantized weight is not a constant, but its integers have its shape.)
    dequantize = dequantizer(matmul.inputs[1])
    weight = constant_array(matmul.inputs[1] if dequantize is None else (dequantize.inputs or [None])[0])
    out_channels = None if weight is None else weight.shape[-1]
    if bias.ndim >= 1 and bias.shape[-1] not in (1, out_channels):
        return None
    return add, bias


def _check_conv_shapes(node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, layout: WeightLayout) -> None:
    """Refuse a Conv/ConvTranspose whose weight, group and bias do not fit together (a malformed model)."""
    label = node_label(node)
    if weight.ndim < 3:
        raise Refusal("channel-mismatch", f"{label} has a {weight.ndim}-D weight; a convolution's is (channels, channels / group, *kernel)")
    if layout.groups < 1 or weight.shape[0] % layout.groups:
        raise Refusal("channel-mismatch", f"{label} has group={layout.groups}, which does not divide the {weight.shape[0]} channels on its weight's axis 0")
    outputs = layout.out_channels(weight.shape)
    if bias is not None and bias.shape != (outputs,):
        raise Refusal("channel-mismatch", f"the bias of {label} has shape {list(bias.shape)}, not [{outputs}]")


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def layer_view(node: ir.Node, opset: int, data_value: ir.Value | None = None, features_last: bool = False) -> Layer:
    """Read ``node`` (in a model of default-domain ``opset``) as a foldable layer, or refuse. ``data_value`` is the input a forward fold
    would scale (it must be the layer's data input, not its weight). ``features_last``: the BatchNorm reads
    the layer's output through a layout op proven to put its last axis on the channel axis, so a MatMul's
    data may have any rank."""
    op = node.op_type
    if data_value is not None and node.inputs[0] is not data_value:
        raise Refusal("no-foldable-neighbour", f"it feeds the weight input of {node_label(node)}, not its data")
    layout = LAYER_OPS[op].layout(lambda name, default: _typed_attr(node, name, default, _INT, "channel-mismatch"))
    quantized = _quantized_weight(node, layout, opset, forward=data_value is not None)
    weight = _const_input(node, 1, "weight") if quantized is None else quantized.quantized
    if 0 in weight.shape:
        raise Refusal("channel-mismatch", f"{node_label(node)} has an empty weight, of shape {list(weight.shape)}")
    if quantized is not None and op != "MatMul":  # (before the bias is read: that would dequantize it)
        _refuse_quantized_bias(node, node.inputs[2] if len(node.inputs) > 2 else None)
    layer = _layer_of_op(node, weight, layout, data_value, features_last)
    if quantized is not None and layer.bias_add is not None:
        _refuse_quantized_bias(node, layer.bias_add.inputs[layer.bias_slot[1]])
    layer.quantized = quantized
    return layer


def _refuse_quantized_bias(node: ir.Node, bias: ir.Value | None) -> None:
    reason = quantized_bias_reason(bias, node_label(node))
    if reason is not None:
        raise Refusal("quantized-weight", reason)


def _quantized_weight(node: ir.Node, layout: WeightLayout, opset: int, forward: bool) -> QuantizedWeight | None:
    """The layer's weight as a :class:`QuantizedWeight` when a DequantizeLinear produces it, or a refusal
    saying why the fold cannot go into it exactly; None for a weight stored in float."""
    dequantize = dequantizer(node.inputs[1]) if len(node.inputs) > 1 else None
    if dequantize is None:
        return None
    if forward:
        raise Refusal(
            "quantized-weight",
            f"the weight of {node_label(node)} is quantized (DequantizeLinear) per output channel, and a BatchNorm before "
            f"it scales its input channels, which those scales cannot express; {FOLD_FIRST}",
        )
    try:
        return quantized_weight(dequantize, node_label(node), layout.out_channel_axis(), opset)
    except QuantizedWeightError as error:
        raise Refusal("quantized-weight", str(error)) from None


def _layer_of_op(node: ir.Node, weight: np.ndarray, layout: WeightLayout, data_value: ir.Value | None, features_last: bool) -> Layer:
    """:func:`layer_view` past the weight: the op's own shape checks and its bias."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        bias = _const_input(node, 2, "bias", optional=True)
        _check_conv_shapes(node, weight, bias, layout)
        return Layer(node, weight, bias, layout, weight.ndim)
    if op == "Gemm":
        if weight.ndim != 2:
            raise Refusal("channel-mismatch", f"{node_label(node)} has a {weight.ndim}-D weight")
        bias = _const_input(node, 2, "bias", optional=True)
        outputs = layout.out_channels(weight.shape)
        # C broadcasts to (M, N): a scalar, [N], [1, N], [M, N], or a size-1 last axis.
        if bias is not None and (bias.ndim > 2 or (bias.ndim and bias.shape[-1] not in (1, outputs))):
            raise Refusal("channel-mismatch", f"the bias of {node_label(node)} has shape {list(bias.shape)}, which does not broadcast to its {outputs} outputs")
        return Layer(node, weight, bias, layout, 2)
    # MatMul: BatchNorm's channel axis is 1, which is the MatMul's feature axis only for 2-D data.
    if weight.ndim != 2:
        raise Refusal("channel-mismatch", f"{node_label(node)} has a {weight.ndim}-D weight; only 2-D weights fold")
    data_rank = _rank(node.inputs[0])
    if data_rank != 2 and not features_last:
        known = "unknown" if data_rank is None else f"{data_rank}-D"
        raise Refusal(
            "channel-mismatch",
            f"the data of {node_label(node)} is {known}, so BatchNorm's channel axis 1 is not provably the "
            "MatMul's feature axis (only 2-D data folds, or data whose features a Flatten/Reshape to [-1, C] "
            "brings to the channel axis)",
        )
    found = None if data_value is not None else matmul_bias_add(node)
    bias_add, bias = found if found else (None, None)
    return Layer(node, weight, bias, layout, 2, bias_add)


@dataclasses.dataclass(frozen=True)
class TrainingMode:
    """What puts a BatchNormalization in training mode (``fact``), and what the user can do (``fix``)."""

    code: str
    fact: str
    fix: str


def batchnorm_training_mode(node: ir.Node, version: int) -> TrainingMode | None:
    """Why a BatchNormalization of opset ``version`` normalises with batch statistics or exposes its
    running statistics, per the operator's versions; None for a plain eval-mode node."""
    if version >= 14 and _attr(node, "training_mode", 0):
        return TrainingMode("training-mode", "training_mode=1", "export the model in eval mode (model.eval())")
    if version < 7 and not _attr(node, "is_test", 0):
        return TrainingMode("training-mode", f"is_test=0 at opset {version}", "set is_test=1")
    extra = [out for out in node.outputs[1:] if out is not None and out.name]
    read = [out.name for out in extra if out.uses() or out.is_graph_output()]
    if read:
        fact = f"its running-statistics outputs are read: {', '.join(read)}"
        return TrainingMode("extra-outputs-used", fact, "export the model in eval mode, where nothing reads them")
    if extra and version < 14:
        names = ", ".join(out.name for out in extra)
        fact = f"it declares running-statistics outputs ({names}), which selects training mode at opset {version}"
        return TrainingMode("training-mode", fact, "remove those outputs")
    return None


def batchnorm_channel_affine(node: ir.Node, opset: int) -> ChannelAffine:
    """The eval-mode BatchNormalization as a channel affine map, or a refusal saying why not.

    Remembered in ``node.meta``: the pass asks once up front and each rule asks again."""
    cached = node.meta.get(_AFFINE)
    if cached is None:
        try:
            cached = _batchnorm_channel_affine(node, opset)
        except Refusal as refusal:
            cached = refusal
        node.meta[_AFFINE] = cached
    if isinstance(cached, Refusal):
        raise cached
    return cached


_AFFINE = "bnfold.channel_affine"


def _batchnorm_channel_affine(node: ir.Node, opset: int) -> ChannelAffine:
    version = node.version or opset
    label = node_label(node)
    if not node.outputs:
        raise Refusal("no-foldable-neighbour", f"{label} has no output")
    training = batchnorm_training_mode(node, version)
    if training is not None:
        raise Refusal(training.code, f"{label}: {training.fact}; {training.fix}")
    parameters = []
    for index, what in enumerate(("scale", "bias", "mean", "var"), start=1):
        value = node.inputs[index] if index < len(node.inputs) else None
        array = None if value is None else constant_array(value)
        if array is None:
            source = "missing" if value is None else f"{value.name}, {not_constant_reason(value)}"
            raise Refusal("parameters-not-constant", f"the {what} of {label} is not a constant ({source})")
        if not _is_floating(array):
            raise Refusal("parameters-not-constant", f"the {what} of {label} is {array.dtype}, not floating point")
        parameters.append(array)
    scale, bias, mean, var = parameters
    if version < 9 and not _typed_attr(node, "spatial", 1, _INT, "channel-mismatch") and any(p.ndim > 1 and p.size != p.shape[0] for p in parameters):
        raise Refusal("channel-mismatch", f"{label} has spatial=0 with per-position statistics; only per-channel folds")
    for what, parameter in zip(("scale", "bias", "mean", "variance"), parameters):
        # One value per channel: shape [C] (before opset 9, [C, 1, ...] also: the spatial attribute's era).
        if parameter.ndim != 1 and not (version < 9 and parameter.ndim and parameter.size == parameter.shape[0]):
            raise Refusal("channel-mismatch", f"the {what} of {label} has shape {list(parameter.shape)}; BatchNormalization takes one value per channel, shape [C]")
    sizes = [p.size for p in parameters]
    if len(set(sizes)) != 1 or not sizes[0]:
        raise Refusal("channel-mismatch", f"{label} has {'/'.join(map(str, sizes))} values of scale/bias/mean/variance; one per channel is needed")
    epsilon = float(_typed_attr(node, "epsilon", BATCHNORM_DEFAULT_EPSILON, _NUMBER, "unfoldable-statistics"))
    try:
        return batchnorm_affine(scale, bias, mean, var, epsilon)
    except UnfoldableStatisticsError as error:
        raise Refusal("unfoldable-statistics", f"{label}: {error}") from None


def elementwise_channel_affine(node: ir.Node, data: ir.Value, channels: int, rank: int, axis: int = 1) -> ChannelAffine | None:
    """``node`` (Mul/Add/Sub/Div of ``data`` and a constant) as a channel affine map over a
    ``rank``-D tensor with channels on ``axis``, or None when the constant is not per-channel."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) != 2 or "broadcast" in node.attributes:
        return None  # opset < 7 "broadcast"/"axis" semantics are not numpy's: leave those alone
    data_first = node.inputs[0] is data
    other = node.inputs[1] if data_first else node.inputs[0]
    if other is data:
        return None
    constant = constant_array(other)
    if constant is None or not _is_floating(constant) or constant.ndim > rank:
        return None
    padded = (1,) * (rank - constant.ndim) + constant.shape
    if any(size != 1 for position, size in enumerate(padded) if position != axis) or padded[axis] not in (1, channels):
        return None
    per_channel = np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op_type == "Mul":
        return ChannelAffine(per_channel, zeros)
    if node.op_type == "Add":
        return ChannelAffine(ones, per_channel)
    if node.op_type == "Sub":
        return ChannelAffine(ones, -per_channel) if data_first else ChannelAffine(-ones, per_channel)
    if node.op_type == "Div" and data_first and np.all(per_channel != 0):
        return ChannelAffine(1.0 / per_channel, zeros)
    return None


def channel_axis_at(layer: Layer, passthroughs: tuple[ir.Node, ...]) -> tuple[int, int]:
    """The axis holding ``layer``'s output channels after ``passthroughs`` (in data order), and the rank there;
    Refusal when a layout op among them does not keep the channels whole on one axis (or cannot be shown to)."""
    if layer.node.op_type == "MatMul":
        rank = _rank(layer.node.inputs[0])
        if rank is None:
            raise Refusal("channel-mismatch", f"the rank of {node_label(layer.node)}'s data is unknown")
    else:
        rank = layer.output_rank
    axis = rank - 1 if layer.node.op_type in _FEATURES_LAST_OPS else 1
    return _moved_along(passthroughs, axis, rank, layer.layout.out_channels(layer.weight.shape))


def _moved_along(nodes: tuple[ir.Node, ...], axis: int, rank: int, channels: int) -> tuple[int, int]:
    """Where the ``channels`` on ``axis`` of a ``rank``-D tensor are after the channel-moving ops among ``nodes``
    (in data order): their axis and the rank there; Refusal when one of them does not keep them whole on one."""
    for node in nodes:
        if node.op_type in CHANNEL_MOVING_OPS:
            moved = moved_channel_axis(node, axis, rank, channels)
            if isinstance(moved, str):
                raise Refusal("channel-mismatch", f"{node_label(node)}: {moved}")
            axis, rank = moved
    return axis, rank


def chained_affine(anchor: ir.Node, previous: ir.Node, layer: Layer, opset: int, moved: tuple[int, int] | None = None) -> ChannelAffine:
    """The map of ``anchor`` (a BatchNorm, or a per-channel Mul/Add/Sub/Div) reading ``previous``'s output through
    passthroughs, over ``layer``'s output channels (``moved``: on that axis of a tensor of that rank, see
    :func:`channel_axis_at`): what folding it once ``previous`` is folded adds to ``layer`` (Keras 3 lowers a
    BatchNorm to a Mul then an Add, two folds into one layer). Raises Refusal when it is not one."""
    data = _data_input(anchor)
    source, between = _chain_moving_channels(data, opset)
    if source is not previous.outputs[0]:
        raise Refusal("no-foldable-neighbour", f"{node_label(anchor)} does not read the output of {node_label(previous)}")
    channels = layer.layout.out_channels(layer.weight.shape)
    if anchor.op_type == "BatchNormalization":
        affine = batchnorm_channel_affine(anchor, opset)
    else:
        axis, rank = moved or (1, _rank(source) if source.shape is not None else layer.output_rank)
        axis, rank = _moved_along(between, axis, rank, channels)  # (ops between the two that move the channels again)
        affine = elementwise_channel_affine(anchor, data, channels, rank, axis)
        if affine is None:
            raise Refusal("no-foldable-neighbour", f"the constant of {node_label(anchor)} is not per-channel")
    return affine


@dataclasses.dataclass
class Match:
    anchor: ir.Node  # the BatchNorm (or elementwise node) that disappears
    layer: Layer
    direction: str
    affine: ChannelAffine  # the anchor's map, folded into the layer
    # The layer's folded weight and bias, computed by ``check``: a fold its dtype cannot hold is refused
    # before anything in the graph changes. A quantized weight's fold is ``quantized`` instead of ``weight``.
    weight: np.ndarray | None
    bias: np.ndarray
    # The nodes between the two, in data order, left in place: Identity / inference Dropout, and for a
    # BatchNorm after a MatMul a layout op (Flatten/Reshape/Transpose) proven to keep the features whole.
    passthroughs: tuple[ir.Node, ...] = ()
    quantized: QuantizedOutputFold | None = None
    # The BatchNorm's channels [start, stop) the layer takes, when the layer is one of a Concat's (see
    # FoldIntoConcatenated); None: all of them.
    channels: tuple[int, int] | None = None

    @property
    def parts(self) -> list[Match]:
        """The folds the match makes, one per layer."""
        return [self]

    def notes(self) -> list[str]:
        """What the report says about the nodes the fold went through, and about a quantized weight."""
        notes = [self._quantized_note()] if self.quantized is not None else []
        return self._passthrough_notes() + notes

    def _quantized_note(self) -> str:
        weight = self.layer.quantized
        note = (
            f"{node_label(self.anchor)} folded into the scales of {node_label(weight.dequantize)}, the quantized weight of "
            f"{node_label(self.layer.node)}: its integers unchanged"
        )
        if self.quantized.mirrored:
            note += f" but for {self.quantized.mirrored} channel(s) with a negative BatchNorm scale, mirrored about their zero point"
        if weight.per_tensor:
            note += f"; its per-tensor scale is now per-channel (axis {weight.axis})"
        return note + (
            "; the bias is float: runtimes that run QDQ layers as integer kernels want it quantized (int32, scale = input "
            "scale x weight scale)"
        )

    def _passthrough_notes(self) -> list[str]:
        if not self.passthroughs:
            return []
        layout = [node for node in self.passthroughs if node.op_type in CHANNEL_MOVING_OPS]
        through = ", ".join(f"{node_label(node)} [{node.op_type}]" for node in self.passthroughs)
        if not layout:
            return [f"{node_label(self.anchor)} folded through {through}, left in place (the identity at inference)"]
        where = "on the BatchNorm's channel axis" if self.anchor.op_type == "BatchNormalization" else "on the axis its constant scales"
        return [
            f"{node_label(self.anchor)} folded through {through}, left in place: "
            f"{'/'.join(node.op_type for node in layout)} keeps {node_label(self.layer.node)}'s output features whole {where}"
        ]


def _inference_passthrough(node: ir.Node | None, opset: int) -> bool:
    """An Identity, or a Dropout in inference mode whose mask nothing reads: its output is its input."""
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type != "Dropout" or any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return False
    version = node.version or opset
    if version < 7:
        return bool(_attr(node, "is_test", 0))
    training = node.inputs[2] if version >= 12 and len(node.inputs) > 2 else None
    if training is None:
        return True  # Dropout 7 and 10 are the identity at inference; 12+ without training_mode too
    flag = constant_array(training)
    return flag is not None and flag.size == 1 and not flag.reshape(-1)[0]


def _chain_before(value: ir.Value | None, opset: int, through_layout: bool) -> tuple[ir.Value | None, tuple[ir.Node, ...]]:
    """:func:`_passthroughs_before`, and with ``through_layout`` also past one layout op (with passthroughs
    before it) that reads a Gemm or MatMul, each node read only by the next."""
    value, chain = _passthroughs_before(value, opset)
    layout = value.producer() if through_layout and value is not None else None
    if layout is None or layout.op_type not in LAYOUT_OPS or layout.domain not in ("", "ai.onnx") or not layout.inputs:
        return value, chain
    before, inner = _passthroughs_before(layout.inputs[0], opset)
    behind = _layer_behind(before)
    if not _is_layer(behind) or behind.op_type not in _FEATURES_LAST_OPS or _only_consumer(layout.outputs[0]) is None:
        return value, chain
    return before, (*inner, layout, *chain)


# Layers whose output features are on the last axis, where a layout op can bring them to the channel axis.
_FEATURES_LAST_OPS = ("Gemm", "MatMul")


def _chain_moving_channels(value: ir.Value | None, opset: int) -> tuple[ir.Value | None, tuple[ir.Node, ...]]:
    """:func:`_passthroughs_before`, also past channel-moving ops (:data:`CHANNEL_MOVING_OPS`), each node read only
    by the next: what stands between a layer and a per-channel elementwise node."""
    value, chain = _passthroughs_before(value, opset)
    while True:
        mover = value.producer() if value is not None else None
        if mover is None or mover.op_type not in CHANNEL_MOVING_OPS or mover.domain not in ("", "ai.onnx") or not mover.inputs:
            return value, chain
        if _only_consumer(mover.outputs[0]) is None:
            return value, chain
        value, inner = _passthroughs_before(mover.inputs[0], opset)
        chain = (*inner, mover, *chain)


def _passthroughs_before(value: ir.Value | None, opset: int) -> tuple[ir.Value | None, tuple[ir.Node, ...]]:
    """The value before a chain of passthroughs ending in ``value``, each read only by the next, and the chain."""
    chain = []
    producer = value.producer() if value is not None else None
    while _inference_passthrough(producer, opset) and _only_consumer(producer.outputs[0]) is not None:
        chain.append(producer)
        value = producer.inputs[0]
        producer = value.producer()
    return value, tuple(reversed(chain))


class GraphEditor:
    """Graph edits shared by both rules: fresh initializers, rewiring, dead-constant removal."""

    def __init__(self, model: ir.Model):
        self.removed_constants: collections.Counter[str] = collections.Counter()  # op types, for the report
        self.fresh_name = FreshNames({v.name for g in (model.graph, *model.graph.subgraphs()) for v in _all_values(g) if v.name})

    def initializer(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        # ir.Tensor, not ir.tensor(): the convenience constructor's protocol checks cost more than the fold.
        # No shape or type on the value: the tensor carries both, and onnx_ir would repeat them as value_info.
        value = ir.Value(name=self.fresh_name(base), const_value=ir.Tensor(array))
        graph.register_initializer(value)
        return value

    def set_input(self, node: ir.Node, index: int, base: str, array: np.ndarray) -> None:
        """Point input ``index`` of ``node`` at a new initializer holding ``array``; the old value is
        never modified (another node may read it) and is dropped once nothing reads it."""
        old = node.inputs[index] if index < len(node.inputs) else None
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, self.initializer(node.graph, base, array))
        if old is not None:
            self.removed_constants.update(drop_if_unread(old))

    def bypass(self, anchor: ir.Node, replacement: ir.Value) -> None:
        """Remove ``anchor``, handing its first output's uses (and graph-output slot, name included)
        to ``replacement``."""
        graph = anchor.graph
        output = anchor.outputs[0]
        if output.is_graph_output():
            name = output.name
            output.name = None
            replacement.name = name
            # The graph output keeps its declared type and shape (the anchor preserves both), which the
            # replacement may not have been given (exporters rarely annotate intermediate values).
            replacement.type = output.type or replacement.type
            replacement.shape = output.shape or replacement.shape
        output.replace_all_uses_with(replacement, replace_graph_outputs=True)
        # Its constant inputs; not the data it reads (``replacement``), which is unread only when its own output
        # was, and whose producers compute at run time: a dead layer is not a constant computation.
        inputs = [value for value in anchor.inputs if value is not None and value is not replacement]
        graph.remove(anchor, safe=True)
        for value in inputs:
            self.removed_constants.update(drop_if_unread(value))


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


class FoldIntoPreceding:
    """``Layer -> BatchNorm (or per-channel Mul/Add/Sub/Div)``: scale the layer's output channels."""

    direction = "into-preceding"

    def check(self, anchor: ir.Node, opset: int) -> Match:
        if not anchor.outputs:
            raise Refusal("no-foldable-neighbour", "it has no output")
        batchnorm = anchor.op_type == "BatchNormalization"

        def chain(value):
            if not batchnorm:
                return _chain_moving_channels(value, opset)
            found = _chain_before(value, opset, through_layout=True)
            if _is_layer(_layer_behind(found[0])):
                return found
            # (a layer's channels may reach the BatchNorm through ops that move them: a Conv's Flatten of [N, C, 1, 1]
            # or Squeeze; jax2onnx's Dense on tokens, Gemm -> Reshape to [B, T, C] -> Transpose to [B, C, T])
            moved = _chain_moving_channels(value, opset)
            return moved if _is_layer(_layer_behind(moved[0])) else found

        if not any(_is_layer(_layer_behind(chain(value)[0])) for value in anchor.inputs):
            # Checked before _data_input, which may evaluate constants (shape arithmetic is full of Mul/Add).
            source = anchor.inputs[0].producer() if anchor.inputs and anchor.inputs[0] is not None else None
            source_name = "a graph input or constant" if source is None else source.op_type
            raise Refusal("no-foldable-neighbour", f"its input comes from {source_name}, not a Conv/ConvTranspose/Gemm/MatMul")
        anchor_input = _data_input(anchor)
        data, passthroughs = chain(anchor_input)
        producer = _layer_behind(data)
        if not _is_layer(producer):
            source = "a graph input or constant" if producer is None else producer.op_type
            raise Refusal("no-foldable-neighbour", f"its input comes from {source}, not a Conv/ConvTranspose/Gemm/MatMul")
        if producer.graph is not anchor.graph:
            raise Refusal("no-foldable-neighbour", f"its input comes from {node_label(producer)} in an enclosing graph")
        layout = [node for node in passthroughs if node.op_type in CHANNEL_MOVING_OPS]
        layer = layer_view(producer, opset, features_last=bool(layout))
        if layer.output is not data:
            raise Refusal("no-foldable-neighbour", f"it is the bias Add of {node_label(producer)}")
        if _only_consumer(layer.output) is not (passthroughs[0] if passthroughs else anchor):
            raise Refusal(
                "layer-output-shared",
                f"the output of {node_label(layer.node)} is also read elsewhere (or is a graph output), so it "
                "must stay unscaled",
            )
        channels = layer.layout.out_channels(layer.weight.shape)
        if batchnorm:
            # One layout op after a Gemm or MatMul (LeViT's Flatten, a Reshape to [M, C]) may read inferred shapes.
            for node in layout if layer.node.op_type in _FEATURES_LAST_OPS and len(layout) == 1 else ():
                reason = features_on_channel_axis(node, channels, node_label(layer.node))
                if reason is not None:
                    raise Refusal("channel-mismatch", f"{node_label(node)}: {reason}")
            if (layer.node.op_type not in _FEATURES_LAST_OPS or len(layout) > 1) and layout and (axis := channel_axis_at(layer, passthroughs)[0]) != 1:
                moving = "/".join(node.op_type for node in layout)
                raise Refusal("channel-mismatch", f"{moving} put {node_label(layer.node)}'s output channels on axis {axis}, not the BatchNorm's channel axis 1")
            affine = batchnorm_channel_affine(anchor, opset)
        else:
            axis, rank = channel_axis_at(layer, passthroughs) if layout else (1, layer.output_rank)
            # (``anchor_input``, not the layer's output: an Identity or Dropout may stand between them)
            affine = elementwise_channel_affine(anchor, anchor_input, channels, rank, axis)
            if affine is None:
                raise Refusal("no-foldable-neighbour", "the constant is not per-channel")
        if affine.channels != channels:
            raise Refusal(
                "channel-mismatch",
                f"{node_label(anchor)} has {affine.channels} channels, {node_label(layer.node)} outputs {channels}",
            )
        return _into_outputs(anchor, layer, affine, passthroughs)

    def rewrite(self, match: Match, editor: GraphEditor) -> None:
        _write_weight_and_bias(match, editor)
        # The passthroughs stay: they now carry the folded layer's output.
        editor.bypass(match.anchor, match.passthroughs[-1].outputs[0] if match.passthroughs else match.layer.output)


def _into_outputs(
    anchor: ir.Node, layer: Layer, affine: ChannelAffine, passthroughs: tuple[ir.Node, ...], channels: tuple[int, int] | None = None
) -> Match:
    """The match of ``affine`` folded into ``layer``'s output channels."""
    bias, _, beta = _bias_alpha_beta(layer)
    # Gemm adds beta * C: the shift enters C divided by beta.
    shifted = ChannelAffine(affine.scale, affine.shift / beta)
    weight, bias, quantized = _folded(fold_into_outputs, anchor, layer, bias, shifted)
    return Match(anchor, layer, "into-preceding", affine, weight, bias, passthroughs, quantized, channels)


@dataclasses.dataclass
class ConcatenationMatch:
    """A BatchNorm after a Concat of layers' outputs: one fold per layer, of its part of the channels."""

    anchor: ir.Node
    concatenation: ir.Node
    parts: list[Match]

    def notes(self) -> list[str]:
        return [note for part in self.parts for note in part.notes()]


class FoldIntoConcatenated:
    """``Concat(Layer_1, ..., Layer_n) -> BatchNorm`` along the channels (MixNet's MixedConv2d: each kernel size
    convolves its own channel group): each layer takes the BatchNorm's channels its output fills, when each
    Concat input is a Conv/ConvTranspose/Gemm output (through Identity and inference Dropout) read by the Concat
    alone, and the Concat is the BatchNorm's alone. The Concat stays."""

    direction = "into-preceding"

    def check(self, anchor: ir.Node, opset: int) -> ConcatenationMatch:
        concatenation = anchor.inputs[0].producer() if anchor.op_type == "BatchNormalization" and anchor.inputs[0] is not None else None
        if concatenation is None or concatenation.op_type != "Concat" or concatenation.domain not in ("", "ai.onnx"):
            raise Refusal("no-foldable-neighbour", "its input is no Concat of layers' outputs")
        chains = [_chain_before(value, opset, through_layout=False) for value in concatenation.inputs]
        producers = [_layer_behind(data) for data, _ in chains]
        for producer in producers:  # (what is no layer's output first: most such Concats join other values, DenseNet's)
            if producer is None or producer.op_type not in _CHANNEL_AXIS_OPS or producer.domain not in ("", "ai.onnx"):
                what = "a graph input or constant" if producer is None else node_label(producer)
                raise Refusal("no-foldable-neighbour", f"{node_label(concatenation)} before it concatenates {what}, no Conv/ConvTranspose/Gemm output")
        layers = [(layer_view(producer, opset), data, passthroughs) for producer, (data, passthroughs) in zip(producers, chains)]
        rank = layers[0][0].output_rank
        axis = _typed_attr(concatenation, "axis", 0, _INT, "channel-mismatch")
        if rank is None or axis % rank != 1:
            raise Refusal("channel-mismatch", f"{node_label(concatenation)} concatenates along axis {axis}, not the BatchNorm's channel axis 1")
        if concatenation.graph is not anchor.graph or _only_consumer(concatenation.outputs[0]) is not anchor:
            raise Refusal("layer-output-shared", f"the output of {node_label(concatenation)} is also read elsewhere (or is a graph output), so it must stay unscaled")
        affine = batchnorm_channel_affine(anchor, opset)
        parts, start = [], 0
        for layer, data, passthroughs in layers:
            producer = layer.node
            if layer.output is not data or _only_consumer(data) is not (passthroughs[0] if passthroughs else concatenation):
                raise Refusal("layer-output-shared", f"the output of {node_label(producer)} is also read elsewhere (or is a graph output), so it must stay unscaled")
            stop = start + layer.layout.out_channels(layer.weight.shape)
            part = ChannelAffine(affine.scale[start:stop], affine.shift[start:stop], None if affine.shift_terms is None else affine.shift_terms[start:stop])
            parts.append(_into_outputs(anchor, layer, part, passthroughs, (start, stop)))
            start = stop
        if start != affine.channels:
            raise Refusal("channel-mismatch", f"{node_label(anchor)} has {affine.channels} channels, the layers {node_label(concatenation)} concatenates output {start}")
        return ConcatenationMatch(anchor, concatenation, parts)

    def rewrite(self, match: ConcatenationMatch, editor: GraphEditor) -> None:
        for part in match.parts:
            _write_weight_and_bias(part, editor)
        editor.bypass(match.anchor, match.concatenation.outputs[0])


# Layers whose output channels are on axis 1, as a Concat along it joins them.
_CHANNEL_AXIS_OPS = ("Conv", "ConvTranspose", "Gemm")


def _starts_without_bias(layer: Layer) -> bool:
    """A Gemm whose C is absent or ignored (beta = 0): the fold starts from no bias, and the rewrite sets
    beta = 1 for the bias it creates."""
    return layer.node.op_type == "Gemm" and (layer.bias is None or layer.gemm_alpha_beta[1] == 0.0)


def _bias_alpha_beta(layer: Layer) -> tuple[np.ndarray | None, float, float]:
    """The layer's bias with Gemm's alpha and beta (beta 1 when the fold starts without a bias)."""
    alpha, beta = layer.gemm_alpha_beta
    if _starts_without_bias(layer):
        return None, alpha, 1.0
    return layer.bias, alpha, beta


def _folded(fold, anchor: ir.Node, layer: Layer, bias: np.ndarray | None, affine: ChannelAffine):
    """``fold`` (a :mod:`bnfold.fold_math` fold) of the layer's weight and ``bias`` as ``(weight, bias, None)``,
    or for a quantized weight (backward folds only) ``(None, bias, QuantizedOutputFold)``; a refusal when
    the dtype cannot hold the result, or the quantized weight cannot take it exactly."""
    try:
        if layer.quantized is None:
            return *fold(layer.weight, bias, affine, layer.layout), None
        weight = layer.quantized
        folded = fold_into_quantized_outputs(weight.quantized, weight.scale, weight.zero_point, weight.axis, bias, affine)
        return None, folded.bias, folded
    except InexactQuantizedFoldError as error:
        raise Refusal("quantized-weight", f"folding {node_label(anchor)} into {node_label(layer.node)}: {error}; {FOLD_FIRST}") from None
    except FoldOverflowError as error:
        raise Refusal(
            "fold-overflows",
            f"folding {node_label(anchor)} into {node_label(layer.node)}: {error}; keep the BatchNorm, or store the "
            "layer in a wider dtype (float16 -> float32) before folding (a near-zero running variance is the usual cause)",
        ) from None


def _write_weight_and_bias(match: Match, editor: GraphEditor) -> None:
    """Give the layer fresh initializers; a MatMul's bias goes into its bias Add, created if absent."""
    layer, weight, bias = match.layer, match.weight, match.bias
    if _starts_without_bias(layer):
        layer.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    base = layer.node.inputs[1].name or node_label(layer.node)
    if match.quantized is None:
        editor.set_input(layer.node, 1, base, weight)
    else:
        _write_quantized_weight(layer.quantized, match.quantized, editor)
    if layer.node.op_type != "MatMul":
        editor.set_input(layer.node, 2, f"{base}_bias", bias)
    elif layer.bias_add is not None:
        editor.set_input(*layer.bias_slot, f"{base}_bias", bias)
    else:
        bias_value = editor.initializer(layer.node.graph, f"{base}_bias", bias)
        layer.bias_add = _insert_bias_add(layer.node, bias_value, editor)


def _write_quantized_weight(weight: QuantizedWeight, folded: QuantizedOutputFold, editor: GraphEditor) -> None:
    """Point the DequantizeLinear at the folded scales (and zero points, when they became per-channel, and
    integers, when some channels were mirrored)."""
    dequantize = weight.dequantize
    base = dequantize.inputs[0].name or node_label(dequantize)
    editor.set_input(dequantize, 1, f"{base}_scale", folded.scale)
    if weight.per_tensor:
        dequantize.attributes["axis"] = ir.AttrInt64("axis", weight.axis)
        if folded.zero_point is not None:
            editor.set_input(dequantize, 2, f"{base}_zero_point", folded.zero_point)
    if folded.quantized is not None:
        editor.set_input(dequantize, 0, base, folded.quantized)


def _data_input(anchor: ir.Node) -> ir.Value | None:
    """The tensor a BatchNorm normalises, or the one non-constant operand of an elementwise node."""
    if anchor.op_type == "BatchNormalization":
        return anchor.inputs[0]
    variable = [v for v in anchor.inputs if v is not None and constant_array(v) is None]
    return variable[0] if len(variable) == 1 else None


def _layer_behind(value: ir.Value | None) -> ir.Node | None:
    """The node that produces ``value``, seeing through a MatMul's bias Add to the MatMul."""
    producer = value.producer() if value is not None else None
    return _matmul_of_bias_add(producer) or producer


def _is_layer(node: ir.Node | None) -> bool:
    return node is not None and node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx")


def _matmul_of_bias_add(node: ir.Node | None) -> ir.Node | None:
    """The MatMul behind ``node`` when ``node`` is that MatMul's bias Add."""
    if node is None or node.op_type != "Add":
        return None
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "MatMul":
            bias = matmul_bias_add(producer)
            if bias is not None and bias[0] is node:
                return producer
    return None


class FoldIntoFollowing:
    """``BatchNorm -> Layer``: scale the next layer's input channels (exact only without padding)."""

    direction = "into-following"

    def check(self, anchor: ir.Node, opset: int) -> Match:
        output = anchor.outputs[0]
        consumer = _only_consumer(output)
        passthroughs = []
        while _inference_passthrough(consumer, opset) and consumer.inputs[0] is output:
            passthroughs.append(consumer)
            output = consumer.outputs[0]
            consumer = _only_consumer(output)
        if consumer is None:
            consumers = sorted({use.node.op_type for use in output.uses()})
            what = "is a graph output" if output.is_graph_output() else f"is read by {len(output.uses())} nodes"
            raise Refusal("no-foldable-neighbour", f"its output {what} ({', '.join(consumers) or 'none'})")
        if not _is_layer(consumer) or consumer.op_type == "ConvTranspose":
            raise Refusal("no-foldable-neighbour", f"its output feeds {consumer.op_type}, which cannot absorb it")
        if consumer.graph is not anchor.graph:
            raise Refusal("no-foldable-neighbour", f"its output feeds {node_label(consumer)} in a subgraph")
        layer = layer_view(consumer, opset, data_value=output)
        _check_unpadded(consumer)
        if consumer.op_type == "Gemm" and _typed_attr(consumer, "transA", 0, _INT, "channel-mismatch"):
            raise Refusal("channel-mismatch", f"{node_label(consumer)} has transA=1: its features are not on axis 1")
        affine = batchnorm_channel_affine(anchor, opset)
        channels = layer.layout.in_channels(layer.weight.shape)
        if affine.channels != channels:
            raise Refusal(
                "channel-mismatch", f"{node_label(anchor)} has {affine.channels} channels, {node_label(consumer)} reads {channels}"
            )
        bias, alpha, beta = _bias_alpha_beta(layer)
        # Gemm computes alpha * A B + beta * C: the shift's contribution alpha * t B enters C over beta.
        shifted = ChannelAffine(affine.scale, affine.shift * alpha / beta)
        weight, bias, _ = _folded(fold_into_inputs, anchor, layer, bias, shifted)
        return Match(anchor, layer, self.direction, affine, weight, bias, tuple(passthroughs))

    def rewrite(self, match: Match, editor: GraphEditor) -> None:
        _write_weight_and_bias(match, editor)
        editor.bypass(match.anchor, match.anchor.inputs[0])


def _insert_bias_add(matmul: ir.Node, bias: ir.Value, editor: GraphEditor) -> ir.Node:
    """Insert ``Add(MatMul, bias)`` and move every reader of the MatMul's output (and its graph-output
    slot, name included) onto it."""
    output = matmul.outputs[0]
    readers, is_graph_output = output.uses(), output.is_graph_output()
    add = ir.Node("", "Add", [output, bias], name=editor.fresh_name(f"{node_label(matmul)}_bias"))
    add.outputs[0].type, add.outputs[0].shape = output.type, output.shape
    matmul.graph.insert_after(matmul, add)
    for use in readers:
        use.node.replace_input_with(use.idx, add.outputs[0])
    if is_graph_output:
        graph = matmul.graph
        graph.outputs[:] = [add.outputs[0] if v is output else v for v in graph.outputs]
        add.outputs[0].name, output.name = output.name, editor.fresh_name(output.name)
    else:
        add.outputs[0].name = editor.fresh_name(output.name or "matmul")
    return add


def _check_unpadded(node: ir.Node) -> None:
    if node.op_type != "Conv":
        return
    auto_pad = _typed_attr(node, "auto_pad", "NOTSET", (ir.AttributeType.STRING,), "padded-conv")
    auto_pad = auto_pad.decode(errors="replace") if isinstance(auto_pad, bytes) else auto_pad
    pads = list(_typed_attr(node, "pads", [], (ir.AttributeType.INTS,), "padded-conv"))
    if auto_pad not in ("NOTSET", "VALID") or any(pads):
        padding = f"auto_pad={auto_pad}" if auto_pad not in ("NOTSET", "VALID") else f"pads={pads}"
        raise Refusal(
            "padded-conv",
            f"{node_label(node)} pads its input ({padding}): the padding zeros would not be shifted",
        )
