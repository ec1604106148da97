"""The ONNX front-end's fast path: plain ``Conv/ConvTranspose/Gemm -> BatchNormalization`` pairs folded
directly on the ``onnx.ModelProto``.

Most exported CNNs hold nothing else to fold, and for them converting the model to onnx_ir and back costs
more than the fold itself (a chain of 500 pairs: ~56 ms of ir.from_proto + ir.to_proto, against a few ms
of arithmetic). :func:`fold_plain_pairs` first proves that a model is such a case:

- every BatchNormalization is an eval-mode node whose statistics are initializers and whose input is the
  only output of a Conv, ConvTranspose or Gemm whose weight and bias are initializers read by nothing else;
- nothing else would fold: no Mul/Add/Sub/Div reads a layer's output next to something that may be constant;
- no subgraphs, no external data, a little-endian machine.

Only then does it rewrite the model, in place; otherwise it returns None with the model untouched, and
:class:`bnfold.onnx_fold.FoldBatchNormPass` folds it (or says why not). When this path folds, its result is
the pass's: the same folds, the same values (the arithmetic is :mod:`bnfold.fold_math`, here with the
statistics of all pairs in one call), the same new names. Tests compare the two on every model they fold.
"""

from __future__ import annotations

import collections
import dataclasses
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.fold_math import ChannelAffine, UnfoldableStatisticsError, WeightLayout, batchnorm_affine, fold_into_outputs
from bnfold.onnx_constants import CONSTANT_OPS
from bnfold.onnx_rules import ELEMENTWISE_OPS, FreshNames
from bnfold.report import Fold

_DEFAULT_DOMAINS = ("", "ai.onnx")
_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm")
# Producers whose output a per-channel Mul/Add/Sub/Div could be folded into (a BatchNorm's, once folded).
_FOLD_TARGET_OPS = (*_LAYER_OPS, "MatMul", "BatchNormalization")
_SUBGRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_CONTROL_FLOW_OPS = ("If", "Loop", "Scan", "SequenceMap")  # the default domain's ops with subgraphs
# Read straight from raw_data; other encodings (and bfloat16) go through onnx.numpy_helper.
_RAW_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64}
_FLOATING = (*_RAW_DTYPES, onnx.TensorProto.BFLOAT16)


@dataclasses.dataclass
class _Pair:
    batchnorm: onnx.NodeProto
    layer: onnx.NodeProto
    layout: WeightLayout
    weight: onnx.TensorProto
    bias: onnx.TensorProto | None  # the layer's bias initializer, rewritten in place when there is one
    fold_bias: bool  # False for a Gemm whose C is ignored (beta = 0): the fold starts from no bias
    beta: float
    statistics: list[np.ndarray]  # scale, bias, mean, var


class _GraphIndex:
    """One pass over the main graph: initializers, producers, readers, taken names, node positions."""

    def __init__(self, graph: onnx.GraphProto):
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.graph_inputs = {value.name for value in graph.input}
        self.graph_outputs = {value.name for value in graph.output}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = collections.defaultdict(list)
        self.has_subgraphs = False
        self.nodes = graph.node
        self._may_be_constant: dict[str, bool] | None = None
        for node in graph.node:
            for position, name in enumerate(node.input):
                if name:
                    self.readers[name].append((node, position))
            for name in node.output:
                if name:
                    self.producers[name] = node
            if node.op_type in _CONTROL_FLOW_OPS or node.domain not in _DEFAULT_DOMAINS:
                self.has_subgraphs = self.has_subgraphs or any(a.type in _SUBGRAPH_ATTRIBUTES for a in node.attribute)

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
            if node.domain not in _DEFAULT_DOMAINS or node.op_type not in CONSTANT_OPS:
                constant = False
            elif node.op_type == "Shape":
                constant = True  # of a statically shaped value
            else:
                needed = node.input[:1] if node.op_type == "CastLike" else node.input
                constant = all(candidates.get(name, name in self.producers) for name in needed if name)
            candidates.update((name, constant) for name in node.output if name)
        return candidates


