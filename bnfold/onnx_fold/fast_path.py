"""The ONNX front-end's fast path: plain ``Conv/ConvTranspose/Gemm -> BatchNormalization`` pairs folded
directly on the ``onnx.ModelProto``.

Most exported CNNs hold nothing else to fold, and for them converting the model to onnx_ir and back costs
more than the fold itself (a chain of 500 pairs: ~56 ms of ir.from_proto + ir.to_proto, against a few ms
of arithmetic). :func:`fold_plain_pairs` first proves that a model is such a case:

- every BatchNormalization is an eval-mode node whose statistics are initializers and whose input is the
  only output of a Conv, ConvTranspose or Gemm whose weight and bias are initializers read by nothing else;
- nothing else would fold: no Mul/Add/Sub/Div reads a layer's output next to something that may be constant;
- no subgraphs, no external data, a little-endian machine.

Only then does it build the folded copy (copying everything but the tensors it replaces); otherwise, or
when a folded weight or bias does not fit its dtype, it returns None, and
:class:`bnfold.onnx_fold.FoldBatchNormPass` folds the model (or says why not). The input is never modified. When this path folds, its result is the pass's: the same folds, the same values (the
arithmetic is :mod:`bnfold.fold_math`, here over many pairs per numpy call), the same new names, the same
initializer order. Tests compare the two on every model they fold.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
import sys
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.fold_math import (
    ChannelAffine,
    FoldOverflowError,
    UnfoldableStatisticsError,
    WeightLayout,
    batchnorm_affine,
    fold_many_into_outputs,
)
from bnfold.onnx_fold.layers import CHANNEL_MOVING_OPS, FAST_PATH_LAYER_OPS, LAYER_OPS, PASS_THROUGH_OPS
from bnfold.onnx_fold.protobuf_writer import copy_fields
from bnfold.onnx_fold.shared import BATCHNORM_DEFAULT_EPSILON, FreshNames, MalformedTensorError, evaluable_op
from bnfold.report import ELEMENTWISE_AFFINE_OPS, Fold

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Producers whose output a per-channel Mul/Add/Sub/Div could be folded into (a BatchNorm's, once folded;
# the ops the pass folds through).
_FOLD_TARGET_OPS = (*LAYER_OPS, "BatchNormalization", *PASS_THROUGH_OPS)
_SUBGRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_CONTROL_FLOW_OPS = ("If", "Loop", "Scan", "SequenceMap")  # the default domain's ops with subgraphs
# Read straight from raw_data; other encodings (and bfloat16) go through onnx.numpy_helper.
_RAW_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64}
_FLOATING = (*_RAW_DTYPES, onnx.TensorProto.BFLOAT16)


@dataclasses.dataclass
class PlainPair:
    """A plain pair as read from the input model."""

    layer_position: int  # in the input model
    batchnorm: onnx.NodeProto
    layer: onnx.NodeProto
    layout: WeightLayout
    weight: onnx.TensorProto
    bias: onnx.TensorProto | None  # the layer's bias initializer, if any
    fold_bias: bool  # False for a Gemm whose C is ignored (beta = 0): the fold starts from no bias
    beta: float
    statistics: list[onnx.TensorProto]  # scale, bias, mean, var
    statistic_names: list[str]
    epsilon: float
    channels: int
    labels: tuple[str, str]  # the BatchNorm's and the layer's, for the report


class FastFold(NamedTuple):
    model: onnx.ModelProto  # the folded copy
    folds: list[Fold]
    # With keep_arrays, the values of the tensors the fold read and wrote, by initializer name: the input's
    # weights and biases it folded and the new ones (fresh names, so a name means the same tensor in both
    # models). Verification hands these to onnxruntime rather than copying them out of the protobufs again.
    # (Else empty: they would double the fold's memory.)
    arrays: dict[str, np.ndarray]
    # With leave_data_pending, the new tensors of at least PENDING_MIN_BYTES whose data ``model`` does not hold,
    # by name: io.save_model writes them from here (see protobuf_writer.fill_pending_data).
    pending: dict[str, np.ndarray]


class _GraphIndex:
    """One pass over the main graph: initializers, producers, readers, the BatchNorms (with their
    positions) and per-channel elementwise candidates, and whether any node holds a subgraph."""

    def __init__(self, graph: onnx.GraphProto):
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.graph_inputs = {value.name for value in graph.input}
        self.graph_outputs = {value.name for value in graph.output}
        self.nodes = list(graph.node)
        self.producers: dict[str, int] = {}  # value name -> position of the node that writes it
        self.readers: dict[str, list[int]] = collections.defaultdict(list)  # positions, once per input slot
        self.batchnorms: list[int] = []
        self.elementwise: list[onnx.NodeProto] = []
        self.has_subgraphs = False
        # protobuf hands over strings that are not UTF-8 as bytes; the pass refuses such models.
        self.has_non_text = any(type(text) is bytes for text in (graph.name, graph.doc_string))
        self._may_be_constant: dict[str, bool] | None = None
        readers, producers = self.readers, self.producers
        for position, node in enumerate(self.nodes):
            if type(node.name) is bytes or any(type(attribute.name) is bytes for attribute in node.attribute):
                self.has_non_text = True
            for name in node.input:
                if name:
                    readers[name].append(position)
            for name in node.output:
                if name:
                    producers[name] = position
            op_type = node.op_type
            if type(op_type) is bytes or type(node.domain) is bytes or type(node.doc_string) is bytes:
                self.has_non_text = True
            if node.domain not in _DEFAULT_DOMAINS:
                self.has_subgraphs = self.has_subgraphs or any(a.type in _SUBGRAPH_ATTRIBUTES for a in node.attribute)
            elif op_type == "BatchNormalization":
                self.batchnorms.append(position)
            elif op_type in ELEMENTWISE_AFFINE_OPS:
                self.elementwise.append(node)
            elif op_type in _CONTROL_FLOW_OPS:
                self.has_subgraphs = True
        names = itertools.chain(readers, producers, self.initializers, self.graph_inputs, self.graph_outputs)
        self.has_non_text = self.has_non_text or any(type(name) is bytes for name in names)

    def producer(self, name: str) -> onnx.NodeProto | None:
        position = self.producers.get(name)
        return None if position is None else self.nodes[position]

    def taken_names(self) -> set[str]:
        return {*self.graph_inputs, *self.initializers, *self.producers}

    def sole_reader(self, name: str) -> bool:
        return len(self.readers.get(name, ())) == 1 and name not in self.graph_outputs

    def initializer(self, name: str) -> onnx.TensorProto | None:
        """The floating-point initializer ``name`` holds in memory; None for anything else (graph inputs
        included: an initializer that is also an input is an overridable default, not a constant)."""
        tensor = self.initializers.get(name)
        if (
            tensor is None
            or name in self.graph_inputs
            or tensor.data_type not in _FLOATING
            or tensor.data_location == onnx.TensorProto.EXTERNAL
        ):
            return None
        return tensor

    def may_be_constant(self, name: str) -> bool:
        """Whether the pass's constant evaluation could find ``name`` constant (erring towards yes)."""
        if self._may_be_constant is None:
            self._may_be_constant = self._constant_candidates()
        return self._may_be_constant.get(name, name in self.producers)

    def _constant_candidates(self) -> dict[str, bool]:
        # Nodes are in topological order, so one pass sees every input before the node that reads it.
        candidates = {name: name not in self.graph_inputs for name in self.initializers}
        for node in self.nodes:
            if not evaluable_op(node.domain, node.op_type):
                constant = False
            elif node.op_type == "Shape":
                constant = True  # of a statically shaped value
            else:
                needed = node.input[:1] if node.op_type == "CastLike" else node.input
                constant = all(candidates.get(name, name in self.producers) for name in needed if name)
            candidates.update((name, constant) for name in node.output if name)
        return candidates


