"""The ONNX layer ops a BatchNorm folds into, and where each keeps its weight's channels.

One table, read by the rules (:mod:`.rules`), the fast path (:mod:`.fast_path`) and the quantization
measurement (:mod:`.quantization`). Adding a layer op is a row here, plus, when its weight or bias needs
checks of its own, a branch in :func:`bnfold.onnx_fold.rules.layer_view`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from bnfold.fold_math import LayoutKind, WeightLayout


@dataclasses.dataclass(frozen=True)
class LayerOp:
    layout_kind: LayoutKind
    grouped: bool = False  # reads the ``group`` attribute
    transposed_attribute: str = ""  # an int attribute that, when set, makes the weight (N, K) (Gemm's transB)
    bias_input: bool = True  # the bias is input 2; a MatMul's is the constant of an Add after it
    # Folded on the protobuf by the fast path. MatMul is not: whether BatchNorm's channel axis is its
    # feature axis depends on the data's rank, which takes shape inference.
    fast_path: bool = True

    def layout(self, int_attribute: Callable[[str, int], int]) -> WeightLayout:
        """The weight layout, given a reader of the node's int attributes ``(name, default) -> value``."""
        if self.transposed_attribute and int_attribute(self.transposed_attribute, 0):
            return WeightLayout("matrix_out_in")
        return WeightLayout(self.layout_kind, int_attribute("group", 1) if self.grouped else 1)


LAYER_OPS: dict[str, LayerOp] = {
    "Conv": LayerOp("conv", grouped=True),
    "ConvTranspose": LayerOp("conv_transpose", grouped=True),
    "Gemm": LayerOp("matrix_in_out", transposed_attribute="transB"),
    "MatMul": LayerOp("matrix_in_out", bias_input=False, fast_path=False),
}
FAST_PATH_LAYER_OPS = tuple(op for op, spec in LAYER_OPS.items() if spec.fast_path)
# Ops whose output is their input at inference (a Dropout only when its mask is unread and it is not in
# training mode): the rules fold through them.
PASS_THROUGH_OPS = ("Identity", "Dropout")
# Ops that only move a tensor's elements, through which a per-channel Mul/Add/Sub/Div folds into the layer when
# they keep its output channels whole on one axis (:func:`bnfold.onnx_fold.layout.moved_channel_axis`): tf2onnx
# writes Keras 3's BatchNorm as a Mul and an Add after a Transpose to NHWC (Conv -> Transpose -> Mul -> Add), after
# a Squeeze (Conv1D), or after a Reshape back to [B, T, C] (Dense on 3-D data).
CHANNEL_MOVING_OPS = ("Transpose", "Squeeze", "Unsqueeze", "Reshape", "Flatten")


_SHAPE_READERS = ("Shape", "Size")


def reads_elements(use) -> bool:
    """Whether a use of a value (an onnx_ir ``Usage``) reads its elements: not a reader of its shape alone, nor
    CastLike's second input, whose type alone it reads (the torch.onnx dynamo exporter makes a Conv's zero bias as
    CastLike(0, x) of the Conv's input, and an unoptimised export reads each weight's Shape)."""
    return use.node.op_type not in _SHAPE_READERS and not (use.node.op_type == "CastLike" and use.idx == 1)
