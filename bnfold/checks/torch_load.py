"""Loading the PyTorch models the check command is given, by what the file holds (not its suffix).

- a ``torch.export`` archive (``.pt2``): :func:`torch.export.load`;
- a TorchScript archive: :func:`torch.jit.load`, only when the caller trusts the file (its code runs);
- a state-dict saved with ``torch.save``: loaded with ``weights_only=True`` into the architecture that
  ``--factory module:callable`` builds;
- a whole pickled module (``torch.save(model)``): unpickling it imports and runs code named in the
  file, so it is refused unless the caller trusts the file (``--trust-pickle``).

What is unpickled: unless the caller trusts the file, nothing from it goes through Python's pickle.
State-dicts and the tensors of a ``.pt2`` archive (weights, constants, example inputs) are read by
torch's ``weights_only`` unpickler, which builds only tensors and plain containers (safe from torch
2.6, CVE-2025-32434). ``torch.export.load`` would also run ``pickle`` (opaque constants),
``torch.load(weights_only=False)`` (pickled weights and constants, and example inputs the safe
loader refuses), the TorchScript object unpickler (custom objects), ``sympy.sympify`` (shape
expressions, which it evaluates as Python) and AOTInductor's native libraries: while it loads, each is
refused, and so is the archive; so is a program whose graph calls anything but aten and prims operators that
open no file and print nothing (``aten::from_file`` creates and maps one; a higher-order operator such as
``with_effects`` calls whatever operator its arguments name: ``check`` runs the program). TorchScript archives
are refused: their code runs as ``torch.jit.load`` loads them (``__setstate__``) and as they run, and
TorchScript reaches the same operators. ``--trust-pickle`` lifts every refusal: the file may then run code (``torch.jit.load``'s C++
unpickler still resolves only TorchScript types).

``--model module:callable`` skips the file: the callable returns the model. For both callables the
current directory is importable, as it is for ``python -m``.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import logging
import os
import pickle
import re
import stat
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import sympy
import torch
from torch import nn

from bnfold.checks.torch_inspect import Model
from bnfold.errors import InputError, MissingInputError, describe_error, file_status


def load_torch_model(
    path: str | os.PathLike, *, factory: Callable[[], nn.Module] | str | None = None, trust_pickle: bool = False
) -> Model:
    """The model in ``path``; :class:`InputError` (one line) when it cannot or must not be loaded."""
    path = Path(path)
    status = file_status(path)
    if status is None:
        raise MissingInputError(path, "no such file")
    if not stat.S_ISREG(status.st_mode):
        raise InputError(path, "not a file")
    entries = _archive_entries(path)
    kind = _archive_kind(entries)
    if kind == "export" and not trust_pickle:
        return _load_untrusted_export(path, entries)
    if kind == "torchscript" and not trust_pickle:
        raise InputError(
            path,
            "is a TorchScript archive: its code runs as it loads and runs, and may call operators that write files "
            "(aten::from_file, aten::save), so it is refused; pass --trust-pickle if you trust the file",
        )
    try:
        if kind == "export":
            return torch.export.load(path)
        if kind == "torchscript":
            return torch.jit.load(path, map_location="cpu")
    except Exception as error:  # a damaged archive: whatever the reader raises
        raise InputError(path, f"not a readable {kind} archive ({describe_error(error)})") from None
    saved = _unpickle(path, trust_pickle)
    if isinstance(saved, nn.Module):
        return saved
    if _is_state_dict(saved):
        if factory is None:
            raise InputError(
                path, "is a state-dict: give the factory that builds its architecture (--factory module:callable; factory= in Python)"
            )
        return _load_state_dict(path, saved, factory)
    raise InputError(path, f"holds a {type(saved).__name__}, not a model or a state-dict")


def _archive_entries(path: Path) -> list[str]:
    """The entries of a zip archive, below its top folder as torch names them; none for other files. An entry that
    expands far past its stored size is refused (torch stores its entries uncompressed: a 3 MB archive of
    compressed zeros took 3 GB and 14 s to load)."""
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.file_size > _MOST_EXPANSION * info.compress_size + _ANY_EXPANSION:
                raise InputError(
                    path,
                    f"archive entry {info.filename!r} expands to {info.file_size} bytes from {info.compress_size} "
                    "(torch stores its archives uncompressed): refused as a decompression bomb",
                )
        return [name.partition("/")[2] for name in archive.namelist()]


# Deflate at its best makes zeros about 1000 times smaller; weights, a few percent.
_MOST_EXPANSION = 20
_ANY_EXPANSION = 1 << 20


def _archive_kind(entries: list[str]) -> str:
    """The kind of file, from its archive entries: "export", "torchscript" or "pickle" (torch.save, zipped or not)."""
    if "archive_format" in entries:
        return "export"
    if "constants.pkl" in entries or any(entry.startswith("code/") for entry in entries):
        return "torchscript"
    return "pickle"


_AOTI_ENTRIES = "data/aotinductor/"


def _load_untrusted_export(path: Path, entries: list[str]) -> torch.export.ExportedProgram:
    """torch.export.load with everything that would run code from the file refused (see the module docstring)."""
    refusals: list[str] = []
    if any(entry.startswith(_AOTI_ENTRIES) for entry in entries):
        # torch.export.load loads every AOTInductor model in the archive: a native library, or C++ it compiles.
        refusals.append("AOTInductor compiled code")
    else:
        logged: list[str] = []
        try:
            with _code_from_the_file_refused(refusals), _export_log_kept(logged):
                program = torch.export.load(path)
        except Exception as error:  # a damaged archive: whatever the reader raises
            if isinstance(error, MemoryError):
                raise  # (past --max-memory: no fault of the file)
            if not refusals:
                raise InputError(path, f"not a readable export archive ({logged[0] if logged else describe_error(error)})") from None
        else:
            unsafe = _unsafe_calls(program)
            if not unsafe:
                return program
            refusals.append(f"a call of {unsafe[0]} (check runs the program)")
    # torch wraps some refusals in its own errors, or catches them and tries its legacy format: the record tells.
    raise InputError(
        path,
        f"is a torch.export archive holding {refusals[0]}: loading or running it runs code from the file, so it is "
        "refused; pass --trust-pickle if you trust the file",
    ) from None


# What a program from an untrusted archive may call: aten and prims operators (operator.getitem picks an output),
# but none that opens a file by name (aten::from_file creates and maps one; aten::save) or writes to the terminal
# (aten::_print: raw bytes into check's output). Higher-order operators are not run: they call what their arguments
# name (with_effects(token, aten.from_file, ...) ran any operator).
_OPERATOR_NAMESPACES = ("aten", "prims")
_FILE_ARGUMENTS = frozenset({"filename", "file", "path", "filepath"})
_UNSAFE_OPERATORS = frozenset({"aten::_print"})


def _unsafe_calls(program: torch.export.ExportedProgram) -> list[str]:
    """What the program's graphs call that :data:`_OPERATOR_NAMESPACES` does not allow, described."""
    found = []
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if node.op != "call_function" or _is_plain_arithmetic(node.target):
                continue
            target = node.target
            if not isinstance(target, torch._ops.OpOverload):
                found.append(f"{getattr(target, '__name__', target)}, which is not an operator bnfold runs from an untrusted file")
            elif target.namespace not in _OPERATOR_NAMESPACES:
                found.append(f"{target.name()}, an operator outside {' and '.join(_OPERATOR_NAMESPACES)}")
            elif any(argument.name in _FILE_ARGUMENTS for argument in target._schema.arguments):
                found.append(f"{target.name()}, which opens a file by name")
            elif target.name() in _UNSAFE_OPERATORS:
                found.append(f"{target.name()}, which writes to the terminal")
    return found


