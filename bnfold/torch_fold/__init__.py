"""PyTorch front-end: fold eval-mode BatchNorm into neighbouring Conv/ConvTranspose/Linear layers.

``fold(model, example_inputs)`` works in five steps:

1. **Pairs from the real data flow** (:mod:`.tracing`, :mod:`.calls`). The model is traced with
   torch.fx, keeping unmodified torch layers and BatchNorms as module calls and tracing through
   layer subclasses with their own ``forward`` (their ``F.conv2d`` becomes a function call on
   parameters; a BatchNorm subclass calling ``super().forward(x)`` is traced with torch's rank check off). The fx graph counts only once it has run on the example inputs in step with the model and
   given the model's outputs (Python that fx evaluates on a proxy can record a graph the model never runs; when
   nothing of that run is kept, ``verify=False``, large Conv/Linear layers compute stand-ins in it, :mod:`.stand_ins`).
   When fx cannot trace the model (or its graph fails that), ``torch.export.export`` gives the graph instead, and
   when export cannot either (a branch on a tensor's value), the graphs TorchDynamo captures running the
   example inputs, split at graph breaks (a value crossing a break is its graph's output, so a pair
   across one has another reader and stays). Those graphs record module calls as the calls their
   forward made, each node naming its module: a call on a module's own weight and bias folds into that
   module. So does, in any graph, the call a layer subclass's own forward makes on its weight and bias
   (timm's Conv2dSame; a bias-less one must be seen to pass ``self.bias`` on, see
   :func:`.calls._layer_module_of`). Module order plays no part: only who
   reads whose output. Between a pair may sit calls that pass values on (:mod:`.passthrough`: Identity,
   eval-mode dropout, reshapes and permutes when the shapes prove the channel axis stays the layer's
   feature axis, as in LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(x)``); they stay.
2. **Checks with reasons** (:mod:`.planning`). Each BatchNorm either becomes a planned fold
   (into the layer before it, else into the layer after it) or a :class:`~bnfold.report.Skip`
   with a stable code and a sentence saying what the user can do.
3. **Fold with the shared algebra** (:mod:`.rewrite`, :mod:`bnfold.fold_math`): float64 numpy at
   the boundary, written back into the existing parameters once.
4. **Module tree or graph.** When every fold is between module calls, each folded BatchNorm is
   replaced by ``nn.Identity`` where it is registered (a BatchNorm module that applies child modules after
   normalising, timm's BatchNormAct2d, by an ``nn.Sequential`` of them): the result is the user's own
   class, forward and state_dict keys. When a fold involves a function call, only the traced graph has it,
   so the result is the fx ``GraphModule`` (so named) with the BatchNorm calls removed (the report says so).
   Exported and Dynamo-captured graphs are specialised to the example inputs and are never returned: their
   folds are the ones that fit the module tree, and function calls outside modules stay.
5. **Verify**: both models run on ``example_inputs`` and every output tensor is compared with the
   shared dtype tolerances; each fold between modules is also checked on its own, its folded layer run on
   the original's input to it (:mod:`.verify`, :mod:`bnfold.verification`).

``report.nodes_before`` / ``nodes_after`` count ``"batchnorm"``: the BatchNorms the report covers
(modules, ``F.batch_norm`` calls with their own statistics, and per-channel ``x * scale + shift`` computed
from parameters and buffers, as FrozenBatchNorm2d does), and ``"total"``: the calls (call_module,
call_function and call_method nodes) in the traced graph. Each fold removes one BatchNorm, and from
``"total"`` the calls it took (one, or the multiply-add and the scale's computation).
"""

from __future__ import annotations

import collections
import copy
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from bnfold.errors import describe_error
from bnfold.quantization import LayerQuantization, check_target_dtype
from bnfold.report import FoldReport
from bnfold.torch_fold.calls import DataFlow, fold_end_modules, read_data_flow
from bnfold.torch_fold.planning import FoldPlan, folded_batchnorms, plan_folds
from bnfold.torch_fold.quantization import measure_torch_folds
from bnfold.torch_fold.rewrite import fold_in_graph, fold_in_module_tree
from bnfold.torch_fold.tracing import ModelNotTraceableError, TracedModel, trace_model
from bnfold.torch_fold.verify import FoldCapture, compare_outputs, measure_noise, output_leaves, run_outputs
from bnfold.verification import VerificationError, tolerance

__all__ = ["ModelNotTraceableError", "TorchFoldResult", "fold", "measure_folds"]

# Modules whose train mode changes what an eval-mode fold must reproduce.
_MODE_SENSITIVE_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class TorchFoldResult(NamedTuple):
    """What :func:`fold` returns: ``result.model``/``result.report``, or ``model, report = fold(...)`` as
    with :func:`bnfold.fold_onnx`."""

    model: nn.Module
    report: FoldReport


