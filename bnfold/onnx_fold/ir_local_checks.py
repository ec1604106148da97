"""The local checks of folds in any model onnx_ir reads (see :mod:`bnfold.onnx_fold.local_checks`): each fold's
BatchNorm and layer found in the original with the pass's rules, its layer in the folded model by label, else
(a model from another tool may rename nodes) by the names of the values around it, else by position among the
nodes of its op type. A layer matched by position alone may be another one (two parallel branches listed in
another order): when its check fails, the fold is left to the outputs' check rather than failed."""

from __future__ import annotations

import collections

import onnx_ir as ir

from bnfold.onnx_fold.constants import constant_array
from bnfold.onnx_fold.local_checks import LayerParameters, LocalFold, compare_layer_parameters
from bnfold.onnx_fold.rules import (
    FoldIntoFollowing,
    FoldIntoPreceding,
    Layer,
    Refusal,
    layer_view,
    node_label,
)
from bnfold.report import Fold
from bnfold.verification import FoldCheck, fold_not_checked


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


def ir_local_folds(
    original: ir.Model, folded: ir.Model, folds: list[Fold], rtol: float | None
) -> tuple[list[LocalFold], list[FoldCheck]]:
    """The folds to check by running their layers, and the verdicts of the others: a not-compared entry (with the
    reason), a MatMul fold's parameter check, a failure found from the models alone."""
    opset = original.opset_imports.get("", original.opset_imports.get("ai.onnx", 1))
    in_original, in_folded = _by_label(original.graph), _by_label(folded.graph)
    positions = (_layers_by_position(original.graph), _layers_by_position(folded.graph))
    per_layer = collections.Counter((fold.graph, fold.layer) for fold in folds)
    local, verdicts = [], []
    for fold in folds:
        label = fold.describe()
        if fold.graph:
            verdicts.append(fold_not_checked(label, "in a subgraph: checked through the model's outputs only"))
        elif per_layer[(fold.graph, fold.layer)] > 1:
            verdicts.append(fold_not_checked(label, "the layer absorbs more than one fold: checked through the model's outputs only"))
        else:
            try:
                check = _local_fold(fold, label, opset, in_original, in_folded, positions, rtol)
                (local if isinstance(check, LocalFold) else verdicts).append(check)
            except _OtherFunction as why:
                verdicts.append(FoldCheck(label, "", "failed", reason=str(why)))
            except (Refusal, LookupError) as why:
                reason = why.reason if isinstance(why, Refusal) else why.args[0]
                verdicts.append(fold_not_checked(label, f"{reason}: checked through the model's outputs only"))
    return local, verdicts


_MATMUL = "a MatMul fold: its parameters checked against the exact fold, its output through the model's outputs"


class _OtherFunction(Exception):
    """The folded model's layer computes another function of its input than the original's, whatever its
    weights (an attribute that a fold never changes differs): the fold fails, saying which."""


def _only(labelled: dict[str, list[ir.Node]], label: str, what: str) -> ir.Node:
    nodes = labelled.get(label, [])
    if len(nodes) != 1:
        raise LookupError(f"{len(nodes)} nodes are labelled {label!r} in the {what} model")
    return nodes[0]


