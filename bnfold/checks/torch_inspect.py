"""The PyTorch inspector: an ``nn.Module``, TorchScript module or ``torch.export`` program, as given.

The model is not put into eval mode, since its mode is what is being checked. The batch-dependence
measurement runs a deep copy (a training-mode BatchNorm updates its buffers on every call) under a
forked, seeded RNG (so Dropout draws the same masks on every check and the caller's RNG is untouched).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bnfold.checks.batch_dependence import (
    NotMeasurable,
    Output,
    Runner,
    measure_batch_dependence,
    measurement_sizes,
    not_measured,
)
from bnfold.checks.findings import DEFAULT_BATCH_SIZE, Finding
from bnfold.checks.layer_rules import layer_findings, with_measured_quantization
from bnfold.checks.torch_states import exported_layer_states, module_layer_states
from bnfold.errors import describe_error
from bnfold.quantization import LayerQuantization
from bnfold.torch_fold import measure_folds
from bnfold.torch_fold.conversion import to_numpy
from bnfold.verification import over_random_input_budget

Model = nn.Module | torch.jit.ScriptModule | torch.export.ExportedProgram
ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def check_model(
    model: Model,
    example_inputs: ExampleInputs | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    measure_batch: bool = True,
) -> list[Finding]:
    """Every finding for a PyTorch model in the state it is given in (it is not modified).

    ``example_inputs`` (a tensor or a sequence of tensors, batch axis first) give the shapes and dtypes
    of the random samples of the batch-dependence measurement; a ``torch.export`` program defaults to
    its own example inputs. ``measure_batch=False`` skips the measurement. With example inputs, an
    ``nn.Module``'s BN007 is measured on the layers its BatchNorms would fold into, as ``bnfold.fold``
    plans them; otherwise (and for TorchScript and exported programs) it is estimated from the statistics.
    """
    exported = isinstance(model, torch.export.ExportedProgram)
    findings = layer_findings(exported_layer_states(model) if exported else module_layer_states(model))
    if example_inputs is not None and not exported and not isinstance(model, torch.jit.ScriptModule):
        findings = with_measured_quantization(findings, _measured_folds(model, example_inputs, seed))
    if not measure_batch:
        return findings
    if exported:
        module, batch_dims = model.module(), _exported_batch_dims(model)
        if example_inputs is None:
            example_inputs = _exported_example_inputs(model)
    else:
        module, batch_dims = model, None
    return findings + _batch_dependence(module, example_inputs, batch_dims, batch_size, seed)


def _measured_folds(model: nn.Module, example_inputs: ExampleInputs, seed: int) -> list[LayerQuantization] | None:
    """The figures of the folds ``bnfold.fold`` would make (float16 as the target), planned on an eval-mode
    copy (the statistics fold the same in either mode) traced on one random sample shaped like the example
    inputs (which may be meta templates); None when its pairs cannot be found or a sample would exceed the
    random-input budget: the estimates from the statistics stay."""
    templates = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    if any(template.dim() == 0 for template in templates) or over_random_input_budget(_input_sizes(templates, 1)):
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inputs = tuple(_random_like(template, 1) for template in templates)
    try:
        return measure_folds(copy.deepcopy(model).eval(), inputs, target_dtype="float16")
    # Not only ModelNotTraceableError: fx can fail past its trace (a module name that is no Python name
    # breaks the GraphModule's generated code), and the check must report on any model it can read.
    except Exception:  # noqa: BLE001
        return None


def _input_sizes(templates: list[torch.Tensor], batch_size: int) -> dict[str, tuple[list[int], str, int]]:
    """Random inputs of ``batch_size`` samples shaped like ``templates``, as over_random_input_budget reads them."""
    return {
        f"input{index}": ([batch_size, *template.shape[1:]], str(template.dtype).removeprefix("torch."), template.element_size())
        for index, template in enumerate(templates)
    }


def _exported_batch_dims(program: torch.export.ExportedProgram) -> list[int | None]:
    """Each user input's batch size as exported: None when export made it dynamic."""
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    dims = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            dims.append(1)  # not a tensor with a batch axis
        else:
            dims.append(value.shape[0] if isinstance(value.shape[0], int) else None)
    return dims


def _exported_example_inputs(program: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...] | None:
    stored = program.example_inputs
    if stored is None:
        return None
    args, kwargs = stored
    return None if kwargs or not all(isinstance(arg, torch.Tensor) for arg in args) else tuple(args)


def _batch_dependence(
    module: nn.Module, example_inputs: ExampleInputs | None, batch_dims: list[int | None] | None, batch_size: int, seed: int
) -> list[Finding]:
    try:
        if example_inputs is None:
            raise NotMeasurable(
                "no example inputs to take input shapes from; give them (--input-shape D1,D2,... in order, example_inputs in Python)"
            )
        templates = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
        if any(template.dim() == 0 for template in templates):
            raise NotMeasurable("an example input is a scalar, with no batch axis")
        if batch_dims is None:
            batch_dims = [None] * len(templates)  # an eager module takes any batch size
        batch_size, alone_size = measurement_sizes(batch_dims, batch_size)
        too_large = over_random_input_budget(_input_sizes(templates, batch_size))
        if too_large:
            raise NotMeasurable(f"{too_large[1]}; give smaller example inputs (--input-shape D1,D2,... in order)")
    except NotMeasurable as reason:
        return [not_measured(str(reason))]
    try:
        copied = copy.deepcopy(module)
    except Exception as error:  # noqa: BLE001 - a lock, a tensor made in a forward (old-style weight_norm)
        return [not_measured(f"the model cannot be copied to run it ({describe_error(error)})")]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inputs = [_random_like(template, batch_size) for template in templates]
        return measure_batch_dependence(_runner(copied, inputs), batch_size, alone_size)


def _random_like(template: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Random samples shaped and typed like ``template``; integer inputs are usually indices, so 0 or 1."""
    shape = (batch_size, *template.shape[1:])
    device = "cpu" if template.is_meta else template.device  # meta templates only describe the input
    if template.is_floating_point():
        return torch.randn(shape).to(device=device, dtype=template.dtype)
    return torch.randint(0, 2, shape).to(device=device, dtype=template.dtype)


def _runner(module: nn.Module, inputs: list[torch.Tensor]) -> Runner:
    def run(indices: list[int]) -> dict[str, Output]:
        with torch.no_grad():
            outputs = module(*(tensor[indices] for tensor in inputs))
        leaves, _ = pytree.tree_flatten_with_path(outputs)
        return {
            f"output{pytree.keystr(path)}": Output(to_numpy(leaf), str(leaf.dtype).removeprefix("torch."))
            for path, leaf in leaves
            if isinstance(leaf, torch.Tensor)
        }

    return run
