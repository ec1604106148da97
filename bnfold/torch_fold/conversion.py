"""The numpy boundary: the shared fold algebra works on float64 numpy arrays, the model on tensors."""

from __future__ import annotations

import numpy as np
import torch

from bnfold.fold_math import round_to_dtype

# torch dtypes numpy has, or (bfloat16) ml_dtypes has, with the same bit layout.
_NUMPY_DTYPES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Those numpy itself has.
_NUMPY_FLOATS = (torch.float64, torch.float32, torch.float16)


def to_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    """float64 on the CPU, whatever the tensor's dtype (numpy has no bfloat16) and device."""
    if tensor is None:
        return None
    if tensor.dtype in _NUMPY_FLOATS:  # widening is exact in numpy too, and cheaper there than torch's .to
        return tensor.numpy(force=True).astype(np.float64, copy=False)
    return tensor.detach().to("cpu", torch.float64).numpy()


def to_numpy_as_is(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values in numpy's (or ml_dtypes') dtype of the same name, exactly (float64 for others); for
    a dtype numpy has, on the CPU, the tensor's own memory (read it, do not write it)."""
    if tensor.dtype in _NUMPY_FLOATS:
        return tensor.numpy(force=True)
    name = _NUMPY_DTYPES.get(tensor.dtype, "float64")
    return to_numpy(tensor).astype(_bfloat16() if name == "bfloat16" else np.dtype(name))


def to_numpy_float(tensor: torch.Tensor | None) -> np.ndarray | None:
    """The values in a float dtype numpy computes with: the tensor's own for float64/32/16 (its memory on the
    CPU, see :func:`to_numpy_as_is`), float64 for any other (bfloat16)."""
    if tensor is None:
        return None
    return to_numpy_as_is(tensor) if tensor.dtype in _NUMPY_FLOATS else to_numpy(tensor)


def to_torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """float64 ``array`` back to ``like``'s device and dtype, rounded once by the shared algebra (torch's own
    float64 -> half/bfloat16 conversion rounds twice, through float32); an array in that dtype already (numpy's,
    or ml_dtypes' bfloat16) keeps its values, and on the CPU its memory."""
    name = _NUMPY_DTYPES.get(like.dtype)
    if name is None:
        return torch.from_numpy(array).to(device=like.device, dtype=like.dtype)
    rounded = round_to_dtype(array, np.dtype(name) if name != "bfloat16" else _bfloat16())
    if name == "bfloat16":  # no bfloat16 in torch.from_numpy: carry the bits over
        return torch.from_numpy(rounded.view(np.int16)).view(torch.bfloat16).to(like.device)
    return torch.from_numpy(rounded).to(like.device)


def _bfloat16() -> np.dtype:
    import ml_dtypes  # installed with onnx

    return np.dtype(ml_dtypes.bfloat16)
