"""One model source checked by the front-end that reads it: a file (``.onnx`` by the ONNX inspector,
anything else as a PyTorch file, whose kind :mod:`bnfold.checks.torch_load` tells by content), or the
``module:callable`` of ``--model``. Findings come back carrying the source, as ``path``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bnfold.checks.findings import DEFAULT_BATCH_SIZE, Finding
from bnfold.checks.onnx_inspect import check_onnx
from bnfold.errors import InputError
from bnfold.input_shapes import InputShapes, named, positional
from bnfold.onnx_fold.io import data_input_names

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bnfold.checks.torch_inspect import ExampleInputs

# torch is imported only for PyTorch sources: ONNX-only installs (no `bnfold[torch]`) check ONNX files.

ONNX_SUFFIX = ".onnx"
# What `bnfold check DIRECTORY` picks up: ONNX files and torch.export archives (other PyTorch files need
# --factory or trust, so they are checked only when named).
MODEL_SUFFIXES = (ONNX_SUFFIX, ".pt2")


def files_to_check(path: str | os.PathLike) -> list[Path]:
    """``path`` itself, or for a directory the model files under it (sorted), as linters recurse: inside a
    git work tree only the files git does not ignore, elsewhere all but hidden files and folders; never a file
    that a symlink places outside the directory (what is checked is what the user named)."""
    path = Path(path)
    if not os.path.isdir(path):  # (False for a name the system cannot look up: reported when checked)
        return [path]
    listed = _git_files(path)
    if listed is None:
        listed = []
        for folder, folders, names in os.walk(path):
            folders[:] = sorted(name for name in folders if not name.startswith("."))  # prunes the walk
            listed += [Path(folder, name).relative_to(path) for name in names if not name.startswith(".")]
    inside = path.resolve()
    return sorted(
        # (realpath: a symlink loop stays a name, reported when checked, where Path.resolve raises)
        path / name for name in listed if name.suffix.lower() in MODEL_SUFFIXES and Path(os.path.realpath(path / name)).is_relative_to(inside)
    )


def _git_files(directory: Path) -> list[Path] | None:
    """The tracked and untracked-but-not-ignored files under ``directory``; None outside a git work tree. The
    repository may have come with the models (an unpacked archive): git runs its ``core.fsmonitor`` setting as a
    command, which is switched off."""
    try:
        listing = subprocess.run(
            ["git", "-c", "core.fsmonitor=false", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "."],
            cwd=directory, capture_output=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):  # no git, or not a repository
        return None
    return [Path(os.fsdecode(name)) for name in listing.stdout.split(b"\0") if name]


def check_file(
    path: str | os.PathLike,
    *,
    factory: Callable[[], nn.Module] | str | None = None,
    trust_pickle: bool = False,
    input_shapes: InputShapes | None = None,
    example_inputs: ExampleInputs | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    measure_batch: bool = True,
) -> list[Finding]:
    """Findings for the model in ``path``. ``input_shapes`` (by input name, or by position among the data
    inputs) serve ONNX files, ``example_inputs`` (positional) PyTorch files."""
    measurement = {"batch_size": batch_size, "seed": seed, "measure_batch": measure_batch}
    if Path(path).suffix.lower() == ONNX_SUFFIX:
        shapes = input_shapes or {}
        if positional(shapes):
            shapes = named(shapes, data_input_names(path), str(path))
        findings = check_onnx(path, input_shapes=shapes, **measurement)
    else:
        try:
            from bnfold.checks.torch_inspect import check_model
            from bnfold.checks.torch_load import load_torch_model
        except ImportError as error:
            if error.name != "torch":
                raise
            raise InputError(path, "is not an .onnx file, and PyTorch files need torch: pip install 'bnfold[torch]'") from None
        model = load_torch_model(path, factory=factory, trust_pickle=trust_pickle)
        findings = check_model(model, example_inputs, **measurement)
    return [finding.at(str(path)) for finding in findings]


def check_entry_point(spec: str, example_inputs: ExampleInputs | None = None, **measurement) -> list[Finding]:
    """Findings for the model that ``module:callable`` returns (keyword arguments as for :func:`check_model`)."""
    from bnfold.checks.torch_inspect import check_model
    from bnfold.checks.torch_load import model_from_callable

    return [finding.at(spec) for finding in check_model(model_from_callable(spec), example_inputs, **measurement)]


def example_inputs(shapes: list[list[int]]) -> list[torch.Tensor] | None:
    """float32 example inputs of these shapes, or None for no shapes. The measurement reads only their shape
    and dtype, so they live on the meta device: a huge shape allocates nothing before the memory budget check."""
    if not shapes:
        return None
    import torch

    return [torch.empty(shape, device="meta") for shape in shapes]
