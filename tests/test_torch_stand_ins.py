"""The trace check's layer stand-ins (bnfold.torch_fold.stand_ins): the output's shape, dtype and memory format, an
output that follows every change of the input, the layer's own forward where a stand-in cannot mirror a call, and
``fold(..., verify=False)`` on models where a stand-in must give way."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from torch_architectures import CASES, trained_eval_model

from bnfold.torch_fold import fold, measure_folds, stand_ins, tracing
from bnfold.torch_fold.stand_ins import can_stand_in, layers_stood_in


def _eval_with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(autouse=True)
def stand_ins_for_every_size(monkeypatch):
    """Stand-ins for the small layers here too (they take layers of four million multiply-adds and more)."""
    monkeypatch.setattr(stand_ins, "_FEWEST_MULTIPLY_ADDS", 0)


_CHANNELS_LAST = torch.channels_last
_CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 11), None),
    "conv1d unbatched": (lambda: nn.Conv1d(3, 5, 4, dilation=2), (3, 12), None),
    "conv2d grouped": (lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2), (2, 4, 9, 10), None),
    "conv2d same": (lambda: nn.Conv2d(4, 3, 4, padding="same", dilation=2), (1, 4, 7, 6), None),
    "conv2d valid": (lambda: nn.Conv2d(4, 3, 3, padding="valid", stride=2), (1, 4, 8, 7), None),
    "conv2d reflect": (lambda: nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect", bias=False), (2, 4, 5, 5), None),
    "conv2d channels-last input": (lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 6, 5), _CHANNELS_LAST),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, stride=2), (1, 2, 5, 6, 7), None),
    "conv3d channels-last input": (lambda: nn.Conv3d(2, 4, 1), (2, 2, 3, 4, 5), torch.channels_last_3d),
    "linear": (lambda: nn.Linear(6, 3), (2, 5, 6), None),
    "linear unbatched": (lambda: nn.Linear(6, 3), (6,), None),
    "linear float64": (lambda: nn.Linear(6, 3).double(), (4, 6), None),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_a_stand_in_has_its_layers_output_shape_dtype_and_strides(name):
    make, shape, memory_format = _CASES[name]
    torch.manual_seed(0)
    layer = make()
    data = torch.randn(shape, dtype=layer.weight.dtype)
    if memory_format is not None:
        data = data.contiguous(memory_format=memory_format)
    assert can_stand_in(layer)
    with torch.no_grad():
        real = layer(data)
        with layers_stood_in([layer]):
            stood_in = layer(data)
    assert (stood_in.shape, stood_in.dtype, stood_in.stride()) == (real.shape, real.dtype, real.stride())
    assert not torch.allclose(stood_in, real, atol=1e-3)  # the stand-in ran, not the layer
    assert "forward" not in vars(layer)


def test_a_channels_last_weight_gives_a_channels_last_stand_in():
    layer = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    data = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        real = layer(data)
        with layers_stood_in([layer]):
            stood_in = layer(data)
    assert stood_in.stride() == real.stride() != torch.empty(real.shape).stride()


def test_under_autocast_a_layer_runs_its_own_forward():
    conv = nn.Conv2d(3, 4, 3)
    data = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        real = conv(data)
        with layers_stood_in([conv]):
            assert torch.equal(conv(data), real) and real.dtype == torch.bfloat16


def _relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).abs().max() / before.abs().max())


def test_a_stand_in_follows_every_change_of_its_input_and_only_those():
    torch.manual_seed(0)
    conv, other = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    data = torch.randn(1, 3, 56, 56)
    swapped = data.clone()
    swapped[0, 1, 10, 20], swapped[0, 1, 20, 10] = data[0, 1, 20, 10], data[0, 1, 10, 20]
    with torch.no_grad(), layers_stood_in([conv, other]):
        output = conv(data)
        assert torch.equal(conv(data.clone()), output)
        # Well beyond the trace check's relative tolerance of 1e-4, for a change of one element in ten thousand.
        assert _relative_change(output, conv(swapped)) > 1e-4
        assert _relative_change(output, conv(data.transpose(2, 3))) > 1e-2
        assert _relative_change(output, conv(data.flip(1))) > 1e-2
        assert _relative_change(output, other(data)) > 1e-2  # another layer on the same input


@pytest.mark.parametrize(
    "data, message",
    [
        (torch.randn(1, 3, 8, 8, dtype=torch.float64), "should be the same"),
        (torch.randn(1, 5, 8, 8), "expected input"),
        (torch.randn(1, 3, 2, 2), "Kernel size can't be greater than actual input size"),
    ],
)
def test_a_call_a_stand_in_cannot_mirror_runs_the_layer_and_raises_as_it_does(data, message):
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad(), layers_stood_in([conv]), pytest.raises(RuntimeError, match=message):
        conv(data)


def test_transposed_convolutions_and_layers_with_their_own_forward_keep_it():
    class Patched(nn.Conv2d):
        pass

    patched = Patched(3, 4, 3)
    patched.forward = lambda data: data
    assert not can_stand_in(nn.ConvTranspose2d(3, 4, 3))
    assert not can_stand_in(patched)
    assert can_stand_in(Patched(3, 4, 3))


class _ConvBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu())


def test_in_a_model_with_a_hook_the_check_runs_the_real_layers():
    torch.manual_seed(0)
    model = _eval_with_statistics(_ConvBatchNorm())
    data = torch.randn(2, 3, 8, 8)
    seen = []
    model.head.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    with torch.no_grad():
        real = model(data)
    seen.clear()
    result = fold(model, (data,), verify=False)
    assert len(result.report.folds) == 1
    assert seen and all(torch.allclose(output, real, rtol=1e-5, atol=1e-6) for output in seen)


class _ChecksItsOutput(_ConvBatchNorm):
    """A head of positive weights and bias on a ReLU's output: the output is positive, which forward asserts (fx
    records the assertion as a call); a stand-in's output is not."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.head.weight.uniform_(0.1, 1.0)
            self.head.bias.fill_(0.1)

    def forward(self, x):
        y = super().forward(x)
        torch._assert(torch.all(y > 0), "the output must be positive")
        return y


