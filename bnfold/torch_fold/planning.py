"""Which BatchNorm folds into which layer, or why it stays: one decision per BatchNorm.

A BatchNorm folds *into the preceding* layer when its input is that layer's output and nothing else
reads that output; otherwise *into the following* layer when that layer is the only reader of its
output and never reads padding. Every check that fails becomes a :class:`~bnfold.report.Skip` with
a stable code and a sentence saying what the user can do.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from bnfold.fold_math import (
    ChannelAffine,
    FoldOverflowError,
    UnfoldableStatisticsError,
    batchnorm_affine,
    fold_into_inputs,
    fold_into_outputs,
    rounded_to_fit,
)
from bnfold.report import Direction, Fold, Skip
from bnfold.torch_fold.calls import BatchNormCall, DataFlow, LayerCall, describe_node, value_readers
from bnfold.torch_fold.conversion import to_numpy, to_numpy_float
from bnfold.torch_fold.passthrough import axis_after, converted_dtypes, held_by_hooks, value_shape
from bnfold.torch_fold.tracing import has_hooks, module_stack_paths

# (skip code, reason) for a check that fails.
Refusal = tuple[str, str]

_STAYS = "It stays as one multiply-add per channel."


@dataclasses.dataclass(frozen=True, eq=False)
class PlannedFold:
    batchnorm: BatchNormCall
    layer: LayerCall
    direction: Direction
    # The layer's weight and bias after this fold and every earlier one into the same layer, each rounded once to
    # its tensor's dtype (numpy's, or ml_dtypes' bfloat16): computed while planning, so that a fold the layer's
    # dtype cannot hold is refused.
    layer_values: tuple[np.ndarray, np.ndarray]
    # The BatchNorm's per-channel scale and shift (float64), as planning computed them from its statistics.
    affine: ChannelAffine
    # The pass-through calls (eval-mode dropout, reshapes, ...) between the two, in data-flow order; they stay.
    between: tuple[fx.Node, ...] = ()
    # The BatchNorm's channels [start, stop) this fold takes, when it follows a concatenation of layers' outputs
    # (MixNet's MixedConv2d: torch.cat of convs over channel groups) and folds a part into each; None: all of them.
    channels: tuple[int, int] | None = None

    @property
    def in_module_tree(self) -> bool:
        """Both ends are module calls, so the model's own module tree can carry the fold."""
        return self.layer.module_path is not None and self.batchnorm.module_path is not None

    def to_report(self) -> Fold:
        channels = None if self.channels is None else list(self.channels)
        return Fold(self.batchnorm.name, self.layer.name, self.layer.op, self.direction, batchnorm_op=self.batchnorm.op, channels=channels)


def folded_batchnorms(folds: list[PlannedFold]) -> list[BatchNormCall]:
    """Each folded BatchNorm once, in fold order (one after a concatenation folds a part into each concatenated layer)."""
    return list({id(fold.batchnorm): fold.batchnorm for fold in folds}.values())


@dataclasses.dataclass
class FoldPlan:
    folds: list[PlannedFold]
    skips: list[Skip]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def needs_graph(self) -> bool:
        return any(not fold.in_module_tree for fold in self.folds)


