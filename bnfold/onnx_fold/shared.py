"""What the onnx_ir pass and the protobuf fast path share, importable without onnx_ir: the fast path's
models never need it, and its import (which pulls sympy) costs more than folding a ResNet-50."""

from __future__ import annotations

import itertools

# BatchNormalization's default epsilon: 1e-5 as the float32 attribute it is, which runtimes compute with
# (1e-5 itself is not a float32; the difference shows in float64 models with small variances).
BATCHNORM_DEFAULT_EPSILON = 9.999999747378752e-06

# The ops evaluated ahead of time when all their inputs are constant: what exporters and converters compute weights
# and statistics with (layout and shape ops, casts, elementwise arithmetic, reductions, products, quantization),
# each a few vectorised numpy calls in onnx's reference evaluator. Any other op is left to run time: random ones
# (Dropout is random in training mode), subgraphs, and those the evaluator loops over in Python (a 568-byte model's
# MaxPool of a 9 MB constant took 57 s, a ScatterND 79 s).
_EVALUATED = frozenset(
    {
        "Constant", "ConstantOfShape", "Identity", "Cast", "CastLike", "Reshape", "Shape", "Size", "Expand", "Range",
        "Tile", "Concat", "Split", "Slice", "Gather", "GatherElements", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
        "Pad", "Trilu", "OneHot",
        "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Pow", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Tan",
        "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Clip", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Less",
        "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Sign", "Floor", "Ceil", "Round", "Erf",
        "Mod", "IsNaN", "IsInf",
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare",
        "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin", "CumSum", "MatMul", "Gemm", "Einsum",
        "LpNormalization", "BatchNormalization", "Softmax", "LogSoftmax", "DequantizeLinear", "QuantizeLinear",
    }
)  # fmt: skip


def evaluable_op(domain: str, op_type: str) -> bool:
    """Whether a node of this op is evaluated when all its inputs are constant."""
    return domain in ("", "ai.onnx") and op_type in _EVALUATED


class MalformedTensorError(ValueError):
    """A stored tensor whose data does not fit its type and shape (short raw data, the wrong typed field, an
    undefined type): the model cannot be used at all."""

    @classmethod
    def unreadable(cls, name: str, error: Exception) -> MalformedTensorError:
        return cls(f"tensor {name!r} is unreadable ({type(error).__name__}: {error})")


class FreshNames:
    """Names for the values a fold creates: ``<base>_bnfold``, numbered when that is taken."""

    def __init__(self, taken: set[str]):
        self._taken = taken
        self._counter = itertools.count()

    def __call__(self, base: str) -> str:
        name = f"{base}_bnfold"
        while name in self._taken:
            name = f"{base}_bnfold{next(self._counter)}"
        self._taken.add(name)
        return name
