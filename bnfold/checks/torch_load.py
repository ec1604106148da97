"""Loading the PyTorch models the check command is given, by what the file holds (not its suffix).

- a ``torch.export`` archive (``.pt2``): :func:`torch.export.load`;
- a TorchScript archive: :func:`torch.jit.load`;
- a state-dict saved with ``torch.save``: loaded with ``weights_only=True`` into the architecture that
  ``--factory module:callable`` builds;
- a whole pickled module (``torch.save(model)``): unpickling it imports and runs code named in the
  file, so it is refused unless the caller trusts the file (``--trust-pickle``).

``--model module:callable`` skips the file: the callable returns the model. For both callables the
current directory is importable, as it is for ``python -m``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bnfold.checks.error_text import describe_error
from bnfold.checks.torch_inspect import Model
from bnfold.onnx_io import InputError


def load_torch_model(path: str | os.PathLike, *, factory: str | None = None, trust_pickle: bool = False) -> Model:
    """The model in ``path``; :class:`InputError` (one line) when it cannot or must not be loaded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file" if not path.exists() else "not a file")
    kind = _archive_kind(path)
    try:
        if kind == "export":
            return torch.export.load(path)
        if kind == "torchscript":
            return torch.jit.load(path, map_location="cpu")
    except Exception as error:  # a damaged archive: whatever the reader raises
        raise InputError(path, f"not a readable {kind} archive ({describe_error(error)})") from None
    saved = _unpickle(path, trust_pickle)
    if isinstance(saved, nn.Module):
        return saved
    if _is_state_dict(saved):
        if factory is None:
            raise InputError(path, "is a state-dict: give --factory module:callable that builds its architecture")
        return _load_state_dict(path, saved, factory)
    raise InputError(path, f"holds a {type(saved).__name__}, not a model or a state-dict")


def _archive_kind(path: Path) -> str:
    """The kind of file, from its archive entries: "export", "torchscript" or "pickle" (torch.save, zipped or not)."""
    if not zipfile.is_zipfile(path):
        return "pickle"
    with zipfile.ZipFile(path) as archive:
        entries = [name.partition("/")[2] for name in archive.namelist()]
    if "archive_format" in entries:
        return "export"
    if "constants.pkl" in entries or any(entry.startswith("code/") for entry in entries):
        return "torchscript"
    return "pickle"


def _unpickle(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # not a torch file at all: torch raises UnpicklingError, KeyError, RuntimeError, ...
        # The safe unpickler names the first class it would have had to import.
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if refused and not trust_pickle:
            raise InputError(
                path,
                f"is a pickled module (it needs {refused.group(1)}): loading it runs code from the file, so it is "
                "refused; pass --trust-pickle if you trust the file, or save a state-dict or a torch.export archive",
            ) from None
        raise InputError(path, f"not a readable PyTorch or ONNX file ({_load_error(error)})") from None


def _load_error(error: Exception) -> str:
    """The error in one line: the safe unpickler's own complaint when torch wraps one in its advice."""
    _, wrapped, complaint = str(error).partition("WeightsUnpickler error:")
    return describe_error(error, complaint if wrapped else None)


def _is_state_dict(saved) -> bool:
    return isinstance(saved, Mapping) and bool(saved) and all(isinstance(value, torch.Tensor) for value in saved.values())


def _load_state_dict(path: Path, state_dict: Mapping[str, torch.Tensor], factory: str) -> nn.Module:
    model = call_entry_point(factory, "--factory")
    if not isinstance(model, nn.Module):
        raise InputError(factory, f"--factory returned a {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # missing, unexpected or misshapen entries
        # torch's message is a header line, then one line per kind of mismatch: the first is the news.
        mismatch = str(error).splitlines()[1:2]
        raise InputError(path, f"does not fit the --factory architecture ({describe_error(error, *mismatch)})") from None
    return model


def call_entry_point(spec: str, option: str):
    """Call ``package.module:attribute.path`` (imported with the current directory importable)."""
    module_name, sep, attribute_path = spec.partition(":")
    if not sep or not module_name or not attribute_path:
        raise InputError(spec, f"{option} must be module:callable")
    try:
        with _current_directory_importable():
            target = importlib.import_module(module_name)
        for attribute in attribute_path.split("."):
            target = getattr(target, attribute)
    except (ImportError, AttributeError) as error:
        raise InputError(spec, f"{option}: cannot import ({error})") from None
    if not callable(target):
        raise InputError(spec, f"{option}: {attribute_path} is not callable")
    try:
        return target()
    except Exception as error:  # the user's code: report it as a bad input, in one line
        raise InputError(spec, f"{option}: calling it raised {describe_error(error)}") from None


@contextlib.contextmanager
def _current_directory_importable():
    """The console script's sys.path holds its own directory, not the current one as ``python -m`` does."""
    directory = os.getcwd()
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            sys.path.remove(directory)


def model_from_callable(spec: str) -> Model:
    """What ``--model module:callable`` returns, which must be a model."""
    model = call_entry_point(spec, "--model")
    if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        raise InputError(spec, f"--model returned a {type(model).__name__}, not an nn.Module or ExportedProgram")
    return model
