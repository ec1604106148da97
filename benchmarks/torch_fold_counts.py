"""How many BatchNorms torch.fx.experimental.optimization.fuse folds versus bnfold, per test architecture,
and how long each takes (bnfold with ``verify=False``; best of 15 runs, and bnfold's time over fuse's).

With verification, bnfold's time is set against what verification cannot avoid: the fold with
``verify=False`` plus one forward pass of the original model and one of the folded model on the example
inputs (each timed on its own under ``torch.no_grad``, best of the same rounds); ``verified/(fold+fwd)`` is
bnfold's verified time over that sum. Verification also checks each fold it can on its own, running the folded
layer twice more on the original's input to it (its output, and the rounding scale of each element): ``+checks``
adds those layer runs (timed alone, on the inputs the original's layers received), and
``verified/(fold+fwd+checks)`` is what is left for the comparisons and the bookkeeping.

``--realistic`` measures the ImageNet-size architectures of ``bnfold.architectures`` instead (ResNet-50,
MobileNetV2, one 224x224 image), the ones the command line's benchmarks export, 3 rounds each: where a forward
pass costs more than tracing, bnfold's proof that the fx graph computes what the model computes (one run of the
model and the graph, with stand-ins for the large layers when nothing of it is kept: fuse makes no such run)
shows.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/torch_fold_counts.py [NAME ...] [--runs N] [--realistic]``
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

from bnfold.architectures import example_image, realistic_model  # noqa: E402
from bnfold.torch_fold import fold  # noqa: E402

_ROUNDS = 15
_REALISTIC_ROUNDS = 3
_REALISTIC = ("resnet50", "mobilenet_v2")


def best_ms(runs: dict[str, object], rounds: int) -> dict[str, float]:
    """Best time of each run over the rounds, the runs taking turns within each round."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.process_time()
            run()
            best[name] = min(best[name], (time.process_time() - start) * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures to measure, by the start of their name (default: all)")
    parser.add_argument("--runs", type=int, default=1, help="measure everything this many times, then give each ratio's range")
    parser.add_argument("--realistic", action="store_true", help="ImageNet-size ResNet-50 and MobileNetV2 instead of the test architectures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.realistic:
        names = [name for name in _REALISTIC if not args.names or any(name.startswith(start) for start in args.names)]
        prepared = [(name, realistic_model(name), (example_image(name),)) for name in names]
    else:
        cases = [case for case in CASES if not args.names or any(case.name.startswith(name) for name in args.names)]
        prepared = [(case.name, *trained_eval_model(case)) for case in cases]
    rounds = _REALISTIC_ROUNDS if args.realistic else _ROUNDS
    ratios: dict[str, list[tuple[float | None, float, float]]] = {name: [] for name, _, _ in prepared}
    for run in range(args.runs):
        if args.runs > 1:
            print(f"run {run + 1} of {args.runs}")
        print(
            f"{'model':<24} {'BNs':>4} {'fuse folded':>12} {'bnfold folded':>14} {'fuse ms':>8} {'bnfold ms':>10} "
            f"{'bnfold/fuse':>12} {'verified ms':>12} {'fold+fwd ms':>12} {'verified/(fold+fwd)':>20} {'+checks ms':>11} "
            f"{'verified/(fold+fwd+checks)':>27}"
        )
        for name, model, inputs in prepared:
            ratios[name].append(_measure(name, model, inputs, rounds))
    if args.runs > 1:
        print(f"\nranges over the {args.runs} runs")
        print(f"{'model':<24} {'bnfold/fuse':>12} {'verified/(fold+fwd)':>20} {'verified/(fold+fwd+checks)':>27}")
        for name, measured in ratios.items():
            fuse_range, verified_range, checked_range = (_range([run[i] for run in measured]) for i in range(3))
            print(f"{name:<24} {fuse_range:>12} {verified_range:>20} {checked_range:>27}")


def _range(values: list[float | None]) -> str:
    known = [value for value in values if value is not None]
    return f"{min(known):.2f}-{max(known):.2f}" if known else "-"


def _measure(name: str, model: torch.nn.Module, inputs: tuple, rounds: int) -> tuple[float | None, float, float]:
    """One row of the table, printed; its bnfold/fuse (None when fuse cannot run), verified/(fold+fwd) and
    verified/(fold+fwd+checks)."""
    folded, report = fold(model, inputs)
    runs = {
        "bnfold": lambda: fold(model, inputs, verify=False),
        "verified": lambda: fold(model, inputs),
        "original forward": lambda: _forward(model, inputs),
        "folded forward": lambda: _forward(folded, inputs),
        "checks": _check_passes(model, folded, report, inputs),
    }
    # fuse traces with torch.fx first: a model fx cannot trace, it cannot fuse (it raises).
    if fx_traceable(model):
        runs["fuse"] = lambda: fuse(model)
    best = best_ms(runs, rounds)
    fuse_ratio = best["bnfold"] / best["fuse"] if "fuse" in best else None
    fuse_ms, ratio = (f"{best['fuse']:.1f}", f"{fuse_ratio:.2f}") if fuse_ratio is not None else ("fails", "-")
    reference = best["bnfold"] + best["original forward"] + best["folded forward"]
    checked_reference = reference + best["checks"]
    print(
        f"{name:<24} {batchnorm_modules(model):>4} {fuse_folds(model):>12} {len(report.folds):>14} "
        f"{fuse_ms:>8} {best['bnfold']:>10.1f} {ratio:>12} {best['verified']:>12.1f} {reference:>12.1f} "
        f"{best['verified'] / reference:>20.2f} {best['checks']:>11.1f} {best['verified'] / checked_reference:>27.2f}"
    )
    return fuse_ratio, best["verified"] / reference, best["verified"] / checked_reference


def _forward(model: torch.nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        model(*inputs)


def _check_passes(model: torch.nn.Module, folded: torch.nn.Module, report, inputs: tuple):
    """The layer runs of verification's checks of single folds, as a run to time: each checked fold's folded
    layer twice on the input the original's layer received on the example inputs."""
    checked = [fold.layer for fold, check in zip(report.folds, report.verification.folds) if check.status != "not compared"]
    received: dict[str, torch.Tensor] = {}

    def receiver(path: str):
        def receive(module, args, output) -> None:  # (a forward hook that returns a value replaces the output)
            received.setdefault(path, args[0].clone())

        return receive

    hooks = [model.get_submodule(path).register_forward_hook(receiver(path)) for path in checked]
    _forward(model, inputs)
    for hook in hooks:
        hook.remove()
    layers = [(folded.get_submodule(path), received[path]) for path in checked if path in received]

    def run() -> None:
        with torch.no_grad():
            for layer, data in layers:
                layer(data)
                layer(data)

    return run


if __name__ == "__main__":
    main()
