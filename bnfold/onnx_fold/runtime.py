"""onnxruntime sessions for verification and the checks, with the models' large tensors handed over as arrays.

Serializing a model for onnxruntime, and onnxruntime parsing its tensors back and copying them into its
own buffers, cost more than running it: on ResNet-50, 0.3 s to serialize and 0.3 s to build the session,
against 0.03 s for the session below. A :class:`RuntimeModel` is the model's graph whose large
initializers refer to external data, and the arrays of those initializers, which go to the session with
``SessionOptions.add_initializer``: onnxruntime then uses the array in place of the initializer ("instead of
deserializing one from the model file"), so no tensor is serialized, parsed or copied, and the sessions of
one verification share nothing but what they read. The graph is written to a scratch folder beside an
empty placeholder file, the location of those references: onnxruntime checks that the file exists before
it looks for a provided initializer.

Small initializers stay in the graph: onnxruntime's shape inference may read them (a Reshape's shape).
An optimised session (the noise measurement, on a failure only) gets its tensors through a real data file:
onnxruntime's graph optimisers read initializers from the file their reference names, provided or not.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bnfold.onnx_fold.fast_path import tensor_array
from bnfold.onnx_fold.io import RAW_STORAGE, graph_and_functions, scratch_directory
from bnfold.onnx_fold.protobuf_writer import copy_fields
from bnfold.onnx_fold.shared import MalformedTensorError

if TYPE_CHECKING:
    import onnx_ir as ir

_PLACEHOLDER = "bnfold-provided-tensors"
_SHARED_MIN_BYTES = 128


class RuntimeModel:
    """A model as onnxruntime gets it: ``proto``, a graph whose large initializers are references, and
    ``tensors``, their values (name -> (array in its storage dtype, ONNX element type))."""

    def __init__(self, proto: onnx.ModelProto, tensors: dict[str, tuple[np.ndarray, int]], source: onnx.ModelProto | None = None):
        self.proto = proto
        self.tensors = tensors
        self.source = source  # the ModelProto it was made from, if it was
        self._outputs: set[str] | None = None

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The values of ``tensor``, an initializer of the source model: the array held for onnxruntime
        when there is one (no second copy of a large tensor), else read from the tensor."""
        held = self.tensors.get(tensor.name)
        if held is None:
            return tensor_array(tensor)
        array, data_type = held
        return array.view(onnx.helper.tensor_dtype_to_np_dtype(data_type))

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        """Add ``array`` as initializer ``name`` of the main graph; return the name."""
        array = np.ascontiguousarray(array)
        data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        if array.nbytes < _SHARED_MIN_BYTES or data_type not in RAW_STORAGE:
            self.proto.graph.initializer.append(numpy_helper.from_array(array, name))
        else:
            self.proto.graph.initializer.append(_reference(name, data_type, array.shape, array.nbytes))
            self.tensors[name] = (array.view(RAW_STORAGE[data_type]), data_type)
        return name

    def add_output(self, name: str) -> None:
        if self._outputs is None:  # (a set: a model may gain tens of thousands of outputs, one at a time)
            self._outputs = {output.name for output in self.proto.graph.output}
        if name not in self._outputs:
            self._outputs.add(name)
            self.proto.graph.output.add(name=name)

    def names(self) -> set[str]:
        """Every value name the main graph uses."""
        graph = self.proto.graph
        names = {value.name for value in (*graph.input, *graph.output, *graph.initializer)}
        names.update(name for node in graph.node for name in (*node.input, *node.output))
        return names

    def runner(self, optimised: bool = False, scratch: Path | None = None) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """An onnxruntime session of this model (graph optimisations off unless ``optimised``), as a
        function from feeds to named outputs. The graph is written in ``scratch`` (default: a scratch
        directory of its own), which onnxruntime needs only while the session is built."""
        if not self.proto.graph.output:  # nothing to compute, and onnxruntime may refuse to build the session
            return _Runner(None)
        options = session_options(optimised)
        values = {} if optimised else {name: _ort_value(array, data_type) for name, (array, data_type) in self.tensors.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        with contextlib.nullcontext(scratch) if scratch is not None else scratch_directory("session") as folder:
            (folder / _PLACEHOLDER).touch()
            path = folder / f"model-{next(_MODEL_NUMBERS)}.onnx"
            path.write_bytes((self._with_data_file(path.with_suffix(".data")) if optimised else self.proto).SerializeToString())
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            finally:
                path.unlink()
        return _Runner(session, provided=(values, self.tensors))

    def _with_data_file(self, data: Path) -> onnx.ModelProto:
        """A copy of ``proto`` whose references read the tensors from ``data``, written here."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        with open(data, "wb") as file:
            for tensor in proto.graph.initializer:
                if tensor.name in self.tensors:
                    offset = file.tell()
                    file.write(np.ascontiguousarray(self.tensors[tensor.name][0]))
                    del tensor.external_data[:]
                    for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(file.tell() - offset))):
                        tensor.external_data.add(key=key, value=value)
        return proto


_MODEL_NUMBERS = itertools.count()


def runtime_model(model: onnx.ModelProto | ir.Model, arrays: dict[str, np.ndarray] | None = None) -> RuntimeModel:
    """``model`` as a :class:`RuntimeModel`; ``model`` itself is not changed (an onnx_ir model's tensors are
    swapped for references while it is converted, then put back). ``arrays`` are the values of some of a
    ``ModelProto``'s initializers, by name, taken instead of copies of their raw data."""
    if isinstance(model, onnx.ModelProto):
        return _from_proto(model, arrays or {})
    return _from_ir(model)


def _from_proto(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> RuntimeModel:
    proto = onnx.ModelProto()
    copy_fields(model, proto, skip=("graph",))
    copy_fields(model.graph, proto.graph, skip=("initializer",))
    tensors = {}
    for tensor in model.graph.initializer:
        storage = RAW_STORAGE.get(tensor.data_type)
        nbytes = math.prod(tensor.dims) * (np.dtype(storage).itemsize if storage else 0)
        known = arrays.get(tensor.name)
        known = known if known is not None and known.nbytes == nbytes else None
        if (
            nbytes < _SHARED_MIN_BYTES
            or tensor.data_location == onnx.TensorProto.EXTERNAL
            or not (tensor.HasField("raw_data") or known is not None)  # (the fast path's pending data is known)
        ):
            proto.graph.initializer.append(tensor)
            continue
        if known is not None:
            array = np.ascontiguousarray(known).view(storage)
        else:
            raw = tensor.raw_data  # (a copy: protobuf hands out bytes)
            if len(raw) != nbytes:
                proto.graph.initializer.append(tensor)  # malformed: onnxruntime says so, in its words
                continue
            array = np.frombuffer(raw, storage)
        proto.graph.initializer.append(_reference(tensor.name, tensor.data_type, tensor.dims, nbytes))
        tensors[tensor.name] = (array.reshape(tuple(tensor.dims)), tensor.data_type)
    return RuntimeModel(proto, tensors, source=model)


def _from_ir(model: ir.Model) -> RuntimeModel:
    """onnx_ir serializes an external tensor as its reference: each large initializer of the main graph is
    swapped for one to the placeholder, any other external tensor (a Constant's too) for its values (the scratch
    folder has none of the model's files)."""
    import onnx_ir as ir

    tensors, swapped = {}, []
    main = model.graph
    for graph in (main, *main.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            data_type = tensor.dtype.value
            shared = graph is main and data_type in RAW_STORAGE and tensor.nbytes >= _SHARED_MIN_BYTES
            if not shared and not isinstance(tensor, ir.ExternalTensor):
                continue
            try:
                array = tensor.numpy()
            except Exception as error:  # onnx_ir raises ValueError, TypeError, ... depending on how the data is wrong
                raise MalformedTensorError.unreadable(value.name, error) from None
            swapped.append((value, tensor))
            if shared:
                tensors[value.name] = (array.view(RAW_STORAGE[data_type]), data_type)
                value.const_value = ir.ExternalTensor(_PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=value.name)
            else:
                value.const_value = ir.tensor(array, name=value.name)
    # A Constant's external tensor (in the graph, a subgraph or a model-local function) goes in as its values too.
    attributes = []
    for graph in graph_and_functions(model):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for name, attribute in node.attributes.items():
                if not attribute.is_ref() and attribute.type == ir.AttributeType.TENSOR and isinstance(attribute.value, ir.ExternalTensor):
                    attributes.append((node, name, attribute))
    for node, name, attribute in attributes:
        try:
            array = attribute.value.numpy()
        except Exception as error:  # (as above)
            raise MalformedTensorError.unreadable(attribute.value.name or name, error) from None
        node.attributes[name] = ir.AttrTensor(name, ir.tensor(array, name=attribute.value.name))
    try:
        proto = ir.to_proto(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
        for node, name, attribute in attributes:
            node.attributes[name] = attribute
    return RuntimeModel(proto, tensors)


def _reference(name: str, data_type: int, dims, nbytes: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", _PLACEHOLDER), ("offset", "0"), ("length", str(nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _ort_value(array: np.ndarray, data_type: int) -> ort.OrtValue:
    """An OrtValue over ``array``'s buffer (a copy when it is not contiguous: onnxruntime takes a provided
    initializer only in the user's own buffer); it holds the array."""
    array = np.ascontiguousarray(array)
    if data_type == onnx.TensorProto.BFLOAT16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, data_type)
    return ort.OrtValue.ortvalue_from_numpy(array)


def session_options(optimised: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimised else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # (fatal only: bnfold reports onnxruntime's errors itself, on one line)
    return options


class _Runner:
    """A session as a function from feeds to named outputs; it holds the arrays the session was given in
    place of initializers, which must outlive it."""

    def __init__(self, session: ort.InferenceSession | None, provided=None):
        self._session = session  # None for a model without outputs
        self._provided = provided
        self._names = [] if session is None else [output.name for output in session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._names:  # a model without outputs computes nothing, and onnxruntime refuses to run it
            return {}
        return dict(zip(self._names, _interruptible_run(self._session, self._names, feeds), strict=True))


# Runs told to stop mid-run: their session's threads abort the interpreter's own exit ("terminate called without an
# active exception", SIGABRT), so an interrupted command line leaves through os._exit (see bnfold.cli).
runs_stopped = 0


def _interruptible_run(session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run``, in a thread of its own: Python handles Ctrl-C and SIGTERM only between its own bytecodes, so
    a run that never returns (a hostile model's Loop of 10**15 iterations) held the process until SIGKILL, scratch
    files left behind. On either, onnxruntime is told to stop (at its next node), then the interruption goes on."""
    options = ort.RunOptions()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["outputs"] = session.run(names, feeds, options)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name="bnfold-onnxruntime", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        options.terminate = True
        global runs_stopped  # noqa: PLW0603 - one fact of the process, read as it exits
        runs_stopped += 1
        worker.join(10)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["outputs"]


def model_runner(
    model: str | os.PathLike | bytes | onnx.ModelProto | ir.Model, optimised: bool = False
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """One onnxruntime session (optimisations off unless ``optimised``) of a model file, serialized model,
    ``ModelProto`` or onnx_ir model, as a function from feeds to named outputs."""
    if isinstance(model, (str, os.PathLike, bytes)):
        source = str(model) if isinstance(model, Path) else model
        return _Runner(ort.InferenceSession(source, session_options(optimised), providers=["CPUExecutionProvider"]))
    return runtime_model(model).runner(optimised)


def run_model(model: str | os.PathLike | bytes | onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return model_runner(model)(feeds)