def plan_folds(flow: DataFlow, model: nn.Module) -> FoldPlan:
    """One decision per BatchNorm: per group of calls sharing statistics, and per module never called."""
    plan = FoldPlan([], [])
    if flow.standardisations:
        where = ", ".join(dict.fromkeys(flow.standardisations))
        plan.notes.append(
            f"not counted as BatchNorms: the batch_norm calls in {where} normalise a value computed from parameters alone "
            "(weight standardisation, as timm's StdConv2d), no data"
        )
    folded: dict[LayerCall, list[tuple[Direction, ChannelAffine]]] = collections.defaultdict(list)
    # A BatchNorm folded into the layer before it leaves that layer's output, normalised, where it was: a second
    # BatchNorm reading it folds into the same layer (layer -> BN -> BN, as the ONNX pass folds it).
    folded_away: set[fx.Node] = set()
    for calls in flow.batchnorms_by_statistics():
        decision = _decide(calls, flow, folded, folded_away)
        if isinstance(decision, Skip):
            # (BatchNorm modules sharing a statistics tensor decide together: each of them is left)
            names = dict.fromkeys(call.name for call in calls)
            plan.skips += [dataclasses.replace(decision, batchnorm=name) for name in names]
            continue
        plan.folds.extend(decision)
        if decision[0].direction == "into-preceding" and _leaves_its_input(decision[0].batchnorm):
            folded_away.add(decision[0].batchnorm.node)
    called = {call.name for call in flow.batchnorms}
    if flow.traced.method == "fx":
        reason = "forward() never calls it, so there is nothing to fold; delete it if it is unused."
    else:
        reason = (
            "the example inputs do not take the path of forward() that calls it, if any (without torch.fx, only "
            "that path is seen); fold with inputs that take it to fold it."
        )
    # A module whose tensors a function call reads (``F.batch_norm(x, bn.running_mean, ...)``) is that call's
    # (torch.export lifts every parameter and buffer, read or not: only those some node reads count).
    read = {path.rpartition(".")[0] for node, path in flow.traced.attribute_paths.items() if node.users}
    # A folded BatchNorm module is replaced, its children with it (timm's SplitBatchNorm2d: aux_bn, for training).
    replaced = tuple(f"{fold.batchnorm.module_path}." for fold in plan.folds if fold.in_module_tree)
    modules = list(flow.traced.modules_by_path.items() if flow.traced.model is model else model.named_modules())
    opaque = tuple(f"{path}." for path in flow.traced.opaque_paths)
    scripted = [name for name, module in modules if name and isinstance(module, torch.jit.ScriptModule)]
    for name, module in modules:
        if _scripted_batchnorm(module):  # (a TorchScript module's BatchNorm: a copy of the class, run as compiled code)
            owner = next(path for path in scripted if name == path or name.startswith(f"{path}."))
            plan.skips.append(Skip(name, "no-foldable-neighbour", (
                f"it runs inside `{owner}`, a TorchScript module (torch.jit.script or trace), whose compiled code "
                "bnfold cannot read; fold the eager module it was made from, then script or trace it."
            )))  # fmt: skip
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and name not in called and name not in read:
            if name.startswith(replaced):
                owner = next(prefix for prefix in replaced if name.startswith(prefix))[:-1]
                plan.notes.append(f"{name} (never called) is removed with {owner}, the folded BatchNorm it belongs to")
            elif name.startswith(opaque):
                owner = next(prefix for prefix in opaque if name.startswith(prefix))[:-1]
                plan.skips.append(Skip(name, "no-foldable-neighbour", (
                    f"it runs inside `{owner}`, which torch.fx could not trace through (see the notes), so its "
                    "neighbours are not seen; make that module's forward traceable, or fold the model's ONNX export."
                )))  # fmt: skip
            else:
                plan.skips.append(Skip(name, "no-foldable-neighbour", reason))
    return plan


def _scripted_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in _BATCHNORM_CLASSES


_BATCHNORM_CLASSES = frozenset(kind.__name__ for kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))


def _leaves_its_input(batchnorm: BatchNormCall) -> bool:
    """Whether removing the folded BatchNorm leaves its input's values in its place: a call on its input alone,
    with nothing applied after normalising (not a BatchNormAct2d's activation, not a multiply-add's two calls)."""
    return not batchnorm.kept_children and batchnorm.input_reader is None and batchnorm.node.args[:1] == (batchnorm.input,)