def _is_plain_arithmetic(target) -> bool:
    """Python's own operators (a dynamic shape's ``s0 * 3``, an output picked by ``getitem``), ``math``'s functions
    and torch's symbolic-integer helpers (``sym_max``, ``sym_not``): values only."""
    module = getattr(target, "__module__", None)
    return module in ("_operator", "math") or (module in ("torch", "torch.fx.experimental.sym_node") and target.__name__.startswith("sym_"))


@contextlib.contextmanager
def _export_log_kept(logged: list[str]) -> Iterator[None]:
    """While active, torch.export's log records go to ``logged`` (one line each) instead of stderr: loading a damaged
    archive, it logs the reader's whole traceback, then raises an error that points at it."""
    logger = logging.getLogger("torch.export")

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(describe_error(record.exc_info[1]) if record.exc_info else record.getMessage())

    handlers, propagates = logger.handlers[:], logger.propagate
    logger.handlers[:] = [Keep()]  # (torch's own handler sits on this logger)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagates


class _Refused(Exception):
    """Raised instead of running an unpickler or an evaluator on an untrusted archive. Not a RuntimeError:
    torch.export.load catches those and retries the archive in its legacy format."""


@contextlib.contextmanager
def _code_from_the_file_refused(refusals: list[str]) -> Iterator[None]:
    """While active: ``torch.load`` only ever loads safely (``weights_only=True``); pickle, the TorchScript
    object unpickler and sympify of anything but plain sympy expressions raise :class:`_Refused`. Each
    refusal is appended to ``refusals``. The patches are process-wide while active, which is only during one load."""

    def refuse(what: str):
        refusals.append(what)
        raise _Refused(what)

    def refuse_pickle(*args, **kwargs):
        refuse("pickled data")

    class RefusingUnpickler(pickle.Unpickler):  # a class, so that modules subclassing it meanwhile still import
        def __init__(self, *args, **kwargs):
            refuse_pickle()

        load = refuse_pickle

    def safe_torch_load(*args, weights_only=None, **kwargs):
        try:
            return original_torch_load(*args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as error:  # the safe unpickler's refusal (a damaged file raises other errors)
            needed = _refused_global(error)
            refuse(f"pickled data (it needs {needed})" if needed else "pickled data")

    def plain_sympify(text, *args, **kwargs):
        if isinstance(text, str) and not _is_plain_sympy(text, kwargs.get("locals") or {}):
            refuse("a shape expression that is not plain sympy (sympify evaluates it as Python)")
        return original_sympify(text, *args, **kwargs)

    original_torch_load, original_sympify = torch.load, sympy.sympify
    patches = [
        (torch, "load", safe_torch_load),
        (pickle, "load", refuse_pickle),
        (pickle, "loads", refuse_pickle),
        (pickle, "Unpickler", RefusingUnpickler),
        (torch._C, "_pickle_load_obj", refuse_pickle),
        (sympy, "sympify", plain_sympify),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


# What sympy's srepr writes (torch serializes shape expressions with it): calls, names, numbers, keywords.
_PLAIN_SYMPY_NODES = (
    ast.Expression, ast.Call, ast.keyword, ast.Name, ast.Load, ast.Constant, ast.Tuple, ast.UnaryOp, ast.USub, ast.UAdd,
)
# No parentheses: sympy may parse a string argument, and a string without them cannot call anything.
_PLAIN_SYMPY_STRING = re.compile(r"[\w.+-]*")


def _is_plain_sympy(text: str, local_names: Mapping[str, object]) -> bool:
    """Whether evaluating ``text`` as sympify does only builds sympy objects: every name is a sympy class
    or constant, one of torch's ``local_names``, or unknown to Python and sympy (so sympify makes it a Symbol)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _PLAIN_SYMPY_NODES):
            return False
        if isinstance(node, ast.Name) and not _is_sympy_name(node.id, local_names):
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if not _PLAIN_SYMPY_STRING.fullmatch(node.value) or "__" in node.value:
                return False
    return True


def _is_sympy_name(name: str, local_names: Mapping[str, object]) -> bool:
    if name in local_names:
        return True
    value = vars(sympy).get(name)
    if value is None:
        return not hasattr(builtins, name)
    return isinstance(value, sympy.Basic) or (isinstance(value, type) and issubclass(value, sympy.Basic))


def _refused_global(error: Exception) -> str | None:
    """The first class the safe unpickler would have had to import, which it names in its error."""
    # (torch's words: "Unsupported global: GLOBAL x.y", or for a blocked module "unsupported GLOBAL x.y whose module ...")
    refused = re.search(r"[Uu]nsupported(?: global:)? GLOBAL ([\w.]+)", str(error))
    return refused.group(1) if refused else None


def _unpickle(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # not a torch file at all: torch raises UnpicklingError, KeyError, RuntimeError, ...
        needed = _refused_global(error)
        if needed and not trust_pickle:
            raise InputError(
                path,
                f"is a pickled module (it needs {needed}): loading it runs code from the file, so it is "
                "refused; pass --trust-pickle if you trust the file, or save a state-dict or a torch.export archive",
            ) from None
        raise InputError(path, f"not a readable PyTorch or ONNX file ({_load_error(error)})") from None


def _load_error(error: Exception) -> str:
    """The error in one line: the safe unpickler's own complaint when torch wraps one in its advice."""
    _, wrapped, complaint = str(error).partition("WeightsUnpickler error:")
    return describe_error(error, complaint if wrapped else None)


def _is_state_dict(saved) -> bool:
    return isinstance(saved, Mapping) and bool(saved) and all(isinstance(value, torch.Tensor) for value in saved.values())


def _load_state_dict(path: Path, state_dict: Mapping[str, torch.Tensor], factory: Callable[[], nn.Module] | str) -> nn.Module:
    model = factory() if callable(factory) else call_entry_point(factory, "--factory")
    if not isinstance(model, nn.Module):
        raise InputError(str(factory), f"the factory returned a {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # missing, unexpected or misshapen entries
        # torch's message is a header line, then one line per kind of mismatch: the first is the news.
        mismatch = str(error).splitlines()[1:2]
        raise InputError(path, f"does not fit the factory's architecture ({describe_error(error, *mismatch)})") from None
    # A checkpoint from before BatchNorm counted its batches (or converted from another framework) has no count:
    # torch's loader fills in 0, which would read as statistics never trained (BN003). The count is unknown.
    for name, module in model.named_modules():
        counted = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_batches_tracked is not None and counted not in state_dict:
            module.num_batches_tracked = None
    # A state-dict stores no train/eval mode, and factories build modules in training mode: check the
    # model as it will be deployed, or every BatchNorm would be a false BN001.
    return model.eval()


def call_entry_point(spec: str, option: str):
    """Call ``package.module:attribute.path`` (imported with the current directory importable)."""
    module_name, sep, attribute_path = spec.partition(":")
    if not sep or not module_name or not attribute_path:
        raise InputError(spec, f"{option} must be module:callable")
    try:
        with _current_directory_importable():
            target = importlib.import_module(module_name)
        for attribute in attribute_path.split("."):
            target = getattr(target, attribute)
    except (ImportError, AttributeError) as error:
        raise InputError(spec, f"{option}: cannot import ({error})") from None
    except (Exception, SystemExit) as error:  # the module's own code failed (a SyntaxError, an argparse exit)
        raise InputError(spec, f"{option}: cannot import (importing it raised {describe_error(error)})") from None
    if not callable(target):
        raise InputError(spec, f"{option}: {attribute_path} is not callable")
    try:
        return target()
    # The user's code: report it as a bad input, in one line (sys.exit too: it would end the whole check, exit 0).
    except (Exception, SystemExit) as error:
        raise InputError(spec, f"{option}: calling it raised {describe_error(error)}") from None


@contextlib.contextmanager
def _current_directory_importable():
    """The console script's sys.path holds its own directory, not the current one as ``python -m`` does."""
    directory = os.getcwd()
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            sys.path.remove(directory)


def model_from_callable(spec: str) -> Model:
    """What ``--model module:callable`` returns, which must be a model."""
    model = call_entry_point(spec, "--model")
    if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        raise InputError(spec, f"--model returned a {type(model).__name__}, not an nn.Module or ExportedProgram")
    return model
