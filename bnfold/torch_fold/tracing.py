"""The model's real data flow as a graph: torch.fx symbolic tracing first, torch.export as the fallback.

Pairs come from this graph, never from module order, so a BatchNorm registered after a conv in
``__init__`` but not called after it in ``forward`` is not a pair.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import logging
import operator
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from bnfold.errors import describe_error
from bnfold.reference import REFERENCE_BATCHNORMS
from bnfold.torch_fold.stand_ins import can_stand_in, layers_stood_in

# The node.meta key of a traced value's (shape, dtype), recorded while the fx graph runs on the example inputs.
SHAPE_AND_DTYPE = "bnfold_shape_and_dtype"

FOLDABLE_LAYER_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


class ModelNotTraceableError(RuntimeError):
    """Neither torch.fx nor torch.export could turn the model into a graph."""


def has_torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs the ``forward`` of the torch class it derives from, unchanged.

    A subclass that only adds attributes or an ``__init__`` computes what the torch layer computes;
    one with its own ``forward`` (a "same"-padding conv, a QAT conv) may compute anything.
    """
    torch_class = next(cls for cls in type(module).__mro__ if cls.__module__.startswith("torch."))
    return type(module).forward is torch_class.forward


def computes_torch_forward(module: nn.Module) -> bool:
    """Whether a call of ``module`` computes what its torch class computes: an unmodified torch forward, or
    bnfold's reference BatchNorm, whose forward tests/test_reference.py holds to torch's."""
    return has_torch_forward(module) or isinstance(module, REFERENCE_BATCHNORMS)


def module_input(args: tuple, kwargs: dict) -> Any:
    """The data a torch layer or BatchNorm module is called on, ``module(x)`` or ``module(input=x)``, from the
    call's arguments (a graph node's, or a forward hook's)."""
    return args[0] if args else kwargs.get("input")


class _UnmodifiedLayersAsLeavesTracer(fx.Tracer):
    """Keeps unmodified torch layers and BatchNorms as single calls and traces through everything else.

    The default tracer keeps every ``torch.nn`` module as a leaf and traces through user classes, so a
    plain ``class MyConv(nn.Conv2d)`` would dissolve into ``F.conv2d``, while a torch subclass with
    its own forward would stay opaque. Here the test is the forward that actually runs.

    Buffers are traced as graph inputs like parameters, so that a scale computed from them in forward
    (FrozenBatchNorm2d's ``weight * (running_var + eps).rsqrt()``) stays traceable to its source instead of
    becoming a constant fx computed while tracing. A module whose whole forward is such a per-channel affine
    (FrozenBatchNorm2d itself) stays one call, its form traced once per class and settings (:class:`AffineForm`).
    """

    proxy_buffer_attributes = True

    def __init__(self, opaque: Opaque | None = None):
        super().__init__()
        self.opaque = opaque or Opaque()
        self.failed_module: nn.Module | None = None  # the innermost module whose forward raised while traced through

    def trace(self, root: nn.Module, concrete_args: dict | None = None) -> fx.Graph:
        self._tensor_paths: tuple[dict[int, str], dict[int, str]] | None = None
        self.affine_forms: dict[str, AffineForm] = {}
        self.module_calls: dict[str, list[bool]] = collections.defaultdict(list)
        state_before = _ModuleState(root)
        try:
            graph = super().trace(root, concrete_args)
        finally:
            assigned = state_before.restore_proxies()
        if assigned:
            # (left there, a proxy in a buffer makes each later use of it add nodes to the graph that runs it)
            raise RuntimeError(f"forward assigns a traced value to {assigned[0]}, which fx cannot follow")
        return graph

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict[str, fx.Proxy]):
        """fx's ``Tracer.getattr`` (a parameter, else with ``proxy_buffer_attributes`` a buffer, becomes one
        ``get_attr`` proxy per path), with the paths looked up instead of searched."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._tensor_paths is None:
            # fx's own getattr finds an attribute's path by walking every parameter and buffer of the model on
            # each read (quadratic in the model's size); these are the paths it would find, first name first.
            self._tensor_paths = _first_paths(self.root.named_parameters()), _first_paths(self.root.named_buffers())
        parameter_paths, buffer_paths = self._tensor_paths
        path = parameter_paths.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if path is None:
            path = buffer_paths.get(id(attr_val))
        if path is None:
            return attr_val
        if path not in parameter_proxy_cache:
            parameter_proxy_cache[path] = self.create_proxy("get_attr", path, (), {})
        return parameter_proxy_cache[path]

    def is_leaf_module(self, module: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(module, (*FOLDABLE_LAYER_TYPES, nn.modules.batchnorm._BatchNorm)):
            return computes_torch_forward(module)
        form = affine_form(module)
        if form is not None:
            self.affine_forms[module_qualified_name] = form
            return True
        return self.opaque.holds(module) or super().is_leaf_module(module, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        # Each call of each module, as whether it passed one positional argument alone: a module traced through
        # leaves no node of its call (TracedModel.module_calls).
        with contextlib.suppress(NameError):  # (a module outside the model's tree has no path)
            self.module_calls[self.path_of_module(m)].append(len(args) == 1 and not kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # (the innermost call sees the error first)
                self.failed_module = m
            raise


@dataclasses.dataclass
class Opaque:
    """Modules fx keeps as one call instead of tracing through them, because tracing through them failed (the last
    resort of :func:`trace_model`): a module with neither children nor parameters by its class (onnx2torch's
    ``OnnxReshape``, ``OnnxShape``: every instance does the same), any other by itself. Never a layer, BatchNorm or
    affine form: its call would read as the torch module's."""

    classes: set[type] = dataclasses.field(default_factory=set)
    modules: set[nn.Module] = dataclasses.field(default_factory=set)

    def holds(self, module: nn.Module) -> bool:
        return type(module) in self.classes or module in self.modules

    def add(self, module: nn.Module) -> bool:
        """Whether ``module`` could be added (else tracing it as one call cannot help, or is not sound)."""
        if self.holds(module) or isinstance(module, (*FOLDABLE_LAYER_TYPES, nn.modules.batchnorm._BatchNorm)):
            return False
        if affine_form(module) is not None:
            return False
        if next(module.children(), None) is None and next(module.parameters(), None) is None:
            self.classes.add(type(module))
        else:
            self.modules.add(module)
        return True