def _decide(
    calls: list[BatchNormCall],
    flow: DataFlow,
    folded: dict[LayerCall, list[tuple[Direction, ChannelAffine]]],
    folded_away: set[fx.Node],
) -> list[PlannedFold] | Skip:
    """The fold (or, after a concatenation, the folds of its parts) or skip for one BatchNorm; ``folded`` holds the
    folds into each layer so far (updated), and ``folded_away`` the BatchNorms folded into the layer before them (see
    :func:`plan_folds`)."""
    batchnorm = calls[0]
    refusal = _batchnorm_refusal(calls, flow) or _read_elsewhere_refusal(batchnorm, flow)
    if refusal is not None:
        return Skip(batchnorm.name, *refusal)
    preceding = flow.layer_producing(batchnorm.input, folded_away)
    following = flow.sole_layer_reading(batchnorm.node)
    pieces = _concatenated(batchnorm.input) if preceding is None else None
    if preceding is None and following is None and pieces is None:
        source = batchnorm.input
        while flow.passes_through(source):
            source = source.args[0]
        if held_by_hooks(source, flow.traced):  # (a hooked Dropout between the layer and the BatchNorm)
            return Skip(batchnorm.name, *_hooks_refusal(source.target, flow, "would see the normalised values instead"))
        return Skip(batchnorm.name, "no-foldable-neighbour", _no_neighbour_reason(batchnorm, flow))
    refusal = _hooks_refusal(batchnorm.module_path, flow, "would be dropped with it")
    if refusal is not None:
        return Skip(batchnorm.name, *refusal)
    try:
        affine = channel_affine(batchnorm)
    except UnfoldableStatisticsError as error:
        reason = f"{error}; re-estimate the running statistics (forward passes in train mode) to fold it."
        return Skip(batchnorm.name, "unfoldable-statistics", reason)
    first_refusal = None
    if pieces is not None:
        decision = _concatenation_folds(batchnorm, pieces, affine, flow, folded, folded_away)
        if isinstance(decision, list):
            return decision
        first_refusal = decision
    for layer, direction in ((preceding, "into-preceding"), (following, "into-following")):
        if layer is None:
            continue
        between = _calls_between(layer.node, batchnorm.input) if layer is preceding else _calls_between(batchnorm.node, layer.input)
        refusal = _layer_refusal(batchnorm, layer, direction, between, flow)
        if refusal is None:
            try:
                values = _fold_values(layer, direction, affine, folded[layer])
            except FoldOverflowError as error:
                refusal = "fold-overflows", (
                    f"folding it into `{layer.name}`: {error}; keep the BatchNorm, or convert the model to a wider "
                    "dtype (model.float()) before folding (a near-zero running variance is the usual cause)."
                )
            else:
                folded[layer].append((direction, affine))
                return [PlannedFold(batchnorm, layer, direction, values, affine, between)]
        first_refusal = first_refusal or refusal
    return Skip(batchnorm.name, *first_refusal)


# torch.cat and its aliases, as fx records them and as export and Dynamo do.
_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)


def _concatenated(value: object) -> list[fx.Node] | None:
    """The values ``value`` concatenates along axis 1 (``torch.cat(values, 1)``), else None."""
    if not isinstance(value, fx.Node) or value.op != "call_function" or value.target not in _CONCATENATIONS:
        return None
    pieces = value.args[0] if value.args else value.kwargs.get("tensors")
    dim = value.args[1] if len(value.args) > 1 else value.kwargs.get("dim", value.kwargs.get("axis", 0))
    shape = value_shape(value)
    if shape is None or not isinstance(pieces, (list, tuple)) or not all(isinstance(piece, fx.Node) for piece in pieces):
        return None
    return list(pieces) if isinstance(dim, int) and len(shape) > 1 and dim % len(shape) == 1 else None


