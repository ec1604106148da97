"""Where ``bnfold.fold(..., verify=False)`` spends its time against torch.fx's ``fuse``, phase by phase, at ImageNet
size (issue 16): what each front-end does alike (the fx trace, the model's copy, the fold's arithmetic) and what only
bnfold does (the trace check, its proof that the fx graph computes what the model computes; the float64 fold,
rounded once, where fuse multiplies in float32).

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/torch_phases.py [resnet50] [mobilenet_v2]``.
CPU time on one thread, least of the rounds, each phase timed on its own (so the phases need not add up to the
whole); fuse and bnfold take turns within each round.

Phases:

- ``fx trace``: bnfold's tracer alone (fx's symbolic trace, which fuse runs too).
- ``trace check``: ``trace_model`` with stand-ins (the trace and its proof run), less the trace.
- ``copy``: bnfold's copy of the model (fuse deep-copies it too).
- ``plan``: reading the data flow and deciding every fold, including the float64 fold of each weight.
- ``float64 fold``: within the plan, the weights' fold (:func:`bnfold.fold_math.fold_into_outputs`), against
  ``float32 fold``: the same products in float32, as fuse computes them.
"""

from __future__ import annotations

import argparse

import torch
from torch.fx.experimental.optimization import fuse
from torch_fold_counts import best_ms  # (this folder: the script's own, first on the path)

from bnfold.architectures import example_image, realistic_model
from bnfold.fold_math import WeightLayout, batchnorm_affine, fold_into_outputs
from bnfold.torch_fold import _copy_model, fold
from bnfold.torch_fold.calls import read_data_flow
from bnfold.torch_fold.planning import plan_folds
from bnfold.torch_fold.tracing import _UnmodifiedLayersAsLeavesTracer, trace_model

_ROUNDS = 5


def _conv_batchnorm_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Each Conv2d followed by a BatchNorm2d among a module's children, in order (the pairs fuse folds here)."""
    pairs = []
    for module in model.modules():
        children = list(module.children())
        pairs += [
            (first, second)
            for first, second in zip(children, children[1:])
            if isinstance(first, torch.nn.Conv2d) and isinstance(second, torch.nn.BatchNorm2d)
        ]
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["resnet50", "mobilenet_v2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    columns = ("fuse", "bnfold", "fx trace", "trace check", "copy", "plan", "float64 fold", "float32 fold")
    print(f"{'model':<14} " + " ".join(f"{column:>12}" for column in columns) + "  (ms)")
    for name in args.names:
        least = _measure(name)
        least["trace check"] = least.pop("trace and check") - least["fx trace"]
        print(f"{name:<14} " + " ".join(f"{least[column]:>12.1f}" for column in columns), flush=True)


def _measure(name: str) -> dict[str, float]:
    """Each phase's least CPU time in ms on the ImageNet-size ``name``."""
    model, inputs = realistic_model(name), (example_image(name),)
    traced = trace_model(model, inputs, stand_ins=True)
    pairs = _conv_batchnorm_pairs(model)
    arrays = [
        (conv.weight.detach().numpy(), None, batchnorm_affine(*(t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)), bn.eps), WeightLayout("conv", conv.groups))
        for conv, bn in pairs
    ]  # fmt: skip
    floats = [(conv.weight.detach(), (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)) for conv, bn in pairs]
    return best_ms(
        {
            "fuse": lambda: fuse(model),
            "bnfold": lambda: fold(model, inputs, verify=False),
            "fx trace": lambda: _UnmodifiedLayersAsLeavesTracer().trace(model),
            "trace and check": lambda: trace_model(model, inputs, stand_ins=True),
            "copy": lambda: _copy_model(model),
            "plan": lambda: plan_folds(read_data_flow(traced), model),
            "float64 fold": lambda: [fold_into_outputs(*each) for each in arrays],
            "float32 fold": lambda: [weight * scale for weight, scale in floats],
        },
        _ROUNDS,
    )


if __name__ == "__main__":
    main()