@dataclasses.dataclass(frozen=True, eq=False)
class AffineForm:
    """The forward of a module without children that computes ``x * scale + shift`` (or ``- shift``) and nothing
    else, scale and shift from its own parameters, buffers and literals only (FrozenBatchNorm2d): the graph fx
    traced of it, read against any module of its class with the same settings (see :func:`affine_form`).

    Such a module stays one ``call_module`` node in the model's graph; the graph run computes its call with this
    graph (so the proof that the graph computes the model's outputs covers it) and keeps the scale and shift it
    computed for the analysis (``TracedModel.affine_values``)."""

    graph: fx.Graph
    product: fx.Node  # x * scale
    output: fx.Node  # product + shift, or product - shift
    scale: Any  # a node of the graph, or a literal
    shift: Any
    subtract: bool
    calls: int  # call nodes of the forward, the scale's and shift's computation included

    def run(self, module: nn.Module, data: torch.Tensor) -> dict[fx.Node, Any]:
        """Each node's value for ``module``'s call on ``data``, as its forward computes them."""
        values: dict[fx.Node, Any] = {}
        for node in self.graph.nodes:
            if node.op == "placeholder":
                values[node] = data
            elif node.op == "get_attr":
                values[node] = getattr(module, node.target)
            elif node.op != "output":
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
                if node.op == "call_method":
                    values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    values[node] = node.target(*args, **kwargs)
        return values


# Forms found so far by (class, forward, settings, tensor names); None for a module whose forward is no such form.
_AFFINE_FORMS: dict[tuple, AffineForm | None] = {}
_SETTINGS = (bool, int, float, str, type(None))
# The calls of x * y, x + y and x - y as fx, torch.export and TorchDynamo record them (functions, methods, aten ops).
MULTIPLY = frozenset({operator.mul, torch.mul, torch.ops.aten.mul.Tensor, "mul"})
ADD = frozenset({operator.add, torch.add, torch.ops.aten.add.Tensor, "add"})
SUBTRACT = frozenset({operator.sub, torch.sub, torch.ops.aten.sub.Tensor, "sub"})