def _attributes(node: onnx.NodeProto) -> dict[str, onnx.AttributeProto]:
    return {attribute.name: attribute for attribute in node.attribute}


def _label(node: onnx.NodeProto) -> str:
    """The label :func:`bnfold.onnx_rules.node_label` gives the same node."""
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    dtype = _RAW_DTYPES.get(tensor.data_type)
    if dtype is not None and tensor.raw_data:
        return np.frombuffer(tensor.raw_data, dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _write(tensor: onnx.TensorProto, name: str, array: np.ndarray, data_type: int) -> None:
    """Make ``tensor`` a fresh initializer holding ``array``, encoded as onnx_ir writes one."""
    tensor.Clear()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(array.shape)
    tensor.raw_data = array.tobytes()


def _elementwise_may_fold(node: onnx.NodeProto, index: _GraphIndex) -> bool:
    """Whether FoldBatchNormPass might fold this Mul/Add/Sub/Div into a layer (erring towards yes)."""
    reads_layer = any(index.producers.get(name) is not None and index.producers[name].op_type in _FOLD_TARGET_OPS for name in node.input)
    return reads_layer and any(index.may_be_constant(name) for name in node.input if name)


def _plain_pair(batchnorm: onnx.NodeProto, opset: int, index: _GraphIndex) -> _Pair | None:
    """``batchnorm`` and the layer before it, when FoldBatchNormPass would certainly fold the one into the
    other; None when anything about it needs the pass's full rules."""
    attributes = _attributes(batchnorm)
    if (
        opset < 7
        or len(batchnorm.input) != 5
        or any(batchnorm.output[1:])
        or ("training_mode" in attributes and attributes["training_mode"].i)
        or ("spatial" in attributes and not attributes["spatial"].i)
    ):
        return None
    statistic_tensors = [index.initializer(name) for name in batchnorm.input[1:]]
    layer = index.producers.get(batchnorm.input[0])
    if None in statistic_tensors or layer is None or layer.op_type not in _LAYER_OPS or layer.domain not in _DEFAULT_DOMAINS:
        return None
    if layer.output[0] != batchnorm.input[0] or not index.sole_reader(layer.output[0]) or len(layer.input) < 2:
        return None
    layer_attributes = _attributes(layer)
    weight = index.initializer(layer.input[1])
    bias_name = layer.input[2] if len(layer.input) > 2 else ""
    bias = index.initializer(bias_name) if bias_name else None
    if weight is None or not index.sole_reader(layer.input[1]) or (bias_name and (bias is None or not index.sole_reader(bias_name))):
        return None
    beta = 1.0
    if layer.op_type == "Gemm":
        if len(weight.dims) != 2:
            return None
        transposed = "transB" in layer_attributes and layer_attributes["transB"].i
        layout = WeightLayout("matrix_out_in" if transposed else "matrix_in_out")
        beta = layer_attributes["beta"].f if "beta" in layer_attributes else 1.0
    else:
        groups = layer_attributes["group"].i if "group" in layer_attributes else 1
        layout = WeightLayout("conv" if layer.op_type == "Conv" else "conv_transpose", groups)
    channels = layout.out_channels(tuple(weight.dims))
    statistics = [_array(tensor).reshape(-1) for tensor in statistic_tensors]
    if any(array.size != channels for array in statistics):
        return None
    fold_bias = bias is not None and beta != 0.0
    return _Pair(batchnorm, layer, layout, weight, bias, fold_bias, beta if fold_bias else 1.0, statistics)


def _channel_affines(pairs: list[_Pair]) -> list[ChannelAffine] | None:
    """Every pair's BatchNorm as a channel affine map, computed in one call over all their channels."""
    if not pairs:
        return []
    eps = []
    for pair in pairs:
        attributes = _attributes(pair.batchnorm)
        epsilon = attributes["epsilon"].f if "epsilon" in attributes else 1e-5
        eps.append(np.full(pair.statistics[0].size, epsilon))
    columns = [np.concatenate([pair.statistics[k] for pair in pairs]) for k in range(4)]
    try:
        joint = batchnorm_affine(*columns, np.concatenate(eps))
    except UnfoldableStatisticsError:
        return None  # the pass names the BatchNorm and the channel
    affines, start = [], 0
    for pair in pairs:
        end = start + pair.statistics[0].size
        affines.append(ChannelAffine(joint.scale[start:end], joint.shift[start:end]))
        start = end
    return affines


def fold_plain_pairs(model: onnx.ModelProto) -> list[Fold] | None:
    """Fold every BatchNorm of ``model`` in place and return the folds, when all of them are plain pairs
    and nothing else would fold; otherwise return None and leave ``model`` as it was."""
    graph = model.graph
    opset = next((entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS), 1)
    index = _GraphIndex(graph)
    if index.has_subgraphs or sys.byteorder != "little":
        return None
    pairs, positions = [], []
    for position, node in enumerate(graph.node):
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op_type == "BatchNormalization":
            pair = _plain_pair(node, opset, index)
            if pair is None:
                return None
            pairs.append(pair)
            positions.append(position)
        elif node.op_type in ELEMENTWISE_OPS and _elementwise_may_fold(node, index):
            return None
    affines = _channel_affines(pairs)
    if affines is None:
        return None
    # Proven: from here on every pair folds. Nothing above changed the model.
    fresh_name = FreshNames(index.taken_names())
    unread = collections.Counter()
    folds = []
    for pair, affine in zip(pairs, affines, strict=True):
        folds.append(Fold(_label(pair.batchnorm), _label(pair.layer), pair.layer.op_type, "into-preceding"))
        _rewrite(pair, affine, graph, fresh_name)
        unread.update(pair.batchnorm.input[1:])
    _bypass_all(pairs, index, graph)
    dead = {name for name, count in unread.items() if count == len(index.readers[name]) and name not in index.graph_outputs}
    _delete(graph.initializer, [i for i, tensor in enumerate(graph.initializer) if tensor.name in dead])
    _delete(graph.node, positions)
    return folds


def _rewrite(pair: _Pair, affine: ChannelAffine, graph: onnx.GraphProto, fresh_name: FreshNames) -> None:
    """Scale the layer's output channels; its weight and bias initializers get new names, as the pass
    gives the new initializers it creates (their old contents are read by nothing else)."""
    layer, data_type = pair.layer, pair.weight.data_type
    old_bias = _array(pair.bias) if pair.fold_bias else None
    # Gemm adds beta * C: the shift enters C divided by beta.
    shifted = ChannelAffine(affine.scale, affine.shift / pair.beta)
    weight, bias = fold_into_outputs(_array(pair.weight), old_bias, shifted, pair.layout)
    base = layer.input[1]
    weight_name, bias_name = fresh_name(base), fresh_name(f"{base}_bias")
    _write(pair.weight, weight_name, weight, data_type)
    layer.input[1] = weight_name
    _write(pair.bias if pair.bias is not None else graph.initializer.add(), bias_name, bias, data_type)
    if len(layer.input) > 2:
        layer.input[2] = bias_name
    else:
        layer.input.append(bias_name)
    if layer.op_type == "Gemm" and not pair.fold_bias:
        _set_float_attribute(layer, "beta", 1.0)  # C is now the folded bias


def _set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _bypass_all(pairs: list[_Pair], index: _GraphIndex, graph: onnx.GraphProto) -> None:
    """Hand each BatchNorm's output to its layer: readers read the layer's output instead, and a graph
    output keeps its name (now the layer's output). Value info of the names that go is dropped."""
    gone = set()
    for pair in pairs:
        normalized, data = pair.batchnorm.output[0], pair.batchnorm.input[0]
        if normalized in index.graph_outputs:
            pair.layer.output[0] = normalized
            gone.add(data)
        else:
            for reader, position in index.readers.get(normalized, ()):
                reader.input[position] = data
            gone.add(normalized)
    _delete(graph.value_info, [i for i, value in enumerate(graph.value_info) if value.name in gone])


def _delete(field, positions: list[int]) -> None:
    for position in sorted(positions, reverse=True):
        del field[position]