# Under torch.inference_mode every tensor made is an inference tensor: the folded copy's parameters would be, and
# fail in any forward that records gradients (and in torch.export) once out of it; they have no version counter
# either, which the trace check reads.
@torch.inference_mode(False)
def fold(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    *,
    inplace: bool = False,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    quantization: bool = False,
    target_dtype: str | None = None,
) -> TorchFoldResult:
    """Fold every foldable eval-mode BatchNorm of ``model`` into a neighbouring Conv/ConvTranspose/Linear.

    ``example_inputs`` are positional arguments for ``model`` (a single tensor is accepted as is); they
    drive export when fx cannot trace, the shape checks, and verification. The model must be in eval
    mode. It is left unchanged unless ``inplace=True`` *and* every fold fits its module tree; a
    ``GraphModule`` result is always built on a copy. ``atol``/``rtol`` override the dtype tolerances.
    Raises :class:`~bnfold.verification.VerificationError` when the outputs differ beyond tolerance.
    With ``quantization`` (implied by ``target_dtype``, "float16" or "bfloat16"), ``report.quantization``
    measures what each fold did to int8 quantization of the layer and to a cast to the target dtype
    (:mod:`bnfold.quantization`).
    """
    check_target_dtype(target_dtype)
    atol, rtol = tolerance("atol", atol), tolerance("rtol", rtol)
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    _require_foldable(model)
    notes = []
    with _BuffersKept(model) as kept:  # (restored on the way out: bnfold's runs leave the models' buffers as given)
        working = model if inplace else kept.also(_copy_model(model))
        traced, flow, plan = _analyse(working, example_inputs, record=verify, stand_ins=True)
        if inplace and plan.needs_graph:
            notes.append("inplace=True not honoured: the result is a new GraphModule and the input model is unchanged")
            kept.restore()  # (the copy is of the model as it was given)
            working = kept.also(_copy_model(model))
            traced, flow, plan = _analyse(working, example_inputs, record=verify, stand_ins=True)
        kept.restore()  # (before the folds write into the layers, and before verification runs the models)
        kept.written = {id(tensor) for fold in plan.folds for tensor in (fold.layer.weight, fold.layer.bias) if tensor is not None}
        notes.append(traced.note)
        if verify:
            # The original's values before anything is folded: from the run that proved the fx graph (the model or
            # its copy, equal to it, running the example inputs), else from a run of the original with hooks catching
            # each fold's own values.
            run = traced.model_run
            capture = FoldCapture(model, plan.folds, folds_into_model=working is model, run=run)
            if capture.recorded:
                expected = output_leaves(run.output)
            else:
                try:
                    expected = run_outputs(model, example_inputs)
                finally:
                    capture.remove()
        measured = []
        if quantization or target_dtype is not None:
            measured = measure_torch_folds(plan.folds, target_dtype)  # before the rewrite overwrites the weights
        if plan.needs_graph:
            folded = fold_in_graph(plan.folds, traced)
            notes.append(
                f"the result is a torch.fx GraphModule instead of the {type(model).__name__} module tree: some folds "
                "involve function calls (F.conv2d, F.batch_norm, or a layer subclass with its own forward) that exist "
                "only in the traced graph"
            )
        else:
            folded = fold_in_module_tree(plan.folds, working, traced, copied=working is not model)
        report = _report(model, flow, plan, notes)
        report.quantization = measured
        if verify:
            actual = run_outputs(folded, example_inputs)
            report.verification = compare_outputs(expected, actual, example_inputs, atol, rtol)
            report.verification.folds = capture.check(folded, plan.folds, rtol)
            if working is not model:  # (the original is intact to measure the noise on)
                measure_noise(model, example_inputs, expected, actual, report.verification, len(plan.folds), atol is None and rtol is None)
            if not report.verification.passed:
                raise VerificationError(report.verification, report, folded)
        return TorchFoldResult(folded, report)


@torch.inference_mode(False)
def measure_folds(model: nn.Module, example_inputs: tuple | torch.Tensor, target_dtype: str | None = None) -> list[LayerQuantization]:
    """What the folds :func:`fold` would make do to int8 quantization and to ``target_dtype``
    (:mod:`bnfold.quantization`), without folding: planned and measured on ``model`` (in eval mode, not
    modified). Raises :class:`ModelNotTraceableError` when its pairs cannot be found."""
    check_target_dtype(target_dtype)
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    _require_foldable(model)
    with _BuffersKept(model):
        _, _, plan = _analyse(model, example_inputs, record=False, stand_ins=False)  # (stand-ins would patch the model)
    return measure_torch_folds(plan.folds, target_dtype)