def affine_form(module: nn.Module) -> AffineForm | None:
    """The :class:`AffineForm` of ``module``'s forward, else None.

    Only for a module of a class outside torch with no children, whose attributes other than its parameters
    and buffers are plain settings (numbers, strings, None): its forward then computes with its tensors and
    those settings alone, so fx traces one graph for every module of its class with the same settings and
    tensor names, and the form found for one is the others' (fx bakes the settings into the graph as
    literals). What a graph run computes with it is checked against the model's run like any other graph.
    """
    if type(module).__module__.startswith("torch.") or module._modules or has_hooks(module):
        return None
    settings = []
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if not isinstance(value, _SETTINGS):
            return None
        settings.append((name, type(value), value))
    key = (type(module), type(module).forward, module.training, tuple(sorted(settings)), tuple(module._parameters), tuple(module._buffers))
    try:
        return _AFFINE_FORMS[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable setting
        return None
    form = _trace_affine_form(module)
    if len(_AFFINE_FORMS) > 1024:
        _AFFINE_FORMS.clear()
    _AFFINE_FORMS[key] = form
    return form


class _ModuleState:
    """Each module's parameters, buffers and attributes, to take back the fx proxies a forward assigns to them
    while traced (``self.steps = self.steps + 1``, ``self.cache = x``)."""

    def __init__(self, root: nn.Module):
        self._stores = [
            (path, store, dict(store))
            for path, module in root.named_modules(remove_duplicate=False)
            for store in (module._parameters, module._buffers, vars(module))
        ]

    def restore_proxies(self) -> list[str]:
        """Put back what each proxy replaced (or remove it); the paths of the attributes that held one."""
        assigned = []
        for path, store, before in self._stores:
            for name, value in list(store.items()):
                if isinstance(value, fx.Proxy):
                    assigned.append(f"{path}.{name}" if path else name)
                    if name in before:
                        store[name] = before[name]
                    else:
                        del store[name]
        return assigned


def has_hooks(module: nn.Module) -> bool:
    """Whether hooks run with a call of ``module`` (its own, or every module's): they may change or read what goes
    in and out, so the call is more than its forward (its form, its fold)."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    hooks = nn.modules.module
    shared = (hooks._global_forward_hooks, hooks._global_forward_pre_hooks, hooks._global_backward_hooks, hooks._global_backward_pre_hooks)
    return any(own) or any(shared)


def _trace_affine_form(module: nn.Module) -> AffineForm | None:
    attributes_before = set(vars(module))
    try:
        graph = _UnmodifiedLayersAsLeavesTracer().trace(module)
    except Exception:  # noqa: BLE001 - not traceable on its own: traced through with the model instead
        return None
    finally:
        added = _take_added_attributes(module, attributes_before)
    if added:
        return None  # a tensor made in forward: a literal, not the module's own
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    (output,) = [node for node in graph.nodes if node.op == "output"]
    if len(placeholders) != 1 or len(output.args) != 1 or not isinstance(output.args[0], fx.Node):
        return None
    (data,) = placeholders
    result = output.args[0]
    found = multiply_add(result)
    if found is None:
        return None
    product, shift, subtract = found
    if list(data.users) != [product] or data not in product.args or product.args[0] is product.args[1]:
        return None
    scale = product.args[1] if product.args[0] is data else product.args[0]
    constant: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif node.op in ("call_function", "call_method") and node not in (product, result):
            if not node.all_input_nodes or not set(node.all_input_nodes) <= constant or mutates_or_draws(node):
                return None
            constant.add(node)
    if not any(node.op == "get_attr" for node in constant) or shift is product:
        return None  # literals only: arithmetic, not a BatchNorm
    calls = sum(node.op in ("call_function", "call_method") for node in graph.nodes)
    return AffineForm(graph, product, result, scale, shift, subtract, calls)


def is_op(node: Any, ops: frozenset) -> bool:
    """Whether ``node`` is a function or method call of one of ``ops``."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in ops


def multiply_add(node: Any) -> tuple[fx.Node, Any, bool] | None:
    """``node`` as ``product + shift`` (operands in either order) or ``product - shift``, ``product`` a
    two-operand multiply that only ``node`` reads: ``(product, shift, subtracts)``; else None."""
    if not is_op(node, ADD | SUBTRACT) or node.kwargs or len(node.args) != 2:
        return None
    subtracts = is_op(node, SUBTRACT)
    product = next((a for a in node.args if is_op(a, MULTIPLY) and not a.kwargs and len(a.args) == 2), None)
    if product is None or len(product.users) != 1 or (subtracts and node.args[0] is not product):
        return None
    return product, node.args[1] if node.args[0] is product else node.args[0], subtracts


def _first_paths(named_tensors) -> dict[int, str]:
    paths: dict[int, str] = {}
    for path, tensor in named_tensors:
        paths.setdefault(id(tensor), path)
    return paths


@dataclasses.dataclass
class ModelRun:
    """What the model computed on the example inputs in the run that proved its fx graph (the model before any
    fold), kept for verification so that it need not run the model again: its output, tensors copied (the
    folded model's run may change a tensor the forward returned, an input or a buffer, in place), and the input and output of each call of the
    modules asked for, copies taken as the call returns (a later in-place op would change them), in call
    order (at most two per module: verification needs one call, and to know whether there was another)."""

    output: Any
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


@dataclasses.dataclass
class TracedModel:
    """The graphs of one model's forward and how to get from their nodes to the model's tensors.

    fx and torch.export give one graph; TorchDynamo one per stretch of forward between graph breaks.
    ``attribute_paths`` maps each node that stands for a parameter or buffer (fx ``get_attr`` nodes,
    export's lifted placeholders, Dynamo's graph inputs) to its dotted path in ``model``; ``constants`` holds
    the tensors fx made while tracing (``_tensor_constant0``), which its ``get_attr`` nodes name but which are
    kept off the model. The graphs are read against the model itself: a GraphModule is built only for a graph
    result (:meth:`to_graph_module`).
    """

    model: nn.Module
    graphs: list[fx.Graph]
    method: Literal["fx", "export", "dynamo"]
    attribute_paths: dict[fx.Node, str]
    note: str
    constants: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The model's own run on the example inputs that proved an fx graph (see _computes_like), when asked to keep it.
    model_run: ModelRun | None = None
    # The values the graph run computed from parameters, buffers and literals only, with each tensor's version
    # then (see constant_value).
    constant_values: dict[fx.Node, tuple[Any, int | None]] = dataclasses.field(default_factory=dict)
    # Modules kept as one call whose forward is a per-channel affine (see AffineForm), by path; for each of their
    # calls the graph run made, the scale and shift it computed and the product's (shape, dtype).
    affine_forms: dict[str, AffineForm] = dataclasses.field(default_factory=dict)
    affine_values: dict[fx.Node, tuple[Any, Any, tuple | None]] = dataclasses.field(default_factory=dict)
    # Modules an fx graph keeps as one call because fx could not trace through them (see Opaque), by path.
    opaque_paths: tuple[str, ...] = ()
    # For an fx graph, each module's calls while fx traced, by path: whether each passed one positional argument
    # alone (fx records no node for the call of a module it traces through, only the calls its forward made).
    module_calls: dict[str, list[bool]] = dataclasses.field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        """The one graph of an fx trace, which a graph result is made of."""
        (graph,) = self.graphs
        return graph

    @property
    def nodes(self) -> list[fx.Node]:
        return [node for graph in self.graphs for node in graph.nodes]

    @property
    def graph_rewritable(self) -> bool:
        """Only an fx graph runs as a module of its own; exported and captured graphs are read, not returned."""
        return self.method == "fx"

    @property
    def modules_inlined(self) -> bool:
        """Whether module calls appear as the function calls their forward made (export, Dynamo), with the module
        in each node's ``nn_module_stack``; fx keeps unmodified torch modules as ``call_module`` nodes."""
        return self.method != "fx"

    def attribute_at(self, path: str) -> Any:
        """The parameter, buffer or fx constant at ``path`` (None for a bias probe, see absent_biases_probed), or the
        module for a module's path."""
        if path in self.constants:
            return self.constants[path]
        owner_path, _, name = path.rpartition(".")
        return getattr(self.module(owner_path), name)

    def constant_value(self, node: fx.Node) -> Any:
        """The value the graph run computed for ``node`` from parameters, buffers and literals only (the op run on
        the same values as any evaluation of it would run), when the run kept it and nothing has changed it in
        place since; else None."""
        value, version = self.constant_values.get(node, (None, None))
        if isinstance(value, torch.Tensor) and value._version != version:
            return None
        return value

    def module(self, path: str) -> nn.Module:
        """The model's module at ``path``, from one table of them (``get_submodule`` walks the path each call)."""
        module = self.modules_by_path.get(path)
        return module if module is not None else self.model.get_submodule(path)

    @functools.cached_property
    def attribute_reads_by_owner(self) -> dict[str, list[fx.Node]]:
        """The graph nodes reading a parameter or buffer (``get_attr``, or export's lifted inputs), by the path of
        the module that holds it."""
        reads = collections.defaultdict(list)
        for node, path in self.attribute_paths.items():
            reads[path.rpartition(".")[0]].append(node)
        return reads

    @functools.cached_property
    def modules_by_path(self) -> dict[str, nn.Module]:
        """The model's modules by path, as ``named_modules`` lists them."""
        return dict(self.model.named_modules())

    def module_stack_top(self, node: fx.Node) -> str | None:
        """The path of the innermost module whose forward produced ``node``, as the tracers record it."""
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else None

    def nodes_inside(self, graph: fx.Graph, path: str) -> list[fx.Node]:
        """The computations module ``path``'s forward made in ``graph`` (its own children's included), in graph
        order."""
        return self._nodes_by_module.get((graph, path), [])

    @functools.cached_property
    def _nodes_by_module(self) -> dict[tuple[fx.Graph, str], list[fx.Node]]:
        # One pass over the graphs for every module_remainder question; read before any graph is edited.
        nodes: dict[tuple[fx.Graph, str], list[fx.Node]] = collections.defaultdict(list)
        for graph in self.graphs:
            for node in graph.nodes:
                # Dynamo records a module on the placeholders it reads too: only its computations are inside it.
                if node.op != "placeholder":
                    for path in module_stack_paths(node):
                        nodes[graph, path].append(node)
        return nodes

    def to_graph_module(self) -> fx.GraphModule:
        """The fx graph as a module of its own, named "GraphModule" as fx names it (a graph result must not pass
        for the user's class), sharing the model's modules and tensors, with fx's constants as buffers.

        Only for a model bnfold works on a copy of: fx's constants sit on it while the GraphModule copies them.
        """
        for name, value in self.constants.items():
            setattr(self.model, name, value)
        try:
            return fx.GraphModule(self.model, self.graph)
        finally:
            for name in self.constants:
                delattr(self.model, name)


def module_stack_paths(node: fx.Node) -> set[str]:
    """The paths of every module whose forward was running when ``node`` was recorded."""
    return {path for path, _ in (node.meta.get("nn_module_stack") or {}).values()}


def trace_model(
    model: nn.Module,
    example_inputs: tuple,
    recorded_modules: Callable[[TracedModel], set[str]] | None = None,
    stand_ins: bool = False,
) -> TracedModel:
    """The model's graph(s). With ``recorded_modules``, an fx graph proven on the model's run keeps that run
    (``model_run``) with the values around each call of the modules at the paths it gives for the graph; else,
    with ``stand_ins``, the run that proves it tries the layers' stand-ins first (:mod:`.stand_ins`: they replace
    the layers' forward for its duration, so only on a model nothing else runs meanwhile)."""
    tracer = _UnmodifiedLayersAsLeavesTracer()
    traced = _fx_traced(model, example_inputs, recorded_modules, stand_ins, tracer)
    if isinstance(traced, TracedModel):
        return traced
    fx_error = traced
    try:
        return _capture_without_fx(model, example_inputs, fx_error)
    except ModelNotTraceableError as not_traceable:
        # Last, fx again with each module it failed to trace through kept as one call (onnx2torch's OnnxReshape
        # takes a shape from a tensor's values, which neither export nor Dynamo can follow either).
        opaque = Opaque()
        for _ in range(_MOST_OPAQUE_RETRIES):
            if tracer.failed_module is None or not opaque.add(tracer.failed_module):
                break
            tracer = _UnmodifiedLayersAsLeavesTracer(opaque)
            traced = _fx_traced(model, example_inputs, recorded_modules, stand_ins, tracer)
            if isinstance(traced, TracedModel):
                traced.opaque_paths = tuple(path for path, module in model.named_modules() if path and opaque.holds(module))
                kinds = sorted({kind.__name__ for kind in opaque.classes} | {type(module).__name__ for module in opaque.modules})
                traced.note = (
                    f"torch.fx could not trace through {', '.join(kinds)} ({describe_error(fx_error)}), and neither "
                    "torch.export nor TorchDynamo could capture the model: pairs found with torch.fx keeping those "
                    "modules as single calls, whose inputs and outputs no fold joins"
                )
                return traced
        raise not_traceable


# Each retry traces the whole model again: past this many modules fx cannot trace through, the model is not traced.
_MOST_OPAQUE_RETRIES = 32


def _fx_traced(
    model: nn.Module, example_inputs: tuple, recorded_modules: Callable[[TracedModel], set[str]] | None, stand_ins: bool,
    tracer: _UnmodifiedLayersAsLeavesTracer,
) -> TracedModel | Exception:
    """The model's fx graph proven on the example inputs (see trace_model), else why not."""
    attributes_before = set(vars(model))
    try:
        with _batchnorm_rank_checks_off(model):
            graph = tracer.trace(model)
    # fx raises TraceError, TypeError, RuntimeError, ... depending on what forward does with a proxy.
    except Exception as fx_error:  # noqa: BLE001
        _take_added_attributes(model, attributes_before)
        return fx_error
    # fx stores the constants it made while tracing on the model; they stay with the graph instead.
    constants = _take_added_attributes(model, attributes_before)
    note = "pairs found with torch.fx symbolic tracing"
    attribute_paths = {node: node.target for node in graph.nodes if node.op == "get_attr"}
    traced = TracedModel(
        model, [graph], "fx", attribute_paths, note, constants, affine_forms=tracer.affine_forms, module_calls=dict(tracer.module_calls)
    )
    keep_run = recorded_modules is not None
    recorded = recorded_modules(traced) if keep_run else set()
    if not _computes_like(traced, example_inputs, recorded, keep_run, stand_ins and not keep_run):
        # Python that fx evaluates on a proxy (isinstance, torch.jit.isinstance, a branch on a flag) can
        # record a graph the model never runs; its pairs would be a tracing artefact. torch.export runs
        # such Python on fake tensors, as the model does.
        tracer.failed_module = None  # (no module failed: the whole graph is not the model's)
        return RuntimeError("the traced graph computes other outputs than the model on the example inputs")
    return traced


@contextlib.contextmanager
def _batchnorm_rank_checks_off(model: nn.Module) -> Iterator[None]:
    """torch's BatchNorm forward first checks its input's rank (``if input.dim() != 4: raise``), a branch fx cannot
    take on a proxy, so a BatchNorm subclass whose forward calls ``super().forward(x)`` (traced through, unlike a
    torch BatchNorm) made the whole model untraceable. While fx traces, each such module's check is an instance
    attribute that accepts any rank; the trace check then runs the model itself, checks included."""
    traced_through = [
        module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm) and not computes_torch_forward(module)
    ]
    for module in traced_through:
        module._check_input_dim = _accept_any_rank
    try:
        yield
    finally:
        for module in traced_through:
            del module._check_input_dim


