"""How many BatchNorms torch.fx.experimental.optimization.fuse folds versus bnfold, per test architecture,
and how long each takes (bnfold with ``verify=False``; best of 15 runs, and bnfold's time over fuse's).

With verification, bnfold's time is set against what verification cannot avoid: the fold with
``verify=False`` plus one forward pass of the original model and one of the folded model on the example
inputs (each timed on its own under ``torch.no_grad``, best of the same rounds); ``verified/(fold+fwd)`` is
bnfold's verified time over that sum.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/torch_fold_counts.py [NAME ...]`` (names
select some of the architectures, by the start of their name). The architectures
are the small ones the PyTorch front-end's tests use (tests/torch_architectures.py). Times are the process's
CPU time on one thread, which other processes on a shared machine disturb less than wall time, and fuse and
bnfold take turns, one run each per round, so that what load remains falls on both alike: the ratio is the
figure to compare between runs, the milliseconds move with the machine.
"""

from __future__ import annotations

import pathlib
import sys
import time

import torch
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from torch_architectures import CASES, batchnorm_modules, fuse_folds, fx_traceable, trained_eval_model  # noqa: E402

from bnfold.torch_fold import fold  # noqa: E402

_ROUNDS = 15


def _best_ms(runs: dict[str, object]) -> dict[str, float]:
    """Best time of each run over the rounds, the runs taking turns within each round."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(_ROUNDS):
        for name, run in runs.items():
            start = time.process_time()
            run()
            best[name] = min(best[name], (time.process_time() - start) * 1000)
    return best


def main() -> None:
    torch.set_num_threads(1)
    print(
        f"{'model':<24} {'BNs':>4} {'fuse folded':>12} {'bnfold folded':>14} {'fuse ms':>8} {'bnfold ms':>10} "
        f"{'bnfold/fuse':>12} {'verified ms':>12} {'fold+fwd ms':>12} {'verified/(fold+fwd)':>20}"
    )
    selected = sys.argv[1:]
    for case in CASES:
        if selected and not any(case.name.startswith(name) for name in selected):
            continue
        model, inputs = trained_eval_model(case)
        batchnorms = batchnorm_modules(model)
        folded, report = fold(model, inputs)
        bnfold_folded = len(report.folds)
        runs = {
            "bnfold": lambda model=model, inputs=inputs: fold(model, inputs, verify=False),
            "verified": lambda model=model, inputs=inputs: fold(model, inputs),
            "original forward": lambda model=model, inputs=inputs: _forward(model, inputs),
            "folded forward": lambda folded=folded, inputs=inputs: _forward(folded, inputs),
        }
        # fuse traces with torch.fx first: a model fx cannot trace, it cannot fuse (it raises).
        if fx_traceable(model):
            runs["fuse"] = lambda model=model: fuse(model)
        best = _best_ms(runs)
        fuse_ms, ratio = (f"{best['fuse']:.1f}", f"{best['bnfold'] / best['fuse']:.2f}") if "fuse" in best else ("fails", "-")
        reference = best["bnfold"] + best["original forward"] + best["folded forward"]
        print(
            f"{case.name:<24} {batchnorms:>4} {fuse_folds(model):>12} {bnfold_folded:>14} "
            f"{fuse_ms:>8} {best['bnfold']:>10.1f} {ratio:>12} {best['verified']:>12.1f} {reference:>12.1f} "
            f"{best['verified'] / reference:>20.2f}"
        )


def _forward(model: torch.nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        model(*inputs)


if __name__ == "__main__":
    main()
