"""PyTorch models read into the layer states of :mod:`bnfold.checks.layer_rules`.

Two sources: the module tree of an ``nn.Module`` (also a TorchScript module, whose submodules keep
their class name in ``original_name`` but not their class), and the graph of a ``torch.export``
program, where the modules are gone and the mode is an argument of each batch-norm and dropout call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from bnfold.checks.layer_rules import BatchNormState, DropoutState, LayerState, Statistics
from bnfold.torch_fold.conversion import to_numpy

_BatchNorm = nn.modules.batchnorm._BatchNorm
_DropoutNd = nn.modules.dropout._DropoutNd


def _class_names(base: type) -> frozenset[str]:
    return frozenset(cls.__name__ for cls in vars(nn).values() if isinstance(cls, type) and issubclass(cls, base))


_SCRIPTED_NAMES = {_BatchNorm: _class_names(_BatchNorm), _DropoutNd: _class_names(_DropoutNd)}

# The aten forms of a batch norm and a dropout in exported graphs, before and after decomposition.
_EXPORTED_BATCHNORMS = frozenset({
    "aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit",
    "aten::_native_batch_norm_legit_functional", "aten::_native_batch_norm_legit_no_training",
})  # fmt: skip
_EXPORTED_DROPOUTS = frozenset({
    "aten::dropout", "aten::native_dropout", "aten::feature_dropout", "aten::alpha_dropout", "aten::feature_alpha_dropout",
})  # fmt: skip


def _is_a(module: nn.Module, base: type) -> bool:
    if isinstance(module, torch.jit.ScriptModule):
        # A scripted subclass (timm's BatchNormAct2d) keeps only its own name: a BatchNorm by its state and code.
        return module.original_name in _SCRIPTED_NAMES[base] or (base is _BatchNorm and _scripted_batchnorm(module))
    return isinstance(module, base)


def _scripted_batchnorm(module: torch.jit.ScriptModule) -> bool:
    """A TorchScript module with a BatchNorm's state whose forward calls batch_norm (InstanceNorm's, with the same
    state, calls instance_norm)."""
    if not all(hasattr(module, name) for name in ("running_mean", "running_var", "eps", "momentum")):
        return False
    try:
        return "batch_norm" in module.code
    except RuntimeError:  # (a module without a forward of its own has no code)
        return False


def module_layer_states(model: nn.Module) -> list[LayerState]:
    states: list[LayerState] = []
    for name, module in model.named_modules():
        training = "module.training is True" if module.training else None
        if _is_a(module, _BatchNorm):
            states.append(BatchNormState(name, training, module.running_mean is not None, _module_statistics(module)))
        elif _is_a(module, _DropoutNd):
            states.append(DropoutState(name, training, float(module.p)))
        elif (regulariser := _random_regulariser(module)) is not None:
            states.append(DropoutState(name, training, *regulariser))
    return states


def _random_regulariser(module: nn.Module) -> tuple[float, str] | None:
    """The drop probability of a training-time random layer that is not a Dropout, and what it drops: timm's
    DropPath and DropBlock2d (``drop_prob``), torchvision's StochasticDepth (``p``)."""
    probability = getattr(module, "p" if type(module).__name__ == "StochasticDepth" else "drop_prob", None)
    if isinstance(probability, bool) or not isinstance(probability, (int, float)):
        return None
    return float(probability), "of its inputs, by whole samples or blocks,"


def _module_statistics(module: nn.Module) -> Statistics | None:
    if module.running_mean is None or is_lazy(module.running_mean):  # (a lazy module's are made by its first forward)
        return None
    return Statistics(
        to_numpy(module.weight),
        to_numpy(module.bias),
        to_numpy(module.running_mean),
        to_numpy(module.running_var),
        float(module.eps),
        _count(module.num_batches_tracked),
    )


def _count(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else int(tensor.item())


def exported_layer_states(program: torch.export.ExportedProgram) -> list[LayerState]:
    lifted = _LiftedTensors(program)
    states: list[LayerState] = []
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target._schema.name
        if op in _EXPORTED_BATCHNORMS:
            states.append(_exported_batchnorm(node, lifted))
        elif op in _EXPORTED_DROPOUTS:
            arguments = _arguments(node)
            training = "exported with train=True" if arguments.get("train") else None
            states.append(DropoutState(_module_path(node), training, float(arguments["p"])))
    return states


class _LiftedTensors:
    """The parameters, buffers and constants that export lifted into graph inputs, by placeholder and
    by their qualified name in the original model (``block.bn1.running_mean``)."""

    def __init__(self, program: torch.export.ExportedProgram):
        signature = program.graph_signature
        self.qualified_names = {
            **signature.inputs_to_parameters, **signature.inputs_to_buffers, **signature.inputs_to_lifted_tensor_constants,
        }  # fmt: skip
        self.by_name = {**program.state_dict, **program.constants}

    def qualified_name(self, value) -> str | None:
        return self.qualified_names.get(value.name) if isinstance(value, torch.fx.Node) else None

    def get(self, qualified_name: str | None) -> torch.Tensor | None:
        return self.by_name.get(qualified_name) if qualified_name else None


def _arguments(node: torch.fx.Node) -> dict:
    names = [argument.name for argument in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def _module_path(node: torch.fx.Node) -> str:
    """The module the call came from (``block.bn1``), from the stack export records; else the node name."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else node.name


def _exported_batchnorm(node: torch.fx.Node, lifted: _LiftedTensors) -> BatchNormState:
    arguments = _arguments(node)
    training = "exported with training=True" if arguments.get("training") else None
    tracks_running_stats = arguments.get("running_mean") is not None
    names = {
        argument: lifted.qualified_name(arguments.get(argument)) for argument in ("weight", "bias", "running_mean", "running_var")
    }
    if names["running_mean"] is None or names["running_var"] is None:
        return BatchNormState(_module_path(node), training, tracks_running_stats)  # no statistics, or computed ones
    # num_batches_tracked is no argument of the call: it sits beside the running mean in the model.
    module_prefix = names["running_mean"].rpartition(".")[0]
    statistics = Statistics(
        to_numpy(lifted.get(names["weight"])),
        to_numpy(lifted.get(names["bias"])),
        to_numpy(lifted.get(names["running_mean"])),
        to_numpy(lifted.get(names["running_var"])),
        float(arguments["eps"]),
        _count(lifted.get(f"{module_prefix}.num_batches_tracked")),
    )
    return BatchNormState(_module_path(node), training, tracks_running_stats, statistics)