def _accept_any_rank(data: Any) -> None:
    pass


def _capture_without_fx(model: nn.Module, example_inputs: tuple, fx_error: Exception) -> TracedModel:
    """torch.export's graph, else the graphs TorchDynamo captures; the model's own modules carry the folds."""
    with absent_biases_probed(model):
        try:
            return _export_model(model, example_inputs, fx_error)
        except Exception as export_error:  # noqa: BLE001 - Dynamo captures what export cannot (data-dependent branches)
            try:
                return _capture_with_dynamo(model, example_inputs, fx_error, export_error)
            except Exception as dynamo_error:  # noqa: BLE001 - reported together with the others
                raise ModelNotTraceableError(
                    f"torch.fx could not trace {type(model).__name__} ({describe_error(fx_error)}), torch.export "
                    f"could not export it ({describe_error(export_error)}) and TorchDynamo could not capture it "
                    f"({describe_error(dynamo_error)})"
                ) from dynamo_error


def _export_model(model: nn.Module, example_inputs: tuple, fx_error: Exception) -> TracedModel:
    with _output_kept_unless_it_fails():
        exported = torch.export.export(model, example_inputs)
    signature = exported.graph_signature
    lifted = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    graph = exported.graph_module.graph
    attribute_paths = {node: lifted[node.name] for node in graph.nodes if node.name in lifted}
    _drop_unresolved_module_paths(model, graph)
    note = (
        f"torch.fx could not trace the model ({describe_error(fx_error)}); pairs found with torch.export.export "
        "instead, folded into the model's own modules (function calls outside them are left)"
    )
    return TracedModel(model, [graph], "export", attribute_paths, note)