def _has_non_text_fields(model: onnx.ModelProto) -> bool:
    return any(type(getattr(model, field)) is bytes for field in ("producer_name", "producer_version", "domain", "doc_string"))


def node_label(node: onnx.NodeProto) -> str:
    """The label :func:`bnfold.onnx_fold.rules.node_label` gives the same node."""
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    dtype = _RAW_DTYPES.get(tensor.data_type)
    raw = tensor.raw_data if dtype is not None else b""  # (each read of the field copies the bytes)
    try:
        if raw:
            return np.frombuffer(raw, dtype).reshape(tuple(tensor.dims))
        return numpy_helper.to_array(tensor)
    except Exception as error:  # data that does not fit the shape: the pass raises the user's error
        raise MalformedTensorError(str(error)) from None


def _elementwise_may_fold(node: onnx.NodeProto, index: _GraphIndex) -> bool:
    """Whether FoldBatchNormPass might fold this Mul/Add/Sub/Div into a layer (erring towards yes): it reads
    one, directly or through ops that move its channels (see CHANNEL_MOVING_OPS)."""
    producers = [index.producer(name) for name in node.input]
    for _ in range(len(index.nodes)):  # (a walk back along one chain of movers: at most the graph's length)
        movers = [producer for producer in producers if producer is not None and producer.op_type in CHANNEL_MOVING_OPS]
        if any(producer is not None and producer.op_type in _FOLD_TARGET_OPS for producer in producers) or not movers:
            break
        producers = [index.producer(mover.input[0]) for mover in movers if mover.input]
    reads_layer = any(producer is not None and producer.op_type in _FOLD_TARGET_OPS for producer in producers)
    return (reads_layer and any(index.may_be_constant(name) for name in node.input if name)) or _lowered_batchnorm(node, index)