def _concatenation_folds(
    batchnorm: BatchNormCall,
    pieces: list[fx.Node],
    affine: ChannelAffine,
    flow: DataFlow,
    folded: dict[LayerCall, list[tuple[Direction, ChannelAffine]]],
    folded_away: set[fx.Node],
) -> list[PlannedFold] | Refusal:
    """A BatchNorm after a concatenation of layers' outputs along its channels (MixNet's MixedConv2d: the convs of
    each channel group, concatenated): each layer absorbs the BatchNorm's channels that its output fills, when
    each is a layer's output (through pass-through calls) and the concatenation is the BatchNorm's alone."""
    concatenation = batchnorm.input
    others = [reader for reader in value_readers(concatenation) if reader is not (batchnorm.input_reader or batchnorm.node)]
    if others:
        readers = ", ".join(describe_node(reader, flow.traced) for reader in others)
        return "layer-output-shared", (
            f"its input, the concatenation {describe_node(concatenation, flow.traced)}, is also read by {readers}, which "
            f"must keep seeing un-normalised values. {_STAYS}"
        )
    parts, start = [], 0
    for piece in pieces:
        layer, shape = flow.layer_producing(piece, folded_away), value_shape(piece)
        if layer is None or shape is None:
            return "no-foldable-neighbour", (
                f"its input is the concatenation {describe_node(concatenation, flow.traced)}, and "
                f"{describe_node(piece, flow.traced)} in it is no Conv, ConvTranspose or Linear output: it folds only "
                f"when each concatenated value is one, each layer taking its channels. {_STAYS}"
            )
        between = _calls_between(layer.node, piece)
        refusal = _layer_refusal(batchnorm, layer, "into-preceding", between, flow, concatenation, shape[1])
        if refusal is not None:
            return refusal
        stop = start + shape[1]
        terms = None if affine.shift_terms is None else affine.shift_terms[start:stop]
        parts.append((layer, between, ChannelAffine(affine.scale[start:stop], affine.shift[start:stop], terms), (start, stop)))
        start = stop
    if len({layer for layer, *_ in parts}) < len(parts):
        return "module-reused", (
            f"the concatenation {describe_node(concatenation, flow.traced)} holds one layer's output more than once, "
            f"and one fold into it cannot scale each copy its own way. {_STAYS}"
        )
    folds = []
    for layer, between, part, channels in parts:
        try:
            values = _fold_values(layer, "into-preceding", part, folded[layer])
        except FoldOverflowError as error:
            return "fold-overflows", (
                f"folding its channels {channels[0]}-{channels[1] - 1} into `{layer.name}`: {error}; keep the BatchNorm, "
                "or convert the model to a wider dtype (model.float()) before folding."
            )
        folds.append(PlannedFold(batchnorm, layer, "into-preceding", values, part, between, channels))
    for fold in folds:
        folded[fold.layer].append(("into-preceding", fold.affine))
    return folds


def channel_affine(batchnorm: BatchNormCall) -> ChannelAffine:
    """The per-channel scale and shift the BatchNorm applies, float64."""
    if batchnorm.per_channel is not None:
        return ChannelAffine(*(to_numpy(values) for values in batchnorm.per_channel))
    return batchnorm_affine(
        to_numpy(batchnorm.weight),
        to_numpy(batchnorm.bias),
        to_numpy(batchnorm.running_mean),
        to_numpy(batchnorm.running_var),
        batchnorm.eps,
    )


def _fold_values(
    layer: LayerCall, direction: Direction, affine: ChannelAffine, earlier: list[tuple[Direction, ChannelAffine]]
) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weight and bias after folding ``affine`` into them, after the ``earlier`` folds into the same
    layer: from its own values, in float64 throughout, each rounded once to its tensor's dtype (raises
    FoldOverflowError when that dtype cannot hold it). One fold, the usual case, is computed a block of output
    channels at a time straight into the dtype, never holding the whole weight in float64."""
    weight, bias = to_numpy_float(layer.weight), to_numpy_float(layer.bias)
    for earlier_direction, earlier_affine in earlier:
        weight, bias = _fold_function(earlier_direction)(weight, bias, earlier_affine, layer.layout, out_dtype=np.float64)
    weight_dtype = _numpy_dtype(layer.weight)
    bias_dtype = weight_dtype if layer.bias is None else _numpy_dtype(layer.bias)
    fold_function = _fold_function(direction)
    if bias_dtype == weight_dtype:
        return fold_function(weight, bias, affine, layer.layout, out_dtype=weight_dtype)
    weight, bias = fold_function(weight, bias, affine, layer.layout, out_dtype=np.float64)
    return rounded_to_fit(weight, weight_dtype, "weight"), rounded_to_fit(bias, bias_dtype, "bias")


def _fold_function(direction: Direction):
    return fold_into_outputs if direction == "into-preceding" else fold_into_inputs


def _numpy_dtype(tensor) -> np.dtype:
    """numpy's (or ml_dtypes') dtype of the same name as the tensor's (torch.bfloat16 -> bfloat16)."""
    return np.dtype(str(tensor.dtype).removeprefix("torch."))