class _BuffersKept:
    """The buffers of the models bnfold runs, as they were given: a forward may change a buffer in place at every
    call (a training-mode ``F.batch_norm`` updates its running statistics, a counter counts), and bnfold's own runs
    (the trace check, verification) must leave the model, and the model it returns, as they were. Tensors a fold
    writes (``written``) keep their new values."""

    def __init__(self, model: nn.Module):
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.written: set[int] = set()
        self.also(model)

    def also(self, model: nn.Module) -> nn.Module:
        """Keep ``model``'s buffers too; ``model``."""
        for buffer in model.buffers():
            # (only dense values: sparse, quantized and meta tensors do not compare; an inference tensor cannot
            # change in place)
            dense = buffer.layout is torch.strided and not (buffer.is_meta or buffer.is_quantized or buffer.is_inference())
            if dense and id(buffer) not in self._kept:
                self._kept[id(buffer)] = (buffer, buffer.detach().clone())
        return model

    def __enter__(self) -> _BuffersKept:
        return self

    def __exit__(self, *exception) -> None:
        self.restore()

    def restore(self) -> None:
        # (by value: batch_norm's kernel updates its running statistics without a version counter's notice)
        with torch.no_grad():
            for key, (buffer, values) in self._kept.items():
                if key in self.written or torch.equal(buffer, values):
                    continue
                if buffer.shape == values.shape and buffer.dtype == values.dtype:
                    buffer.copy_(values)
                else:  # (resized in place)
                    buffer.data = values.clone()


def _copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, in 40% of its time or less on the test architectures (mobilenet_v2: 2.3 ms
    against 5.9), with copies made up front in the memo deepcopy consults first:

    - Each module's ``__dict__`` holds a dozen hook and bookkeeping containers, nearly always empty, which
      deepcopy rebuilds through ``__reduce_ex__``: every empty ``dict``, ``OrderedDict`` and ``set`` among them
      gets its copy (a container shared between modules stays shared).
    - A buffer's deepcopy copies its storage through ``TypedStorage`` (30 µs, however small) so that tensors
      sharing a storage keep sharing it: a plain buffer whose storage no other tensor of the modules holds is
      cloned instead (2 µs). Parameters deepcopy through a clone already. Where a module holds a tensor of
      another kind (sparse, a subclass such as a quantized wrapper) whose storage cannot be told, every buffer
      goes through deepcopy.
    """
    memo: dict[int, object] = {}
    modules = list(model.modules())
    for module in modules:
        for value in vars(module).values():
            if type(value) in _PLAIN_CONTAINERS and not value:
                memo[id(value)] = type(value)()
    tensors = [
        value
        for module in modules
        for values in (vars(module).values(), module._parameters.values(), module._buffers.values())
        for value in values
        if isinstance(value, torch.Tensor)
    ]
    if all(type(tensor) in (torch.Tensor, nn.Parameter) and tensor.layout is torch.strided for tensor in tensors):
        holders = collections.Counter(tensor.untyped_storage().data_ptr() for tensor in tensors)
        for module in modules:
            for buffer in module._buffers.values():
                if _plain_tensor(buffer) and holders[buffer.untyped_storage().data_ptr()] == 1:
                    memo[id(buffer)] = buffer.clone()
    try:
        return copy.deepcopy(model, memo)
    except (RuntimeError, TypeError) as error:  # (legacy weight_norm keeps its computed weight, a non-leaf, as an attribute)
        raise ValueError(
            f"{type(model).__name__} cannot be copied ({describe_error(error)}), and bnfold folds a copy: remove what "
            "cannot be (torch.nn.utils.remove_weight_norm for the legacy weight_norm), or fold the model itself with "
            "inplace=True"
        ) from None


def _plain_tensor(value: object) -> bool:
    """A contiguous torch.Tensor (no subclass) that ``Tensor.__deepcopy__`` would copy to a clone of the same values
    and strides (an expanded tensor's clone would hold every element its strides repeat)."""
    return (
        type(value) is torch.Tensor
        and value.is_contiguous()
        and not value.requires_grad
        and value.grad is None
        and not value.is_quantized
        and not value.is_conj()
        and not value.is_neg()
        and not vars(value)
    )


_PLAIN_CONTAINERS = (dict, collections.OrderedDict, set)


def _require_eval_mode(model: nn.Module) -> None:
    training = {
        name or "<model>": module
        for name, module in model.named_modules()
        if isinstance(module, _MODE_SENSITIVE_TYPES) and module.training
    }
    if training:
        listed = ", ".join(list(training)[:3]) + (", ..." if len(training) > 3 else "")
        why = (
            "BatchNorm uses batch statistics there and only eval-mode BatchNorm can be folded"
            if any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in training.values())
            else "Dropout zeroes values at random there, so no fold could be checked"
        )
        raise ValueError(f"{type(model).__name__} is in training mode ({listed}): {why}. Call model.eval() before bnfold.fold.")


