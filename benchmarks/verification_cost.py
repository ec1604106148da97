"""What verification and the quantization measurement cost on ResNet-50 (ONNX, float32, 1x3x224x224),
against the fold itself.

Each phase runs in a child process of its own, so its peak resident memory is its own: loading the model
alone (the baseline), the fold without verification, the fold with verification (end-to-end outputs and
the per-fold checks), and the fold without verification measuring each fold (``quantization=True``: int8
figures; ``target_dtype="float16"``: those and the float16 figures). Prints one markdown table: wall time
(median of ``--repeats`` runs in each child) and peak RSS, and what verification and each measurement add.
It also prints the per-fold checks' figures: the worst correct fold in rounding units (layer output and
parameters), against the allowed units.

Run: .venv/bin/python benchmarks/verification_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each phase's fold_onnx options; "load" only loads.
PHASES = {
    "load": None,
    "fold": {"verify": False},
    "fold+verify": {"verify": True},
    "fold+quantization": {"verify": False, "quantization": True},
    "fold+float16": {"verify": False, "target_dtype": "float16"},
}
# What each phase adds to the fold.
ADDED = {"fold+verify": "verification", "fold+quantization": "quantization measurement", "fold+float16": "float16 measurement"}


def child(path: str, phase: str, repeats: int) -> None:
    import onnx

    from bnfold.onnx_fold import fold_onnx

    times, worst, parameters = [], None, None
    for _ in range(repeats):
        started = time.perf_counter()
        model = onnx.load(path)
        if PHASES[phase] is not None:
            _, report = fold_onnx(model, **PHASES[phase])
            if report.verification is not None:
                worst = max(check.units for check in report.verification.folds if check.units is not None)
                parameters = max(check.parameters.units for check in report.verification.folds if check.parameters)
        times.append(time.perf_counter() - started)
    peak = _peak_mib()
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak, "worst_units": worst, "worst_parameter_units": parameters}))


def _peak_mib() -> float:
    """This process's peak resident memory. ru_maxrss would do, but a child started by fork and exec keeps
    its parent's peak at the fork (the parent here has exported the model with torch): VmHWM is the
    process's own since the exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.repeats)
        return
    import torch

    from bnfold import architectures
    from bnfold.testing import export_onnx
    from bnfold.verification import LOCAL_UNITS, PARAMETER_UNITS

    with tempfile.TemporaryDirectory() as scratch:
        path = str(Path(scratch) / "resnet50.onnx")
        export_onnx(architectures.realistic_model("resnet50"), torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)), path)
        results = {}
        for phase in PHASES:
            command = [sys.executable, __file__, "--child", path, phase, "--repeats", str(args.repeats)]
            results[phase] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print("| ResNet-50 ONNX, 224x224 | time (s) | peak RSS (MiB) |")
    print("|---|---|---|")
    for phase in PHASES:
        print(f"| {phase} | {results[phase]['seconds']:.2f} | {results[phase]['peak_mib']:.0f} |")
    fold = results["fold"]
    fold_itself = fold["seconds"] - results["load"]["seconds"]
    for phase, what in ADDED.items():
        more = results[phase]
        added = more["seconds"] - fold["seconds"]
        print(f"| {what} adds | {added:.2f} ({added / fold_itself:.1f}x the fold's own {fold_itself:.2f}) | {more['peak_mib'] - fold['peak_mib']:.0f} |")
    verified = results["fold+verify"]
    print(
        f"\nworst correct fold: {verified['worst_units']:.3g} rounding units in the layer's output (float32 allows "
        f"{LOCAL_UNITS['float32']:g}), {verified['worst_parameter_units']:.3g} in its parameters (allows {PARAMETER_UNITS['float32']:g})"
    )


if __name__ == "__main__":
    main()
