"""Scale and speed: bnfold against the field's BatchNorm folders, on the same models in one run.

    .venv/bin/python benchmarks/compare_folders.py [--quick] [--models a,b] [--repeats N]

Prints three markdown tables on stdout (progress goes to stderr):

1. **Folding.** For each model and tool: BatchNorm nodes before and folded, fold time (median of the
   timed runs, in memory from a loaded ``onnx.ModelProto`` to a ``ModelProto``), peak extra memory
   during the fold, and the folded model's max abs error against the original (onnxruntime with graph
   optimisations off, the same seeded inputs). Every (model, tool) runs in a fresh subprocess with a
   per-run timeout; a crash or timeout fills the cell instead of ending the run. A reference row per
   model times ``onnx.load`` + ``onnx.save`` of the model file. bnfold has two rows: the bare
   ``FoldBatchNormPass`` on onnx_ir (conversion included) and the public ``fold_onnx(verify=False)``, which
   folds a model of plain Conv/Gemm→BN pairs on the protobuf (``bnfold.onnx_fold.fast_path``) and runs the pass
   (with shape inference when there is a MatMul) otherwise.
2. **Inference gain.** onnxruntime latency of the original and the bnfold-folded model with the
   runtime's optimisations off and at ORT_ENABLE_ALL, and PyTorch eager latency of the original module
   and ``bnfold.fold(model, example_inputs).model``.
3. **Scaling.** bnfold's fold time per Conv→BN pair (the pass alone, and ``fold_onnx``) on chains of 500,
   2000 and 8000 pairs, and the ratio of the slowest to the fastest per-pair time.

See benchmarks/README.md for the method and a full run's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import os
import platform
import queue
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import psutil

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MODELS_DIR = CACHE / "models-v1"  # bump the version when an architecture or the statistics change
RUN_TIMEOUT_S = 120.0  # per tool run (each timed repetition, and start-up + first run)
TIMED_BUDGET_S = {"full": 60.0, "quick": 15.0}  # stop repeating once one (model, tool)'s runs took this long
CHAIN_SIZES = (500, 2000, 8000)
QUICK_ARCHITECTURE = "mobilenet_v2"
PROTOCOL_PREFIX = "@@bench "  # marks the worker's result lines among whatever the tools print


# ---------------------------------------------------------------------------------------------------------
# Tool adapters: one per tool, each ModelProto -> ModelProto (imports are lazy so a worker loads only its own)


def fold_bnfold(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir

    from bnfold.onnx_fold import FoldBatchNormPass

    working = ir.from_proto(model)
    FoldBatchNormPass()(working)
    return ir.to_proto(working)


def fold_bnfold_api(model: onnx.ModelProto) -> onnx.ModelProto:
    """The public entry point without verification: adds shape inference (for MatMul folds) and a report.
    With ``freeze_initializer_inputs``, which changes only models that declare initializers graph inputs
    (IR version < 4): the other tools all fold those initializers as constants."""
    from bnfold import fold_onnx

    return fold_onnx(model, verify=False, freeze_initializer_inputs=True)[0]


def fold_onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def fold_onnxscript(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
    return rewriter.rewrite(model, pattern_rewrite_rules=rules)


def fold_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def fold_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """Basic graph optimisations (constant folding, Conv+BN fusion, ...), written out and read back."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="bench-ort-") as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(scratch, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


FOLDERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "bnfold": fold_bnfold,
    "bnfold.fold_onnx": fold_bnfold_api,
    "onnxoptimizer": fold_onnxoptimizer,
    "onnxscript": fold_onnxscript,
    "onnxslim": fold_onnxslim,
    "onnxruntime": fold_onnxruntime,
}
REFERENCE = "onnx.load + onnx.save"
TOOL_LABELS = {
    "bnfold": "bnfold (FoldBatchNormPass)",
    "bnfold.fold_onnx": "bnfold.fold_onnx(verify=False)",
    "onnxoptimizer": "onnxoptimizer fuse_bn_into_conv",
    "onnxscript": "onnxscript rewriter BN rules",
    "onnxslim": "onnxslim.slim",
    "onnxruntime": "onnxruntime ORT_ENABLE_BASIC",
    REFERENCE: f"*reference: {REFERENCE}*",
}


