"""The local checks of folds in any model onnx_ir reads (see :mod:`bnfold.onnx_fold.local_checks`): each fold's
BatchNorm and layer found in the original with the pass's rules, its layer in the folded model by label, else
(a model from another tool may rename nodes) by the names of the values around it, else by position among the
nodes of its op type. When that layer does not hold the fold (its parameters or attributes differ), another layer
of the op type that does, and feeds the outputs as the original's does, is taken instead, among as many layers of
the op type as the original has (another tool may renumber two parallel branches' layers); when none does, the
first one's failure stands.

The check runs the layer where it can; its parameters alone are checked (against the exact fold) for a fold into a
MatMul, a fold in a subgraph (found in the subgraph of the same label, else in the same attribute of the node with
the same label: its values cannot be exposed as the model's outputs), a fold through ops that move the channels,
and several folds into one layer from its output's side (Keras 3's Mul then Add), as the one map they compose. A
candidate that keeps a BatchNorm, or a Mul/Add of such a chain, under another name is left to the outputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bnfold.onnx_fold.constants import constant_array
from bnfold.onnx_fold.layers import CHANNEL_MOVING_OPS, PASS_THROUGH_OPS
from bnfold.onnx_fold.local_checks import LayerParameters, LocalFold, compare_layer_parameters
from bnfold.onnx_fold.rules import (
    FoldIntoConcatenated,
    FoldIntoFollowing,
    FoldIntoPreceding,
    Layer,
    Refusal,
    chained_affine,
    channel_axis_at,
    labelled_graphs,
    layer_view,
    node_label,
)
from bnfold.report import Fold
from bnfold.verification import FoldCheck, ParameterComparison, fold_not_checked


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


def _feeding_the_outputs(graph: ir.Graph) -> set[ir.Node]:
    """The nodes of ``graph`` whose outputs its outputs read, directly or through others (or their subgraphs)."""
    feeding: set[ir.Node] = set()
    waiting = [value.producer() for value in graph.outputs]
    while waiting:
        node = waiting.pop()
        if node is None or node in feeding or node.graph is not graph:
            continue
        feeding.add(node)
        read = list(node.inputs)
        for attribute in node.attributes.values():
            subgraphs = [attribute.value] if attribute.type == ir.AttributeType.GRAPH else attribute.value if attribute.type == ir.AttributeType.GRAPHS else []
            read += [value for subgraph in subgraphs for inner in ir.traversal.RecursiveGraphIterator(subgraph) for value in inner.inputs]
        waiting += [value.producer() for value in read if value is not None]
    return feeding


@dataclasses.dataclass
class _GraphPair:
    """One graph of the original and the same graph of the folded model (the main graph, or a subgraph of that
    label), with what the search for a fold's layers reads: their nodes by label and each op type's nodes in
    order (original, folded), and the nodes that feed each one's outputs."""

    by_label: tuple[dict[str, list[ir.Node]], dict[str, list[ir.Node]]]
    positions: tuple[dict[str, list[ir.Node]], dict[str, list[ir.Node]]]
    feeding: tuple[set[ir.Node], set[ir.Node]]

    @classmethod
    def of(cls, original: ir.Graph, folded: ir.Graph) -> _GraphPair:
        graphs = (original, folded)
        return cls(
            tuple(_by_label(graph) for graph in graphs), tuple(_layers_by_position(graph) for graph in graphs), tuple(_feeding_the_outputs(graph) for graph in graphs)
        )  # fmt: skip


def _graph_pair(original: ir.Model, folded: ir.Model, fold: Fold) -> _GraphPair:
    """The subgraph ``fold`` is in (labelled ``fold.graph``, see labelled_graphs, and holding its BatchNorm) in the
    original, and the same one in the folded model: labelled alike and holding its layer, else (another tool may
    rename graphs; a then and an else branch may share a name) the graph in the same attribute of the node with
    the same label as the one that holds the original's."""
    found = [graph for label, graph in labelled_graphs(original) if label == fold.graph and fold.batchnorm in _by_label(graph)]
    if len(found) != 1:
        raise LookupError(f"{len(found)} subgraphs labelled {fold.graph!r} hold {fold.batchnorm!r} in the original model")
    inner = found[0]
    candidates = [graph for label, graph in labelled_graphs(folded) if label == fold.graph and fold.layer in _by_label(graph)]
    if len(candidates) != 1:
        owner, attribute = next(
            ((node, name) for node in original.graph.all_nodes() for name, value in node.attributes.items() if inner in _graphs_of(value)), (None, "")
        )
        owners = [node for node in folded.graph.all_nodes() if owner is not None and node_label(node) == node_label(owner) and node.op_type == owner.op_type]
        candidates = [graph for node in owners for graph in _graphs_of(node.attributes.get(attribute))]
        if len(candidates) != 1:
            raise LookupError(f"no one subgraph of the folded model corresponds to the original's {fold.graph!r}")
    return _GraphPair.of(inner, candidates[0])


