"""The ONNX front-end: load -> find foldable pairs -> fold -> verify -> report -> save.

- :mod:`.io`: loading (external data confined to the model's folder) and atomic saving.
- :mod:`.layers`: the layer ops a BatchNorm folds into and their weight layouts, the one table.
- :mod:`.constants`: the values a fold may treat as constants (initializers, Constant nodes, constant
  subgraphs evaluated under a size cap).
- :mod:`.layout`: whether a Flatten/Reshape/Transpose keeps a layer's features on a BatchNorm's channel axis.
- :mod:`.qdq`: a ``DequantizeLinear`` weight (QDQ models) read as one the fold can go into exactly.
- :mod:`.rules`: the fold rules, each a pattern, a ``check`` that says why not, and a ``rewrite``.
- :mod:`.folding`: :func:`fold_onnx`, which picks the route: the fast path, or the pass.
- :mod:`.ir_pass`: :class:`FoldBatchNormPass` (an onnx_ir pass over the rules), the only route that
  imports onnx_ir.
- :mod:`.shared`: what the pass and the fast path share, without onnx_ir.
- :mod:`.fast_path`: plain Conv/ConvTranspose/Gemm -> BatchNorm pairs folded on the protobuf, for models
  that hold nothing else to fold.
- :mod:`.verify`: onnxruntime verification; :mod:`.quantization`: what each fold did to the weights.

The fold arithmetic itself is :mod:`bnfold.fold_math`, shared with the PyTorch front-end.
"""

__all__ = ["FoldBatchNormPass", "fold_onnx"]


def __getattr__(name: str):
    # The pass imports onnx_ir; a caller of .io or .layers alone needs neither.
    if name == "FoldBatchNormPass":
        from bnfold.onnx_fold.ir_pass import FoldBatchNormPass

        return FoldBatchNormPass
    if name == "fold_onnx":
        from bnfold.onnx_fold.folding import fold_onnx

        return fold_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
