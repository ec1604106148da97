"""Verification of an ONNX fold: run the original and the folded model in onnxruntime on the same seeded
random inputs, with the runtime's graph optimisations off (so its own fusions cannot hide a wrong fold)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from bnfold.limits import allocation_failed
from bnfold.onnx_fold.io import load_model, read_model_proto, scratch_directory
from bnfold.onnx_fold.local_checks import append_local_checks, plain_folds, plain_local_folds, read_local_checks
from bnfold.onnx_fold.runtime import RuntimeModel, model_runner, run_model, runtime_model
from bnfold.onnx_fold.shared import MalformedTensorError
from bnfold.report import Fold, printable
from bnfold.verification import (
    RANDOM_INPUT_BUDGET_BYTES,
    OutputComparison,
    Verification,
    VerificationUnavailableError,
    compare_output,
    folds_proven,
    gib,
    not_compared,
    over_random_input_budget,
    tolerance,
)

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["VerificationUnavailableError", "model_runner", "random_inputs", "run_model", "verify"]

# Elements drawn at a time when making a random input (8 MiB of float64).
_DRAW_CHUNK = 2**20


@dataclasses.dataclass
class _DeclaredInput:
    """A graph input that is not an initializer: its element type, and its dimensions (None: symbolic),
    or no shape at all."""

    name: str
    dtype: np.dtype
    dims: list[int | None] | None


def _declared_inputs(model: onnx.ModelProto | ir.Model) -> list[_DeclaredInput]:
    if not isinstance(model, onnx.ModelProto):
        import onnx_ir as ir

        from bnfold.onnx_fold.derived_shapes import static_dims
        from bnfold.onnx_fold.io import data_inputs

        return [
            # (An undefined element type is float32, as in a protobuf's inputs below.)
            _DeclaredInput(value.name, value.dtype.numpy() if value.dtype not in (None, ir.DataType.UNDEFINED) else np.dtype(np.float32),
                           static_dims(value))
            for value in data_inputs(model.graph)
        ]  # fmt: skip
    initializers = {tensor.name for tensor in model.graph.initializer}
    declared = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else np.dtype(np.float32)
        dims = None
        if tensor_type.HasField("shape"):
            dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
        declared.append(_DeclaredInput(value.name, np.dtype(dtype), dims))
    return declared


def random_inputs(
    model: onnx.ModelProto | ir.Model, input_shapes: dict[str, list[int]] | None = None, seed: int = 0, fixed_remedy: str = ""
) -> dict[str, np.ndarray]:
    """Seeded inputs shaped from the model's inputs; symbolic dimensions are 1 unless overridden. Shapes
    with a size below 1, or inputs past :data:`RANDOM_INPUT_BUDGET_BYTES` in all, are refused before
    anything is allocated; ``fixed_remedy`` is the caller's advice when the model's fixed sizes alone
    are past the budget."""
    input_shapes = dict(input_shapes or {})
    declared = _declared_inputs(model)
    planned: dict[str, tuple[list[int], np.dtype]] = {}
    for value in declared:
        planned[value.name] = (_input_shape(value, input_shapes.pop(value.name, None)), value.dtype)
    if input_shapes:
        raise VerificationUnavailableError(f"--input-shape names unknown input(s): {', '.join(sorted(input_shapes))}")
    _refuse_past_budget(declared, planned, fixed_remedy)
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


def _refuse_past_budget(declared: list[_DeclaredInput], planned: dict[str, tuple[list[int], np.dtype]], fixed_remedy: str) -> None:
    too_large = over_random_input_budget({name: (shape, str(dtype), dtype.itemsize) for name, (shape, dtype) in planned.items()})
    if too_large is None:
        return
    largest, problem = too_large
    fixed_bytes = math.prod(_smallest_shape(next(value for value in declared if value.name == largest))) * planned[largest][1].itemsize
    if fixed_bytes <= RANDOM_INPUT_BUDGET_BYTES:
        raise VerificationUnavailableError(f"{problem}; give a smaller shape with --input-shape {largest}=D1,D2,...")
    fixed = f"{problem}, and the model fixes sizes that take {gib(fixed_bytes)} at the least, so no --input-shape brings it within"
    raise VerificationUnavailableError(f"{fixed}; {fixed_remedy}" if fixed_remedy else fixed)


def _input_shape(value: _DeclaredInput, given: list[int] | None) -> list[int]:
    """The shape to make ``value``'s random input in: the given one, else the declared one with symbolic
    dimensions at 1; every size at least 1."""
    if given is not None:
        if any(dim < 1 for dim in given):
            raise VerificationUnavailableError(
                f"--input-shape {value.name}={','.join(map(str, given))}: every size must be at least 1"
            )
        return list(given)
    if value.dims is None:
        raise VerificationUnavailableError(f"input {value.name!r} has no shape; give one with --input-shape {value.name}=...")
    shape = _smallest_shape(value)
    if any(dim < 1 for dim in shape):
        raise VerificationUnavailableError(
            f"input {value.name!r} declares shape {shape}, with a size below 1; give one with --input-shape {value.name}=D1,D2,..."
        )
    return shape


def _smallest_shape(value: _DeclaredInput) -> list[int]:
    """The declared shape with its symbolic dimensions at 1 (no dimensions when there is no shape)."""
    return [1 if dim is None else dim for dim in value.dims or []]


def _cannot_run_original(error: Exception) -> str:
    """onnxruntime's whole message on one line (escaped: it quotes names from the model), and the option
    that fixes it: input shapes for a shape complaint, --no-verify only where a kernel is missing."""
    message = _one_line(error)
    if "NOT_IMPLEMENTED" in message or "Could not find an implementation" in message:
        remedy = "onnxruntime has no kernel for it here: use --no-verify to fold without verification"
    elif "bound to different types" in message:
        remedy = (
            "the model itself is invalid, an op's inputs disagreeing in element type (a float16 export with float32 "
            "weights): onnx.checker.check_model(model, full_check=True) lists them; fix the export"
        )
    elif allocation_failed(message):  # (before the shape words: ConstantOfShape's allocation names its op)
        remedy = "the run needs more memory than it may have: give smaller input shapes (--input-shape), raise --max-memory, or use --no-verify"
    elif _TYPE_NOT_TAKEN in message:
        remedy = "onnxruntime does not take that element type there: use --no-verify to fold without verification"
    elif any(word in message for word in ("dimension", "rank", "shape", "Shape")):
        remedy = "give each input a shape the model accepts with --input-shape NAME=D1,D2,..."
    else:
        remedy = "check the input shapes (--input-shape NAME=D1,D2,...), or use --no-verify to fold without verification"
    return f"onnxruntime cannot run the original model ({message}); {remedy}"


# How onnxruntime refuses an element type an op does not take (bfloat16 Conv on CPU, an int32 Reshape target).
_TYPE_NOT_TAKEN = "Type Error: Type 'tensor("


def _one_line(error: Exception) -> str:
    """onnxruntime's whole message on one line, escaped (it quotes names from the model), without the path of
    the scratch file the model was handed over in (gone when the user reads it)."""
    text = " / ".join(line.strip() for line in str(error).strip().splitlines() if line.strip()) or type(error).__name__
    return printable(re.sub(r"Load model from \S+ failed: ?", "", text))


def _progress(message: str, started: float) -> None:
    """Progress on stderr when a person is watching it: verification of a large model takes a while."""
    if sys.stderr is not None and sys.stderr.isatty():  # (None: stderr closed at start-up, `2>&-`)
        print(f"bnfold: verifying: {message} ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)


ModelSource = str | os.PathLike | bytes | onnx.ModelProto


def verify(
    original: ModelSource | ir.Model,
    folded: ir.Model | onnx.ModelProto,
    *,
    folds: list[Fold] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    known_arrays: dict[str, np.ndarray] | None = None,
) -> Verification:
    """Compare every output of ``folded`` with ``original`` (a path, serialized model, ``ModelProto`` or
    onnx_ir model; never changed), and check each of ``folds`` on its own: the folded layer, run on the
    original's input to it, against the original layer and BatchNorm, channel by channel (see
    :data:`bnfold.verification.LOCAL_UNITS`), and its parameters against the exact fold.

    The original runs once, with the checked layers added beside it (:mod:`bnfold.onnx_fold.local_checks`),
    and the folded model once; neither model's tensors are serialized (:mod:`bnfold.onnx_fold.runtime`).
    ``known_arrays`` are values of initializers already in memory, by name, each the same tensor in both
    models where both have it (the fast path's: see :class:`bnfold.onnx_fold.fast_path.FastFold`):
    onnxruntime gets these rather than copies out of the protobufs."""
    atol, rtol = tolerance("atol", atol), tolerance("rtol", rtol)
    started = time.perf_counter()
    known_arrays = known_arrays or {}
    try:
        folded_model = runtime_model(folded, known_arrays)
    except MalformedTensorError as error:
        raise VerificationUnavailableError(str(error), model="folded") from None
    # Shaped as the original's inputs, the reference (a candidate of `bnfold verify` may declare others).
    shaped_as = original if isinstance(original, onnx.ModelProto) or _is_ir_model(original) else folded_model.proto
    feeds = random_inputs(shaped_as, input_shapes, seed, fixed_remedy="use --no-verify to fold without verification")
    checks, original_model = [], None
    if folds:
        try:
            original_model, local, checks = _with_local_checks(original, folded, folded_model, folds, rtol, known_arrays)
        except MalformedTensorError as error:
            raise VerificationUnavailableError(str(error)) from None
        names = append_local_checks(original_model, local)
    with scratch_directory("verify") as scratch:
        _progress("running the original model in onnxruntime", started)
        try:
            expected = (original_model.runner(scratch=scratch) if original_model else model_runner(original))(feeds)
        except Exception as error:
            raise VerificationUnavailableError(_cannot_run_original(error)) from None
        if folds:
            checks += read_local_checks(local, names, expected, rtol)
        _progress("running the folded model in onnxruntime", started)
        try:
            actual = folded_model.runner(scratch=scratch)(feeds)
        except Exception as error:  # (a fold bnfold made, or the candidate of `bnfold verify`)
            raise VerificationUnavailableError(f"onnxruntime cannot run the folded model ({_one_line(error)})", model="folded") from None
    _progress("comparing outputs", started)
    output_types = {value.name: value.type.tensor_type.elem_type for value in folded_model.proto.graph.output}
    comparisons = []
    for name, reference in expected.items():
        if name not in output_types:
            continue  # a value exposed for the per-fold checks
        if not isinstance(reference, np.ndarray):  # a sequence or map output: onnxruntime returns a list or dict
            kind = type(reference).__name__
            comparisons.append(not_compared(name, kind, f"onnxruntime returned a {kind}, not a tensor"))
            continue
        element_type = output_types[name]
        dtype_name = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(element_type))) if element_type else str(reference.dtype)
        comparisons.append(compare_output(name, reference, actual[name], dtype_name, atol, rtol))
    if any(comparison.failed and comparison.magnitude is not None for comparison in comparisons):
        proven = folds_proven(checks, len(folds or []))
        _measure_noise(original, feeds, expected, actual, comparisons, proven, allowances=atol is None and rtol is None)
    return Verification(comparisons, {name: list(array.shape) for name, array in feeds.items()}, folds=checks)


def _with_local_checks(
    original: ModelSource | ir.Model,
    folded: ir.Model | onnx.ModelProto,
    folded_model: RuntimeModel,
    folds: list[Fold],
    rtol: float | None,
    known_arrays: dict[str, np.ndarray],
):
    """The original as a :class:`RuntimeModel`, the folds it can check on their own, and a not-compared
    entry for each other. The fast path's plain pairs are read from the protobufs; any other fold needs
    onnx_ir and the pass's rules."""
    if isinstance(folded, onnx.ModelProto) and not _is_ir_model(original):
        original_proto = _proto(original)
        pairs = plain_folds(original_proto, folds)
        if pairs is not None:
            original_model = runtime_model(original_proto, known_arrays)
            local, checks = plain_local_folds(original_model, folded_model, pairs, folds, rtol)
            if not checks:  # (else a model from another tool: the rules below find more of its layers)
                return original_model, local, checks
    import onnx_ir as ir

    from bnfold.onnx_fold.ir_local_checks import ir_local_folds
    from bnfold.onnx_fold.ir_pass import analysis_copy, reshapes_a_layer

    # Both run and read as the fold saw the original, its folds' functions inlined (a candidate of `bnfold verify`
    # may keep them too); never the caller's model.
    original_ir = _fold_functions_inlined(original if _is_ir_model(original) else _ir_model(original), original)
    folded_ir = _fold_functions_inlined(folded if isinstance(folded, ir.Model) else ir.from_proto(folded), folded)
    # A MatMul fold's rule reads its data's rank, one through a Reshape the shape it gives: inferred on a copy
    # (onnxruntime runs the original as it is).
    shapes_read = any(fold.layer_op == "MatMul" for fold in folds) or reshapes_a_layer(original_ir)
    read = analysis_copy(original_ir) if shapes_read else original_ir
    local, checks = ir_local_folds(read, folded_ir, folds, rtol)
    return runtime_model(original_ir), local, checks


def _fold_functions_inlined(model: ir.Model, given) -> ir.Model:
    """``model`` with the functions a fold inlines inlined (see inline_fold_functions): a copy when it is ``given``,
    the caller's."""
    from bnfold.onnx_fold.ir_pass import inline_fold_functions

    if not model.functions:
        return model
    model = model.clone() if model is given else model
    inline_fold_functions(model)
    return model


def _is_ir_model(model) -> bool:
    return not isinstance(model, (str, os.PathLike, bytes, onnx.ModelProto))


def _proto(original: ModelSource) -> onnx.ModelProto:
    if isinstance(original, onnx.ModelProto):
        return original
    if isinstance(original, bytes):
        return onnx.load_from_string(original)
    return read_model_proto(Path(original))


def _ir_model(original: ModelSource) -> ir.Model:
    import onnx_ir as ir

    if isinstance(original, (str, os.PathLike)):
        return load_model(original)  # (checked as the fold loaded it: external data from the model's folder only)
    return ir.from_proto(_proto(original))


def _measure_noise(
    original: ModelSource | ir.Model, feeds: dict[str, np.ndarray], plain: dict[str, np.ndarray], actual: dict[str, np.ndarray],
    comparisons: list[OutputComparison], folds_proven: bool, allowances: bool,
) -> None:
    """Measure each failed output's noise (see OutputComparison.measure_noise): how far onnxruntime's optimised run
    of the original (its own fusions and kernel choices) is from the plain one (``plain``, the verification's own
    run), the float noise a user can compare the error with."""
    try:
        optimised = model_runner(original, optimised=True)(feeds)
    except Exception:
        return  # the figure is a help to the reader, never a reason to fail differently
    for comparison in comparisons:
        if comparison.failed and comparison.magnitude is not None and comparison.name in optimised:
            name = comparison.name
            comparison.measure_noise(plain[name], optimised[name], actual[name], _OPTIMISED_RUN, folds_proven, allowances)


_OPTIMISED_RUN = "onnxruntime's optimised run of the original against its plain run"