def _lowered_batchnorm(node: onnx.NodeProto, index: _GraphIndex) -> bool:
    """Whether ``node`` is a Mul by an initializer of several values read only by an Add/Sub of an initializer of
    the same shape (a BatchNorm as tf2onnx writes Keras 3's): the pass names those it leaves, in a note."""
    scales = [index.initializers[name] for name in node.input if name in index.initializers]
    readers = index.readers.get(node.output[0], []) if node.op_type == "Mul" and len(node.output) == 1 else []
    if len(scales) != 1 or len(readers) != 1 or math.prod(scales[0].dims) < 2:
        return False
    reader = index.nodes[readers[0]]
    shifts = [index.initializers[name] for name in reader.input if name in index.initializers]
    return reader.op_type in ("Add", "Sub") and len(shifts) == 1 and list(shifts[0].dims) == list(scales[0].dims)


def _plain_pair(position: int, opset: int, index: _GraphIndex) -> PlainPair | None:
    """The BatchNorm at ``position`` and the layer before it, when FoldBatchNormPass would certainly fold
    the one into the other; None when anything about it needs the pass's full rules."""
    batchnorm = index.nodes[position]
    inputs = batchnorm.input
    if opset < 7 or len(inputs) != 5 or not batchnorm.output or any(batchnorm.output[1:]):
        return None
    epsilon = BATCHNORM_DEFAULT_EPSILON
    for attribute in batchnorm.attribute:  # (read once: protobuf field access is the cost here)
        name = attribute.name
        if _BATCHNORM_ATTRIBUTES.get(name, attribute.type) != attribute.type:
            return None  # malformed: the pass says why
        if name == "epsilon":
            epsilon = attribute.f
        elif (name == "training_mode" and attribute.i) or (name == "spatial" and not attribute.i):
            return None
    statistic_names = inputs[1:]
    statistics = [index.initializer(name) for name in statistic_names]
    layer_position = index.producers.get(inputs[0])
    layer = None if layer_position is None else index.nodes[layer_position]
    if None in statistics or layer is None or layer.op_type not in FAST_PATH_LAYER_OPS or layer.domain not in _DEFAULT_DOMAINS:
        return None
    layer_inputs = layer.input
    if layer.output[0] != inputs[0] or not index.sole_reader(inputs[0]) or len(layer_inputs) < 2:
        return None
    weight = index.initializer(layer_inputs[1])
    bias_name = layer_inputs[2] if len(layer_inputs) > 2 else ""
    bias = index.initializer(bias_name) if bias_name else None
    if weight is None or not index.sole_reader(layer_inputs[1]) or (bias_name and (bias is None or not index.sole_reader(bias_name))):
        return None
    ints, beta = {}, 1.0
    for attribute in layer.attribute:
        name = attribute.name
        if _LAYER_ATTRIBUTES.get(name, attribute.type) != attribute.type:
            return None
        if name == "beta":
            beta = attribute.f
        elif attribute.type == _INT:
            ints[name] = attribute.i
    layout = LAYER_OPS[layer.op_type].layout(lambda name, default: ints.get(name, default))
    dims = weight.dims
    if layer.op_type == "Gemm":
        if len(dims) != 2:
            return None
    elif len(dims) < 3 or layout.groups < 1 or dims[0] % layout.groups:
        return None
    channels = layout.out_channels(dims)
    if 0 in dims or any(list(tensor.dims) != [channels] for tensor in statistics) or not _bias_fits(bias, layer, channels):
        return None
    fold_bias = bias is not None and beta != 0.0
    labels = (node_label(batchnorm), node_label(layer))
    return PlainPair(
        layer_position, batchnorm, layer, layout, weight, bias, fold_bias, beta if fold_bias else 1.0,
        statistics, statistic_names, epsilon, channels, labels,
    )  # fmt: skip


