"""Applying planned folds: new layer weights, then the BatchNorms removed from the module tree or graph.

Each layer's weight and bias were folded in float64 through every fold that touches them while planning (a
layer can absorb one BatchNorm before it and one after it), and rounded once to their dtypes there; they are
written back as they are.
Parameters keep their identity, class and ``requires_grad``. In a model bnfold copied, a contiguous parameter takes
the folded values' memory (``parameter.data``: ResNet-50 at 224x224 saves a 90 MiB copy); in the user's model
(``inplace=True``) the values are copied into the parameter's own memory, which views of it may share.
"""

from __future__ import annotations

import collections

import torch
import torch.fx as fx
from torch import nn

from bnfold.torch_fold.calls import LayerCall
from bnfold.torch_fold.conversion import to_torch
from bnfold.torch_fold.planning import PlannedFold, folded_batchnorms
from bnfold.torch_fold.tracing import FOLDABLE_LAYER_TYPES, TracedModel


def fold_in_module_tree(folds: list[PlannedFold], model: nn.Module, traced: TracedModel, copied: bool) -> nn.Module:
    """The user's model, with each folded BatchNorm module replaced wherever it is registered by ``nn.Identity``,
    or by an ``nn.Sequential`` of the children its forward applied after normalising (timm's BatchNormAct2d:
    ``drop``, ``act``), under their own names so their state_dict keys stay. ``copied``: the model is bnfold's copy."""
    _write_folded_weights(folds, traced, copied)
    registered = collections.defaultdict(list)  # (a module registered under two names is replaced under both)
    for path, module in model.named_modules(remove_duplicate=False):
        registered[id(module)].append(path)
    for batchnorm in folded_batchnorms(folds):
        module = model.get_submodule(batchnorm.module_path)
        kept = collections.OrderedDict((name, module.get_submodule(name)) for name in batchnorm.kept_children)
        replacement = nn.Sequential(kept) if kept else nn.Identity()
        for path in registered[id(module)]:
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, replacement)
    return model


def fold_in_graph(folds: list[PlannedFold], traced: TracedModel) -> fx.GraphModule:
    """The traced graph with each folded BatchNorm call taken out, as a GraphModule built once from the edited
    graph (so it holds no module the graph no longer calls); ``traced`` is of bnfold's copy of the model."""
    _write_folded_weights(folds, traced, copied=True)
    # Each bypassed BatchNorm's replacement: the next one's input may be its output (BN -> BN, both folded into
    # the layer before them, or the second into the layer after).
    replacements: dict[fx.Node, fx.Node] = {}
    for batchnorm in folded_batchnorms(folds):
        data = batchnorm.input
        while data in replacements:
            data = replacements[data]
        _bypass(batchnorm.node, data)
        replacements[batchnorm.node] = data
    graph_module = traced.to_graph_module()
    graph_module.graph.lint()
    return graph_module


def _write_folded_weights(folds: list[PlannedFold], traced: TracedModel, copied: bool) -> None:
    # A layer's last fold carries the values of all its folds, rounded to the layer's dtypes already.
    folded = {fold.layer: fold.layer_values for fold in folds}
    for layer, (weight, bias) in folded.items():
        _write(layer.weight, weight, copied)
        if layer.bias is not None:
            _write(layer.bias, bias, copied)
        else:
            _add_bias(layer, to_torch(bias, like=layer.weight), traced)


def _write(parameter: torch.Tensor, values, copied: bool) -> None:
    new = to_torch(values, like=parameter)
    with torch.no_grad():
        if copied and parameter.is_contiguous() and new.is_contiguous():
            parameter.data = new
        else:
            parameter.copy_(new)


def _add_bias(layer: LayerCall, bias: torch.Tensor, traced: TracedModel) -> None:
    """Give a layer without a bias the folded one, as a parameter next to its weight (in the model, which a
    graph result's GraphModule copies it from)."""
    owner_path, _, weight_name = layer.weight_path.rpartition(".")
    owner = traced.model.get_submodule(owner_path)
    name = _free_bias_name(owner, weight_name)
    owner.register_parameter(name, nn.Parameter(bias, requires_grad=layer.weight.requires_grad))
    if layer.module_path is not None:
        return  # the module's own forward reads self.bias
    graph = traced.graph
    with graph.inserting_before(layer.node):
        bias_node = graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
    # conv, conv_transpose and linear all take the bias third.
    if len(layer.node.args) > 2:
        layer.node.update_arg(2, bias_node)
    else:
        layer.node.update_kwarg("bias", bias_node)


def _free_bias_name(owner: nn.Module, weight_name: str) -> str:
    # A layer module (also a subclass with its own forward) keeps the usual state_dict key `<layer>.bias`.
    if isinstance(owner, FOLDABLE_LAYER_TYPES):
        return "bias"
    name = f"{weight_name}_bias"
    while hasattr(owner, name):
        name += "_"
    return name


def _bypass(node: fx.Node, replacement: fx.Node) -> None:
    """Remove ``node`` from its graph, its readers reading ``replacement``; then what only it read (attributes,
    the multiply of ``x * scale + shift`` and the scale's computation). A module call it read alone stays: the
    graph has no module yet to tell whether the call is pure, and a normalisation bnfold folds reads none."""
    node.replace_all_uses_with(replacement)
    unused = [node]
    while unused:
        dead = unused.pop()
        inputs = dead.all_input_nodes
        dead.graph.erase_node(dead)
        unused.extend(
            n for n in inputs if not n.users and n.op not in ("placeholder", "call_module") and not n.is_impure() and n not in unused
        )
