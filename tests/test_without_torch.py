"""An install without torch (`pip install bnfold`, no `[torch]` extra) folds and checks ONNX models.

torch is made unimportable in a fresh interpreter (``sys.modules["torch"] = None`` makes every
``import torch`` raise ImportError, as in a venv without it), then the real command line runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
from onnx_models import assert_same_outputs

EXAMPLE = Path(__file__).parent.parent / "examples" / "small_cnn.onnx"
WITHOUT_TORCH = 'import sys; sys.modules["torch"] = None; from bnfold.cli import main; main()'


def bnfold_without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True)


def test_fold_and_check_an_onnx_model_without_torch(tmp_path):
    out = tmp_path / "folded.onnx"
    folded = bnfold_without_torch(EXAMPLE, "-o", out)
    assert folded.returncode == 0, folded.stderr
    assert "folded 4 of 4" in folded.stdout and "verification passed" in folded.stdout
    assert_same_outputs(onnx.load(EXAMPLE), onnx.load(out), atol=1e-5, rtol=1e-4)
    checked = bnfold_without_torch("check", "--format", "json", EXAMPLE)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.count('"BN006"') == 4


def test_a_pytorch_file_without_torch_says_what_to_install(tmp_path):
    archive = tmp_path / "model.pt2"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))  # any non-ONNX file goes to the PyTorch reader
    checked = bnfold_without_torch("check", archive)
    assert checked.returncode == 2
    assert checked.stderr.strip() == f"bnfold: error: {archive}: is not an .onnx file, and PyTorch files need torch: pip install 'bnfold[torch]'"


def test_command_line_start_up_imports_no_numerical_library():
    """`bnfold --help`, `--version` and usage errors pay only for click (0.8-2.3 s of imports before)."""
    probe = "import sys, bnfold.cli; print(sorted(m for m in ('numpy', 'onnx', 'onnx_ir', 'onnxruntime', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