def tiny_model() -> onnx.ModelProto:
    """One Conv→BN pair: a warm-up so imports and first-call set-up stay out of the measurements."""
    from onnx import TensorProto, helper, numpy_helper

    parameters = {"w": np.ones((2, 2, 1, 1)), "scale": [1.5, 0.5], "bias": [0.1, 0.2], "mean": [0.3, 0.4], "var": [1.2, 0.8]}
    initializers = [numpy_helper.from_array(np.asarray(value, np.float32), name) for name, value in parameters.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn"),
    ]
    value_info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 4, 4]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "tiny", value_info[:1], value_info[1:], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# ---------------------------------------------------------------------------------------------------------
# Benchmark models, exported once and cached


@dataclasses.dataclass(frozen=True)
class BenchModel:
    name: str
    write_onnx: Callable[[Path], None]
    torch_model: Callable[[], tuple] | None = None  # () -> (eval-mode module, batch-1 example input)

    @property
    def path(self) -> Path:
        return MODELS_DIR / f"{self.name}.onnx"

    def ensure_exported(self) -> Path:
        if not self.path.exists():
            MODELS_DIR.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_suffix(".tmp.onnx")
            self.write_onnx(staging)
            staging.replace(self.path)
        return self.path


def _fixture(name: str) -> BenchModel:
    def torch_model():
        from bnfold.testing import example_input, trained_fixture

        return trained_fixture(name), example_input(name, batch=1)

    def write_onnx(path: Path) -> None:
        from bnfold.testing import example_input, export_onnx, trained_fixture

        export_onnx(trained_fixture(name), example_input(name), path)

    return BenchModel(name, write_onnx, torch_model)


def _architecture(name: str) -> BenchModel:
    def torch_model():
        from bnfold.architectures import example_image, realistic_model

        return realistic_model(name), example_image(name)

    def write_onnx(path: Path) -> None:
        from bnfold.testing import export_onnx

        model, example = torch_model()
        export_onnx(model, example, path)

    return BenchModel(name, write_onnx, torch_model)


def _chain(pairs: int) -> BenchModel:
    def write_onnx(path: Path) -> None:
        from bnfold.testing import conv_bn_chain

        onnx.save(conv_bn_chain(pairs), path)

    return BenchModel(f"chain{pairs}", write_onnx)


