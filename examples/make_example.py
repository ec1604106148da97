"""Regenerate examples/small_cnn.onnx: the small_cnn fixture trained with the reference BatchNorm.

Run: .venv/bin/python examples/make_example.py
"""

from pathlib import Path

from bnfold.testing import example_input, export_onnx, trained_fixture

if __name__ == "__main__":
    target = Path(__file__).with_name("small_cnn.onnx")
    export_onnx(trained_fixture("small_cnn"), example_input("small_cnn"), target)
    print(f"wrote {target} ({target.stat().st_size} bytes)")
