"""Loading and saving ONNX models: clear one-line errors, atomic writes, external data confined to the
model's folder. A model whose tensors are all in the file loads as a protobuf (:func:`load_inline_model`,
the fast path's input); one with external data loads with onnx_ir (:func:`load_model`), which keeps the data
on disk. onnx_ir is imported only where it is used: its import pulls sympy and costs about a second."""

from __future__ import annotations

import collections
import contextlib
import heapq
import math
import mmap
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import InputError, MissingInputError, describe_error, file_status
from bnfold.onnx_fold.protobuf_writer import SerializedModel, copy_fields, fill_pending_data

if TYPE_CHECKING:
    import onnx_ir as ir

# Past this many bytes of tensor data a model cannot be one protobuf file (the 2 GiB limit, with margin).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` with its external data kept lazy, after checking that onnx's checker accepts it and
    that every external data file lies in the model's folder and is there, whole. Nothing outside the
    model's folder is ever read."""
    import onnx_ir as ir

    path = _model_file(path)
    proto = _read_proto(path)
    _check_external_data_fields(proto, path)
    try:
        # (ir.load's steps, on the proto read here.) An absolute base directory: onnx_ir confines a tensor's
        # data to it only when it is not empty.
        with onnx_ir_logging_off():
            model = ir.serde.deserialize_model(proto)
        # (a model-local function's tensors too: left without, they were read from the working directory)
        for graph in graph_and_functions(model):
            ir.external_data.set_base_dir(graph, path.absolute().parent)
    except Exception as error:  # noqa: BLE001 - what onnx_ir cannot read (a name that is not UTF-8)
        raise InputError(path, f"not a readable ONNX model ({describe_error(error)})") from None
    _check_external_data(model, path)
    try:
        # By path, so that models past 2 GiB are checked too (the checker reads no tensor data from files).
        onnx.checker.check_model(str(path))
    except Exception as error:  # ValidationError; non-UTF-8 strings fail to decode as UnicodeDecodeError
        if "topologically sorted" not in str(error) or not _sorted_and_checked(model, path):
            raise InputError(path, f"not a valid ONNX model ({describe_error(error)})") from None
    return model


def _sorted_and_checked(model, path: Path) -> bool:
    """Check ``model`` (onnx_ir's) with its nodes in an order :func:`_sort_topologically` finds, through its
    protobuf, in which external tensors stay references (the checker reads no tensor data); then sort its nodes
    (onnx_ir's sort). False when there is no such order."""
    import onnx_ir as ir

    try:
        proto = ir.to_proto(model)
    except Exception:  # noqa: BLE001 - onnx_ir cannot write it back (a name that is not UTF-8): the checker's error stands
        return False
    if not _sort_topologically(proto.graph):
        return False
    for tensor in proto.graph.initializer:  # (checked in place above; in memory the checker would look in the working directory)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.CopyFrom(onnx.helper.make_tensor(tensor.name, tensor.data_type, [0], []))
    try:
        onnx.checker.check_model(proto)
    except Exception as error:  # noqa: BLE001 - (as in load_model)
        raise InputError(path, f"not a valid ONNX model ({describe_error(error)})") from None
    model.graph.sort()
    return True


@contextlib.contextmanager
def onnx_ir_logging_off():
    """onnx_ir logs each problem it meets reading a malformed model (an input no node makes, an unnamed
    initializer), and the traceback of a failed shape inference, which Python prints on stderr when nothing is
    configured; bnfold says what matters in one line of its own (an error, or a note), which they would only
    precede."""
    import logging

    logger = logging.getLogger("onnx_ir")  # (its modules' loggers take their level from it)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_inline_model(path: str | os.PathLike) -> onnx.ModelProto | None:
    """``path`` as a protobuf, with the checks of :func:`load_model`; None when any of its tensors is in an
    external data file (:func:`load_model` keeps those on disk, a protobuf would hold them in memory)."""
    path = _model_file(path)
    model = _read_proto(path)
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in _tensors(model)):
        return None
    try:
        onnx.checker.check_model(_checker_view(model, path))
    except Exception as error:  # ValidationError; non-UTF-8 strings fail to decode as UnicodeDecodeError
        if not ("topologically sorted" in str(error) and _sort_topologically(model.graph)):
            raise InputError(path, f"not a valid ONNX model ({describe_error(error)})") from None
        try:
            onnx.checker.check_model(_checker_view(model, path))
        except Exception as error:  # noqa: BLE001 - (as above)
            raise InputError(path, f"not a valid ONNX model ({describe_error(error)})") from None
    _files_named[_file_identity(path)] = frozenset({path.absolute()})
    return model