def _graphs_of(attribute: ir.Attr | None) -> list[ir.Graph]:
    if attribute is None:
        return []
    if attribute.type == ir.AttributeType.GRAPH:
        return [attribute.value]
    return list(attribute.value) if attribute.type == ir.AttributeType.GRAPHS else []


def ir_local_folds(
    original: ir.Model, folded: ir.Model, folds: list[Fold], rtol: float | None
) -> tuple[list[LocalFold], list[FoldCheck]]:
    """The folds to check by running their layers, and the verdicts of the others: a not-compared entry (with the
    reason), a parameter check (a MatMul fold, a fold in a subgraph), a failure found from the models alone."""
    opset = original.opset_imports.get("", original.opset_imports.get("ai.onnx", 1))
    pairs = {"": _GraphPair.of(original.graph, folded.graph)}
    # The folds into each layer, in the order they were made: several into one layer (a BatchNorm lowered to Mul
    # then Add) are checked together, as the one map they compose.
    per_layer: dict[tuple[str, str], list[Fold]] = {}
    for fold in folds:
        per_layer.setdefault((fold.graph, fold.layer), []).append(fold)
    local, verdicts = [], []
    for chain in per_layer.values():
        labels = [fold.describe() for fold in chain]
        if len(chain) > 1 and any(fold.direction != "into-preceding" for fold in chain):
            why = "the layer absorbs more than one fold, not all from its output's side: checked through the model's outputs only"
            verdicts += [fold_not_checked(label, why) for label in labels]
            continue
        try:
            where = chain[0].graph and (chain[0].graph, chain[0].batchnorm)
            if where not in pairs:
                pairs[where] = _graph_pair(original, folded, chain[0])
            check = _local_fold(chain, labels[0], opset, pairs[where], rtol)
            if isinstance(check, LocalFold):
                local.append(check)
            else:
                verdicts += [dataclasses.replace(check, fold=label) for label in labels]
        except _OtherFunction as why:
            verdicts += [FoldCheck(label, "", "failed", reason=str(why)) for label in labels]
        except (Refusal, LookupError) as why:
            reason = why.reason if isinstance(why, Refusal) else why.args[0]
            verdicts += [fold_not_checked(label, f"{reason}: checked through the model's outputs only") for label in labels]
    return local, verdicts


_MATMUL = "a MatMul fold: its parameters checked against the exact fold, its output through the model's outputs"
_SUBGRAPH = "in a subgraph: its parameters checked against the exact fold, its output through the model's outputs"
_MOVED = "through ops that move the channels: its parameters checked against the exact fold, its output through the model's outputs"
_CONCATENATED = "a part of a BatchNorm after a Concat: its parameters checked against the exact fold, its output through the model's outputs"
_CHAIN = "one of {} folds into the layer: their composed map's parameters checked against the exact fold, its output through the model's outputs"


class _OtherFunction(Exception):
    """The folded model's layer computes another function of its input than the original's, whatever its
    weights (an attribute that a fold never changes differs): the fold fails, saying which."""


def _only(labelled: dict[str, list[ir.Node]], label: str, what: str) -> ir.Node:
    nodes = labelled.get(label, [])
    if len(nodes) != 1:
        raise LookupError(f"{len(nodes)} nodes are labelled {label!r} in the {what} model")
    return nodes[0]


