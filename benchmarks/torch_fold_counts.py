"""How many BatchNorms torch.fx.experimental.optimization.fuse folds versus bnfold, per test architecture,
and how long each takes (bnfold with ``verify=False``; best of 5 runs).

Run from the repository root: ``python benchmarks/torch_fold_counts.py``. The architectures are the
small ones the PyTorch front-end's tests use (tests/torch_architectures.py).
"""

from __future__ import annotations

import pathlib
import sys
import timeit

from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from torch_architectures import CASES, batchnorm_modules, fuse_folds, fx_traceable, trained_eval_model  # noqa: E402

from bnfold.torch_fold import fold  # noqa: E402


def _best_ms(run) -> float:
    return min(timeit.repeat(run, number=1, repeat=5)) * 1000


def main() -> None:
    print(f"{'model':<24} {'BNs':>4} {'fuse folded':>12} {'bnfold folded':>14} {'fuse ms':>8} {'bnfold ms':>10}")
    for case in CASES:
        model, inputs = trained_eval_model(case)
        batchnorms = batchnorm_modules(model)
        bnfold_folded = len(fold(model, inputs).report.folds)
        # fuse traces with torch.fx first: a model fx cannot trace, it cannot fuse (it raises).
        fuse_ms = f"{_best_ms(lambda model=model: fuse(model)):.1f}" if fx_traceable(model) else "fails"
        bnfold_ms = _best_ms(lambda model=model, inputs=inputs: fold(model, inputs, verify=False))
        print(
            f"{case.name:<24} {batchnorms:>4} {fuse_folds(model):>12} {bnfold_folded:>14} "
            f"{fuse_ms:>8} {bnfold_ms:>10.1f}"
        )


if __name__ == "__main__":
    main()
