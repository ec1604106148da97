#!/usr/bin/env bash
# Sets up, then folds the bundled example model and prints the fold report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p build
.venv/bin/bnfold examples/small_cnn.onnx -o build/small_cnn.folded.onnx "$@"
