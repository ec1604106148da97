"""The numpy boundary: the shared fold algebra works on float64 numpy arrays, the model on tensors."""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    """float64 on the CPU, whatever the tensor's dtype (numpy has no bfloat16) and device."""
    return None if tensor is None else tensor.detach().to("cpu", torch.float64).numpy()


def to_torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Back to ``like``'s device and dtype: the one rounding of the fold happens here."""
    return torch.from_numpy(array).to(device=like.device, dtype=like.dtype)
