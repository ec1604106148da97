"""The ONNX front-end's quantization figures (:mod:`bnfold.quantization`): each fold of a BatchNormalization
read back from the models, the layer's weight and bias from the original and from the folded model, the
statistics from the original's BatchNorm node. Per-channel Mul/Add/Sub/Div folds have no statistics to name
and are not measured."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import onnx_ir as ir

from bnfold.fold_math import batchnorm_affine
from bnfold.half_precision_error import BatchNormParameters
from bnfold.onnx_fold.constants import constant_array
from bnfold.onnx_fold.io import load_model
from bnfold.onnx_fold.layers import LAYER_OPS
from bnfold.onnx_fold.rules import labelled_graphs, matmul_bias_add, node_label
from bnfold.onnx_fold.shared import BATCHNORM_DEFAULT_EPSILON
from bnfold.quantization import LayerQuantization, measure_fold, named_channels
from bnfold.report import Fold


def measure_onnx_folds(
    original: str | os.PathLike | ir.Model | onnx.ModelProto,
    folded: ir.Model | onnx.ModelProto,
    folds: list[Fold],
    target_dtype: str | None,
) -> list[LayerQuantization]:
    if not any(fold.batchnorm_op == "BatchNormalization" for fold in folds):
        return []
    before, after = (_nodes(model) for model in (original, folded))
    measured = []
    for fold in folds:
        batchnorm = before.get((fold.graph, fold.batchnorm))
        layer_before, layer_after = before.get((fold.graph, fold.layer)), after.get((fold.graph, fold.layer))
        if fold.batchnorm_op != "BatchNormalization" or None in (batchnorm, layer_before, layer_after):
            continue
        gamma, beta, mean, variance = (constant_array(batchnorm.inputs[index]) for index in range(1, 5))
        weight_before, weight_after = constant_array(layer_before.inputs[1]), constant_array(layer_after.inputs[1])
        # Read from the file again, initializers that a frozen model declared graph inputs are not constants.
        if any(array is None for array in (gamma, beta, mean, variance, weight_before, weight_after)):
            continue
        eps = batchnorm.attributes.get_float("epsilon", BATCHNORM_DEFAULT_EPSILON)
        scale = batchnorm_affine(gamma, beta, mean, variance, eps).scale
        measured.append(
            measure_fold(
                weight_before,
                weight_after,
                LAYER_OPS[layer_after.op_type].layout(layer_after.attributes.get_int),
                named_channels(scale, gamma, mean, variance, eps),
                bias_before=_bias(layer_before),
                bias_after=_bias(layer_after),
                target_dtype=target_dtype,
                batchnorm_parameters=BatchNormParameters(gamma, beta, mean, variance, eps),
                batchnorm=fold.batchnorm,
                layer=fold.layer,
                direction=fold.direction,
                graph=fold.graph,
            )
        )
    return measured


def _nodes(model: str | os.PathLike | ir.Model | onnx.ModelProto) -> dict[tuple[str, str], ir.Node]:
    """Every node by (graph label, node label), the keys of :class:`bnfold.report.Fold`; a label that several
    nodes share (node names need not be unique) names none of them, and its folds are not measured."""
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)  # the fold edited its own copy in place: the file holds the original
    elif isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    keys = [((label, node_label(node)), node) for label, graph in labelled_graphs(model) for node in graph]
    shared = {key for key, count in collections.Counter(key for key, _ in keys).items() if count > 1}
    return {key: node for key, node in keys if key not in shared}


def _bias(node: ir.Node) -> np.ndarray | None:
    """The layer's bias: its third input (Conv, ConvTranspose, Gemm), or the constant of the Add after a MatMul."""
    if node.op_type != "MatMul":
        return constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    found = matmul_bias_add(node)
    return None if found is None else found[1]