def _batchnorm_refusal(calls: list[BatchNormCall], flow: DataFlow) -> Refusal | None:
    """Reasons that hold whatever the neighbours are."""
    batchnorm = calls[0]
    names = list(dict.fromkeys(call.name for call in calls))
    if len(names) > 1:
        return "module-reused", (
            f"{', '.join(f'`{name}`' for name in names)} share their statistics (the same running mean or variance "
            "tensor), which bnfold decides together, as the calls of one module, and one fold cannot absorb them all; "
            "give each BatchNorm its own buffers to fold them."
        )
    if len(calls) > 1:
        return "module-reused", (
            f"it is called {len(calls)} times with the same statistics and one fold can absorb only one call; "
            "give each call its own BatchNorm to fold them."
        )
    if batchnorm.per_channel is None and (batchnorm.running_mean is None or batchnorm.running_var is None):
        module = flow.traced.module(batchnorm.module_path) if batchnorm.module_path else None
        if getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None:
            return "parameters-not-constant", (
                "its running mean or variance is not what the call reads as a constant: forward() changes it before "
                "the call (an update in place) or passes other statistics; only constants can be folded."
            )
        return "batch-statistics", (
            "track_running_stats=False: it normalises every batch with that batch's own statistics, even in "
            "eval mode, so there is no constant scale and shift to fold; train with track_running_stats=True "
            "to make it foldable."
        )
    if batchnorm.training:
        return "training-mode", (
            "F.batch_norm is called with training=True, so it normalises with batch statistics; "
            "pass training=self.training to fold it in eval mode."
        )
    if not batchnorm.tensors_are_attributes:
        return "parameters-not-constant", (
            "its scale, bias, mean or variance is computed in forward() instead of being a parameter or buffer; "
            "only constants can be folded."
        )
    return None


def _read_elsewhere_refusal(batchnorm: BatchNormCall, flow: DataFlow) -> Refusal | None:
    """A BatchNorm module whose parameters or buffers forward() also reads outside its call (NAM attention weighs
    the channels by ``bn.weight``) must stay, with them."""
    path = batchnorm.module_path
    for node in flow.traced.attribute_reads_by_owner.get(path, []) if path is not None else []:
        outside = [user for user in node.users if user is not batchnorm.node and path not in module_stack_paths(user)]
        if node.graph is batchnorm.node.graph and outside:
            return "read-elsewhere", (
                f"forward() also reads `{flow.traced.attribute_paths[node]}` outside the module's call "
                f"({describe_node(outside[0], flow.traced)}), so the module must stay as it is."
            )
    return None


def _hooks_refusal(path: str | None, flow: DataFlow, consequence: str) -> Refusal | None:
    """A module whose call runs hooks is more than its forward: folding would change what they see, or drop them."""
    if path is None or not has_hooks(flow.traced.module(path)):
        return None
    return "hooked-module", (
        f"`{path}` has hooks (forward, forward pre- or backward hooks, its own or every module's), which {consequence}; "
        "remove them before folding to fold it."
    )


def _calls_between(source: fx.Node, value: fx.Node) -> tuple[fx.Node, ...]:
    """The pass-through calls from ``source``'s output to ``value``, in data-flow order (``value`` last)."""
    calls: list[fx.Node] = []
    while value is not source:
        calls.insert(0, value)
        value = value.args[0]
    return tuple(calls)


