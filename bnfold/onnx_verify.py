"""Verification of an ONNX fold: run the original and the folded model in onnxruntime on the same seeded
random inputs, with the runtime's graph optimisations off (so its own fusions cannot hide a wrong fold)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from bnfold.onnx_io import EXTERNAL_DATA_THRESHOLD, tensor_bytes, uses_external_data
from bnfold.verification import Verification, compare_output, not_compared


class VerificationUnavailableError(RuntimeError):
    """onnxruntime cannot run the original model, so nothing can be proven either way."""


def random_inputs(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded inputs shaped from the model's inputs; symbolic dimensions are 1 unless overridden."""
    input_shapes = dict(input_shapes or {})
    rng = np.random.default_rng(seed)
    initializer_names = set(model.graph.initializers)
    feeds = {}
    for value in model.graph.inputs:
        if value.name in initializer_names:
            continue  # an overridable default: run with the stored value
        shape = input_shapes.pop(value.name, None)
        if shape is None:
            if value.shape is None:
                raise VerificationUnavailableError(
                    f"input {value.name!r} has no shape; give one with --input-shape {value.name}=..."
                )
            shape = [dim if isinstance(dim, int) else 1 for dim in value.shape]
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:  # integer inputs are usually indices: stay within the smallest plausible range
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    if input_shapes:
        raise VerificationUnavailableError(f"--input-shape names unknown input(s): {', '.join(sorted(input_shapes))}")
    return feeds


def _session(source: str | os.PathLike | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = str(source) if isinstance(source, Path) else source
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def model_runner(source: str | os.PathLike | bytes) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """One onnxruntime session (optimisations off), as a function from feeds to named outputs."""
    session = _session(source)
    names = [output.name for output in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


def run_model(source: str | os.PathLike | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return model_runner(source)(feeds)


def model_source(model: ir.Model, scratch: str) -> str | bytes:
    """Something onnxruntime can open: serialized bytes, or a file with its external data when the
    model has external tensors (bytes would point at data relative to the working directory) or
    passes the 2 GiB protobuf limit."""
    if not uses_external_data(model) and tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        return ir.to_proto(model).SerializeToString()
    path = Path(scratch) / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return str(path)


def _progress(message: str, started: float) -> None:
    """Progress on stderr when a person is watching it: verification of a large model takes a while."""
    if sys.stderr.isatty():
        print(f"bnfold: verifying: {message} ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)


def verify(
    original: str | os.PathLike | bytes,
    folded: ir.Model | onnx.ModelProto,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> Verification:
    """Compare every output of ``folded`` with ``original`` (a path or serialized model)."""
    started = time.perf_counter()
    folded_source = None
    if isinstance(folded, onnx.ModelProto):  # the fast path's result: in memory, no external data
        folded_source, folded = folded.SerializeToString(), ir.from_proto(folded)
    feeds = random_inputs(folded, input_shapes, seed)
    _progress("running the original model in onnxruntime", started)
    try:
        expected = run_model(original, feeds)
    except Exception as error:
        raise VerificationUnavailableError(
            f"onnxruntime cannot run the original model ({str(error).strip().splitlines()[0]}); "
            "use --no-verify to fold without verification"
        ) from None
    _progress("running the folded model in onnxruntime", started)
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as scratch:
        actual = run_model(folded_source or model_source(folded, scratch), feeds)
    _progress("comparing outputs", started)
    output_types = {value.name: value.dtype for value in folded.graph.outputs}
    comparisons = []
    for name, reference in expected.items():
        if not isinstance(reference, np.ndarray):  # a sequence or map output: onnxruntime returns a list or dict
            kind = type(reference).__name__
            comparisons.append(not_compared(name, kind, f"onnxruntime returned a {kind}, not a tensor"))
            continue
        dtype = output_types.get(name)
        dtype_name = str(dtype.numpy()) if dtype is not None else str(reference.dtype)
        comparisons.append(compare_output(name, reference, actual[name], dtype_name, atol, rtol))
    return Verification(comparisons, {name: list(array.shape) for name, array in feeds.items()})