_FLOAT, _INT = onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT
# The types of the attributes the pass reads; any other type is a malformed model.
_BATCHNORM_ATTRIBUTES = {"epsilon": _FLOAT, "training_mode": _INT, "spatial": _INT, "is_test": _INT}
_LAYER_ATTRIBUTES = {"group": _INT, "transA": _INT, "transB": _INT, "alpha": _FLOAT, "beta": _FLOAT}


def _bias_fits(bias: onnx.TensorProto | None, layer: onnx.NodeProto, channels: int) -> bool:
    """Whether the bias has a shape the pass folds: ``[C]`` for a convolution, whatever broadcasts to
    ``(M, N)`` for a Gemm."""
    if bias is None:
        return True
    dims = list(bias.dims)
    if layer.op_type != "Gemm":
        return dims == [channels]
    return len(dims) <= 2 and (not dims or dims[-1] in (1, channels))


def _channel_affines(pairs: list[PlainPair]) -> list[ChannelAffine] | None:
    """Every pair's BatchNorm as a channel affine map, computed in one call over all their channels."""
    if not pairs:
        return []
    sizes = [pair.channels for pair in pairs]
    columns = _concatenated([pair.statistics[k] for k in range(4) for pair in pairs]).reshape(4, -1)
    eps = np.repeat([pair.epsilon for pair in pairs], sizes)
    try:
        joint = batchnorm_affine(*columns, eps)
    except UnfoldableStatisticsError:
        return None  # the pass names the BatchNorm and the channel
    ends = itertools.accumulate(sizes)
    return [ChannelAffine(joint.scale[end - size : end], joint.shift[end - size : end]) for size, end in zip(sizes, ends)]


def _concatenated(tensors: list[onnx.TensorProto]) -> np.ndarray:
    """The tensors' values end to end, as float64; float32 raw data (the usual encoding) in one read."""
    raw = [tensor.raw_data if tensor.data_type == onnx.TensorProto.FLOAT else b"" for tensor in tensors]  # (one copy each)
    if all(raw):
        if any(len(data) != 4 * math.prod(tensor.dims) for data, tensor in zip(raw, tensors)):
            raise MalformedTensorError("raw data does not fit the shape")
        return np.frombuffer(b"".join(raw), np.float32).astype(np.float64)
    return np.concatenate([tensor_array(tensor).reshape(-1).astype(np.float64) for tensor in tensors])


def _default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS), 1)


def plain_pairs(model: onnx.ModelProto) -> dict[str, PlainPair]:
    """The main graph's BatchNorms that sit in plain pairs, by their labels (the others are left out):
    what verification reads to check the folds this path made."""
    opset, index = _default_opset(model), _GraphIndex(model.graph)
    pairs = (_plain_pair(position, opset, index) for position in index.batchnorms)
    return {pair.labels[0]: pair for pair in pairs if pair is not None}


