"""Loading and saving ONNX models with onnx_ir: clear one-line errors, atomic writes, external data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

# Past this many bytes of tensor data a model cannot be one protobuf file (the 2 GiB limit, with margin).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


class InputError(Exception):
    """Bad input or output path: one line naming the file and the problem (CLI exit code 2)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` with its external data kept lazy, after checking that the data files are there."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file, not an ONNX model")
    try:
        model = ir.load(path)
    except Exception as error:  # protobuf's DecodeError and friends: truncated or not ONNX at all
        raise InputError(path, f"not a readable ONNX model ({type(error).__name__}: {_first_line(error)})") from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InputError(path, "not an ONNX model (no graph in the file)")
    _check_external_data(model, path)
    return model


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no detail"


def _check_external_data(model: ir.Model, path: Path) -> None:
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            data_path = Path(tensor.base_dir) / tensor.location
            if not data_path.is_file():
                raise InputError(path, f"external data file {tensor.location!r} of tensor {value.name!r} is missing")
            end = (tensor.offset or 0) + (tensor.length or 0)
            if data_path.stat().st_size < end:
                raise InputError(path, f"external data file {tensor.location!r} is truncated (tensor {value.name!r})")


def uses_external_data(model: ir.Model) -> bool:
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in (model.graph, *model.graph.subgraphs())
        for value in graph.initializers.values()
    )


def tensor_bytes(model: ir.Model) -> int:
    return sum(
        value.const_value.nbytes
        for graph in (model.graph, *model.graph.subgraphs())
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def check_writable(path: str | os.PathLike) -> None:
    """Fail before any work when the output cannot be written."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(path, "output is a directory")
    if not directory.is_dir():
        raise InputError(path, f"output directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(path, "output is not writable")


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically: into a temporary directory beside it, then rename.

    With ``external_data`` (default: when the input had it, or the tensors pass the protobuf limit)
    the tensors go to ``<name>.data`` beside the model. Writing to a temporary directory first also
    keeps the input's external data readable while it is being copied, even when writing in place.
    """
    path = Path(path)
    check_writable(path)
    if external_data is None:
        external_data = uses_external_data(model) or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=path.parent if str(path.parent) else "."))
    try:
        staged_model = staging / path.name
        try:
            ir.save(model, staged_model, external_data=data_name if external_data else None)
        except OSError as error:
            raise InputError(path, f"cannot write output ({error.strerror or error})") from None
        if external_data:
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged_model, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
