"""Fold a model past the 2 GiB protobuf limit end to end through the CLI, and print time and peak memory.

Builds (once, cached in benchmarks/.cache/large/) a chain of 1x1 Conv→BatchNorm pairs whose weights total
``--gib`` GiB, saved with external data; then runs ``bnfold MODEL -o OUT`` in a child process and reports
wall time and the child's peak resident memory, next to the model's size.

Run: .venv/bin/python benchmarks/large_model.py [--gib 2.2] [--no-verify]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CACHE = Path(__file__).parent / ".cache" / "large"
CHANNELS = 4096  # one 1x1 conv weight: 4096 * 4096 float32 = 64 MiB


def build(path: Path, gib: float) -> None:
    pairs = int(np.ceil(gib * 2**30 / (CHANNELS * CHANNELS * 4)))
    rng = np.random.default_rng(0)
    nodes, initializers, current = [], [], "input"
    for index in range(pairs):
        weight = (rng.standard_normal((CHANNELS, CHANNELS, 1, 1), dtype=np.float32) / np.sqrt(CHANNELS)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{index}"))
        stats = {
            "scale": rng.uniform(0.8, 1.2, CHANNELS), "bias": rng.normal(0, 0.1, CHANNELS),
            "mean": rng.normal(0, 0.1, CHANNELS), "var": rng.uniform(0.8, 1.2, CHANNELS),
        }  # fmt: skip
        initializers.extend(numpy_helper.from_array(v.astype(np.float32), f"bn{index}_{k}") for k, v in stats.items())
        nodes.append(helper.make_node("Conv", [current, f"w{index}"], [f"c{index}"], name=f"conv{index}"))
        current = "output" if index == pairs - 1 else f"b{index}"
        nodes.append(helper.make_node("BatchNormalization", [f"c{index}", *(f"bn{index}_{k}" for k in stats)], [current], name=f"bn{index}"))
    graph = helper.make_graph(
        nodes,
        "large_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, CHANNELS, 1, 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, CHANNELS, 1, 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.2)
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    model = CACHE / f"chain_{args.gib:g}gib.onnx"
    if not model.exists():
        build(model, args.gib)
    size = sum(p.stat().st_size for p in CACHE.glob(model.name + "*"))
    output = CACHE / "folded.onnx"
    command = [str(Path(sys.executable).with_name("bnfold")), str(model), "-o", str(output)]
    command += ["--no-verify"] if args.no_verify else []
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(completed.stdout.strip().splitlines()[1] if completed.returncode == 0 else completed.stderr)
    print("| model size | verify | exit | wall time | peak RSS | peak / size |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {size / 2**30:.2f} GiB | {'no' if args.no_verify else 'yes'} | {completed.returncode} | "
        f"{elapsed:.1f} s | {peak / 2**30:.2f} GiB | {peak / size:.2f} |"
    )


if __name__ == "__main__":
    main()
