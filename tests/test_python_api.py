"""The Python API as users meet it: the same result shape from both front-ends, one way to save, the
exceptions they catch exported from ``bnfold``, a version, type information."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import onnx
import pytest
from onnx_models import assert_same_outputs
from torch import nn

import bnfold
from bnfold.testing import example_input, trained_fixture

EXAMPLE = Path(__file__).parent.parent / "examples" / "small_cnn.onnx"


def test_both_front_ends_unpack_into_model_and_report():
    folded_onnx, onnx_report = bnfold.fold_onnx(EXAMPLE)
    folded_torch, torch_report = bnfold.fold(trained_fixture("small_cnn"), (example_input("small_cnn"),))
    result = bnfold.fold(trained_fixture("small_cnn"), (example_input("small_cnn"),))
    assert result.model is not None and result.report.frontend == "pytorch"
    assert len(onnx_report.folds) == len(torch_report.folds) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_torch.modules())


@pytest.mark.parametrize("kind", ["path", "proto"])
def test_save_writes_what_fold_onnx_returns(tmp_path, kind):
    source = EXAMPLE if kind == "path" else onnx.load(EXAMPLE)
    folded, _ = bnfold.fold_onnx(source)
    bnfold.save(folded, tmp_path / "folded.onnx")
    written = onnx.load(tmp_path / "folded.onnx")
    assert sum(node.op_type == "BatchNormalization" for node in written.graph.node) == 0
    assert_same_outputs(onnx.load(EXAMPLE), written, atol=1e-5, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["folded.onnx"]


def test_a_missing_model_is_file_not_found_and_an_input_error(tmp_path):
    for catch in (FileNotFoundError, bnfold.InputError, bnfold.MissingInputError):
        with pytest.raises(catch, match="no such file"):
            bnfold.fold_onnx(tmp_path / "absent.onnx")


def test_exceptions_users_catch_are_exported():
    for name in ("InputError", "MissingInputError", "VerificationError", "VerificationUnavailableError"):
        assert issubclass(getattr(bnfold, name), Exception), name
        assert name in bnfold.__all__


def test_version_and_type_information():
    assert bnfold.__version__ == version("bnfold") and re.fullmatch(r"\d+\.\d+\.\d+.*", bnfold.__version__)
    assert (Path(bnfold.__file__).parent / "py.typed").is_file()


def test_printing_a_report_prints_the_readable_report():
    _, report = bnfold.fold_onnx(EXAMPLE)
    assert str(report) == report.format_text() and str(report).startswith("bnfold: ")
    assert "folded 4 of 4 BatchNorm(s)" in str(report)