def _local_fold(chain: list[Fold], label: str, opset: int, pair: _GraphPair, rtol: float | None) -> LocalFold | FoldCheck:
    """The check to run of ``chain``, the folds into one layer (one, or several into the layer before in the
    order made), or its parameter check alone for a MatMul fold (its output goes through layout ops to the
    BatchNorm's channel axis), one in a subgraph (whose values cannot be exposed to run the check) or a chain of
    several: its output compared through the model's outputs. A layer that feeds the outputs of its graph is held
    to by one that does too in the folded model's."""
    in_original, in_folded = pair.by_label
    positions, feeding = pair.positions, pair.feeding
    fold = chain[0]
    anchor = _only(in_original, fold.batchnorm, "original")
    preceding = fold.direction == "into-preceding"
    if fold.channels is None:
        rule = FoldIntoPreceding() if preceding else FoldIntoFollowing()
        match = rule.check(anchor, opset)  # read-only: the original's layer and the map that was folded
    else:  # (the part of a BatchNorm after a Concat that this layer took)
        parts = [part for part in FoldIntoConcatenated().check(anchor, opset).parts if node_label(part.layer.node) == fold.layer]
        if len(parts) != 1:
            raise LookupError(f"{len(parts)} layers labelled {fold.layer!r} are concatenated before {fold.batchnorm!r}")
        match = parts[0]
    if match.layer.quantized is not None:
        # (the fold went into the DequantizeLinear's scales: the layer's weight is its integers)
        raise LookupError(f"{fold.layer!r} reads a quantized weight")
    layer, affine = match.layer, match.affine
    # An elementwise map after ops that move the channels (Conv -> Transpose to NHWC -> Mul -> Add): its constants
    # are on the axis the channels went to; its output is not the layer's in layout.
    movers = sum(node.op_type in CHANNEL_MOVING_OPS for node in match.passthroughs)
    moved = movers > 0 and (anchor.op_type != "BatchNormalization" or layer.node.op_type in ("Conv", "ConvTranspose") or movers > 1)
    # (a BatchNorm after one Flatten of a Gemm's output to [M, C] reads that output as it is)
    where = channel_axis_at(layer, match.passthroughs) if moved and anchor.op_type != "BatchNormalization" else None
    for previous, later in zip(chain, chain[1:]):
        affine = affine.then(chained_affine(_only(in_original, later.batchnorm, "original"), _only(in_original, previous.batchnorm, "original"), layer, opset, where))
    matmul = layer.node.op_type == "MatMul"
    for each in chain:
        if in_folded.get(each.batchnorm):
            raise LookupError(f"the folded model keeps {each.batchnorm!r}")  # another tool left it: nothing folded
    folded_layer = _corresponding_layer(fold, layer, anchor, in_folded, positions)
    if folded_layer.op_type != layer.node.op_type:
        raise LookupError(f"{fold.layer!r} is a {folded_layer.op_type} in the folded model")
    if _beside_a_batchnorm(folded_layer, preceding):
        raise LookupError(f"the folded model keeps a BatchNorm {'after' if preceding else 'before'} {fold.layer!r}")
    elementwise = {each.batchnorm_op for each in chain} - {"BatchNormalization"}
    kept = _kept_elementwise(folded_layer, elementwise) if preceding and elementwise else None
    if kept is not None:  # (under another name: another tool left it, or folded only part of the chain)
        raise LookupError(f"the folded model keeps {node_label(kept)} [{kept.op_type}], by a constant, after {fold.layer!r}")
    original_inputs = [None if value is None else constant_array(value) for value in layer.node.inputs[1:]]
    if any(array is None and value is not None for array, value in zip(original_inputs, layer.node.inputs[1:])):
        raise LookupError(f"the original {fold.layer!r} reads a weight that is not constant")
    # (A layer holding the fold beside the model, which none of its outputs read, proves nothing of the model.)
    live = layer.node in feeding[0]
    verdict = _holds_the_fold(layer, folded_layer, opset, affine, preceding, rtol)
    # Another tool may have renumbered parallel branches: the layer that holds it, if any, among as many layers of
    # the op type as the original has (a candidate with one more could keep the exact fold beside a wrong layer,
    # feeding the outputs times zero).
    renumbered = len(positions[0].get(layer.node.op_type, [])) == len(positions[1].get(layer.node.op_type, []))
    if renumbered and not (verdict.holds and (folded_layer in feeding[1] or not live)):
        for node in positions[1].get(layer.node.op_type, []):
            if node is not folded_layer and (node in feeding[1] or not live) and not _beside_a_batchnorm(node, preceding):
                other = _holds_the_fold(layer, node, opset, affine, preceding, rtol, quiet=True)
                if other.holds:
                    verdict, folded_layer = other, node
                    break
    if live and folded_layer not in feeding[1]:
        raise _OtherFunction(f"the folded model's {node_label(folded_layer)!r} feeds none of its outputs, where the original's {fold.layer!r} does")
    if verdict.different:
        raise _OtherFunction(f"the folded layer has another {verdict.different}, which a fold never changes")
    parameters, bias_terms = verdict.parameters, verdict.bias_terms
    if matmul or fold.graph or len(chain) > 1 or moved or fold.channels is not None:
        status = "passed" if parameters.passed else "failed"
        reason = (
            _MATMUL if matmul else _SUBGRAPH if fold.graph else _CHAIN.format(len(chain)) if len(chain) > 1 else _MOVED if moved else _CONCATENATED
        )
        return FoldCheck(label, parameters.dtype, status, layer.layout.out_channels(layer.weight.shape), parameters=parameters, reason=reason)
    if preceding:
        data, reference = layer.node.inputs[0].name, anchor.outputs[0].name
    else:
        data, reference = anchor.inputs[0].name, layer.output.name
    folded_weights = [None if value is None else constant_array(value) for value in folded_layer.inputs[1:]]
    return LocalFold(
        label, data, reference, ir.serde.serialize_node(folded_layer), folded_weights,
        ir.serde.serialize_node(layer.node), original_inputs, affine, preceding, parameters, bias_terms,
    )  # fmt: skip