def _fold_unverified(model: nn.Module, **options):
    """``fold(..., verify=False)`` of ``model`` on a batch, the folded model checked to compute what it did."""
    data = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(data)
    folded, report = fold(model, (data,), verify=False, **options)
    with torch.no_grad():
        torch.testing.assert_close(folded(data), expected, rtol=1e-5, atol=1e-5)
    return folded, report


def test_a_model_that_rejects_a_stand_ins_values_is_proven_on_its_real_layers():
    torch.manual_seed(0)
    model = _eval_with_statistics(_ChecksItsOutput())
    with torch.no_grad(), layers_stood_in([model.conv, model.head]), pytest.raises(AssertionError, match="must be positive"):
        model(torch.randn(2, 3, 8, 8))
    folded, report = _fold_unverified(model, inplace=True)
    assert report.skips == [] and len(report.folds) == 1
    assert report.notes[0] == "pairs found with torch.fx symbolic tracing"
    assert isinstance(folded.bn, nn.Identity) and "forward" not in vars(folded.conv)


def test_small_layers_run_their_own_forward_large_ones_a_stand_in(monkeypatch):
    monkeypatch.undo()  # the size threshold itself
    torch.manual_seed(0)
    small, large = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    small_data, large_data = torch.randn(1, 16, 16, 16), torch.randn(1, 64, 28, 28)  # 0.6 and 29 million
    with torch.no_grad():
        small_real, large_real = small(small_data), large(large_data)
        with layers_stood_in([small, large]):
            assert torch.equal(small(small_data), small_real)
            assert not torch.allclose(large(large_data), large_real, atol=1e-3)


class _FlipsWhenRun(_ConvBatchNorm):
    """fx records ``forward`` on a proxy, which is no tensor: the graph does not flip what the model flips."""

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            x = x.flip(-1)
        return super().forward(x)


def test_the_check_with_stand_ins_still_catches_a_graph_the_model_does_not_run():
    torch.manual_seed(0)
    _, report = _fold_unverified(_eval_with_statistics(_FlipsWhenRun()))
    assert any("traced graph computes other outputs than the model" in note for note in report.notes)


class _NotesStandIns(_ConvBatchNorm):
    """Notes whether its conv was called while a stand-in replaced its forward."""

    saw_a_stand_in = False

    def forward(self, x):
        type(self).saw_a_stand_in |= "forward" in vars(self.conv)
        return super().forward(x)


