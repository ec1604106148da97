"""Layer weights stored quantized, as QDQ models from quantization toolchains hold them:
``DequantizeLinear(W_q, scale, zero_point) -> Conv/Gemm/MatMul``.

A BatchNorm after such a layer folds into the ``DequantizeLinear``'s scale, per output channel, and the
integers stay (:func:`bnfold.fold_math.fold_into_quantized_outputs`). :func:`quantized_weight` reads the
weight when that can be done exactly, and otherwise says why not (:class:`QuantizedWeightError`): the fold
would otherwise evaluate the ``DequantizeLinear`` and store the weight in float, which drops its quantization.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bnfold.onnx_fold.constants import constant_array, not_constant_reason
from bnfold.onnx_fold.layers import reads_elements

DEQUANTIZE_OPS = ("DequantizeLinear",)
# DequantizeLinear's axis attribute, which a per-tensor scale needs to become per-channel, came with opset 13.
PER_CHANNEL_OPSET = 13
_QUANTIZE_OPS = ("QuantizeLinear", "DynamicQuantizeLinear")

FOLD_FIRST = "fold the float model before quantizing it"


class QuantizedWeightError(ValueError):
    """Why a quantized weight or bias cannot absorb the fold exactly (a sentence naming what to do)."""


@dataclasses.dataclass
class QuantizedWeight:
    """``DequantizeLinear(quantized, scale, zero_point)`` with the output channels on ``axis``."""

    dequantize: ir.Node
    quantized: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    per_tensor: bool  # the fold makes the scale (and zero point) per-channel and sets ``axis``


def dequantizer(value: ir.Value | None) -> ir.Node | None:
    """The ``DequantizeLinear`` (default domain) that produces ``value``, if one does."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type not in DEQUANTIZE_OPS or producer.domain not in ("", "ai.onnx"):
        return None
    return producer


def quantized_weight(node: ir.Node, layer_label: str, out_axis: int | None, opset: int) -> QuantizedWeight:
    """Read ``DequantizeLinear`` ``node``, the weight of ``layer_label``, as a weight whose output channels
    (weight axis ``out_axis``; None where no single axis holds them) can absorb a per-channel scale, in a
    model of default-domain ``opset``."""
    label = f"the quantized weight of {layer_label} ({node.name or node.outputs[0].name})"
    # (a Shape of the weight, as an unoptimised dynamo export reads each, keeps its value: the fold keeps the shape)
    if len([use for use in node.outputs[0].uses() if reads_elements(use)]) != 1 or node.outputs[0].is_graph_output():
        raise QuantizedWeightError(f"{label} is also read elsewhere, which must keep its values; {FOLD_FIRST}")
    inputs = [node.inputs[index] if index < len(node.inputs) else None for index in range(3)]
    source = inputs[0].producer() if inputs[0] is not None else None
    if source is not None and source.op_type in _QUANTIZE_OPS:
        raise QuantizedWeightError(
            f"{label} is fake-quantized ({source.op_type} -> DequantizeLinear of a float weight), whose two nodes share "
            f"one scale; {FOLD_FIRST}"
        )
    arrays = []
    for value, what in zip(inputs, ("integers", "scale", "zero point")):
        array = None if value is None else constant_array(value)
        if array is None and (value is not None or what != "zero point"):
            reason = "missing" if value is None else not_constant_reason(value)
            raise QuantizedWeightError(f"the {what} of {label} is not a constant ({reason})")
        arrays.append(array)
    quantized, scale, zero_point = arrays
    if quantized.dtype.kind not in "iu" and quantized.dtype.name not in ("int4", "uint4"):
        raise QuantizedWeightError(f"{label} is stored as {quantized.dtype.name}; only integer weights fold")
    if scale.dtype.kind != "f" and scale.dtype.name != "bfloat16":
        raise QuantizedWeightError(f"the scale of {label} is {scale.dtype.name}, not floating point")
    if any(attribute.value for name, attribute in node.attributes.items() if name in ("block_size", "output_dtype")):
        raise QuantizedWeightError(f"{label} is block-quantized or casts its output (block_size/output_dtype); {FOLD_FIRST}")
    if out_axis is None:  # (whatever its scales: a per-tensor one would have to become per output channel)
        raise QuantizedWeightError(
            f"{label} is a grouped ConvTranspose's, whose output channels lie on no one weight axis (axis 1 holds one "
            f"group's): no per-channel scale can take the BatchNorm's; {FOLD_FIRST}"
        )
    version = node.version or opset
    if scale.size == 1:
        if version < PER_CHANNEL_OPSET:
            raise QuantizedWeightError(
                f"{label} has one scale for the whole tensor, which the fold makes per-channel: DequantizeLinear takes "
                f"per-channel scales from opset {PER_CHANNEL_OPSET}, and the model is opset {version} (convert it with "
                "onnx.version_converter first)"
            )
        axis, per_tensor = out_axis, True
    else:
        attribute = node.attributes.get("axis")
        if attribute is not None and attribute.type != ir.AttributeType.INT:
            raise QuantizedWeightError(f"the axis attribute of {label} is {attribute.type.name}, not INT")
        axis = 1 if attribute is None else attribute.value  # DequantizeLinear's default
        axis, per_tensor = (axis + quantized.ndim if axis < 0 else axis), False
    if axis != out_axis:
        raise QuantizedWeightError(
            f"{label} is quantized per channel along axis {axis}, but its output channels are on axis {out_axis}: the "
            f"BatchNorm's scale cannot go into those scales; {FOLD_FIRST}"
        )
    if not (per_tensor or scale.shape == (quantized.shape[axis],)) or (zero_point is not None and zero_point.size != scale.size):
        zero = "" if zero_point is None else f" and a zero point of shape {list(zero_point.shape)}"
        raise QuantizedWeightError(
            f"{label} has a scale of shape {list(scale.shape)}{zero} for its {quantized.shape[axis]} channels on axis {axis} "
            "(not a valid DequantizeLinear)"
        )
    return QuantizedWeight(node, quantized, scale, zero_point, axis, per_tensor)


def quantized_bias_reason(value: ir.Value | None, layer_label: str) -> str | None:
    """Why the bias ``value`` of ``layer_label`` cannot take the BatchNorm's shift, when it is quantized."""
    if dequantizer(value) is None:
        return None
    # An int32 bias is quantized with scale input scale x weight scale: the shift, divided by that scale, is
    # almost never an integer, and a float bias would make integer runtimes run the layer in float.
    return (
        f"the bias of {layer_label} is quantized (DequantizeLinear, int32 with scale input scale x weight scale): the "
        f"BatchNorm's shift would have to be rounded to that scale; {FOLD_FIRST}, or dequantize the bias to a float "
        "initializer"
    )