@dataclasses.dataclass
class _Candidate:
    """A folded model's layer read as a fold of the original's: its attribute that differs (or ""), its parameters
    against the exact fold."""

    node: ir.Node
    different: str
    parameters: ParameterComparison | None
    bias_terms: np.ndarray | None

    @property
    def holds(self) -> bool:
        return not self.different and self.parameters is not None and self.parameters.passed


def _holds_the_fold(
    layer: Layer, node: ir.Node, opset: int, affine, preceding: bool, rtol: float | None, quiet: bool = False
) -> _Candidate:
    """``node`` as the fold of the original's ``layer``. With ``quiet``, a node that cannot be read as one (another
    weight shape or layout, a weight that is not constant) holds nothing, where it otherwise raises."""
    try:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if quiet and (weight is None or weight.shape is None or list(weight.shape) != list(layer.weight.shape)):
            raise LookupError("another weight shape")
        # (its weights may be initializers, Constant nodes or constant computations, as in the original)
        view = layer_view(node, opset, features_last=layer.node.op_type == "MatMul")  # (a MatMul's data rank: its weights suffice)
        different = _different_attribute(layer.node, node, layer.weight.shape)
        parameters, bias_terms = compare_layer_parameters(_parameters(layer), _parameters(view), affine, preceding, rtol)
    except (Refusal, LookupError):
        if not quiet:
            raise
        return _Candidate(node, "", None, None)
    return _Candidate(node, different, parameters, bias_terms)


def _kept_elementwise(layer: ir.Node, ops: set[str]) -> ir.Node | None:
    """The node of one of ``ops`` by a constant that reads ``layer``'s output (past a MatMul's bias Add, and
    passthroughs and channel-moving ops each read only by the next), if any."""
    value, bias_add = (layer.outputs[0] if layer.outputs else None), layer.op_type == "MatMul"
    while value is not None:
        uses = [use.node for use in value.uses()]
        if len(uses) != 1:
            return None
        reader = uses[0]
        by_constant = any(operand is not None and operand is not value and constant_array(operand) is not None for operand in reader.inputs)
        if reader.op_type in ops and by_constant and not (bias_add and reader.op_type == "Add"):
            return reader
        moves = reader.op_type in (*CHANNEL_MOVING_OPS, *PASS_THROUGH_OPS) or (bias_add and reader.op_type == "Add" and by_constant)
        value, bias_add = (reader.outputs[0] if moves and reader.outputs else None), False
    return None


def _beside_a_batchnorm(layer: ir.Node, preceding: bool) -> bool:
    """Whether a BatchNorm, under whatever name, reads the layer's output (``preceding``) or makes its input."""
    if preceding:
        return any(use.node.op_type == "BatchNormalization" for output in layer.outputs[:1] for use in output.uses())
    producer = layer.inputs[0].producer() if layer.inputs and layer.inputs[0] is not None else None
    return producer is not None and producer.op_type == "BatchNormalization"


