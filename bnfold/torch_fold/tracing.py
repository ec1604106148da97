"""The model's real data flow as a graph: torch.fx symbolic tracing first, torch.export as the fallback.

Pairs come from this graph, never from module order, so a BatchNorm registered after a conv in
``__init__`` but not called after it in ``forward`` is not a pair.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from bnfold.errors import describe_error
from bnfold.reference import REFERENCE_BATCHNORMS

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


class _UnmodifiedLayersAsLeavesTracer(fx.Tracer):
    """Keeps unmodified torch layers and BatchNorms as single calls and traces through everything else.

    The default tracer keeps every ``torch.nn`` module as a leaf and traces through user classes, so a
    plain ``class MyConv(nn.Conv2d)`` would dissolve into ``F.conv2d``, while a torch subclass with
    its own forward would stay opaque. Here the test is the forward that actually runs.

    Buffers are traced as graph inputs like parameters, so that a scale computed from them in forward
    (FrozenBatchNorm2d's ``weight * (running_var + eps).rsqrt()``) stays traceable to its source instead of
    becoming a constant fx computed while tracing.
    """

    proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(module, (*FOLDABLE_LAYER_TYPES, nn.modules.batchnorm._BatchNorm)):
            return computes_torch_forward(module)
        return super().is_leaf_module(module, module_qualified_name)


@dataclasses.dataclass
class TracedModel:
    """A graph of one model's forward and how to get from its nodes to the model's tensors.

    ``attribute_paths`` maps each node that stands for a parameter or buffer (fx ``get_attr`` nodes,
    export's lifted placeholders) to its dotted path under ``root``: the GraphModule for fx (which
    shares the model's leaf modules and tensors but has plain ``nn.Module`` s for the modules traced
    through), the model itself for export.
    """

    model: nn.Module
    graph_module: fx.GraphModule
    method: Literal["fx", "export"]
    root: nn.Module
    attribute_paths: dict[fx.Node, str]
    note: str

    @property
    def graph_rewritable(self) -> bool:
        """Only an fx graph runs as a module of its own; an exported graph is read, not returned."""
        return self.method == "fx"

    def tensor_at(self, path: str) -> torch.Tensor | None:
        """The parameter or buffer at ``path``; None for an export's bias probe (see _probe_absent_biases)."""
        owner_path, _, name = path.rpartition(".")
        return getattr(self.root.get_submodule(owner_path), name)

    def module_stack_top(self, node: fx.Node) -> str | None:
        """The path of the innermost module whose forward produced ``node``, as both tracers record it."""
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else None


def trace_model(model: nn.Module, example_inputs: tuple) -> TracedModel:
    attributes_before = set(vars(model))
    try:
        graph = _UnmodifiedLayersAsLeavesTracer().trace(model)
    # fx raises TraceError, TypeError, RuntimeError, ... depending on what forward does with a proxy.
    except Exception as fx_error:  # noqa: BLE001
        _remove_added_attributes(model, attributes_before)
        return _export_model(model, example_inputs, fx_error)
    # Named "GraphModule", as fx names it by default: a graph result must not pass for the user's class.
    graph_module = fx.GraphModule(model, graph)
    # fx stores the constants it made while tracing on the model; the GraphModule has its own copies now.
    _remove_added_attributes(model, attributes_before)
    if not _computes_like(model, graph_module, example_inputs):
        # Python that fx evaluates on a proxy (isinstance, torch.jit.isinstance, a branch on a flag) can
        # record a graph the model never runs; its pairs would be a tracing artefact. torch.export runs
        # such Python on fake tensors, as the model does.
        mismatch = RuntimeError("the traced graph computes other outputs than the model on the example inputs")
        return _export_model(model, example_inputs, mismatch)
    note = "pairs found with torch.fx symbolic tracing"
    if not _record_shapes(graph_module, example_inputs):
        note += " (shape propagation failed, so rank-dependent Linear folds are refused)"
    attribute_paths = {node: node.target for node in graph.nodes if node.op == "get_attr"}
    return TracedModel(model, graph_module, "fx", graph_module, attribute_paths, note)


def _export_model(model: nn.Module, example_inputs: tuple, fx_error: Exception) -> TracedModel:
    probed = _probe_absent_biases(model)
    try:
        exported = torch.export.export(model, example_inputs)
    except Exception as export_error:  # noqa: BLE001 - reported together with the fx error
        raise ModelNotTraceableError(
            f"torch.fx could not trace {type(model).__name__} ({type(fx_error).__name__}: {fx_error}) "
            f"and torch.export could not export it ({type(export_error).__name__}: {export_error})"
        ) from export_error
    finally:
        for module in probed:
            module.register_parameter("bias", None)
    signature = exported.graph_signature
    lifted = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    graph_module = exported.graph_module
    attribute_paths = {node: lifted[node.name] for node in graph_module.graph.nodes if node.name in lifted}
    note = (
        f"torch.fx could not trace the model ({describe_error(fx_error)}); pairs found with torch.export.export "
        "instead, folded into the model's own modules (function calls outside them are left)"
    )
    return TracedModel(model, graph_module, "export", model, attribute_paths, note)


def _probe_absent_biases(model: nn.Module) -> list[nn.Module]:
    """Give each bias-less layer subclass with its own forward (timm's Conv2dSame) a zero bias while exporting.

    Its forward is free to ignore ``self.bias``; the exported graph shows whether it passes the probe to its
    conv as the bias, and only then does a bias registered on the module reach the folded layer's output.
    The probes are removed after the export (their graph nodes then stand for an absent bias); zeros leave
    the exported values as they are.
    """
    probed = []
    for module in model.modules():
        if isinstance(module, FOLDABLE_LAYER_TYPES) and module.bias is None and not computes_torch_forward(module):
            channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            weight = module.weight
            module.register_parameter("bias", nn.Parameter(weight.new_zeros(channels), requires_grad=False))
            probed.append(module)
    return probed


def _remove_added_attributes(model: nn.Module, attributes_before: set[str]) -> None:
    for name in set(vars(model)) - attributes_before:
        delattr(model, name)


def _computes_like(model: nn.Module, graph_module: fx.GraphModule, example_inputs: tuple) -> bool:
    """Whether the traced graph gives the model's outputs on ``example_inputs`` (the same ops in the same
    order: equal up to the rounding of a kernel that picks another path)."""
    try:
        with torch.no_grad():
            expected, actual = model(*example_inputs), graph_module(*example_inputs)
    except Exception:  # noqa: BLE001 - the graph does not even run: it is not the model's
        return False
    expected_leaves, expected_structure = pytree.tree_flatten(expected)
    actual_leaves, actual_structure = pytree.tree_flatten(actual)
    if expected_structure != actual_structure:
        return False
    for want, got in zip(expected_leaves, actual_leaves):
        if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
            return False
        if isinstance(want, torch.Tensor):
            if want.shape != got.shape or want.dtype != got.dtype:
                return False
            finite = want[torch.isfinite(want)] if want.is_floating_point() else want.new_zeros(0)
            scale = finite.abs().max().item() if finite.numel() else 0.0
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-6 + 1e-4 * scale, equal_nan=True):
                return False
    return True


def _record_shapes(graph_module: fx.GraphModule, example_inputs: tuple) -> bool:
    """Put each node's shape in its ``tensor_meta``; the rank tells which axis a Linear's features are on."""
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*example_inputs)
    except Exception:  # noqa: BLE001 - shapes are an aid; without them rank-dependent folds are refused
        return False
    return True
