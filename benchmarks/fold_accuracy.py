"""How exact each tool's fold is, apart from the runtime's float32 arithmetic.

    .venv/bin/python benchmarks/fold_accuracy.py [--pairs 50] [--seeds 20]

compare_folders.py's error column runs the folded and the original model in onnxruntime in float32, so
it mixes the fold's rounding with the runtime's rounding of every activation, and on one input and one
set of weights a few units in the last place go either way. This script isolates the fold, on seeded
Conv→BN chains (``bnfold.testing.conv_bn_chain``):

- *weight error*: each folded Conv weight and bias (as the runtime gets it) against the exact fold (float64 arithmetic on the
  model's float32 parameters), in units in the last place (ulp) of float32; max and mean.
- *network error*: the folded chain evaluated in float64 (so only the folded parameters' rounding
  counts) against the original chain evaluated in float64, max abs over the output; the median over the
  seeds, and on how many seeds each peer is closer than bnfold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_folders import FOLDERS, TOOL_LABELS, markdown_table  # noqa: E402

from bnfold.testing import conv_bn_chain  # noqa: E402

TOOLS = ["bnfold.fold_onnx", "onnxoptimizer", "onnxscript", "onnxslim", "onnxruntime"]


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor).astype(np.float64) for tensor in model.graph.initializer}


def exact_fold(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each Conv→BN pair's folded (weight, bias) in float64, from the float32 parameters."""
    values = _initializers(model)
    nodes = list(model.graph.node)
    folded = []
    for conv, batchnorm in zip(nodes[::2], nodes[1::2], strict=True):
        gamma, beta, mean, var = (values[name] for name in batchnorm.input[1:])
        scale = gamma / np.sqrt(var + 1e-5)
        folded.append((values[conv.input[1]][:, :, 0, 0] * scale[:, None], beta - mean * scale))
    return folded


def tool_fold(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (weight, bias) of each Conv of a folded chain, in order. A weight that is computed in the graph
    (onnxoptimizer emits the fold as float32 Mul/Div/Sqrt nodes run with the model) is evaluated with
    onnx's reference evaluator, in the model's float32."""
    values = _initializers(model)
    computed = [name for node in model.graph.node if node.op_type == "Conv" for name in node.input[1:] if name and name not in values]
    if computed:
        from onnx.reference import ReferenceEvaluator

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in computed)
        feeds = {value.name: np.zeros([d.dim_value or 1 for d in value.type.tensor_type.shape.dim], np.float32) for value in probe.graph.input}
        results = ReferenceEvaluator(probe).run(None, feeds)
        values.update((name, np.asarray(result, np.float64)) for name, result in zip(computed, results, strict=True))
    layers = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight = values[node.input[1]][:, :, 0, 0]
            bias = values[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[0])
            layers.append((weight, bias))
    return layers


def run_float64(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    y = x.astype(np.float64)
    for weight, bias in layers:
        y = np.einsum("oc,nchw->nohw", weight, y) + bias[None, :, None, None]
    return y


def ulp_errors(ours: list, exact: list) -> np.ndarray:
    errors = []
    for (weight, bias), (exact_weight, exact_bias) in zip(ours, exact, strict=True):
        for value, truth in ((weight, exact_weight), (bias, exact_bias)):
            ulp = np.spacing(np.abs(truth).astype(np.float32)).astype(np.float64)
            errors.append((np.abs(value - truth) / ulp).ravel())
    return np.concatenate(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    ulps = {tool: [] for tool in TOOLS}
    network = {tool: [] for tool in TOOLS}
    failures = {}
    for seed in range(args.seeds):
        model = conv_bn_chain(args.pairs, seed=seed)
        exact = exact_fold(model)
        x = np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)
        truth = run_float64(exact, x)
        for tool in TOOLS:
            if tool in failures:
                continue
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            try:
                layers = tool_fold(FOLDERS[tool](copy))
                ulps[tool].append(ulp_errors(layers, exact))
            except Exception as error:  # a tool that cannot fold these chains gets a note, not a stop
                failures[tool] = f"{type(error).__name__}: {str(error)[:80]}"
                continue
            network[tool].append(float(np.max(np.abs(run_float64(layers, x) - truth))))
    ours = np.array(network[TOOLS[0]])
    rows = []
    for tool in TOOLS:
        if tool in failures:
            rows.append([TOOL_LABELS[tool], failures[tool], "", "", "", ""])
            continue
        errors = np.concatenate(ulps[tool])
        closer = "—" if tool == TOOLS[0] else f"{int(np.sum(np.array(network[tool]) < ours))} of {len(ours)}"
        rows.append([TOOL_LABELS[tool], f"{errors.max():.2f}", f"{errors.mean():.3f}",
                     f"{np.mean(errors > 0.5):.1%}", f"{np.median(network[tool]):.2e}", closer])  # fmt: skip
    headers = ["tool", "weight error, max ulp", "mean ulp", "share > 0.5 ulp", "network error (median)",
               "seeds where closer than bnfold"]  # fmt: skip
    print(f"Fold accuracy on {args.seeds} seeded chains of {args.pairs} Conv→BN pairs (4 channels)\n")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