def test_measure_folds_never_replaces_a_layers_forward_in_the_users_model():
    model = _eval_with_statistics(_NotesStandIns())
    data = torch.randn(2, 3, 8, 8)
    _NotesStandIns.saw_a_stand_in = False
    assert len(measure_folds(model, (data,))) == 1
    assert not _NotesStandIns.saw_a_stand_in
    fold(model, (data,), verify=False, inplace=True)  # the model it folds: stand-ins while it proves the graph
    assert _NotesStandIns.saw_a_stand_in and "forward" not in vars(model.conv)


def _outcome(model: nn.Module, inputs: tuple) -> tuple:
    report = fold(model, inputs, verify=False).report
    return report.folds, [(skip.batchnorm, skip.code) for skip in report.skips], report.notes


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_architecture_folds_alike_with_stand_ins_for_every_layer_and_without(case, monkeypatch):
    model, inputs = trained_eval_model(case)
    runs = []
    runs_alike = tracing._runs_alike

    def noting_runs(traced, example_inputs, calls, stand_ins):
        passed, output = runs_alike(traced, example_inputs, calls, stand_ins)
        runs.append((stand_ins, passed))
        return passed, output

    monkeypatch.setattr(tracing, "_runs_alike", noting_runs)
    stood_in = _outcome(model, inputs)
    # The run with stand-ins proves every graph fx traces here on its own (export and Dynamo need no such run).
    assert runs in ([(True, True)], []) and (runs == []) == (case.name in ("tf_mobilevit", "value_branch"))
    monkeypatch.setattr(tracing, "can_stand_in", lambda layer: False)
    assert stood_in == _outcome(model, inputs)


class _RandomNet(nn.Module):
    """A random stack of convs (1d/2d/3d, grouped, "same"), transposed convs, BatchNorms, ReLUs (some in place),
    dropout and residual adds, then a Linear head and sometimes a BatchNorm1d after it."""

    def __init__(self, rng):
        super().__init__()
        self.spatial = rng.choice([1, 2, 3])
        conv, transposed, batchnorm = (
            getattr(nn, f"{name}{self.spatial}d") for name in ("Conv", "ConvTranspose", "BatchNorm")
        )
        self.in_channels = channels = rng.choice([3, 4, 8])
        self.layers, self.residual = nn.ModuleList(), set()
        for _ in range(rng.randint(2, 7)):
            kind = rng.choice(["conv", "conv", "transposed", "bn", "bn", "relu", "dropout", "add"])
            if kind == "conv":
                out = rng.choice([4, 6, 8])
                groups = rng.choice([g for g in (1, 2) if channels % g == 0 and out % g == 0])
                padding = rng.choice([0, 1, "same"])
                self.layers.append(conv(channels, out, rng.choice([1, 3]), padding=padding, groups=groups, bias=rng.random() < 0.5))
                channels = out
            elif kind == "transposed":
                out = rng.choice([4, 6])
                self.layers.append(transposed(channels, out, 1))
                channels = out
            elif kind == "bn":
                self.layers.append(batchnorm(channels))
            elif kind == "relu":
                self.layers.append(nn.ReLU(inplace=rng.random() < 0.5))
            elif kind == "dropout":
                self.layers.append(nn.Dropout(0.3))
            else:
                self.residual.add(len(self.layers))
                self.layers.append(nn.Identity())
        self.head = nn.Linear(channels, 5)
        self.head_norm = nn.BatchNorm1d(5) if rng.random() < 0.5 else nn.Identity()

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            y = layer(x)
            x = y + x if index in self.residual and y.shape == x.shape else y
        return self.head_norm(self.head(x.flatten(2).mean(-1)))


def test_random_models_fold_alike_with_stand_ins_for_every_layer_and_without(monkeypatch):
    rng, compared, folds = random.Random(0), 0, 0
    for seed in range(40):
        torch.manual_seed(seed)
        model = _eval_with_statistics(_RandomNet(rng))
        data = torch.randn(2, model.in_channels, *[6] * model.spatial)
        try:
            with torch.no_grad():
                model(data)
        except RuntimeError:  # (a "valid" conv stack that shrinks past its kernel)
            continue
        stood_in = _outcome(model, (data,))
        with monkeypatch.context() as real_layers:
            real_layers.setattr(tracing, "can_stand_in", lambda layer: False)
            assert stood_in == _outcome(model, (data,)), seed
        compared, folds = compared + 1, folds + len(stood_in[0])
    assert compared >= 35 and folds >= 35  # (the generator makes models that run and fold: 40 and 44 here)