def _layer_refusal(
    batchnorm: BatchNormCall,
    layer: LayerCall,
    direction: Direction,
    between: tuple[fx.Node, ...],
    flow: DataFlow,
    concatenation: fx.Node | None = None,
    channels: int | None = None,
) -> Refusal | None:
    """Why ``layer`` cannot absorb the BatchNorm (``channels`` of it, where the layer's output reaches it through
    ``concatenation``), or None."""
    if layer.weight is None or not layer.bias_is_attribute:
        return "weight-not-constant", (
            f"`{layer.name}` computes its weight or bias in forward() or through a parametrization (weight_norm, "
            "spectral_norm: torch.nn.utils.parametrize.remove_parametrizations makes it a parameter again; a "
            "quantization-aware layer such as brevitas's QuantConv2d: fold before quantizing, or use the quantization "
            "library's own BatchNorm merge); only a parameter or buffer can absorb the BatchNorm."
        )
    uses = flow.uses_of(layer)
    if uses > 1:
        calls = sum(other.module_path == layer.module_path for other in flow.layers.values()) if layer.module_path else 1
        if calls > 1:
            return "module-reused", (
                f"`{layer.name}` is called {calls} times, and folding would change every call; give each call its own "
                "layer to fold it."
            )
        return "module-reused", (
            f"`{layer.name}`'s weight or bias is also read elsewhere ({uses} reads: a parameter tied to another layer or "
            "module), and folding would change what every reader sees; give the layer its own parameters to fold it."
        )
    refusal = _hooks_refusal(layer.module_path, flow, "would see the folded layer's values instead of its own")
    if refusal is not None:
        return refusal
    if direction == "into-preceding":
        refusal = _preceding_layer_refusal(batchnorm, layer, between, flow, concatenation, channels)
    else:
        refusal = _following_layer_refusal(batchnorm, layer, between, flow)
    if refusal is None and not flow.traced.graph_rewritable and not (layer.module_path and batchnorm.module_path):
        function_call = "this BatchNorm (F.batch_norm)" if layer.module_path else f"`{layer.name}` ({layer.op})"
        refusal = "no-foldable-neighbour", (
            f"{function_call} is a function call, which only a torch.fx graph can fold, but torch.fx could not "
            "trace the model; make forward() traceable by torch.fx to fold it."
        )
    return refusal


def _preceding_layer_refusal(
    batchnorm: BatchNormCall,
    layer: LayerCall,
    between: tuple[fx.Node, ...],
    flow: DataFlow,
    concatenation: fx.Node | None,
    channels: int | None,
) -> Refusal | None:
    # Each value from the layer's output to the BatchNorm's input must have the next call as its only reader.
    values = [layer.node, *between]
    next_readers = [*between, concatenation or batchnorm.input_reader or batchnorm.node]
    other_readers = [
        reader for value, next_node in zip(values, next_readers) for reader in value_readers(value) if reader is not next_node
    ]
    if other_readers:
        readers = ", ".join(describe_node(reader, flow.traced) for reader in other_readers)
        return "layer-output-shared", (
            f"the output of `{layer.name}` is also read by {readers}, which must keep seeing "
            f"un-normalised values. {_STAYS}"
        )
    return _channel_refusal(batchnorm, layer, "into-preceding", between, flow, channels)


def _following_layer_refusal(
    batchnorm: BatchNormCall, layer: LayerCall, between: tuple[fx.Node, ...], flow: DataFlow
) -> Refusal | None:
    if layer.layout.kind == "conv_transpose":
        return "no-foldable-neighbour", (
            f"its only reader `{layer.name}` is a transposed convolution, which sums a varying number of kernel "
            f"taps near the borders, so the BatchNorm's shift cannot move into its bias. {_STAYS}"
        )
    if layer.pads_zeros:
        return "padded-conv", (
            f"its only reader `{layer.name}` pads its input with zeros, which would not be scaled and shifted like "
            f"the normalised values. {_STAYS} (With padding=0, or padding_mode 'reflect', 'replicate' or 'circular', "
            "it would fold.)"
        )
    return _channel_refusal(batchnorm, layer, "into-following", between, flow)