def fold_plain_pairs(model: onnx.ModelProto, keep_arrays: bool = False, leave_data_pending: bool = False) -> FastFold | None:
    """The folded copy of ``model``, its folds and (with ``keep_arrays``) its new tensors' values, when every
    BatchNorm in it is a plain pair and nothing else would fold; None otherwise. ``model`` is never modified, and the tensors the fold replaces are
    never copied. With ``leave_data_pending``, the folded copy's large new tensors come without their data, which
    ``pending`` holds: copying it into the protobuf and serializing it from there cost ResNet-50 0.15 s."""
    if model.functions:  # (a BatchNorm may sit in one: the pass inlines those)
        return None
    opset, index = _default_opset(model), _GraphIndex(model.graph)
    if index.has_subgraphs or index.has_non_text or sys.byteorder != "little" or _has_non_text_fields(model):
        return None
    if _has_unknown_element_types(model.graph):
        return None  # the pass's conversion reports the malformed model as bad input
    if any(_elementwise_may_fold(node, index) for node in index.elementwise):
        return None
    pairs = [_plain_pair(position, opset, index) for position in index.batchnorms]
    if None in pairs:
        return None
    try:
        return _fold_pairs(model, index, pairs, keep_arrays, leave_data_pending)
    except (FoldOverflowError, MalformedTensorError):
        return None  # the pass refuses that pair, or the model, and says why


_KNOWN_ELEMENT_TYPES = frozenset(onnx.TensorProto.DataType.values())


def _has_unknown_element_types(graph: onnx.GraphProto) -> bool:
    """A declared input, output or value type that no ONNX version defines (a damaged or hostile file)."""
    values = itertools.chain(graph.input, graph.output, graph.value_info)
    return any(
        value.type.HasField("tensor_type") and value.type.tensor_type.elem_type not in _KNOWN_ELEMENT_TYPES for value in values
    )


def _fold_pairs(
    model: onnx.ModelProto, index: _GraphIndex, pairs: list[PlainPair], keep_arrays: bool, leave_data_pending: bool
) -> FastFold | None:
    affines = _channel_affines(pairs)
    if affines is None:
        return None
    # Proven: every pair folds (unless a folded value overflows its dtype or a tensor's data is malformed).
    folds = [Fold(*pair.labels, pair.layer.op_type, "into-preceding") for pair in pairs]
    fresh_name = FreshNames(index.taken_names())
    new_names = [(fresh_name(pair.layer.input[1]), fresh_name(f"{pair.layer.input[1]}_bias")) for pair in pairs]
    unread = collections.Counter(name for pair in pairs for name in pair.statistic_names)
    dropped = {name for name, count in unread.items() if count == len(index.readers[name]) and name not in index.graph_outputs}
    dropped.update(tensor.name for pair in pairs for tensor in (pair.weight, pair.bias) if tensor is not None)

    def position_in_folded(position: int) -> int:  # the BatchNorms before it are gone
        return position - bisect.bisect_left(index.batchnorms, position)

    folded = onnx.ModelProto()
    copy_fields(model, folded, skip=("graph",))
    # Nodes and value info are copied without what the folds remove: deleting from a protobuf list moves
    # its tail each time, which made folding long chains quadratic.
    copy_fields(model.graph, folded.graph, skip=("initializer", "node", "value_info"))
    batchnorms = set(index.batchnorms)
    folded.graph.node.extend(node for position, node in enumerate(index.nodes) if position not in batchnorms)
    # The pass's order: the initializers it keeps, then each pair's new weight and bias. (One CopyFrom each:
    # protobuf's extend copies a large tensor several times slower, 20 ms for MobileNetV2's 5 MB classifier.)
    add_initializer = folded.graph.initializer.add
    for tensor in model.graph.initializer:
        if tensor.name not in dropped:
            add_initializer().CopyFrom(tensor)
    arrays, pending = {}, {}
    for chunk in _chunks(list(zip(pairs, affines, new_names))):
        _rewrite(chunk, folded.graph, position_in_folded, arrays if keep_arrays else None, pending if leave_data_pending else None)
    gone = _bypass_all(pairs, index, folded.graph, position_in_folded)
    folded.graph.value_info.extend(value for value in model.graph.value_info if value.name not in gone)
    return FastFold(folded, folds, arrays, pending)


