"""Trained fixture models for tests, examples and benchmarks.

Each fixture is a small architecture whose BatchNorm layers come from a ``norms`` namespace (anything
with ``BatchNorm1d``/``2d``/``3d``). :func:`trained_fixture` builds it with the reference BatchNorm
(:mod:`bnfold.reference`), trains it for a few seeded Adam steps on synthetic data so the running
statistics, γ and β are realistic, then loads the weights into the same architecture built with
``torch.nn``'s layers (the two are state-dict compatible) and returns that, in eval mode.

Training runs in float64 on one thread with torch's deterministic algorithms, and the weights are
rounded to float32 once at the end: CPUs differ in the last bits of their float32 kernels, and a few
Adam steps amplify those bits to visible differences (up to 3e-3 seen), while float64 differences stay
far below float32 resolution. Tests still never expect bit-identical fixtures across machines.
:func:`export_onnx` writes such a model to ONNX with its BatchNormalization nodes kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norms: ModuleType):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norms.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norms.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class SmallCNN(nn.Module):
    """Conv→BN→ReLU stem, one residual block, a strided Conv→BN with bias, pooled linear head."""

    def __init__(self, norms: ModuleType, channels: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), norms.BatchNorm2d(channels), nn.ReLU())
        self.block = ResidualBlock(channels, norms)
        self.down = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2), norms.BatchNorm2d(2 * channels), nn.ReLU())
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.block(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def _mlp(norms: ModuleType) -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), norms.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32, bias=False), norms.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 4),
    )  # fmt: skip


def _decoder(norms: ModuleType) -> nn.Module:
    """ConvTranspose up-sampling, plain and grouped, with and without bias."""
    return nn.Sequential(
        nn.ConvTranspose2d(8, 12, 4, stride=2, padding=1, bias=False), norms.BatchNorm2d(12), nn.ReLU(),
        nn.ConvTranspose2d(12, 6, 3, stride=2, padding=1, output_padding=1, groups=3), norms.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 3, 1),
    )  # fmt: skip


def _conv1d(norms: ModuleType) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(4, 8, 5, padding=2), norms.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3, dilation=2, bias=False), norms.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 2, 1),
    )  # fmt: skip


def _conv3d(norms: ModuleType) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 6, 3, padding=1, bias=False), norms.BatchNorm3d(6), nn.ReLU(),
        nn.Conv3d(6, 6, 3, stride=2), norms.BatchNorm3d(6), nn.ReLU(),
        nn.Conv3d(6, 2, 1),
    )  # fmt: skip


def _grouped(norms: ModuleType) -> nn.Module:
    """MobileNet-style separable blocks: depthwise (groups = channels) and grouped convs."""
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), norms.BatchNorm2d(12), nn.ReLU6(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), norms.BatchNorm2d(12), nn.ReLU6(),
        nn.Conv2d(12, 16, 1, groups=4), norms.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, stride=2, groups=16), norms.BatchNorm2d(16),
        nn.Conv2d(16, 5, 1),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FixtureSpec:
    build: Callable[[ModuleType], nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    batchnorms: int


FIXTURES: dict[str, FixtureSpec] = {
    "small_cnn": FixtureSpec(SmallCNN, (3, 16, 16), 4),
    "mlp": FixtureSpec(_mlp, (16,), 2),
    "decoder": FixtureSpec(_decoder, (8, 5, 5), 2),
    "conv1d": FixtureSpec(_conv1d, (4, 32), 2),
    "conv3d": FixtureSpec(_conv3d, (2, 8, 8, 8), 2),
    "grouped": FixtureSpec(_grouped, (3, 12, 12), 4),
}


def train_steps(model: nn.Module, input_shape: tuple[int, ...], steps: int, seed: int, batch: int = 16) -> None:
    """A few seeded Adam steps on synthetic inputs (mean 0.5, std 1.5) towards fixed random targets."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # in eval mode, so the shape probe does not count as a training batch
        probe = model.eval()(torch.randn(batch, *input_shape, generator=generator))
    target = torch.randn(probe.shape, generator=generator)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        x = torch.randn(batch, *input_shape, generator=generator) * 1.5 + 0.5
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def trained_fixture(name: str, steps: int = 20, seed: int = 0) -> nn.Module:
    """The fixture ``name``, trained with the reference BatchNorm, as a float32 torch.nn model in eval mode."""
    from bnfold import reference

    spec = FIXTURES[name]
    with _reproducible_training():
        torch.manual_seed(seed)
        trained = spec.build(reference).double()
        train_steps(trained, spec.input_shape, steps, seed)
    model = spec.build(nn)
    model.load_state_dict(trained.state_dict())  # copies round each float64 value to float32 once
    return model.eval()


@contextlib.contextmanager
def _reproducible_training():
    """float64 by default, one thread, deterministic kernels; the caller's settings restored after."""
    dtype, threads, deterministic = torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def example_input(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *FIXTURES[name].input_shape, generator=generator)


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    training: bool = False,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> None:
    """Export with the BatchNormalization nodes kept (no constant folding, which would fuse them).

    ``training=True`` exports the BatchNorms in training mode (``training_mode=1``, batch statistics).
    """
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            training=mode,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=dynamic_axes,
        )


def conv_bn_chain(pairs: int, channels: int = 4, size: int = 8, seed: int = 0):
    """An ONNX model of ``pairs`` Conv(1x1)→BatchNorm pairs in a chain, built directly with onnx.helper
    (exporting thousands of layers from PyTorch would dominate any timing). Statistics are random
    but trained-looking: nothing is 1 or 0."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "input"
    for index in range(pairs):
        weight = rng.normal(0, 1 / np.sqrt(channels), (channels, channels, 1, 1)).astype(np.float32)
        parameters = {
            "scale": rng.uniform(0.8, 1.2, channels),
            "bias": rng.normal(0, 0.1, channels),
            "mean": rng.normal(0, 0.1, channels),
            "var": rng.uniform(0.8, 1.2, channels),
        }
        initializers.append(numpy_helper.from_array(weight, f"w{index}"))
        initializers.extend(numpy_helper.from_array(v.astype(np.float32), f"bn{index}_{k}") for k, v in parameters.items())
        nodes.append(helper.make_node("Conv", [current, f"w{index}"], [f"c{index}"], name=f"conv{index}"))
        bn_inputs = [f"c{index}"] + [f"bn{index}_{k}" for k in parameters]
        current = "output" if index == pairs - 1 else f"b{index}"
        nodes.append(helper.make_node("BatchNormalization", bn_inputs, [current], name=f"bn{index}"))
    graph = helper.make_graph(
        nodes,
        f"chain{pairs}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", channels, size, size])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