def _parameters(layer: Layer) -> LayerParameters:
    return LayerParameters(layer.weight, layer.bias, layer.layout, *layer.gemm_alpha_beta)


# The attributes that make a layer's function of its input and weights, and their defaults (k: spatial axes).
_FUNCTION_ATTRIBUTES = {
    "Conv": {"auto_pad": lambda k: "NOTSET", "dilations": lambda k: [1] * k, "group": lambda k: 1,
             "pads": lambda k: [0] * 2 * k, "strides": lambda k: [1] * k},
    "Gemm": {"transA": lambda k: 0},
}  # fmt: skip
_FUNCTION_ATTRIBUTES["ConvTranspose"] = {**_FUNCTION_ATTRIBUTES["Conv"], "output_padding": lambda k: [0] * k}


def _different_attribute(original: ir.Node, folded: ir.Node, weight_shape: tuple[int, ...]) -> str:
    """The first attribute (of :data:`_FUNCTION_ATTRIBUTES`) on which the two layers differ in effect, said with
    both values; "" when none does. Equivalent forms agree: ``auto_pad`` at stride 1 as its explicit pads, VALID
    as zero pads, a dilation on a kernel axis of size 1 as none."""
    forms = [_function_attributes(node, weight_shape) for node in (original, folded)]
    return next((f"{name} ({forms[1][name]}, the original's {value})" for name, value in forms[0].items() if forms[1][name] != value), "")


def _function_attributes(node: ir.Node, weight_shape: tuple[int, ...]) -> dict:
    kernel = list(weight_shape[2:])
    values = {}
    for name, default in _FUNCTION_ATTRIBUTES.get(node.op_type, {}).items():
        attribute = node.attributes.get(name)
        value = default(len(kernel)) if attribute is None else attribute.value
        values[name] = list(value) if isinstance(value, (list, tuple)) else value
    if "dilations" not in values:
        return values
    values["dilations"] = [1 if size == 1 else dilation for size, dilation in zip(kernel, values["dilations"])]
    if values["auto_pad"] == "VALID":
        values["auto_pad"], values["pads"] = "NOTSET", [0] * 2 * len(kernel)
    elif values["auto_pad"] in ("SAME_UPPER", "SAME_LOWER") and all(stride == 1 for stride in values["strides"]):
        totals = [dilation * (size - 1) for size, dilation in zip(kernel, values["dilations"])]
        small, large = [total // 2 for total in totals], [total - total // 2 for total in totals]
        values["pads"] = small + large if values["auto_pad"] == "SAME_UPPER" else large + small
        values["auto_pad"] = "NOTSET"
    return values


def _corresponding_layer(fold: Fold, layer: Layer, anchor: ir.Node, in_folded, positions) -> ir.Node:
    """The folded model's node for the original's ``layer``: by label, else (a model from another tool may
    rename nodes) the one node of its op type that writes the BatchNorm's output (a fold into the layer before)
    or reads its input (into the layer after), else by position among the nodes of its op type when both models
    have as many of them."""
    labels = [fold.layer]
    if fold.direction == "into-preceding":
        # An unnamed layer whose output became a graph output took the BatchNorm's output name.
        labels.append(f"{layer.node.op_type}->{anchor.outputs[0].name}")
    for label in labels:
        if in_folded.get(label):
            return _only(in_folded, label, "folded")
    in_original, in_candidate = (by_op.get(layer.node.op_type, []) for by_op in positions)
    if fold.direction == "into-preceding":
        around = [node for node in in_candidate if node.outputs and node.outputs[0].name == anchor.outputs[0].name]
    else:
        around = [node for node in in_candidate if node.inputs and node.inputs[0] is not None and node.inputs[0].name == anchor.inputs[0].name]
    if len(around) == 1:
        return around[0]
    if len(in_original) != len(in_candidate):
        raise LookupError(f"no node is labelled {fold.layer!r} in the folded model, and it has {len(in_candidate)} "
                          f"{layer.node.op_type} nodes where the original has {len(in_original)}")  # fmt: skip
    return in_candidate[in_original.index(layer.node)]
