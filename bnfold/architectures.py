"""Real architectures at their published size, for the ONNX architecture tests and the folder benchmark
(torchvision's wheels do not work beside the CPU torch this project pins, so they are written out here).

- ``resnet50``: ResNet-50 v1.5 (bottleneck blocks [3, 4, 6, 3], stride on the 3x3 conv), 53 BatchNorms.
- ``mobilenet_v2``: MobileNetV2, width 1.0, inverted residuals with ReLU6, 52 BatchNorms.
- ``densenet121``: DenseNet-121 (growth 32, blocks [6, 12, 24, 16], bottleneck 4x, compression 0.5),
  pre-activation BN→ReLU→Conv layers, so most BatchNorms follow a Concat and precede a ReLU; 121 BatchNorms.
- ``shufflenet_v2``: ShuffleNetV2 1.0x (stages [4, 8, 4], channels [24, 116, 232, 464, 1024]) with channel
  shuffle (reshape → transpose → reshape), 56 BatchNorms.

:func:`realistic_model` builds one in eval mode with seeded weights and trained-looking BatchNorm statistics:
running mean ~ N(0, 0.5), running var ~ U(0.5, 2), γ ~ U(0.5, 1.5), β ~ N(0, 0.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

IMAGE_SHAPE = (3, 224, 224)


def conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) → BatchNorm → optional activation."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


# ResNet-50 -------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            conv_bn(cin, width, 1),
            conv_bn(width, width, 3, stride),
            conv_bn(width, cout, 1, act=None),
        )
        self.downsample = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.downsample(x))


class ResNet50(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for stage, count in enumerate(blocks):
            width = 64 * 2**stage
            for index in range(count):
                layers.append(Bottleneck(cin, width, stride=2 if index == 0 and stage > 0 else 1))
                cin = width * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


# MobileNetV2 -----------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    # (expansion, output channels, repeats, first stride), width multiplier 1.0
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        layers.append(conv_bn(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


# DenseNet-121 ----------------------------------------------------------------------------------------------


def bn_relu_conv(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """The pre-activation order: BatchNorm → ReLU → Conv."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), conv)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: int):
        super().__init__()
        self.body = nn.Sequential(bn_relu_conv(cin, bottleneck * growth, 1), bn_relu_conv(bottleneck * growth, growth, 3))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.body(torch.cat(features, 1))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int, bottleneck: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + index * growth, growth, bottleneck) for index in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet121(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (6, 12, 24, 16), growth: int = 32, bottleneck: int = 4, classes: int = 1000):
        super().__init__()
        stages, channels = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
        for index, count in enumerate(blocks):
            stages.append(DenseBlock(count, channels, growth, bottleneck))
            channels += count * growth
            if index < len(blocks) - 1:
                stages += [bn_relu_conv(channels, channels // 2, 1), nn.AvgPool2d(2, 2)]
                channels //= 2
        stages += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


# ShuffleNetV2 ----------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    batch, channels, height, width = x.shape
    x = x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        branch = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, branch, 1))
        self.branch2 = nn.Sequential(
            conv_bn(cin if stride > 1 else branch, branch, 1),
            conv_bn(branch, branch, 3, stride, groups=branch, act=None),
            conv_bn(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat((left, self.branch2(right)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out)


class ShuffleNetV2(nn.Module):
    def __init__(
        self, repeats: tuple[int, ...] = (4, 8, 4), channels: tuple[int, ...] = (24, 116, 232, 464, 1024), classes: int = 1000
    ):
        super().__init__()
        layers, cin = [conv_bn(3, channels[0], 3, 2), nn.MaxPool2d(3, 2, 1)], channels[0]
        for count, cout in zip(repeats, channels[1:-1]):
            layers += [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(count - 1)]
            cin = cout
        layers.append(conv_bn(cin, channels[-1], 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


# Building --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
    build: Callable[[], nn.Module]
    batchnorms: int
    input_shape: tuple[int, ...] = IMAGE_SHAPE


ARCHITECTURES: dict[str, Architecture] = {
    "resnet50": Architecture(ResNet50, 53),
    "mobilenet_v2": Architecture(MobileNetV2, 52),
    "densenet121": Architecture(DenseNet121, 121),
    "shufflenet_v2": Architecture(ShuffleNetV2, 56),
}


def randomize_batchnorm_statistics(model: nn.Module, generator: torch.Generator) -> None:
    """Trained-looking statistics and affine parameters: nothing is 0 or 1."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                channels = module.num_features
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(channels, generator=generator) * 0.3)


def realistic_model(name: str, seed: int = 0) -> nn.Module:
    """Architecture ``name`` with seeded weights and random trained-looking BatchNorm statistics, in eval mode."""
    spec = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = spec.build()
    randomize_batchnorm_statistics(model, torch.Generator().manual_seed(seed))
    found = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert found == spec.batchnorms, f"{name}: {found} BatchNorms, expected {spec.batchnorms}"
    return model.eval()


def example_image(name: str, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *ARCHITECTURES[name].input_shape, generator=torch.Generator().manual_seed(seed))