def _local_fold(fold: Fold, label: str, opset: int, in_original, in_folded, positions, rtol: float | None) -> LocalFold | FoldCheck:
    """The fold's check to run, or for a MatMul fold its parameter check alone (its output goes through layout ops
    to the BatchNorm's channel axis: compared through the model's outputs)."""
    anchor = _only(in_original, fold.batchnorm, "original")
    preceding = fold.direction == "into-preceding"
    rule = FoldIntoPreceding() if preceding else FoldIntoFollowing()
    match = rule.check(anchor, opset)  # read-only: the original's layer and the map that was folded
    layer = match.layer
    matmul = layer.node.op_type == "MatMul"
    if in_folded.get(fold.batchnorm):
        raise LookupError(f"the folded model keeps {fold.batchnorm!r}")  # another tool left it: nothing folded
    folded_layer, by_position = _corresponding_layer(fold, layer, anchor, in_folded, positions)
    if folded_layer.op_type != layer.node.op_type:
        raise LookupError(f"{fold.layer!r} is a {folded_layer.op_type} in the folded model")
    if _beside_a_batchnorm(folded_layer, preceding):
        raise LookupError(f"the folded model keeps a BatchNorm {'after' if preceding else 'before'} {fold.layer!r}")
    original_inputs = [None if value is None else constant_array(value) for value in layer.node.inputs[1:]]
    if any(array is None and value is not None for array, value in zip(original_inputs, layer.node.inputs[1:])):
        raise LookupError(f"the original {fold.layer!r} reads a weight that is not constant")
    # (its weights may be initializers, Constant nodes or constant computations, as in the original)
    folded_view = layer_view(folded_layer, opset, features_last=matmul)  # (a MatMul's data rank: its weights suffice)
    different = _different_attribute(layer.node, folded_layer, layer.weight.ndim)
    if different:
        if by_position:
            raise LookupError(f"the folded model's {folded_layer.op_type} at its position has another {different}")
        raise _OtherFunction(f"the folded layer has another {different}, which a fold never changes")
    parameters, bias_terms = compare_layer_parameters(_parameters(layer), _parameters(folded_view), match.affine, preceding, rtol)
    if matmul:
        status = "passed" if parameters.passed else "failed"
        return FoldCheck(label, parameters.dtype, status, layer.layout.out_channels(layer.weight.shape), parameters=parameters, reason=_MATMUL)
    if preceding:
        data, reference = layer.node.inputs[0].name, anchor.outputs[0].name
    else:
        data, reference = anchor.inputs[0].name, layer.output.name
    folded_weights = [None if value is None else constant_array(value) for value in folded_layer.inputs[1:]]
    return LocalFold(
        label, data, reference, ir.serde.serialize_node(folded_layer), folded_weights,
        ir.serde.serialize_node(layer.node), original_inputs, match.affine, preceding, parameters, bias_terms,
        matched_by_position=by_position,
    )  # fmt: skip


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
_FUNCTION_ATTRIBUTES["ConvTranspose"] = {**_FUNCTION_ATTRIBUTES["Conv"], "output_padding": lambda k: [0] * k, "output_shape": lambda k: None}


def _different_attribute(original: ir.Node, folded: ir.Node, weight_rank: int) -> str:
    """The first attribute (of :data:`_FUNCTION_ATTRIBUTES`) on which the two layers differ, said with both
    values; "" when none does."""
    spatial = weight_rank - 2
    for name, default in _FUNCTION_ATTRIBUTES.get(original.op_type, {}).items():
        values = []
        for node in (original, folded):
            attribute = node.attributes.get(name)
            value = default(spatial) if attribute is None else attribute.value
            values.append(list(value) if isinstance(value, (list, tuple)) else value)
        if values[0] != values[1]:
            return f"{name} ({values[1]}, the original's {values[0]})"
    return ""


def _corresponding_layer(fold: Fold, layer: Layer, anchor: ir.Node, in_folded, positions) -> tuple[ir.Node, bool]:
    """The folded model's node for the original's ``layer``, and whether it was matched by position alone:
    by label, else (a model from another tool may rename nodes) the one node of its op type that writes the
    BatchNorm's output (a fold into the layer before) or reads its input (into the layer after), else by
    position among the nodes of its op type when both models have as many of them."""
    labels = [fold.layer]
    if fold.direction == "into-preceding":
        # An unnamed layer whose output became a graph output took the BatchNorm's output name.
        labels.append(f"{layer.node.op_type}->{anchor.outputs[0].name}")
    for label in labels:
        if in_folded.get(label):
            return _only(in_folded, label, "folded"), False
    in_original, in_candidate = (by_op.get(layer.node.op_type, []) for by_op in positions)
    if fold.direction == "into-preceding":
        around = [node for node in in_candidate if node.outputs and node.outputs[0].name == anchor.outputs[0].name]
    else:
        around = [node for node in in_candidate if node.inputs and node.inputs[0] is not None and node.inputs[0].name == anchor.inputs[0].name]
    if len(around) == 1:
        return around[0], False
    if len(in_original) != len(in_candidate):
        raise LookupError(f"no node is labelled {fold.layer!r} in the folded model, and it has {len(in_candidate)} "
                          f"{layer.node.op_type} nodes where the original has {len(in_original)}")  # fmt: skip
    return in_candidate[in_original.index(layer.node)], True