# Inlined functions may make this many times the nodes a model stores, past 10,000 nodes: a model whose transformer
# layers are one function called 24 times is well within it; 18 levels of functions each calling the next twice (a
# 1.8 KB file) make 262,144 nodes, which onnxruntime took hours to load, deaf to Ctrl-C.
_MOST_INLINED_EXPANSION = 64
_FEWEST_INLINED_LIMIT = 10_000


def _check_inlined_size(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a model whose local functions call each other so that inlining them (onnxruntime does, as it loads
    the model; the fold does for the functions holding what it folds) would multiply its nodes (see the caps)."""
    if not model.functions:
        return
    bodies = {(function.domain, function.name, function.overload): function for function in model.functions}

    def called(nodes) -> list[tuple[str, str, str]]:
        return [(node.domain, node.op_type, node.overload) for node in _nodes_within(nodes)]

    calls = {key: called(function.node) for key, function in bodies.items()}
    sizes: dict[tuple[str, str, str], int] = {}
    pending, started = list(bodies), set()
    while pending:  # (a function's size once those it calls are known; recursion counts 1: onnx's checker refuses it)
        key = pending[-1]
        if key in sizes:
            pending.pop()
            continue
        started.add(key)
        unknown = [each for each in calls[key] if each in bodies and each not in sizes and each not in started]
        if unknown:
            pending.append(unknown[0])
            continue
        pending.pop()
        sizes[key] = sum(sizes.get(each, 1) for each in calls[key])
    in_graph = called(model.graph.node)
    stored = len(in_graph) + sum(len(each) for each in calls.values())
    inlined = sum(sizes.get(each, 1) for each in in_graph)
    if inlined > max(_FEWEST_INLINED_LIMIT, _MOST_INLINED_EXPANSION * stored):
        raise InputError(
            path, f"its model-local functions call each other so that inlining them makes {inlined} nodes from the {stored} it stores"
        )


def _read_proto(path: Path) -> onnx.ModelProto:
    """``path`` parsed (:func:`read_model_proto`), refused unless it holds a graph of dense tensors."""
    try:
        model = read_model_proto(path)
    except Exception as error:  # protobuf's DecodeError and friends: truncated or not ONNX at all
        raise InputError(path, f"not a readable ONNX model ({describe_error(error)})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(path, "not an ONNX model (no graph in the file)")
    # onnx_ir reads no sparse initializer: the folded model would read values it no longer has.
    sparse = list(dict.fromkeys(tensor.values.name for graph in proto_graphs(model.graph) for tensor in graph.sparse_initializer))
    if sparse:
        names = ", ".join(sparse[:3]) + (", ..." if len(sparse) > 3 else "")
        raise InputError(path, f"sparse initializers ({names}) are not supported; store them dense to fold the model")
    _check_inlined_size(model, path)
    return model


def _sort_topologically(graph: onnx.GraphProto) -> bool:
    """Put ``graph``'s nodes in an order where each comes after the nodes making its inputs, keeping their
    order where it already is one (onnxruntime runs graphs in any order; onnx's checker, and bnfold with it,
    takes only sorted ones: onnxruntime's float16 converter with keep_io_types writes its input casts last).
    False, changing nothing, when there is none (a cycle, an input nothing makes) or a node holds a subgraph
    (whose reads of outer values would count as inputs too)."""
    nodes = list(graph.node)
    if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in nodes for attribute in node.attribute):
        return False
    producer = {output: index for index, node in enumerate(nodes) for output in node.output if output}
    given = {"", *(value.name for value in graph.input), *(tensor.name for tensor in graph.initializer)}
    if any(name not in producer and name not in given for node in nodes for name in node.input):
        return False
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = collections.defaultdict(list)
    for index, node in enumerate(nodes):
        for source in {producer[name] for name in node.input if name in producer}:
            waiting[index] += 1
            readers[source].append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers[index]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) < len(nodes):
        return False
    del graph.node[:]
    graph.node.extend(nodes[index] for index in order)
    return True


def read_model_proto(path: Path) -> onnx.ModelProto:
    """``onnx.load(path, load_external_data=False)``, parsed from a memory map of a binary file rather than
    from a copy of its bytes: on ResNet-50 (98 MiB) 0.08 s instead of 0.16 s, and no transient copy of the
    file in memory. The parsed model holds copies of everything (the map is closed before returning); a
    text-format file (known by its extension, as onnx decides), or a file that cannot be mapped, goes
    through onnx.load. (A file that another process truncates during the parse ends this one with SIGBUS,
    where a read would have seen a short file and said so: a risk taken for a parse that lasts 0.1 s.)"""
    if onnx.serialization.registry.get_format_from_file_extension(path.suffix) not in (None, "protobuf"):
        return onnx.load(str(path), load_external_data=False)
    with open(path, "rb") as file:
        try:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # not mappable (some special file systems)
            return onnx.load(file, load_external_data=False)
    model, size = onnx.ModelProto(), len(mapped)
    with mapped, memoryview(mapped) as contents:
        decoded = model.ParseFromString(contents)
    if decoded != size:  # (as onnx.load checks)
        raise DecodeError(f"Protobuf decoding consumed too few bytes: {decoded} out of {size}")
    return model


# The files of models this process has read, by file identity (path, inode, size, modification time): when
# the output exists, save_model asks for the input's files, and parsing a large model again only to list
# them costs 0.2-0.3 s and its size in memory. A file changed since is a new identity, parsed again.
_files_named: dict[tuple, frozenset[Path]] = {}


def _file_identity(path: Path) -> tuple:
    status = path.stat()
    return (str(path.absolute()), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def _model_file(path: str | os.PathLike) -> Path:
    """``path``, refused unless it is a non-empty regular file (reading a FIFO could wait forever, a device never end)."""
    path = Path(path)
    status = file_status(path)
    if status is None:
        raise MissingInputError(path, "no such file")
    if stat.S_ISDIR(status.st_mode):
        raise InputError(path, "is a directory, not an ONNX file")
    if not stat.S_ISREG(status.st_mode):
        raise InputError(path, "not a regular file (a FIFO, a device or a socket), not an ONNX model")
    if status.st_size == 0:
        raise InputError(path, "empty file, not an ONNX model")
    return path


# How each element type's raw data is held in numpy (bfloat16 as its bits): the types whose raw data
# :func:`_checker_view` checks itself (tensors of other types go to the checker whole) and verification hands
# to onnxruntime as arrays (bnfold.onnx_fold.runtime).
RAW_STORAGE = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.BFLOAT16: np.uint16, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT16: np.int16, onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT64: np.uint64,
    onnx.TensorProto.BOOL: np.bool_,
}  # fmt: skip
# The fields of a plain raw-data tensor; one with any other field set (typed data, external data, a data
# location, a segment, metadata) goes to the checker whole.
_PLAIN_FIELDS = frozenset({"dims", "data_type", "name", "doc_string", "raw_data"})
# Below this many bytes per initializer on average, the copy below costs more than the checker's own parse.
_VIEW_BYTES_PER_TENSOR = 4096


def _checker_view(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """What onnx's checker is given: ``model``, or, when tensor bytes make most of the file, a copy whose
    plain raw-data initializers are one-element stand-ins of the same name and type. The checker
    serializes and parses whatever it is given, which on a ResNet-50 costs 0.2-0.3 s (all the weights),
    against a few milliseconds for the copy. Of a tensor's bytes the checker checks only that raw data is
    long enough for the shape and type; that check is made here, with the checker's words."""
    initializers = model.graph.initializer
    if path.stat().st_size < _VIEW_BYTES_PER_TENSOR * len(initializers):
        return model
    view = onnx.ModelProto()
    copy_fields(model, view, skip=("graph",))
    copy_fields(model.graph, view.graph, skip=("initializer",))
    for tensor in initializers:
        fields = {field.name: value for field, value in tensor.ListFields()}  # (one read of each set field)
        storage = RAW_STORAGE.get(tensor.data_type)
        dims = fields.get("dims", ())
        if storage is None or "raw_data" not in fields or not fields.keys() <= _PLAIN_FIELDS or any(dim < 0 for dim in dims):
            view.graph.initializer.add().CopyFrom(tensor)  # anything unusual: the checker sees it whole
            continue
        itemsize = np.dtype(storage).itemsize
        size, needed = len(fields["raw_data"]), math.prod(dims) * itemsize
        if size < needed:
            raise InputError(
                path,
                f"not a valid ONNX model (ValidationError: TensorProto (tensor name: {tensor.name}) raw_data size "
                f"({size} bytes) is too small for the declared shape and type ({needed} bytes required).)",
            )
        stand_in = view.graph.initializer.add()
        stand_in.name, stand_in.data_type, stand_in.raw_data = tensor.name, tensor.data_type, bytes(itemsize)
    return view


def data_inputs(graph: ir.Graph) -> list[ir.Value]:
    """The graph's inputs that are not initializers (what verification feeds), in order: an input with an
    initializer is an overridable default."""
    return [value for value in graph.inputs if value.name not in graph.initializers]


def data_input_names(path: str | os.PathLike) -> list[str]:
    return [value.name for value in data_inputs(load_model(path).graph)]


def external_data_files(model: ir.Model) -> set[Path]:
    """The files the model's external tensors are read from."""
    return {Path(tensor.path) for tensor in _external_tensors(model)}


def graph_and_functions(model: ir.Model) -> list[ir.Graph]:
    """The model's graph and the graphs of its model-local functions (subgraphs are theirs to walk)."""
    return [model.graph, *(function.graph for function in model.functions.values())]


def _external_tensors(model: ir.Model):
    """Every tensor of the model kept in an external data file: initializers and Constant attributes, in the graph,
    its subgraphs and the model-local functions."""
    import onnx_ir as ir

    for graph in graph_and_functions(model):
        for tensor in ir.external_data._all_tensors(graph, include_attributes=True):
            if isinstance(tensor, ir.ExternalTensor):
                yield tensor


def _check_external_data_fields(model: onnx.ModelProto, path: Path) -> None:
    """An external tensor's offset and length must be whole numbers of bytes (onnx_ir's error for another said
    nothing of which tensor, or why)."""
    for tensor in _tensors(model):
        for entry in tensor.external_data if tensor.data_location == onnx.TensorProto.EXTERNAL else ():
            if entry.key in ("offset", "length") and not (entry.value.isascii() and entry.value.isdigit()):
                raise InputError(path, f"external data {entry.key} {entry.value!r} of tensor {tensor.name!r} is not a whole number of bytes")


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external data location must name a regular file inside the model's folder (after symlinks),
    long enough for its tensor: a hostile model could otherwise make bnfold read, and copy into its
    output, any file the user can read."""
    folder = path.absolute().parent.resolve()
    for tensor in _external_tensors(model):
        location = tensor.location
        try:
            # (os.path.realpath leaves a symlink loop as it is, for the lookup below to report; Path.resolve raises)
            data_path = Path(os.path.realpath(folder / location))
        except (OSError, ValueError) as error:  # a NUL byte
            raise InputError(path, f"external data location {location!r} of tensor {tensor.name!r} is unusable ({error})") from None
        if Path(location).is_absolute() or not data_path.is_relative_to(folder):
            raise InputError(
                path,
                f"external data location {location!r} of tensor {tensor.name!r} leaves the model's folder; "
                "bnfold reads external data only from the model's own folder",
            )
        try:
            status = file_status(data_path)
        except InputError as error:
            raise InputError(path, f"external data location {location!r} of tensor {tensor.name!r} {error.problem}") from None
        if status is None:
            raise InputError(path, f"external data file {location!r} of tensor {tensor.name!r} is missing")
        if not stat.S_ISREG(status.st_mode):
            raise InputError(path, f"external data location {location!r} of tensor {tensor.name!r} is not a regular file")
        # (a length other than the tensor's size: onnx and onnxruntime refuse it, where onnx_ir reads the tensor's size)
        if tensor.length is not None and tensor.length != tensor.nbytes:
            raise InputError(
                path, f"external data of tensor {tensor.name!r} has length {tensor.length}, but the tensor takes {tensor.nbytes} bytes"
            )
        if status.st_size < (tensor.offset or 0) + tensor.nbytes:
            raise InputError(path, f"external data file {location!r} is truncated (tensor {tensor.name!r})")


def tensor_bytes(model: ir.Model) -> int:
    return sum(
        value.const_value.nbytes
        for graph in (model.graph, *model.graph.subgraphs())
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def check_writable(path: str | os.PathLike, read_from: Iterable[str | os.PathLike] = ()) -> None:
    """Fail before any work when the output cannot be written, is not a regular file (a FIFO, a device:
    replacing ``/dev/null`` is never what was meant), or is one of the files ``read_from``."""
    path = Path(path)
    directory = path.parent
    status, directory_status = file_status(path), file_status(directory)
    if status is not None and stat.S_ISDIR(status.st_mode):
        raise InputError(path, "output is a directory")
    if directory_status is None or not stat.S_ISDIR(directory_status.st_mode):
        raise InputError(path, f"output directory {str(directory)!r} does not exist")
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise InputError(path, "output exists and is not a regular file (a device, FIFO or socket)")
    if not os.access(directory, os.W_OK) or (status is not None and not os.access(path, os.W_OK)):
        raise InputError(path, "output is not writable")
    for source in read_from:
        if _same_file(path, Path(source)):
            raise InputError(path, f"output would replace {str(source)!r}, which the model is read from; write elsewhere")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# Scratch directories are named kind-PID-random so that a later run can tell those of dead runs (killed
# before they could clean up) and remove them; a marker file inside proves bnfold made one: a folder of the user's
# named alike (``bnfold-runs-20240101-final``) is never touched.
_SCRATCH_KINDS = ("staging", "verify", "session")
_SCRATCH_NAME = re.compile(rf"\.?bnfold-(?:{'|'.join(_SCRATCH_KINDS)})-(\d+)-\w+")
_SCRATCH_MARKER = ".bnfold-scratch"


@contextlib.contextmanager
def scratch_directory(kind: str, parent: str | os.PathLike | None = None, *, hidden: bool = False):
    """A fresh directory ``bnfold-KIND-PID-*`` in ``parent`` (default: the system's temporary directory),
    removed on exit; stale ones left there by runs that no longer exist are removed first."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    _remove_stale_scratch(parent)
    prefix = f"{'.' if hidden else ''}bnfold-{kind}-{os.getpid()}-"
    directory = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        (Path(directory) / _SCRATCH_MARKER).touch()
        yield Path(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _remove_stale_scratch(parent: Path) -> None:
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        match = _SCRATCH_NAME.fullmatch(entry.name)
        if match and _made_by_bnfold(entry) and not _process_exists(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)


def _made_by_bnfold(entry: os.DirEntry) -> bool:
    """A directory of this user's (not a symlink) holding bnfold's marker file."""
    try:
        return (
            entry.is_dir(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_uid == os.getuid()
            and os.path.isfile(os.path.join(entry.path, _SCRATCH_MARKER))
            and not os.path.islink(os.path.join(entry.path, _SCRATCH_MARKER))
        )
    except OSError:
        return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or a name that only looks like ours: leave it
    return True


def save_model(
    model: ir.Model | onnx.ModelProto,
    path: str | os.PathLike,
    external_data: bool | None = None,
    *,
    read_from: Iterable[str | os.PathLike] = (),
    pending: dict[str, np.ndarray] | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically: staged in a directory beside it, then renamed.

    ``read_from`` names the input model files (their external data files count too) that must survive:
    ``path`` may be none of them nor any file the model's tensors are read from. With ``external_data``
    (default: when the input had it, or the tensors pass the protobuf limit) the tensors go to a data file
    of this write's own, ``<name>.<8 hex>.data``, placed before the model is renamed: a model and its data
    appear together or not at all, an interrupted or concurrent run can never pair a model with another
    run's data, and no existing file but ``path`` is ever replaced. Once the new model is in place, the data
    files bearing its name that the replaced model read are removed, unless they belong to ``read_from``.
    A ``ModelProto`` within the protobuf limit is written by :mod:`bnfold.onnx_fold.protobuf_writer`, a piece at
    a time (onnx_ir's writer is about twice as slow), with the data of its initializers named in ``pending``
    (:func:`bnfold.onnx_fold.folding.fold_onnx_file`) from those arrays.
    """
    path = Path(path)
    serialized = None
    if isinstance(model, onnx.ModelProto):
        serialized = None if external_data else _serialized_within_limit(model, pending)
        if serialized is None:
            import onnx_ir as ir

            fill_pending_data(model, pending or {})
            model = ir.from_proto(model)
        else:
            external_data = False
    kept = {file for source in read_from for file in model_files(source)} if file_status(path) is not None else set(map(Path, read_from))
    tensor_files = external_data_files(model) if serialized is None else set()
    check_writable(path, [*kept, *tensor_files])
    if external_data is None:
        external_data = bool(tensor_files) or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = f"{path.name}.{os.urandom(4).hex()}.data" if external_data else None
    # (by file identity: a location such as ``sub/../out.onnx.data`` or a symlink names a kept file too)
    orphaned = {file for file in _own_data_files(path) if not any(_same_file(file, Path(source)) for source in kept)}
    try:
        with scratch_directory("staging", path.parent, hidden=True) as staging:
            staged_model = staging / path.name
            if serialized is not None:
                with open(staged_model, "wb") as file:
                    serialized.write(file)
            else:
                import onnx_ir as ir

                _attribute_tensors_in_memory(model)
                ir.save(model, staged_model, external_data=data_name)
            if data_name:
                os.link(staging / data_name, path.parent / data_name)  # fails rather than replace a file
            os.replace(staged_model, path)
    except OSError as error:
        raise InputError(path, f"cannot write output ({error.strerror or error})") from None
    for file in orphaned:
        file.unlink(missing_ok=True)


def _attribute_tensors_in_memory(model: ir.Model) -> None:
    """Read into the model each attribute tensor held in an external data file (a Constant's value): onnx_ir writes
    initializers to the output's data file, but left these naming the input's file, relative to a folder the output
    may not be in (an output onnxruntime could not load)."""
    import onnx_ir as ir

    for graph in graph_and_functions(model):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for name, attribute in list(node.attributes.items()):
                if attribute.type not in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
                    continue
                several = attribute.type == ir.AttributeType.TENSORS
                tensors = attribute.value if several else [attribute.value]
                if any(isinstance(tensor, ir.ExternalTensor) for tensor in tensors):
                    loaded = ir.external_data.convert_tensors_from_external(tensors)
                    node.attributes[name] = ir.Attr(name, attribute.type, loaded if several else loaded[0])


def _serialized_within_limit(model: onnx.ModelProto, pending: dict[str, np.ndarray] | None) -> SerializedModel | None:
    """The model's serialization, planned, when it fits one protobuf file."""
    try:
        serialized = SerializedModel(model, pending)
    except ValueError:  # past protobuf's 2 GiB
        return None
    return serialized if serialized.size <= EXTERNAL_DATA_THRESHOLD else None


def model_files(path: str | os.PathLike) -> set[Path]:
    """``path`` and, when it is an ONNX model, the external data files it names (absolute paths)."""
    path = Path(path).absolute()
    with contextlib.suppress(OSError):
        known = _files_named.get(_file_identity(path))
        if known is not None:
            return set(known)
    try:
        proto = read_model_proto(path)
    except Exception:  # not an ONNX model (or not there): only the file itself
        return {path}
    locations = {
        entry.value
        for tensor in _tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return {path} | {path.parent / location for location in locations}


def proto_graphs(graph: onnx.GraphProto):
    """``graph`` and its subgraphs, at any depth."""
    yield graph
    yield from _subgraphs(graph.node)


def _subgraphs(nodes):
    """The subgraphs of ``nodes``' attributes, at any depth."""
    for node in nodes:
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                yield from proto_graphs(subgraph)


def _nodes_within(nodes):
    """``nodes`` and those of their subgraphs, at any depth."""
    yield from nodes
    for subgraph in _subgraphs(nodes):
        yield from subgraph.node


def _tensors(model: onnx.ModelProto):
    """Every initializer and Constant tensor of the model's graph, its subgraphs and its local functions."""
    function_nodes = [node for function in model.functions for node in function.node]
    for graph in (*proto_graphs(model.graph), *_subgraphs(function_nodes)):
        yield from graph.initializer
    for node in (*_nodes_within(model.graph.node), *_nodes_within(function_nodes)):
        for attribute in node.attribute:
            yield from [attribute.t] if attribute.type == onnx.AttributeProto.TENSOR else attribute.tensors


def _own_data_files(path: Path) -> set[Path]:
    """The data files beside ``path`` bearing its name (``<name>.data``, ``<name>.<hex>.data``) that the
    model now there reads: replacing the model orphans them. Data files named otherwise may be shared."""
    own_name = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{8})?\.data")
    if not path.is_file() or not any(own_name.fullmatch(entry.name) for entry in os.scandir(path.parent)):
        return set()  # nothing to clean up: spare the parse
    return {file for file in model_files(path) - {path.absolute()} if file.parent == path.absolute().parent and own_name.fullmatch(file.name)}


def save(model: ir.Model | onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write a model that :func:`bnfold.fold_onnx` returned (either kind) to ``path``, as the CLI does:
    atomically, tensors in a data file of its own when the model has external data or passes 2 GiB."""
    save_model(model, path)