def _drop_unresolved_module_paths(model: nn.Module, graph: fx.Graph) -> None:
    """Take out of each node's ``nn_module_stack`` the modules whose recorded path is not a module of the
    recorded class in ``model``: export records a call inside a module whose ``forward`` was set on the instance
    and whose activation is shared with other modules (ultralytics' fused Conv: ``m.forward = m.forward_fuse``)
    under the child's own name ("conv" for "a.conv").
    Such a call then has no known caller, as in a graph that records none."""
    kinds = {path: f"{type(module).__module__}.{type(module).__qualname__}" for path, module in model.named_modules()}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {key: (path, kind) for key, (path, kind) in stack.items() if kinds.get(path) == _class_name(kind)}


def _class_name(kind: Any) -> str:
    """A module class as ``nn_module_stack`` records it (the class, or its qualified name), as a qualified name."""
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


@contextlib.contextmanager
def _output_kept_unless_it_fails() -> Iterator[None]:
    """torch.export's commentary on a failure bnfold falls back from, dropped: before raising, export prints the
    partial graph to ``sys.stderr`` and logs warnings about it through torch's loggers, and bnfold catches that
    error, falls back to TorchDynamo and says why in the report (and in ModelNotTraceableError when nothing can
    capture the model). Everything else the block writes to ``sys.stderr``, and what torch logs when the block
    returns, is passed on when it ends."""
    held_records: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if not record.name.startswith("torch"):
            return True
        held_records.append(record)
        return False

    # torch's loggers each have their own handler (torch._logging), not propagating to the root's.
    handlers = {
        handler
        for name, logger in list(logging.root.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and (name == "torch" or name.startswith("torch."))
        for handler in logger.handlers
    }
    for handler in handlers:
        handler.addFilter(hold)
    held_text = io.StringIO()
    try:
        with contextlib.redirect_stderr(held_text):
            yield
    except BaseException as error:
        _stop_holding(handlers, hold)
        partial_graph = getattr(error, "partial_fx_graph", None)
        text = held_text.getvalue()
        # (printed once by each of export's nested entry points it passes through)
        sys.stderr.write(text.replace(f"{partial_graph}\n", "") if partial_graph is not None else text)
        raise
    _stop_holding(handlers, hold)
    sys.stderr.write(held_text.getvalue())
    for record in dict.fromkeys(held_records):  # (each record once, though more than one handler held it)
        logging.getLogger(record.name).handle(record)


def _stop_holding(handlers: set[logging.Handler], hold: Callable[[logging.LogRecord], bool]) -> None:
    for handler in handlers:
        handler.removeFilter(hold)


def _capture_with_dynamo(
    model: nn.Module, example_inputs: tuple, fx_error: Exception, export_error: Exception
) -> TracedModel:
    """The graphs TorchDynamo captures while the model runs on ``example_inputs``, split at graph breaks
    (a branch on a tensor's value, an unsupported call). A value used across a break is an output of its
    graph, so a pair whose intermediate leaves its graph has another reader and stays, as under fx."""
    graphs: list[tuple[fx.GraphModule, list]] = []

    def keep_graph(graph_module: fx.GraphModule, graph_inputs: list):
        graphs.append((graph_module, graph_inputs))
        return graph_module.forward  # run as captured

    torch._dynamo.reset()  # a fresh capture, not graphs cached from an earlier call
    try:
        # Dynamo inlines module calls: parameters and buffers are graph inputs, each node records its module.
        with torch.no_grad():
            torch.compile(model, backend=keep_graph)(*example_inputs)
    finally:
        torch._dynamo.reset()
    paths_by_tensor = {
        id(tensor): path
        for path, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    }
    paths_by_module = {id(module): path for path, module in model.named_modules(remove_duplicate=False)}
    attribute_paths = {}
    for graph_module, graph_inputs in graphs:
        placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
        for node, value in zip(placeholders, graph_inputs):
            if id(value) in paths_by_tensor:
                attribute_paths[node] = paths_by_tensor[id(value)]
        for node in graph_module.graph.nodes:
            # Dynamo keys each module by str(id(module)), "@1", "@2", ... appended for its second, third, ... call;
            # the paths say what the user knows them by.
            stack = node.meta.get("nn_module_stack") or {}
            ids = {key: key.partition("@")[0] for key in stack}
            paths = {key: paths_by_module.get(int(ids[key])) if ids[key].isdigit() else None for key in stack}
            node.meta["nn_module_stack"] = {key: (paths[key], kind) for key, (_, kind) in stack.items() if paths[key] is not None}
    note = (
        f"torch.fx could not trace the model ({describe_error(fx_error)}) nor torch.export export it "
        f"({describe_error(export_error)}); pairs found in the {len(graphs)} graph(s) TorchDynamo captured running "
        "the example inputs (split at graph breaks), folded into the model's own modules. Code paths the example "
        "inputs do not take are not seen: fold with inputs that take the deployed path"
    )
    return TracedModel(model, [graph_module.graph for graph_module, _ in graphs], "dynamo", attribute_paths, note)


@contextlib.contextmanager
def absent_biases_probed(model: nn.Module) -> Iterator[None]:
    """Each bias-less layer subclass with its own forward (timm's Conv2dSame) given a zero bias while capturing.

    Its forward is free to ignore ``self.bias``; the captured graph shows whether it passes the probe to its
    conv as the bias, and only then does a bias registered on the module reach the folded layer's output.
    The probes are removed after the capture (their graph nodes then stand for an absent bias); zeros leave
    the captured values as they are.
    """
    probed = []
    for module in model.modules():
        if isinstance(module, FOLDABLE_LAYER_TYPES) and module.bias is None and not computes_torch_forward(module):
            channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            module.register_parameter("bias", nn.Parameter(module.weight.new_zeros(channels), requires_grad=False))
            probed.append(module)
    try:
        yield
    finally:
        for module in probed:
            module.register_parameter("bias", None)


def _take_added_attributes(model: nn.Module, attributes_before: set[str]) -> dict[str, Any]:
    added = {name: vars(model)[name] for name in set(vars(model)) - attributes_before}
    for name in added:
        delattr(model, name)
    return added


class _GraphRun(fx.Interpreter):
    """The fx graph run on the model's own modules and tensors, in step with a run of the model, putting each
    tensor value's shape and dtype in its node's ``meta[SHAPE_AND_DTYPE]`` (which axis a Linear's features are
    on, where a reshape moves the channels: the two facts the analysis reads, without ShapeProp's strides and
    memory formats).

    In step: each time the model calls a Conv/ConvTranspose/Linear module with torch's own forward, the graph
    runs up to its own next such call; when that is a call of the same module on bitwise-equal inputs, the graph
    takes the model's result (a copy: either run may change its values in place later) instead of computing it
    again. Such a call computes from its input and the module's parameters only, so the graph's values are the
    ones it would compute. At the first call that does not match, the runs part and the graph computes the rest
    itself. (fx's ``Interpreter.run`` cannot pause for the model, hence the node loop here.) Values are freed
    after their last use, as fx's run frees them.
    """

    def __init__(self, traced: TracedModel, example_inputs: tuple):
        super().__init__(traced.model, graph=traced.graph)
        self.traced = traced
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*example_inputs))
        self._unrun = iter(self.graph.nodes)
        self._in_step = True
        self._output = None
        self.running = False  # while the graph runs nodes inside a call of the model's (see _take_result)
        # Each value computed from parameters, buffers and literals only (no random draw, no in-place op), with
        # its tensor version: FrozenBatchNorm2d's scale and shift, which the analysis reads.
        self.constants: dict[fx.Node, tuple[Any, int | None]] = {}
        self.constants_changed = False  # a call changed one of them in place (a buffer updated in forward)
        # The calls whose result the graph can take from the model's run.
        self._layer_calls = {
            node
            for node in self.graph.nodes
            if node.op == "call_module"
            and isinstance(module := traced.module(node.target), FOLDABLE_LAYER_TYPES)
            and has_torch_forward(module)
        }

    @contextlib.contextmanager
    def in_step_with_the_model(self) -> Iterator[None]:
        """While the model runs: forward hooks on the layers whose calls the graph can take from the model."""
        layers = {self.traced.module(node.target) for node in self._layer_calls}
        hooks = [layer.register_forward_hook(self._take_result) for layer in layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def layers_stood_in(self) -> contextlib.AbstractContextManager[None]:
        """While inside: the layers whose calls the graph can take from the model compute stand-ins (see
        :mod:`.stand_ins`), unless a module has hooks (they would see the stand-ins' values)."""
        if any(has_hooks(module) for module in self.traced.model.modules()):
            return contextlib.nullcontext()
        layers = {self.traced.module(node.target): None for node in self.graph.nodes if node in self._layer_calls}
        return layers_stood_in(layer for layer in layers if can_stand_in(layer))

    def finish(self) -> Any:
        """The graph's output, after running what it has not run yet."""
        self._in_step = False
        self._run_until(lambda node: False)
        return self._output

    def fetch_attr(self, target: str) -> Any:
        # From the traced model's table of modules (fx walks the path attribute by attribute), or fx's constants.
        return self.traced.attribute_at(target)

    def run_node(self, node: fx.Node) -> Any:
        # fx's run_node without marking the node current for fx's traceback tooling: nothing here retraces.
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        form = self.traced.affine_forms.get(node.target) if node.op == "call_module" else None
        if form is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            values = form.run(self.traced.module(node.target), args[0])
            product = values[form.product]
            scale, shift = (values[v] if isinstance(v, fx.Node) else v for v in (form.scale, form.shift))
            self.traced.affine_values[node] = (scale, shift, (tuple(product.shape), product.dtype))
            return values[form.output]
        return getattr(self, node.op)(node.target, args, kwargs)

    def _take_result(self, layer: nn.Module, inputs: tuple, output: Any) -> None:
        if not self._in_step:
            return
        self.running = True  # the module calls from here on are the graph's, not the model's
        try:
            self._take_from_the_model(layer, inputs, output)
        finally:
            self.running = False

    def _take_from_the_model(self, layer: nn.Module, inputs: tuple, output: Any) -> None:
        # Out of step until this call matches: a layer the graph run calls meanwhile is not the model's call.
        self._in_step = False
        node = self._run_until(self._layer_calls.__contains__)
        if node is None:
            return
        graph_inputs, graph_keywords = self.fetch_args_kwargs_from_env(node)
        if self.traced.module(node.target) is layer and not graph_keywords and _equal_tensors(graph_inputs, inputs):
            self._store(node, output.clone())
            self._in_step = True
        else:
            self._store(node, self.run_node(node))

    def _run_until(self, stop: Callable[[fx.Node], bool]) -> fx.Node | None:
        """Runs the graph's nodes in order up to the first one ``stop`` holds for, which it returns unrun."""
        for node in self._unrun:
            if stop(node):
                return node
            self._store(node, self.run_node(node))
        return None

    def _store(self, node: fx.Node, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            node.meta[SHAPE_AND_DTYPE] = (tuple(value.shape), value.dtype)
        if node.op == "get_attr":
            self.constants[node] = (value, value._version if isinstance(value, torch.Tensor) else None)
        elif node.op in ("call_function", "call_method"):
            used = node.all_input_nodes
            if used and any(value_used in self.constants for value_used in used):
                if mutates_or_draws(node):
                    self.constants_changed = True  # (or a draw from them: either way, left to the analysis)
                elif all(value_used in self.constants for value_used in used):
                    self.constants[node] = (value, value._version if isinstance(value, torch.Tensor) else None)
        self.env[node] = value
        for used in self.user_to_last_uses.get(node, []):
            del self.env[used]
        if node.op == "output":
            self._output = self.graph.process_outputs(value)


# Random functions: a value computed with them is not a constant even when every input is.
_RANDOM_NAMES = ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout")


def mutates_or_draws(node: fx.Node) -> bool:
    """Whether the call changes a tensor in place or draws random numbers: its value is no constant."""
    try:
        return _target_mutates_or_draws(node.target)
    except TypeError:  # an unhashable target
        return _target_mutates_or_draws.__wrapped__(node.target)


@functools.lru_cache(maxsize=1024)
def _target_mutates_or_draws(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") or any(random in name for random in _RANDOM_NAMES)


def _equal_tensors(these: tuple, those: tuple) -> bool:
    return len(these) == len(those) and all(
        isinstance(this, torch.Tensor)
        and isinstance(that, torch.Tensor)
        and this.shape == that.shape
        and this.dtype == that.dtype
        and torch.equal(this, that)
        for this, that in zip(these, those)
    )


def _computes_like(traced: TracedModel, example_inputs: tuple, recorded: set[str], keep_run: bool, stand_ins: bool) -> bool:
    """Whether the traced graph gives the model's outputs on ``example_inputs`` (the same ops in the same
    order: equal up to the rounding of a kernel that picks another path). The graph run records the shapes
    the analysis reads in the same pass, in step with the model's (see _GraphRun). With ``keep_run``, the
    model's run is kept in ``traced.model_run`` when the graph passes, with the calls of the modules at
    ``recorded``. With ``stand_ins``, the layers it can take from the model compute stand-ins (:mod:`.stand_ins`)
    first, and their own forward only when that run does not pass."""
    if stand_ins and _runs_alike(traced, example_inputs, {}, stand_ins=True)[0]:
        return True
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {path: [] for path in recorded}
    passed, expected = _runs_alike(traced, example_inputs, calls, stand_ins=False)
    if not passed:
        return False
    if keep_run:
        output = pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, expected)
        traced.model_run = ModelRun(output, calls)
    return True


def _runs_alike(
    traced: TracedModel, example_inputs: tuple, calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], stand_ins: bool
) -> tuple[bool, Any]:
    """Whether the graph, run in step with the model (recording ``calls``), gives the model's output; and that output."""
    try:
        graph_run = _GraphRun(traced, example_inputs)
        layers = graph_run.layers_stood_in() if stand_ins else contextlib.nullcontext()
        with torch.no_grad(), layers:
            # Registered first, so each records its call before the graph run takes the call's result.
            with _recording(traced, calls, graph_run), graph_run.in_step_with_the_model():
                expected = traced.model(*example_inputs)
            actual = graph_run.finish()
    except Exception:  # noqa: BLE001 - the graph does not even run: it is not the model's
        return False, None
    if not _same_outputs(expected, actual):
        return False, None
    if not graph_run.constants_changed:  # else each is evaluated when the analysis reads it
        traced.constant_values = graph_run.constants
    return True, expected


@contextlib.contextmanager
def _recording(
    traced: TracedModel, calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], graph_run: _GraphRun
) -> Iterator[None]:
    """Forward hooks putting a copy of each call's tensor input and output in ``calls[path]`` (two calls at most),
    for the model's calls only: the graph run, in step with the model, calls the same modules. A tensor recorded
    again unchanged (the same object, its version counter where it was: a conv's output is the next BatchNorm's
    input) shares the first copy, which verification only reads."""
    copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def copy_of(tensor: torch.Tensor) -> torch.Tensor:
        # (a tensor made under torch.inference_mode, e.g. an example input, has no version counter; a subclass may not)
        if type(tensor) is not torch.Tensor or tensor.is_inference():
            return tensor.detach().clone()
        known = copies.get(id(tensor))
        if known is not None and known[0]() is tensor and known[1] == tensor._version:
            return known[2]
        copied = tensor.detach().clone()
        copies[id(tensor)] = (weakref.ref(tensor), tensor._version, copied)
        return copied

    def recorder(path: str):
        def record(module, args, kwargs, output):
            kept, data = calls[path], module_input(args, kwargs)
            if not graph_run.running and len(kept) < 2 and isinstance(data, torch.Tensor) and isinstance(output, torch.Tensor):
                kept.append((copy_of(data), copy_of(output)))

        return record

    hooks = [traced.module(path).register_forward_hook(recorder(path), with_kwargs=True) for path in calls]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _same_outputs(expected: Any, actual: Any) -> bool:
    """The same leaves at the same places (keys and indices: the graph run returns a dict or list the forward
    returned in fx's immutable containers, in which a graph keeps a node's arguments), and tensors equal up to
    the rounding of a kernel that picks another path."""
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        pairs = [(expected, actual)]  # (the usual output: no container to walk, 0.1 ms a call)
    else:
        expected_leaves, _ = pytree.tree_flatten_with_path(expected)
        actual_leaves, _ = pytree.tree_flatten_with_path(actual)
        if [path for path, _ in expected_leaves] != [path for path, _ in actual_leaves]:
            return False
        pairs = [(want, got) for (_, want), (_, got) in zip(expected_leaves, actual_leaves)]
    for want, got in pairs:
        if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
            return False
        if isinstance(want, torch.Tensor):
            if want.shape != got.shape or want.dtype != got.dtype:
                return False
            if torch.equal(got, want):
                continue  # the usual case, the same kernels on the same values: no tolerance to work out
            finite = want[torch.isfinite(want)] if want.is_floating_point() else want.new_zeros(0)
            scale = finite.abs().max().item() if finite.numel() else 0.0
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-6 + 1e-4 * scale, equal_nan=True):
                return False
    return True
