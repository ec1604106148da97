"""How many BatchNorms torch.fx.experimental.optimization.fuse folds versus bnfold, per test architecture,
and how long each takes (bnfold with ``verify=False``; best of 15 runs, and bnfold's time over fuse's).

With verification, bnfold's time is set against what verification cannot avoid: the fold with
``verify=False`` plus one forward pass of the original model and one of the folded model on the example
inputs (each timed on its own under ``torch.no_grad``, best of the same rounds); ``verified/(fold+fwd)`` is
bnfold's verified time over that sum.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/torch_fold_counts.py [NAME ...] [--runs N]``
(names select some of the architectures, by the start of their name; ``--runs 3`` measures everything three
times and ends with each ratio's range over the runs, the figures the README quotes). The architectures
are the small ones the PyTorch front-end's tests use (tests/torch_architectures.py). Times are the process's
CPU time on one thread, which other processes on a shared machine disturb less than wall time, and fuse and
bnfold take turns, one run each per round, so that what load remains falls on both alike: the ratio is the
figure to compare between runs, the milliseconds move with the machine.
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures to measure, by the start of their name (default: all)")
    parser.add_argument("--runs", type=int, default=1, help="measure everything this many times, then give each ratio's range")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [case for case in CASES if not args.names or any(case.name.startswith(name) for name in args.names)]
    prepared = [(case.name, *trained_eval_model(case)) for case in cases]
    ratios: dict[str, list[tuple[float | None, float]]] = {name: [] for name, _, _ in prepared}
    for run in range(args.runs):
        if args.runs > 1:
            print(f"run {run + 1} of {args.runs}")
        print(
            f"{'model':<24} {'BNs':>4} {'fuse folded':>12} {'bnfold folded':>14} {'fuse ms':>8} {'bnfold ms':>10} "
            f"{'bnfold/fuse':>12} {'verified ms':>12} {'fold+fwd ms':>12} {'verified/(fold+fwd)':>20}"
        )
        for name, model, inputs in prepared:
            ratios[name].append(_measure(name, model, inputs))
    if args.runs > 1:
        print(f"\nranges over the {args.runs} runs")
        print(f"{'model':<24} {'bnfold/fuse':>12} {'verified/(fold+fwd)':>20}")
        for name, measured in ratios.items():
            fuse_ratios = [fuse_ratio for fuse_ratio, _ in measured if fuse_ratio is not None]
            fuse_range = f"{min(fuse_ratios):.2f}-{max(fuse_ratios):.2f}" if fuse_ratios else "-"
            verified = [verified_ratio for _, verified_ratio in measured]
            print(f"{name:<24} {fuse_range:>12} {f'{min(verified):.2f}-{max(verified):.2f}':>20}")


def _measure(name: str, model: torch.nn.Module, inputs: tuple) -> tuple[float | None, float]:
    """One row of the table, printed; its bnfold/fuse (None when fuse cannot run) and verified/(fold+fwd)."""
    folded, report = fold(model, inputs)
    runs = {
        "bnfold": lambda: fold(model, inputs, verify=False),
        "verified": lambda: fold(model, inputs),
        "original forward": lambda: _forward(model, inputs),
        "folded forward": lambda: _forward(folded, inputs),
    }
    # fuse traces with torch.fx first: a model fx cannot trace, it cannot fuse (it raises).
    if fx_traceable(model):
        runs["fuse"] = lambda: fuse(model)
    best = _best_ms(runs)
    fuse_ratio = best["bnfold"] / best["fuse"] if "fuse" in best else None
    fuse_ms, ratio = (f"{best['fuse']:.1f}", f"{fuse_ratio:.2f}") if fuse_ratio is not None else ("fails", "-")
    reference = best["bnfold"] + best["original forward"] + best["folded forward"]
    print(
        f"{name:<24} {batchnorm_modules(model):>4} {fuse_folds(model):>12} {len(report.folds):>14} "
        f"{fuse_ms:>8} {best['bnfold']:>10.1f} {ratio:>12} {best['verified']:>12.1f} {reference:>12.1f} "
        f"{best['verified'] / reference:>20.2f}"
    )
    return fuse_ratio, best["verified"] / reference


def _forward(model: torch.nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        model(*inputs)


if __name__ == "__main__":
    main()