def _light(name: str) -> BenchModel:
    """A light model-zoo network from the onnx package's test data: IR version 3 (initializers are graph
    inputs), weights built by ConstantOfShape subgraphs."""

    def write_onnx(path: Path) -> None:
        import shutil

        shutil.copyfile(Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{name}.onnx", path)

    return BenchModel(name, write_onnx)


def _resnet50_form(name: str, transform: str | None, opset: int = 17) -> BenchModel:
    """ResNet-50 (published size) in a form other toolchains leave: ``transform`` names a function of
    :mod:`bnfold.zoo_forms` applied to the export; opset 8 exports IR version 3, initializers as inputs."""

    def write_onnx(path: Path) -> None:
        from bnfold import zoo_forms
        from bnfold.architectures import example_image, realistic_model
        from bnfold.testing import export_onnx

        export_onnx(realistic_model("resnet50"), example_image("resnet50"), path, opset=opset)
        if transform is not None:
            onnx.save(getattr(zoo_forms, transform)(onnx.load(path)), path)

    return BenchModel(name, write_onnx)


def _levit_style() -> BenchModel:
    def torch_model():
        import torch

        from bnfold.zoo_forms import LEVIT_INPUT_SHAPE, levit_style_model

        return levit_style_model(), torch.randn(1, *LEVIT_INPUT_SHAPE, generator=torch.Generator().manual_seed(1))

    def write_onnx(path: Path) -> None:
        from bnfold.testing import export_onnx

        export_onnx(*torch_model(), path)

    return BenchModel("levit_style", write_onnx, torch_model)


# Issue 15's forms: IR version < 4 and constant-subgraph weights (the light models), Identity between layer
# and BN, LeViT's MatMul -> Flatten -> BN, weight-only QDQ.
ZOO_FORMS = (
    *(_light(f"light_{name}") for name in ("resnet50", "densenet121", "inception_v2", "shufflenet")),
    _resnet50_form("resnet50_ir3", None, opset=8),
    _resnet50_form("resnet50_identity", "with_identities"),
    _levit_style(),
    _resnet50_form("resnet50_qdq", "quantize_weights"),
)


def catalogue() -> dict[str, BenchModel]:
    from bnfold.architectures import ARCHITECTURES
    from bnfold.testing import FIXTURES

    models = [*map(_fixture, FIXTURES), *map(_architecture, ARCHITECTURES), *map(_chain, CHAIN_SIZES), *ZOO_FORMS]
    return {model.name: model for model in models}


def chain_size(name: str) -> int | None:
    match = re.fullmatch(r"chain(\d+)", name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------------
# Worker: one (model, tool) in a fresh process; prints one protocol line per event


class PeakMemory:
    """Peak resident memory since :meth:`reset`: Linux's VmHWM, reset through /proc/self/clear_refs.
    Where that cannot be reset, falls back to ru_maxrss growth (a lower bound: an earlier peak hides)."""

    def __init__(self) -> None:
        self.resettable = self._try_reset()
        self.baseline = 0

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as status:
            return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        gc.collect()
        if self.resettable:
            self._try_reset()
            self.baseline = psutil.Process().memory_info().rss // 1024
        else:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def extra_bytes(self) -> int:
        peak = self._status_kib("VmHWM") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.baseline) * 1024


def emit(**event) -> None:
    print(PROTOCOL_PREFIX + json.dumps(event), flush=True)


def _reference_run(model_path: Path, scratch: Path) -> Callable[[], Callable[[], None]]:
    def prepare():
        return lambda: onnx.save(onnx.load(model_path), scratch / "copy.onnx")

    return prepare


def _fold_run(tool: str, model_path: Path) -> Callable[[], Callable[[], onnx.ModelProto]]:
    adapter = FOLDERS[tool]
    adapter(tiny_model())
    original = onnx.load(model_path)

    def prepare():
        copy = onnx.ModelProto()
        copy.CopyFrom(original)  # some tools change their input; each run gets its own, outside the timing
        return lambda: adapter(copy)

    return prepare


def worker(tool: str, model_path: Path, output_path: Path, repeats: int, budget_s: float) -> None:
    """Up to ``repeats`` timed runs, fewer once they have taken ``budget_s``. The first also gives the
    peak memory and the folded model, which is saved for the error and latency measurements."""
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as scratch:
        prepare = _reference_run(model_path, Path(scratch)) if tool == REFERENCE else _fold_run(tool, model_path)
        memory = PeakMemory()
        spent = 0.0
        for index in range(repeats):
            run = prepare()
            memory.reset()  # also collects garbage, outside the timing
            start = time.perf_counter()
            try:
                folded = run()
            except BaseException as error:  # RecursionError, MemoryError, the tools' own: a cell, not a stop
                emit(event="crash", type=type(error).__name__, message=str(error)[:300])
                return
            elapsed = time.perf_counter() - start
            if index == 0:
                emit(event="memory", extra_bytes=memory.extra_bytes())
                if folded is not None:
                    onnx.save(folded, output_path)
            del folded
            emit(event="time", seconds=elapsed)
            spent += elapsed
            if spent > budget_s:
                break
    emit(event="done")


# ---------------------------------------------------------------------------------------------------------
# Driver side of the worker


@dataclasses.dataclass
class ToolRun:
    times: list[float] = dataclasses.field(default_factory=list)
    extra_bytes: int | None = None
    failure: str | None = None  # "crash: RecursionError", "timeout (>120 s)", ...
    output: Path | None = None


def _stream_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"crash: {signal.Signals(-returncode).name}"
        except ValueError:
            return f"crash: signal {-returncode}"
    return f"crash: exit status {returncode}"


def _record(result: ToolRun, event: dict) -> bool:
    """Fold one worker event into ``result``; False once the worker is finished."""
    kind = event["event"]
    if kind == "crash":
        result.failure = f"crash: {event['type']}"
    elif kind == "memory":
        result.extra_bytes = event["extra_bytes"]
    elif kind == "time":
        result.times.append(event["seconds"])
    return kind not in ("done", "crash")


def _collect(process: subprocess.Popen, result: ToolRun) -> None:
    """Read the worker's events until it is done, crashes, or is silent for RUN_TIMEOUT_S."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_stream_lines, args=(process.stdout, lines), daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=RUN_TIMEOUT_S)
        except queue.Empty:
            process.kill()
            if not result.times:  # a later repetition that hangs leaves the finished runs standing
                result.failure = f"timeout (>{RUN_TIMEOUT_S:.0f} s)"
            return
        if line is None:  # the worker exited without saying it was done
            result.failure = _exit_description(process.wait())
            return
        if line.startswith(PROTOCOL_PREFIX) and not _record(result, json.loads(line[len(PROTOCOL_PREFIX):])):
            return  # (other lines are the tools' own printing)


def run_tool(tool: str, model: BenchModel, repeats: int, budget_s: float) -> ToolRun:
    """Run one (model, tool) in a fresh subprocess of this script; its stderr goes to .cache/logs/."""
    stem = f"{model.name}.{tool.split()[0]}"
    output, log_path = CACHE / "folded" / f"{stem}.onnx", CACHE / "logs" / f"{stem}.log"
    for directory in (output.parent, log_path.parent):
        directory.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    worker_args = [tool, str(model.path), str(output), str(repeats), str(budget_s)]
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *worker_args]
    result = ToolRun()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=HERE.parent)
        _collect(process, result)
        process.wait()
    result.output = output if output.exists() else None
    return result


# ---------------------------------------------------------------------------------------------------------
# Measurements in the driver


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        yield from attribute.graphs


def batchnorm_count(graph: onnx.GraphProto) -> int:
    """BatchNormalization nodes in ``graph`` and every subgraph."""
    return sum((node.op_type == "BatchNormalization") + sum(map(batchnorm_count, _subgraphs(node))) for node in graph.node)


def node_count(graph: onnx.GraphProto) -> int:
    """Nodes in ``graph`` and every subgraph."""
    return sum(1 + sum(map(node_count, _subgraphs(node))) for node in graph.node)


def seeded_feeds(path: Path) -> dict[str, np.ndarray]:
    import onnx_ir as ir

    from bnfold.onnx_fold.verify import random_inputs

    return random_inputs(ir.load(path), seed=0)


def max_abs_error(expected: dict[str, np.ndarray], folded_path: Path, feeds: dict[str, np.ndarray]) -> float:
    from bnfold.onnx_fold.verify import run_model  # onnxruntime with graph optimisations off

    actual = run_model(folded_path, feeds)
    return max(float(np.max(np.abs(actual[name].astype(np.float64) - value))) for name, value in expected.items())


def median_latencies_ms(runners: dict[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time per call, with the runners interleaved round by round so drift hits them alike."""
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner()
            samples[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in samples.items()}


def ort_runner(path: Path, feeds: dict[str, np.ndarray], level) -> Callable[[], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def torch_runner(module, example) -> Callable[[], object]:
    import torch

    def run():
        with torch.inference_mode():
            return module(example)

    return run


def bnfold_torch_fold():
    """``bnfold.torch_fold.fold`` when the PyTorch front-end imports, else the reason it does not."""
    try:
        from bnfold.torch_fold import fold
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    return fold, None


# ---------------------------------------------------------------------------------------------------------
# Formatting


def markdown_table(headers: list[str], rows: Iterable[list[str]], text_columns: int = 1) -> str:
    """Left-aligned text columns first, then right-aligned figures."""
    alignment = ["---" if index < text_columns else "---:" for index in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(alignment) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def fmt_mib(size: int | None) -> str:
    return "—" if size is None else f"{size / 2**20:.1f}"


def fmt_error(error: float | str | None) -> str:
    if error is None or isinstance(error, str):
        return error or "—"
    return "0" if error == 0 else f"{error:.1e}"


def fmt_ratio(before: float | None, after: float | None) -> str:
    return "—" if not before or not after else f"{before / after:.2f}x"


def median_ms(times: list[float]) -> float | None:
    return 1000 * statistics.median(times) if times else None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The three tables


@dataclasses.dataclass
class FoldRow:
    model: str
    tool: str
    before: int
    run: ToolRun
    after: int | None = None
    nodes: int | None = None  # in the tool's output (the original's on the reference row)
    error: float | str | None = None

    def cells(self, repeats: int) -> list[str]:
        head, memory = [self.model, TOOL_LABELS[self.tool]], fmt_mib(self.run.extra_bytes)
        time_cell = fmt_ms(median_ms(self.run.times))
        if self.run.times and len(self.run.times) < repeats:
            time_cell += f" (n={len(self.run.times)})"
        nodes = "—" if self.nodes is None else str(self.nodes)
        if self.run.failure:
            return [*head, str(self.before), "—", "—", self.run.failure, memory, "—"]
        if self.tool == REFERENCE:
            return [*head, "", "", nodes, time_cell, memory, ""]
        folded = "—" if self.after is None else str(self.before - self.after)
        return [*head, str(self.before), folded, nodes, time_cell, memory, fmt_error(self.error)]


def fold_rows(model: BenchModel, repeats: int, budget_s: float) -> list[FoldRow]:
    original = onnx.load(model.path, load_external_data=False).graph
    before = batchnorm_count(original)
    feeds = seeded_feeds(model.path)
    from bnfold.onnx_fold.verify import run_model

    expected = {name: value.astype(np.float64) for name, value in run_model(model.path, feeds).items()}
    rows = []
    for tool in [*FOLDERS, REFERENCE]:
        run = run_tool(tool, model, repeats, budget_s)
        row = FoldRow(model.name, tool, before, run, nodes=node_count(original) if tool == REFERENCE else None)
        if run.output is not None:
            folded = onnx.load(run.output, load_external_data=False).graph
            row.after, row.nodes = batchnorm_count(folded), node_count(folded)
            try:
                row.error = max_abs_error(expected, run.output, feeds)
            except Exception as error:
                row.error = f"does not run: {type(error).__name__}"
        log(f"  {model.name:<14} {tool:<22} {run.failure or fmt_ms(median_ms(run.times)) + ' ms'}")
        rows.append(row)
    return rows


def fold_table(rows: list[FoldRow], repeats: int) -> str:
    headers = ["model", "tool", "BN before", "BN folded", "nodes after (reference: before)", "fold time ms (median)",
               "peak extra MiB", "max abs error"]  # fmt: skip
    return markdown_table(headers, (row.cells(repeats) for row in rows), text_columns=2)


def inference_row(model: BenchModel, rounds: int, fold) -> list[str]:
    import onnxruntime as ort

    folded_path = CACHE / "folded" / f"{model.name}.bnfold.onnx"
    feeds = seeded_feeds(model.path)
    cells = [model.name]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        if not folded_path.exists():
            cells += ["—", "no bnfold output", "—"]
            continue
        runners = {"original": ort_runner(model.path, feeds, level), "folded": ort_runner(folded_path, feeds, level)}
        cells += latency_cells(runners, rounds)
    cells += torch_latency_cells(model, rounds, fold)
    return cells


def latency_cells(runners: dict[str, Callable[[], object]], rounds: int) -> list[str]:
    """original ms, folded ms, speed-up."""
    latency = median_latencies_ms(runners, rounds)
    return [fmt_ms(latency["original"]), fmt_ms(latency["folded"]), fmt_ratio(latency["original"], latency["folded"])]


def torch_latency_cells(model: BenchModel, rounds: int, fold) -> list[str]:
    if model.torch_model is None or fold is None:
        return ["—", "—", "—"]
    module, example = model.torch_model()
    try:
        folded = fold(module, example).model
    except Exception as error:
        return ["—", f"fold failed: {type(error).__name__}", "—"]
    return latency_cells({"original": torch_runner(module, example), "folded": torch_runner(folded, example)}, rounds)


def inference_table(models: list[BenchModel], rounds: int) -> tuple[str, list[str]]:
    import torch

    torch.set_num_threads(1)
    fold, unavailable = bnfold_torch_fold()
    notes = [f"PyTorch columns left out: `from bnfold.torch_fold import fold` failed ({unavailable})"] if unavailable else []
    rows = []
    for model in models:
        log(f"  latency {model.name}")
        rows.append(inference_row(model, rounds, fold))
    headers = ["model", "ORT off: original ms", "folded ms", "speed-up", "ORT all: original ms", "folded ms", "speed-up",
               "torch eager: original ms", "folded ms", "speed-up"]  # fmt: skip
    return markdown_table(headers, rows), notes


def bnfold_seconds(model: onnx.ModelProto, repeats: int) -> dict[str, list[float]]:
    """In-process timings on one model: the FoldBatchNormPass alone (each run on a fresh onnx_ir model,
    conversion not timed) and ``fold_onnx(verify=False)`` end to end (ModelProto in and out: the
    protobuf fast path on a plain model)."""
    import onnx_ir as ir

    from bnfold import fold_onnx
    from bnfold.onnx_fold import FoldBatchNormPass

    FoldBatchNormPass()(ir.from_proto(tiny_model()))
    fold_onnx(tiny_model(), verify=False)
    times = {"pass": [], "fold_onnx": []}
    for _ in range(repeats):
        working = ir.from_proto(model)
        gc.collect()
        start = time.perf_counter()
        FoldBatchNormPass()(working)
        times["pass"].append(time.perf_counter() - start)
        gc.collect()
        start = time.perf_counter()
        fold_onnx(model, verify=False)
        times["fold_onnx"].append(time.perf_counter() - start)
    return times


def _per_pair_cell(row: FoldRow | None, pairs: int) -> str:
    """A tool's end-to-end time per pair from table 1, in µs."""
    if row is None or row.run.failure:
        return row.run.failure if row else "—"
    return f"{1000 * median_ms(row.run.times) / pairs:.1f}"


def scaling_table(chains: list[BenchModel], repeats: int, fold_results: dict[tuple[str, str], FoldRow]) -> str:
    per_pair_us: dict[str, dict[int, float]] = {"pass": {}, "fold_onnx": {}}
    rows = []
    for chain in chains:
        pairs = chain_size(chain.name)
        log(f"  scaling {chain.name}")
        cells = [str(pairs)]
        for what, times in bnfold_seconds(onnx.load(chain.path), repeats).items():
            seconds = statistics.median(times)
            per_pair_us[what][pairs] = 1e6 * seconds / pairs
            cells += [fmt_ms(1000 * seconds), f"{per_pair_us[what][pairs]:.1f}"]
        peers = [_per_pair_cell(fold_results.get((chain.name, tool)), pairs) for tool in FOLDERS]
        rows.append([*cells, *peers])
    headers = ["pairs", "bnfold pass ms", "bnfold pass µs/pair", "bnfold.fold_onnx ms", "bnfold.fold_onnx µs/pair",
               *(f"{tool} end-to-end µs/pair (table 1)" for tool in FOLDERS)]  # fmt: skip
    table = markdown_table(headers, rows)
    for what, label in (("pass", "FoldBatchNormPass"), ("fold_onnx", "fold_onnx(verify=False)")):
        if len(per_pair_us[what]) > 1:
            ratio = max(per_pair_us[what].values()) / min(per_pair_us[what].values())
            verdict = "within" if ratio <= 2 else "NOT within"
            table += f"\n\nbnfold {label} time per pair, slowest / fastest: **{ratio:.2f}** ({verdict} the factor-2 target)."
    return table


# ---------------------------------------------------------------------------------------------------------
# Entry point


def bnfold_source_hash() -> str:
    """A digest of bnfold's source as it is on disk: each worker imports it afresh, so an edit made
    during the run would put different versions in one table."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((HERE.parent / "bnfold").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def bnfold_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "bnfold") else ""
    return f"{commit}{dirty} (source {bnfold_source_hash()})"


def _version(module: str) -> str:
    """The module's version; a tool that is not installed gets crash cells in the tables, not an aborted run."""
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def environment() -> str:
    versions = {name: _version(name) for name in ("onnx", "onnxruntime", "onnxscript", "onnxoptimizer", "onnxslim")}
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    cores = f"{psutil.cpu_count()} cores ({psutil.cpu_count(logical=False)} physical)"
    machine = f"{cpu}, {cores}, {psutil.virtual_memory().total / 2**30:.0f} GiB, CPU only"
    return (f"{datetime.date.today().isoformat()}; {machine}; Python {platform.python_version()}; bnfold {bnfold_revision()}; "
            + ", ".join(f"{name} {version}" for name, version in versions.items()))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"fixtures, chain500 and {QUICK_ARCHITECTURE}, 3 repeats (about 2 minutes)")  # fmt: skip
    parser.add_argument("--models", help="comma-separated model names (default: all; see --list)")
    parser.add_argument("--repeats", type=int, help="timed runs per (model, tool) (default 5, 3 with --quick)")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    parser.add_argument("--worker", nargs=5, metavar=("TOOL", "MODEL", "OUTPUT", "REPEATS", "BUDGET"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select_models(args: argparse.Namespace, models: dict[str, BenchModel]) -> list[BenchModel]:
    from bnfold.testing import FIXTURES

    if args.models:
        names = [name.strip() for name in args.models.split(",") if name.strip()]
        unknown = [name for name in names if name not in models]
        if unknown:
            sys.exit(f"unknown model(s): {', '.join(unknown)}; choose from {', '.join(models)}")
    elif args.quick:
        names = [*FIXTURES, QUICK_ARCHITECTURE, f"chain{CHAIN_SIZES[0]}"]
    else:
        names = list(models)
    return [models[name] for name in names]


def scaling_chains(args: argparse.Namespace, models: dict[str, BenchModel], selected: list[BenchModel]) -> list[BenchModel]:
    """Every chain size by default (the bnfold pass alone is cheap even at 8000 pairs); with --models, the chains named."""
    if args.models:
        return [model for model in selected if chain_size(model.name)]
    return [models[f"chain{pairs}"] for pairs in CHAIN_SIZES]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        tool, model_path, output_path, repeats, budget_s = args.worker
        return worker(tool, Path(model_path), Path(output_path), int(repeats), float(budget_s))
    models = catalogue()
    if args.list:
        return print("\n".join(models))
    repeats = args.repeats or (3 if args.quick else 5)
    selected = select_models(args, models)
    chains = scaling_chains(args, models, selected)
    for model in {model.name: model for model in [*selected, *chains]}.values():
        log(f"cached {model.name}" if model.path.exists() else f"exporting {model.name}")
        model.ensure_exported()

    source = bnfold_source_hash()
    print(f"# bnfold against the field's BatchNorm folders\n\n{environment()}\n")
    print(f"Timed runs per (model, tool): {repeats}; every (model, tool) in a fresh subprocess; "
          f"timeout {RUN_TIMEOUT_S:.0f} s per run.\n")

    log("table 1: folding")
    budget_s = TIMED_BUDGET_S["quick" if args.quick else "full"]
    rows = [row for model in selected for row in fold_rows(model, repeats, budget_s)]
    print("## 1. Folding\n\n" + fold_table(rows, repeats) + "\n")

    log("table 2: inference")
    table, notes = inference_table(selected, rounds=10 if args.quick else 30)
    print("## 2. Inference latency, batch 1, one thread (median ms)\n\n" + table + "\n")
    print("".join(f"Note: {note}\n\n" for note in notes), end="")

    if chains:
        log("table 3: scaling")
        fold_results = {(row.model, row.tool): row for row in rows}
        print("## 3. Scaling on Conv→BN chains\n\n" + scaling_table(chains, repeats, fold_results) + "\n")
    if bnfold_source_hash() != source:
        print(f"**Warning: bnfold's source changed during the run (now {bnfold_source_hash()}); the rows may mix versions.**")


if __name__ == "__main__":
    main()
