"""How many BatchNorms torch.fx.experimental.optimization.fuse folds versus bnfold, per test architecture.

Run from the repository root: ``python benchmarks/torch_fold_counts.py``. The architectures are the
small ones the PyTorch front-end's tests use (tests/torch_architectures.py).
"""

from __future__ import annotations

import pathlib
import sys

from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from torch_architectures import CASES, batchnorm_modules, trained_eval_model  # noqa: E402

from bnfold.torch_fold import fold  # noqa: E402


def main() -> None:
    print(f"{'model':<24} {'BNs':>4} {'fuse folded':>12} {'bnfold folded':>14}")
    for case in CASES:
        model, inputs = trained_eval_model(case)
        batchnorms = batchnorm_modules(model)
        fuse_folded = batchnorms - batchnorm_modules(fuse(model))
        bnfold_folded = len(fold(model, inputs).report.folds)
        print(f"{case.name:<24} {batchnorms:>4} {fuse_folded:>12} {bnfold_folded:>14}")


if __name__ == "__main__":
    main()
