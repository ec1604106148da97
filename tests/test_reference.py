"""The reference BatchNorm (bnfold.reference) against torch.nn.BatchNorm1d/2d/3d.

Comparisons use ``|ours - torch| <= tol * (1 + |torch|)`` element-wise (atol = rtol = tol).
Largest tol actually needed over this file's cases (torch 2.13 CPU):

    quantity                 float32     float64
    forward, train           1.1e-6      6.9e-15
    forward, eval            8.2e-7      5.3e-15
    grad x                   1.7e-7      9.9e-16
    grad weight              2.7e-6      3.5e-14
    grad bias                1.2e-6      1.3e-15
    running_mean             1.2e-7      4.5e-16
    running_var              1.8e-7      4.8e-16

hence TOL below: 1e-5 for float32, 2e-13 for float64 (a 4-6x margin). num_batches_tracked must be equal.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import bnfold
from bnfold import reference
from bnfold.reference import _BatchNormTrainFunction

TOL = {torch.float32: 1e-5, torch.float64: 2e-13}

# name -> (reference class, torch class, input shape); shape[1] is the channel count.
SHAPES = {
    "1d_NC": (reference.BatchNorm1d, nn.BatchNorm1d, (16, 5)),
    "1d_NCL": (reference.BatchNorm1d, nn.BatchNorm1d, (6, 5, 9)),
    "2d": (reference.BatchNorm2d, nn.BatchNorm2d, (4, 5, 6, 7)),
    "3d": (reference.BatchNorm3d, nn.BatchNorm3d, (3, 5, 4, 3, 5)),
}

CONFIGS = [
    {},  # momentum 0.1, eps 1e-5
    {"momentum": 0.3},
    {"momentum": None},
    {"eps": 1e-3},
    {"eps": 1e-3, "momentum": None},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False, "momentum": None},
]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])


def _make_pair(shape_name: str, dtype: torch.dtype, seed: int = 0, **config):
    """A torch BatchNorm with random gamma/beta, and a reference one loaded from its state_dict."""
    ours_cls, torch_cls, shape = SHAPES[shape_name]
    theirs = torch_cls(shape[1], dtype=dtype, **config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (theirs.weight, theirs.bias):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    ours = ours_cls(shape[1], dtype=dtype, **config)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape, gen


def _batch(shape, dtype, gen) -> torch.Tensor:
    """Non-zero mean, non-unit variance, and different per channel (catches a wrong reduction axis)."""
    channel = torch.arange(shape[1], dtype=dtype).view(1, -1, *([1] * (len(shape) - 2)))
    return torch.randn(shape, generator=gen, dtype=dtype) * 3 + 2 + 5 * channel


def _step_and_compare(ours, theirs, shape, dtype, gen) -> torch.Tensor:
    """One forward/backward on the same batch and upstream gradient; compare outputs and grads.

    Returns our output (to inspect its grad_fn)."""
    x = _batch(shape, dtype, gen)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    _assert_close(y_ours, y_theirs, dtype)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    _assert_close(x_ours.grad, x_theirs.grad, dtype)
    for name in ("weight", "bias"):
        p_ours, p_theirs = getattr(ours, name), getattr(theirs, name)
        assert (p_ours is None) == (p_theirs is None)
        if p_theirs is not None:
            _assert_close(p_ours.grad, p_theirs.grad, dtype)
            p_ours.grad = p_theirs.grad = None
    return y_ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("shape_name", SHAPES)
def test_matches_torch_over_training_then_eval(shape_name, config, dtype):
    ours, theirs, shape, gen = _make_pair(shape_name, dtype, **config)
    for _ in range(5):
        y = _step_and_compare(ours, theirs, shape, dtype, gen)
        # The gradients come from the explicit backward, not from autograd through the forward.
        assert type(y.grad_fn).__name__ == "_BatchNormTrainFunctionBackward"

    for name in ("running_mean", "running_var", "num_batches_tracked"):
        b_ours, b_theirs = getattr(ours, name), getattr(theirs, name)
        assert (b_ours is None) == (b_theirs is None)
        if b_theirs is None:
            continue
        assert not b_ours.requires_grad and b_ours.grad_fn is None
        if name == "num_batches_tracked":
            assert b_ours.dtype == torch.int64 and b_ours.shape == () and int(b_ours) == int(b_theirs) == 5
        else:
            _assert_close(b_ours, b_theirs, dtype)

    ours.eval()
    theirs.eval()
    y = _step_and_compare(ours, theirs, shape, dtype, gen)  # running stats, or batch stats if untracked
    tracked = theirs.running_mean is not None
    assert (type(y.grad_fn).__name__ == "_BatchNormTrainFunctionBackward") != tracked
    if tracked:  # eval mode leaves the statistics alone
        assert int(ours.num_batches_tracked) == 5
        _assert_close(ours.running_mean, theirs.running_mean, dtype)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("params", ["weight_bias", "weight_only", "none"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (2, 3, 3, 2), (2, 2, 2, 3, 2)], ids=lambda s: f"{len(s)}D")
def test_backward_passes_gradcheck(shape, params, eps):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).requires_grad_()
    c = shape[1]
    weight = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_() if params != "none" else None
    bias = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_() if params == "weight_bias" else None

    def normalise(x, weight, bias):
        return _BatchNormTrainFunction.apply(x, weight, bias, eps)[0]

    assert torch.autograd.gradcheck(normalise, (x, weight, bias), eps=1e-6, atol=1e-7, rtol=1e-6)


# Training with a single value per channel: torch raises from F.batch_norm, *after* advancing
# num_batches_tracked; untracked layers use batch statistics in eval too, so they raise there as well.
SINGLE_VALUE_CASES = [
    ("1d_NC", (1, 5), True, {}),
    ("1d_NCL", (1, 5, 1), True, {}),
    ("2d", (1, 5, 1, 1), True, {"momentum": None}),
    ("3d", (1, 5, 1, 1, 1), True, {}),
    ("2d", (1, 5, 1, 1), False, {"track_running_stats": False}),
]


@pytest.mark.parametrize(("shape_name", "shape", "training", "config"), SINGLE_VALUE_CASES)
def test_single_value_per_channel_raises_like_torch(shape_name, shape, training, config):
    ours, theirs, _, gen = _make_pair(shape_name, torch.float64, **config)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError) as theirs_error:
        theirs(x)
    with pytest.raises(ValueError) as ours_error:
        ours(x)
    assert str(ours_error.value) == str(theirs_error.value)
    assert "Expected more than 1 value per channel when training" in str(ours_error.value)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("shape_name", ["1d_NC", "2d", "3d"])
def test_single_value_per_channel_is_fine_in_eval_with_running_stats(shape_name):
    ours, theirs, shape, gen = _make_pair(shape_name, torch.float64)
    ours.eval()
    theirs.eval()
    x = torch.randn((1, shape[1], *([1] * (len(shape) - 2))), generator=gen, dtype=torch.float64)
    _assert_close(ours(x), theirs(x), torch.float64)


@pytest.mark.parametrize(
    ("ours_cls", "torch_cls", "ndim"),
    [
        (reference.BatchNorm1d, nn.BatchNorm1d, 1),
        (reference.BatchNorm1d, nn.BatchNorm1d, 4),
        (reference.BatchNorm2d, nn.BatchNorm2d, 3),
        (reference.BatchNorm2d, nn.BatchNorm2d, 5),
        (reference.BatchNorm3d, nn.BatchNorm3d, 4),
        (reference.BatchNorm3d, nn.BatchNorm3d, 6),
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_input_dimensions_raise_like_torch(ours_cls, torch_cls, ndim, training):
    x = torch.randn((2, 3, 2, 2, 2, 2)[:ndim]) if ndim > 1 else torch.randn(3)
    theirs, ours = torch_cls(3).train(training), ours_cls(3).train(training)
    with pytest.raises(ValueError) as theirs_error:
        theirs(x)
    with pytest.raises(ValueError) as ours_error:
        ours(x)
    assert str(ours_error.value) == str(theirs_error.value)
    assert f"got {ndim}D input" in str(ours_error.value)
    assert int(ours.num_batches_tracked) == 0  # rejected before anything is counted


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_module_surface_matches_torch(config):
    ours = reference.BatchNorm2d(4, dtype=torch.float64, **config)
    theirs = nn.BatchNorm2d(4, dtype=torch.float64, **config)
    assert repr(ours) == repr(theirs)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in theirs.named_parameters()
    ]
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(ours, name) is None) == (getattr(theirs, name) is None), name
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert ours_state._metadata == theirs_state._metadata
    for key, value in theirs_state.items():
        assert ours_state[key].dtype == value.dtype and torch.equal(ours_state[key], value), key


@pytest.mark.parametrize("shape_name", SHAPES)
def test_reset_restores_initial_state(shape_name):
    ours, _, shape, gen = _make_pair(shape_name, torch.float64)
    ours(_batch(shape, torch.float64, gen))
    ours.reset_running_stats()
    assert int(ours.num_batches_tracked) == 0
    assert torch.equal(ours.running_mean, torch.zeros(shape[1], dtype=torch.float64))
    assert torch.equal(ours.running_var, torch.ones(shape[1], dtype=torch.float64))
    assert not torch.equal(ours.weight, torch.ones_like(ours.weight))  # randomised by _make_pair
    ours(_batch(shape, torch.float64, gen))
    ours.reset_parameters()
    fresh = SHAPES[shape_name][1](shape[1], dtype=torch.float64)
    for key, value in fresh.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_round_trip_after_training(config, direction):
    ours, theirs, shape, gen = _make_pair("2d", torch.float64, **config)
    source, target = (ours, theirs) if direction == "ours_to_torch" else (theirs, ours)
    for _ in range(3):
        source(_batch(shape, torch.float64, gen))
    target.load_state_dict(source.state_dict(), strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    source.eval()
    target.eval()
    x = _batch(shape, torch.float64, gen)
    _assert_close(target(x), source(x), torch.float64)


def _convnet(bn_cls) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn_cls(4), nn.ReLU(), nn.Conv2d(4, 2, 1), bn_cls(2, momentum=None))


def test_sequential_trains_like_torch_and_round_trips():
    torch.manual_seed(0)
    theirs = _convnet(nn.BatchNorm2d).double()
    ours = _convnet(reference.BatchNorm2d).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = _batch((4, 3, 6, 6), torch.float64, gen)
        target = torch.randn(4, 2, 6, 6, generator=gen, dtype=torch.float64)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
    trained_ours, trained_theirs = ours.state_dict(), theirs.state_dict()
    assert list(trained_ours) == list(trained_theirs)
    assert int(trained_ours["1.num_batches_tracked"]) == int(trained_ours["4.num_batches_tracked"]) == 4
    for key, value in trained_theirs.items():
        if value.is_floating_point():
            _assert_close(trained_ours[key], value, torch.float64)
        else:
            assert torch.equal(trained_ours[key], value), key

    # Round trips both ways into fresh models of the other kind, checked on eval outputs.
    x = _batch((2, 3, 6, 6), torch.float64, gen)
    for source, fresh_cls in ((ours, nn.BatchNorm2d), (theirs, reference.BatchNorm2d)):
        fresh = _convnet(fresh_cls).double()
        fresh.load_state_dict(source.state_dict(), strict=True)
        source.eval()
        fresh.eval()
        _assert_close(fresh(x), source(x), torch.float64)


# --- a drop-in for torch's classes ------------------------------------------------------------------


@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), SHAPES.values(), ids=SHAPES)
def test_is_the_torch_class_with_the_reference_forward(ours_cls, torch_cls, shape):
    ours = ours_cls(shape[1])
    assert isinstance(ours, torch_cls) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert type(ours).forward is not torch_cls.forward
    y = ours(_batch(shape, torch.float32, torch.Generator().manual_seed(0)))
    assert type(y.grad_fn).__name__ == "_BatchNormTrainFunctionBackward"


@pytest.mark.parametrize("with_metadata", [False, True], ids=["plain_dict", "state_dict_metadata_v1"])
def test_checkpoint_without_num_batches_tracked_loads_as_in_torch(with_metadata):
    ours, theirs, shape, _ = _make_pair("2d", torch.float64)
    for module in (ours, theirs):
        with torch.no_grad():
            module.num_batches_tracked.fill_(7)
    source = nn.BatchNorm2d(shape[1], dtype=torch.float64)
    checkpoint = {k: v for k, v in source.state_dict().items() if k != "num_batches_tracked"}
    if with_metadata:  # a checkpoint written before torch added the counter (state_dict version 1)
        checkpoint = collections.OrderedDict(checkpoint)
        checkpoint._metadata = {"": {"version": 1}}
    ours_result = ours.load_state_dict(copy.copy(checkpoint), strict=True)
    theirs_result = theirs.load_state_dict(copy.copy(checkpoint), strict=True)
    assert ours_result == theirs_result
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 7  # the counter is kept
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def _fuse_conv_bn(is_qat: bool, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    return fuse_conv_bn_eval(conv, bn)


def test_torch_utilities_and_bnfold_see_a_batchnorm():
    torch.manual_seed(0)
    model = _convnet(reference.BatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    model(x)  # one training step's statistics
    model.eval()

    # convert_sync_batchnorm finds it by isinstance and keeps its state.
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced[1], nn.SyncBatchNorm) and torch.equal(synced[1].running_mean, model[1].running_mean)

    # torch.ao's fuse_modules looks fusers up by exact type, so a subclass is named in the mapping.
    fused = torch.ao.quantization.fuse_modules(
        copy.deepcopy(model),
        [["0", "1"]],
        fuse_custom_config_dict={
            "additional_fuser_method_mapping": {(nn.Conv2d, reference.BatchNorm2d): _fuse_conv_bn}
        },
    )
    assert isinstance(fused[1], nn.Identity)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)

    result = bnfold.fold(model, (x,))
    assert type(result.model) is nn.Sequential
    assert [(f.batchnorm, f.batchnorm_op, f.layer) for f in result.report.folds] == [
        ("1", "BatchNorm2d", "0"),
        ("4", "BatchNorm2d", "3"),
    ]
    assert "torch.fx" in result.report.notes[0]  # a module call: fx does not trace its forward
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())

    codes = {(finding.code, finding.name) for finding in bnfold.check(model.train(), (x,))}
    assert {("BN001", "1"), ("BN001", "4")} <= codes


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=["no-samples", "no-positions"])
def test_an_empty_batch_leaves_the_running_statistics_as_torch_does(shape):
    ours, theirs = reference.BatchNorm2d(3), nn.BatchNorm2d(3)
    for module in (ours, theirs):
        output = module(torch.randn(shape))
        assert output.shape == shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_in_place_op_on_the_output_leaves_backward_as_torch_does(dtype):
    """float64 without weight and bias returned the very tensor backward reads: ReLU(inplace=True) after it
    made backward fail, where torch's works."""
    x = torch.randn(4, 2, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    gradients = []
    for module in (reference.BatchNorm2d(2, affine=False), nn.BatchNorm2d(2, affine=False)):
        leaf = x.clone().requires_grad_()
        output = module.to(dtype)(leaf)
        output.relu_()
        output.square().sum().backward()
        gradients.append(leaf.grad)
    torch.testing.assert_close(*gradients, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-4 if dtype == torch.float32 else 1e-10)