def _require_foldable(model: nn.Module) -> None:
    """Refuse, saying why, a model bnfold cannot fold as it is (for fold and measure_folds alike)."""
    _require_eager(model)
    _require_eval_mode(model)
    _require_initialised(model)
    _require_values(model)


def _require_eager(model: nn.Module) -> None:
    """A TorchScript module runs compiled code that neither fx nor torch.export can read: say what to fold instead
    (each tracer's own failure said nothing of it)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelNotTraceableError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script or torch.jit.trace), which bnfold cannot "
            "read: fold the eager nn.Module it was made from, then script or trace the folded model."
        )


def _require_values(model: nn.Module) -> None:
    """A model on the meta device has shapes and no values: nothing to fold from."""
    on_meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if on_meta:
        listed = ", ".join(on_meta[:3]) + (", ..." if len(on_meta) > 3 else "")
        raise ValueError(
            f"{type(model).__name__} has tensors on the meta device ({listed}), which hold no values: load its weights "
            "(load_state_dict(..., assign=True), or to_empty() then load them) before bnfold.fold."
        )


def _require_initialised(model: nn.Module) -> None:
    """A lazy module (LazyConv2d, LazyLinear) has no weights until its first forward: a copy would draw its own."""
    lazy = [
        name or "<model>"
        for name, module in model.named_modules()
        if any(is_lazy(tensor) for tensor in (*module._parameters.values(), *module._buffers.values()) if tensor is not None)
    ]
    if lazy:
        listed = ", ".join(lazy[:3]) + (", ..." if len(lazy) > 3 else "")
        raise ValueError(
            f"{type(model).__name__} has lazy modules not yet initialised ({listed}): their weights do not exist until "
            "the model first runs. Run the model once on an input before bnfold.fold."
        )


def _analyse(model: nn.Module, example_inputs: tuple, record: bool, stand_ins: bool) -> tuple[TracedModel, DataFlow, FoldPlan]:
    """The traced model, its data flow and the fold plan; with ``record``, an fx trace keeps the model's run on
    the example inputs with the values around each module a fold may join (for verification); else, with
    ``stand_ins``, the run that proves it may replace the layers' forward for its duration (see trace_model)."""
    try:
        traced = trace_model(model, example_inputs, fold_end_modules if record else None, stand_ins=stand_ins)
    except ModelNotTraceableError as error:
        given = example_inputs[0] if len(example_inputs) == 1 else None
        if isinstance(given, (dict, list)):  # (transformers' processors return a dict of keyword arguments)
            raise ModelNotTraceableError(
                f"{error}. example_inputs are forward()'s positional arguments, and one {type(given).__name__} was "
                "given as its first: for keyword arguments (a processor's output), give their values as a tuple in "
                "forward()'s order, e.g. (inputs['pixel_values'],)"
            ) from error
        _require_running(model, example_inputs, error)
        raise
    flow = read_data_flow(traced)
    return traced, flow, plan_folds(flow, model)


def _require_running(model: nn.Module, example_inputs: tuple, error: ModelNotTraceableError) -> None:
    """No tracer captures a model that fails on the example inputs itself: say that first (each tracer's failure
    said it its own way, fx's as "other outputs than the model")."""
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as failure:  # noqa: BLE001 - whatever the model raises is the cause to name
        raise ModelNotTraceableError(
            f"{type(model).__name__} fails on the example inputs ({describe_error(failure)}): bnfold runs the model on "
            "them, so give inputs it accepts (forward()'s positional arguments, as a tuple)"
        ) from error


def _report(model: nn.Module, flow: DataFlow, plan: FoldPlan, notes: list[str]) -> FoldReport:
    folded = folded_batchnorms(plan.folds)
    batchnorms = len(folded) + len(plan.skips)
    return FoldReport(
        model=type(model).__name__,
        frontend="pytorch",
        folds=[fold.to_report() for fold in plan.folds],
        skips=plan.skips,
        nodes_before={"batchnorm": batchnorms, "total": flow.call_count},
        nodes_after={
            "batchnorm": batchnorms - len(folded),
            "total": flow.call_count - sum(batchnorm.call_nodes for batchnorm in folded),
        },
        notes=[*notes, *plan.notes],
    )