def _chunks(items: list[tuple[PlainPair, ChannelAffine, tuple[str, str]]]):
    """Runs of pairs with at most :data:`_CHUNK_ELEMENTS` weight elements (one layer may exceed it), so
    that folding many layers at once never holds float64 copies of all the model's weights."""
    chunk, elements = [], 0
    for item in items:
        size = math.prod(item[0].weight.dims)
        if chunk and elements + size > _CHUNK_ELEMENTS:
            yield chunk
            chunk, elements = [], 0
        chunk.append(item)
        elements += size
    if chunk:
        yield chunk


_CHUNK_ELEMENTS = 1 << 19


def _rewrite(
    chunk: list[tuple[PlainPair, ChannelAffine, tuple[str, str]]],
    graph: onnx.GraphProto,
    position_in_folded,
    arrays: dict[str, np.ndarray] | None,
    pending: dict[str, np.ndarray] | None,
) -> None:
    """Scale the chunk's layers' output channels into new weight and bias initializers of ``graph`` (the
    folded copy), under the names the pass gives them, and point the layers at them; the values read and
    written go to ``arrays`` too, if given, and the data of the large new ones to ``pending`` instead of the
    protobuf, if given."""
    layers = []
    for pair, affine, _ in chunk:
        weight = tensor_array(pair.weight)
        bias = tensor_array(pair.bias) if pair.fold_bias else None
        if arrays is not None:
            arrays[pair.weight.name] = weight
            if bias is not None:
                arrays[pair.bias.name] = bias
        # Gemm adds beta * C: the shift enters C divided by beta.
        shifted = affine if pair.beta == 1.0 else ChannelAffine(affine.scale, affine.shift / pair.beta)
        layers.append((weight, bias, shifted, pair.layout))
    for (pair, _, (weight_name, bias_name)), (weight, bias) in zip(chunk, fold_many_into_outputs(layers)):
        data_type = pair.weight.data_type
        _add_initializer(graph, weight_name, weight, data_type, pending)
        _add_initializer(graph, bias_name, bias, data_type, pending)
        if arrays is not None:
            arrays[weight_name], arrays[bias_name] = weight, bias
        layer = graph.node[position_in_folded(pair.layer_position)]
        layer.input[1] = weight_name
        if len(layer.input) > 2:
            layer.input[2] = bias_name
        else:
            layer.input.append(bias_name)
        if layer.op_type == "Gemm" and not pair.fold_bias:
            _set_float_attribute(layer, "beta", 1.0)  # C is now the folded bias


def _add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray, data_type: int, pending: dict[str, np.ndarray] | None) -> None:
    """An initializer holding ``array`` as raw data, as onnx_ir writes one; with ``pending``, one of at least
    :data:`PENDING_MIN_BYTES` holds no data, which goes to ``pending`` (see
    :func:`bnfold.onnx_fold.protobuf_writer.fill_pending_data`)."""
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(array.shape)
    if pending is not None and array.nbytes >= PENDING_MIN_BYTES:
        pending[name] = np.ascontiguousarray(array)
    else:
        tensor.raw_data = array.tobytes()


# A new tensor smaller than this gets its data at once: the bookkeeping would cost more than the copy.
PENDING_MIN_BYTES = 1 << 16


def _set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _bypass_all(pairs: list[PlainPair], index: _GraphIndex, graph: onnx.GraphProto, position_in_folded) -> set[str]:
    """Hand each BatchNorm's output to its layer in ``graph`` (the folded copy): readers read the layer's
    output instead, and a graph output keeps its name (now the layer's output). The names that go."""
    gone = set()
    nodes = graph.node
    for pair in pairs:
        normalized, data = pair.batchnorm.output[0], pair.batchnorm.input[0]
        if normalized in index.graph_outputs:
            nodes[position_in_folded(pair.layer_position)].output[0] = normalized
            gone.add(data)
        else:
            for position in index.readers.get(normalized, ()):
                reader = nodes[position_in_folded(position)]
                for slot, name in enumerate(reader.input):
                    if name == normalized:
                        reader.input[slot] = data
            gone.add(normalized)
    return gone