def _channel_refusal(
    batchnorm: BatchNormCall, layer: LayerCall, direction: Direction, between: tuple[fx.Node, ...], flow: DataFlow,
    channels: int | None = None,
) -> Refusal | None:
    """The BatchNorm's channels (axis 1 of its input and output; ``channels`` of them after a concatenation) must be
    the layer's features (see :meth:`LayerCall.feature_axis`), followed through the calls between them."""
    preceding = direction == "into-preceding"
    side, layer_value = ("output", layer.node) if preceding else ("input", layer.input)
    shape = value_shape(layer_value)
    if shape is None:
        return "channel-mismatch", (
            f"the shape of `{layer.name}`'s {side} is unknown, so whether its "
            "features are the BatchNorm's channels (axis 1) cannot be told."
        )
    feature_axis = layer.feature_axis(len(shape))
    # Followed in data-flow order: from the layer's features to the BatchNorm's input, or from its output.
    axis, target = (feature_axis, 1) if preceding else (1, feature_axis)
    for node in between:
        axis = axis_after(node, axis)
        if axis is None:
            calls = ", ".join(describe_node(node, flow.traced) for node in between)
            return "channel-mismatch", (
                f"between the BatchNorm and `{layer.name}`, {calls} split or merge the channel axis (or their shapes "
                "are unknown), so the BatchNorm's channels cannot be the layer's features."
            )
    if axis != target:
        if preceding:
            where = f"`{layer.name}`'s features (axis {feature_axis} of its output) are axis {axis} of the BatchNorm's input"
        else:
            where = f"the BatchNorm's channels are axis {axis} of `{layer.name}`'s input, its features axis {feature_axis}"
        return "channel-mismatch", (
            f"{where}, but the BatchNorm normalises axis 1: the channel axes do not line up."
        )
    layer_channels = layer.output_channels if preceding else layer.input_channels
    expected = batchnorm.channels if channels is None else channels
    if expected != layer_channels:
        return "channel-mismatch", f"the BatchNorm has {expected} channels there but `{layer.name}` has {layer_channels}."
    return None


def _no_neighbour_reason(batchnorm: BatchNormCall, flow: DataFlow) -> str:
    readers = value_readers(batchnorm.node)
    # The call that made the values, not the reshapes or dropouts they went through since.
    value, passed = batchnorm.input, []
    while flow.passes_through(value):
        value, passed = value.args[0], [value, *passed]
    source = describe_node(value, flow.traced)
    if passed:
        source += f" (through {', '.join(describe_node(node, flow.traced) for node in passed)})"
    described = ", ".join(describe_node(reader, flow.traced) for reader in readers) or "nothing"
    if batchnorm.kept_children:  # (timm's BatchNormAct2d: its own drop and act read the normalised values)
        inside = flow.traced.nodes_inside(batchnorm.node.graph, batchnorm.module_path)
        readers = value_readers(inside[-1]) if inside else []
        described = ", ".join(describe_node(reader, flow.traced) for reader in readers) or "nothing"
        # (an nn.Identity child, as timm's apply_act=False makes, changes nothing the readers see)
        passing = {node.target for node in inside if node.op == "call_module" and flow.passes_through(node)}
        changing = [path for child in batchnorm.kept_children if (path := f"{batchnorm.module_path}.{child}") not in passing]
        applied = ", ".join(f"`{path}`" for path in changing)
        if changing and any(reader in flow.layers for reader in readers):
            return (
                f"its input comes from {source}, and the module applies {applied} to its output before {described} "
                f"reads it: a layer can absorb only what reaches it unchanged. {_STAYS}"
            )
        if changing:
            described = f"the module's own {applied}, then {described}"
    if any(reader in flow.layers for reader in readers):
        return (
            f"its input comes from {source} and its output is read by {described}: a layer can absorb it only "
            f"as the output's only reader. {_STAYS}"
        )
    conversion = converted_dtypes(value)
    layer = None if conversion is None else flow.layer_producing(value.args[0])
    if layer is not None:  # (a layer's output converted on its way to the BatchNorm: say what to change)
        before, after = (str(dtype).removeprefix("torch.") for dtype in conversion)
        return (
            f"its input comes from {source}, which converts `{layer.name}`'s output from {before} to {after}: the "
            f"BatchNorm computes in {after}, the layer in {before}, so the layer cannot absorb it exactly; convert "
            f"the model, or convert before the layer, to fold it. {_STAYS}"
        )
    return (
        f"its input comes from {source} and its output is read by {described}; none of them is a Conv, "
        f"ConvTranspose or Linear that could absorb a per-channel scale and shift. {_STAYS}"
    )
