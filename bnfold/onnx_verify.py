"""Verification of an ONNX fold: run the original and the folded model in onnxruntime on the same seeded
random inputs, with the runtime's graph optimisations off (so its own fusions cannot hide a wrong fold)."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from bnfold.onnx_io import EXTERNAL_DATA_THRESHOLD, scratch_directory, tensor_bytes, uses_external_data
from bnfold.report import printable
from bnfold.verification import (
    RANDOM_INPUT_BUDGET_BYTES,
    Verification,
    compare_output,
    gib,
    not_compared,
    over_random_input_budget,
)


# Elements drawn at a time when making a random input (8 MiB of float64).
_DRAW_CHUNK = 2**20


class VerificationUnavailableError(RuntimeError):
    """Nothing can be proven either way: onnxruntime cannot run the original model, or no random inputs
    can be made for it (no shape, a size below 1, or past the memory budget)."""


def random_inputs(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, seed: int = 0, fixed_remedy: str = ""
) -> dict[str, np.ndarray]:
    """Seeded inputs shaped from the model's inputs; symbolic dimensions are 1 unless overridden. Shapes
    with a size below 1, or inputs past :data:`RANDOM_INPUT_BUDGET_BYTES` in all, are refused before
    anything is allocated; ``fixed_remedy`` is the caller's advice when the model's fixed sizes alone
    are past the budget."""
    input_shapes = dict(input_shapes or {})
    initializer_names = set(model.graph.initializers)
    planned: dict[str, tuple[list[int], np.dtype]] = {}
    for value in model.graph.inputs:
        if value.name in initializer_names:
            continue  # an overridable default: run with the stored value
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        planned[value.name] = (_input_shape(value, input_shapes.pop(value.name, None)), dtype)
    if input_shapes:
        raise VerificationUnavailableError(f"--input-shape names unknown input(s): {', '.join(sorted(input_shapes))}")
    _refuse_past_budget(model, planned, fixed_remedy)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in planned.items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = _drawn(shape, dtype, rng.standard_normal)
        else:  # integer inputs are usually indices: stay within the smallest plausible range (bool: 0 or 1)
            feeds[name] = _drawn(shape, dtype, lambda size: rng.integers(0, 2, size))
    return feeds


def _drawn(shape: list[int], dtype: np.dtype, draw: Callable[[int], np.ndarray]) -> np.ndarray:
    """An array of ``dtype`` filled with ``draw``'s values a chunk at a time: the draws come in float64 or
    int64, and whole they would take up to four times the budget beside the input. The values are those
    of one whole draw (the generator's stream does not depend on the chunking)."""
    array = np.empty(shape, dtype)
    flat = array.reshape(-1)
    for start in range(0, flat.size, _DRAW_CHUNK):
        flat[start : start + _DRAW_CHUNK] = draw(min(_DRAW_CHUNK, flat.size - start))
    return array


def _refuse_past_budget(model: ir.Model, planned: dict[str, tuple[list[int], np.dtype]], fixed_remedy: str) -> None:
    too_large = over_random_input_budget({name: (shape, str(dtype), dtype.itemsize) for name, (shape, dtype) in planned.items()})
    if too_large is None:
        return
    largest, problem = too_large
    declared = next(value for value in model.graph.inputs if value.name == largest)
    fixed_bytes = math.prod(_smallest_shape(declared)) * planned[largest][1].itemsize
    if fixed_bytes <= RANDOM_INPUT_BUDGET_BYTES:
        raise VerificationUnavailableError(f"{problem}; give a smaller shape with --input-shape {largest}=D1,D2,...")
    fixed = f"{problem}, and the model fixes sizes that take {gib(fixed_bytes)} at the least, so no --input-shape brings it within"
    raise VerificationUnavailableError(f"{fixed}; {fixed_remedy}" if fixed_remedy else fixed)


def _input_shape(value: ir.Value, given: list[int] | None) -> list[int]:
    """The shape to make ``value``'s random input in: the given one, else the declared one with symbolic
    dimensions at 1; every size at least 1."""
    if given is not None:
        if any(dim < 1 for dim in given):
            raise VerificationUnavailableError(
                f"--input-shape {value.name}={','.join(map(str, given))}: every size must be at least 1"
            )
        return list(given)
    if value.shape is None:
        raise VerificationUnavailableError(f"input {value.name!r} has no shape; give one with --input-shape {value.name}=...")
    shape = _smallest_shape(value)
    if any(dim < 1 for dim in shape):
        raise VerificationUnavailableError(
            f"input {value.name!r} declares shape {shape}, with a size below 1; give one with --input-shape {value.name}=D1,D2,..."
        )
    return shape


def _smallest_shape(value: ir.Value) -> list[int]:
    """The declared shape with its symbolic dimensions at 1 (no dimensions when there is no shape)."""
    return [dim if isinstance(dim, int) else 1 for dim in value.shape or []]


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
    feeds = random_inputs(folded, input_shapes, seed, fixed_remedy="use --no-verify to fold without verification")
    _progress("running the original model in onnxruntime", started)
    try:
        expected = run_model(original, feeds)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise VerificationUnavailableError(  # onnxruntime quotes node names from the model: print them escaped
            f"onnxruntime cannot run the original model ({printable(first_line)}); use --no-verify to fold without verification"
        ) from None
    _progress("running the folded model in onnxruntime", started)
    with scratch_directory("verify") as scratch:
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
