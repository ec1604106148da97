"""Small versions of real architectures for the PyTorch front-end's tests and the fuse comparison.

Widths are tiny so the whole suite stays fast; the structure (where BatchNorms sit, what reads what)
is what matters. ``CASES`` lists each model with an example input and the number of BatchNorm
modules bnfold must leave.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse


def conv_bn_act(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """Basic blocks with a conv+BN downsample in the shortcut; scriptable."""

    def __init__(self, widths: tuple[int, ...] = (8, 16), classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        blocks = []
        for cin, cout in zip((widths[0], *widths), widths):
            blocks.append(BasicBlock(cin, cout, 1 if cin == cout else 2))
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn_act(cin, hidden, 1, act=nn.ReLU6),
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8, 3, 2, act=nn.ReLU6),
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 3),
            conv_bn_act(12, 24, 1, act=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class DenseLayer(nn.Module):
    """Pre-activation: norm1 sits between a concat and a ReLU, so it stays; norm2 follows conv1 and folds."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(F.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, cin: int, growth: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """BN straight into an unpadded 1x1 conv (no ReLU between): folds forward into the conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.norm(x)))


class DenseNet(nn.Module):
    """11 BatchNorms: norm0, 4 x norm2 and the transition fold; 4 x norm1 and norm5 (before ReLU) stay."""

    def __init__(self, growth: int = 4, classes: int = 5):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.pool0 = nn.MaxPool2d(2)
        self.block1 = DenseBlock(8, growth, 2)
        self.transition = Transition(8 + 2 * growth, 8)
        self.block2 = DenseBlock(8, growth, 2)
        self.norm5 = nn.BatchNorm2d(8 + 2 * growth)
        self.classifier = nn.Linear(8 + 2 * growth, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(F.relu(self.norm0(self.conv0(x))))
        x = self.block2(self.transition(self.block1(x)))
        return self.classifier(F.relu(self.norm5(x)).mean((2, 3)))


class UNet(nn.Module):
    """Two levels: ConvTranspose2d up-sampling followed by BN, concatenated with the skip."""

    def __init__(self, width: int = 6, classes: int = 2):
        super().__init__()
        self.down1 = self._double(3, width)
        self.down2 = self._double(width, 2 * width)
        self.bottom = self._double(2 * width, 4 * width)
        self.up2 = self._up(4 * width, 2 * width)
        self.dec2 = self._double(4 * width, 2 * width)
        self.up1 = self._up(2 * width, width)
        self.dec1 = self._double(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    @staticmethod
    def _double(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(conv_bn_act(cin, cout), conv_bn_act(cout, cout))

    @staticmethod
    def _up(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.down1(x)
        skip2 = self.down2(F.max_pool2d(skip1, 2))
        x = self.bottom(F.max_pool2d(skip2, 2))
        x = self.dec2(torch.cat([self.up2(x), skip2], 1))
        x = self.dec1(torch.cat([self.up1(x), skip1], 1))
        return self.head(x)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d (BiT's ResNetV2; transformers' WeightStandardizedConv2d is the same): a Conv2d whose
    weight is standardised at every call, with F.batch_norm in training mode over each output channel's weights."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, eps: float = 1e-6):
        super().__init__(cin, cout, kernel, stride=stride, padding=((stride - 1) + (kernel - 1)) // 2, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BitStyleNet(nn.Module):
    """A BiT-style pre-activation stack (StdConv2d, BatchNorm2d, ReLU), then a plain Conv2d -> BatchNorm2d."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm, self.conv = StdConv2d(3, 8, 3), nn.BatchNorm2d(8), StdConv2d(8, 8, 3)
        self.head, self.head_norm = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.relu(self.norm(self.stem(x))))
        return self.head_norm(self.head(x))


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding (asymmetric for even kernels or stride 2) with its own forward."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        total = max(kernel - stride, 0)
        self.same_padding = (total // 2, total - total // 2) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.same_padding)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Expand 1x1, depthwise "same" conv, squeeze-excite, project 1x1; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(
            Conv2dSame(hidden, hidden, 3, stride, groups=hidden), nn.BatchNorm2d(hidden), nn.SiLU()
        )
        self.se_reduce = nn.Conv2d(hidden, max(1, cin // 4), 1)
        self.se_expand = nn.Conv2d(max(1, cin // 4), hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(x))
        h = h * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        h = self.project(h)
        return x + h if self.use_residual else h


class EfficientNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(Conv2dSame(3, 8, 3, 2), nn.BatchNorm2d(8), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(8, 8, 1), MBConv(8, 12, 2))
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24), nn.SiLU())
        self.classifier = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int):
    """timm's ``layers/padding.py`` get_same_padding, verbatim."""
    if isinstance(x, torch.Tensor):
        return torch.clamp(((x / stride).ceil() - 1) * stride + (kernel_size - 1) * dilation + 1 - x, min=0)
    else:
        return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0):
    """timm's ``layers/padding.py`` pad_same, verbatim: padding computed from the input's size in forward."""
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)
    return x


class DynamicConv2dSame(nn.Conv2d):
    """timm's ``layers/conv2d_same.py`` Conv2dSame (what TF-ported EfficientNets, MixNets and MobileNets use):
    the "SAME" padding comes from ``math.ceil`` of the input size, which torch.fx cannot trace."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride, 0, 1, groups, bias)

    def forward(self, x):
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``layers/norm_act.py`` BatchNormAct2d (eval-relevant path verbatim): a BatchNorm2d subclass whose
    forward asserts the input's rank, calls ``F.batch_norm`` and then applies ``drop`` and ``act``."""

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
        drop_layer: type[nn.Module] | None = None,
    ):
        super().__init__(num_features)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class TimmGELU(nn.Module):
    """timm's ``layers/activations.py`` GELU, verbatim: a module of timm's own (fx traces through it), with a dummy
    ``inplace`` argument; efficientformerv2's and any ``act_layer='gelu'`` BatchNormAct2d apply it."""

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - timm's name
        return F.gelu(input)


class TimmSwish(nn.Module):
    """timm's ``layers/activations.py`` Swish, verbatim: in place on its input when asked."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.mul_(x.sigmoid()) if self.inplace else x.mul(x.sigmoid())


def _split_channels(num_chan, num_groups):
    """timm's ``layers/mixed_conv2d.py`` _split_channels, verbatim."""
    split = [num_chan // num_groups for _ in range(num_groups)]
    split[0] += num_chan - sum(split)
    return split


class MixedConv2d(nn.ModuleDict):
    """timm's ``layers/mixed_conv2d.py`` MixedConv2d (MixNet's MDConv), with plain symmetric padding for its
    ``create_conv2d_pad``: each kernel size convolves its own channel group, the results concatenated."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1, depthwise=False):
        super().__init__()
        kernel_size = kernel_size if isinstance(kernel_size, list) else [kernel_size]
        num_groups = len(kernel_size)
        in_splits = _split_channels(in_channels, num_groups)
        out_splits = _split_channels(out_channels, num_groups)
        self.in_channels = sum(in_splits)
        self.out_channels = sum(out_splits)
        for idx, (k, in_ch, out_ch) in enumerate(zip(kernel_size, in_splits, out_splits)):
            conv_groups = in_ch if depthwise else 1
            padding = ((stride - 1) + dilation * (k - 1)) // 2
            self.add_module(str(idx), nn.Conv2d(in_ch, out_ch, k, stride, padding, dilation, groups=conv_groups, bias=False))
        self.splits = in_splits

    def forward(self, x):
        x_split = torch.split(x, self.splits, 1)
        x_out = [c(x_split[i]) for i, c in enumerate(self.values())]
        x = torch.cat(x_out, 1)
        return x


class LearnableAffineBlock(nn.Module):
    """timm's ``models/hgnet.py`` LearnableAffineBlock, verbatim: one learned scale and bias for every channel,
    after the activation of hgnetv2's ConvBNAct."""

    def __init__(self, scale_value=1.0, bias_value=0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale_value]), requires_grad=True)
        self.bias = nn.Parameter(torch.tensor([bias_value]), requires_grad=True)

    def forward(self, x):
        return self.scale * x + self.bias


class ConvNormAct(nn.Module):
    """timm's ``layers/conv_bn_act.py`` ConvNormAct: ``conv`` then ``bn`` (a BatchNormAct2d), no anti-aliasing."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        same: bool = False,
        apply_act: bool = True,
    ):
        super().__init__()
        if same:
            self.conv = Conv2dSame(cin, cout, kernel, stride, groups=groups)
        else:
            self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.1))

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        aa = getattr(self, "aa", None)
        if aa is not None:
            x = self.aa(x)
        return x


class TimmStyleNet(nn.Module):
    """A timm-style stem and blocks: ConvNormAct with BatchNormAct2d, TF-"same" convs, a residual add."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv_stem = ConvNormAct(3, 8, 3, 2, same=True)
        self.block1 = ConvNormAct(8, 8, 3, groups=8)
        self.block2 = ConvNormAct(8, 16, 1)
        self.conv_head = ConvNormAct(16, 24, 3, 2, same=True)
        self.classifier = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_stem(x)
        x = x + self.block1(x)
        x = self.conv_head(self.block2(x))
        return self.classifier(x.mean((2, 3)))


class TimmConvNet(nn.Module):
    """timm ConvNormAct blocks on plain convs (ResNet/ByobNet style; one without activation before a residual
    add): every pair is a module call, so the BatchNormAct2d fold fits the module tree."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, 2)
        self.conv1 = ConvNormAct(8, 8, 3)
        self.conv2 = ConvNormAct(8, 8, 1, apply_act=False)
        self.act = nn.ReLU()
        self.head = ConvNormAct(8, 16, 1)
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.act(x + self.conv2(self.conv1(x)))
        return self.classifier(self.head(x).mean((2, 3)))


class MobileVitBlock(nn.Module):
    """timm's ``models/mobilevit.py`` MobileVitBlock (forward verbatim; a one-block transformer): the feature map
    is cut into patches whose count comes from ``math.ceil`` of its size, interpolated when they do not divide
    it, which torch.fx cannot trace."""

    def __init__(self, chs: int, transformer_dim: int, patch_size: int = 2):
        super().__init__()
        self.conv_kxk = ConvNormAct(chs, chs, 3)
        self.conv_1x1 = nn.Conv2d(chs, transformer_dim, kernel_size=1, bias=False)
        self.transformer = nn.Sequential(
            nn.LayerNorm(transformer_dim), nn.Linear(transformer_dim, transformer_dim), nn.GELU()
        )
        self.norm = nn.LayerNorm(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, chs, 1)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3)
        self.patch_size = (patch_size, patch_size)
        self.patch_area = patch_size * patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        # Local representation
        x = self.conv_kxk(x)
        x = self.conv_1x1(x)

        # Unfold (feature map -> patches)
        patch_h, patch_w = self.patch_size
        B, C, H, W = x.shape
        new_h, new_w = math.ceil(H / patch_h) * patch_h, math.ceil(W / patch_w) * patch_w
        num_patch_h, num_patch_w = new_h // patch_h, new_w // patch_w  # n_h, n_w
        num_patches = num_patch_h * num_patch_w  # N
        interpolate = False
        if new_h != H or new_w != W:
            # Note: Padding can be done, but then it needs to be handled in attention function.
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
            interpolate = True

        # [B, C, H, W] --> [B * C * n_h, n_w, p_h, p_w]
        x = x.reshape(B * C * num_patch_h, patch_h, num_patch_w, patch_w).transpose(1, 2)
        # [B * C * n_h, n_w, p_h, p_w] --> [BP, N, C] where P = p_h * p_w and N = n_h * n_w
        x = x.reshape(B, C, num_patches, self.patch_area).transpose(1, 3).reshape(B * self.patch_area, num_patches, -1)

        # Global representations
        x = self.transformer(x)
        x = self.norm(x)

        # Fold (patch -> feature map)
        # [B, P, N, C] --> [B*C*n_h, n_w, p_h, p_w]
        x = x.contiguous().view(B, self.patch_area, num_patches, -1)
        x = x.transpose(1, 3).reshape(B * C * num_patch_h, num_patch_w, patch_h, patch_w)
        # [B*C*n_h, n_w, p_h, p_w] --> [B*C*n_h, p_h, n_w, p_w] --> [B, C, H, W]
        x = x.transpose(1, 2).reshape(B, C, num_patch_h * patch_h, num_patch_w * patch_w)
        if interpolate:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)

        x = self.conv_proj(x)
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


class TfMobileVit(nn.Module):
    """A model torch.fx cannot trace: a TF-ported stem (timm's dynamic-padding Conv2dSame into BatchNormAct2d, as
    tf_efficientnet's ``conv_stem``/``bn1``), a MobileVitBlock on an odd-sized map, a ConvNormAct head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv_stem = DynamicConv2dSame(3, 8, 3, 2)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.block = MobileVitBlock(8, 12)
        self.head = ConvNormAct(8, 16, 1)
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block(self.bn1(self.conv_stem(x))))
        return self.classifier(x.mean((2, 3)))


class ValueBranchNet(nn.Module):
    """A model neither torch.fx nor torch.export can capture: forward branches on the value of a BatchNorm's
    output (``if y.sum() > 0``), and a graph break (an unsupported call, here explicit) separates ``conv2`` from
    ``bn2``. TorchDynamo captures it as graphs split at both."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.positive = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.negative = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(self.stem(x)))
        y = self.positive(y) if y.sum() > 0 else self.negative(y)
        h = self.conv2(y)
        torch._dynamo.graph_break()
        return self.classifier(self.bn2(h).mean((2, 3)))


class FrozenBatchNorm2d(nn.Module):
    """torchvision's ``ops/misc.py`` FrozenBatchNorm2d (detectron2's is the same in eval): statistics and affine
    parameters as buffers, forward ``x * scale + shift``; not an ``nn.BatchNorm`` subclass."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # move reshapes to the beginning
        # to make it fuser-friendly
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class FrozenBottleneck(nn.Module):
    """torchvision's ResNet Bottleneck with ``norm_layer=FrozenBatchNorm2d``, as detection backbones build it."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False), FrozenBatchNorm2d(4 * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class DetectionBackbone(nn.Module):
    """A Faster R-CNN style ResNet + FPN body: FrozenBatchNorm2d throughout the ResNet, plain convs in the FPN,
    two feature maps out."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = FrozenBottleneck(8, 4, 1)
        self.layer2 = FrozenBottleneck(16, 8, 2)
        self.inner1, self.inner2 = nn.Conv2d(16, channels, 1), nn.Conv2d(32, channels, 1)
        self.layer_out1, self.layer_out2 = (nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c2 = self.layer2(c1)
        p2 = self.inner2(c2)
        p1 = self.inner1(c1) + F.interpolate(p2, size=c1.shape[-2:], mode="nearest")
        return self.layer_out1(p1), self.layer_out2(p2)


class ConvNorm(nn.Module):
    """timm's ``models/levit.py`` ConvNorm (forward verbatim)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0):
        super().__init__()
        self.linear = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """timm's ``models/levit.py`` LinearNorm (forward verbatim): BatchNorm1d over the Linear's output features,
    on (B * N, C) flattened from the (B, N, C) tokens, then reshaped back."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """timm's ``models/levit.py`` NormLinear (forward verbatim): the classifier head BatchNorm1d -> Dropout -> Linear."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class LevitAttention(nn.Module):
    """timm's ``models/levit.py`` Attention, linear (non-conv) path, forward verbatim but for the attention-bias
    cache (the biases are indexed on every call, as in training)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + key_dim * num_heads * 2)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(self.val_attn_dim, dim, bn_weight_init=0))
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", rel_pos[0] * resolution + rel_pos[1], persistent=False)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)

        attn = q @ k * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)

        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        x = self.proj(x)
        return x


class LevitMlp(nn.Module):
    """timm's ``models/levit.py`` LevitMlp (linear path, forward verbatim)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.ln1 = LinearNorm(in_features, hidden_features)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(drop)
        self.ln2 = LinearNorm(hidden_features, in_features, bn_weight_init=0)

    def forward(self, x):
        x = self.ln1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.ln2(x)
        return x


class Levit(nn.Module):
    """A small LeViT (timm's ``Levit``, linear mode): ConvNorm stem, tokens, residual attention and MLP blocks whose
    BatchNorms are LinearNorm's, NormLinear head on the mean token."""

    def __init__(self, classes: int = 5, dim: int = 16, resolution: int = 4):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, dim // 2, 3, 2, 1), nn.Hardswish(), ConvNorm(dim // 2, dim, 3, 2, 1))
        self.attn = LevitAttention(dim, key_dim=4, num_heads=2, attn_ratio=2, resolution=resolution)
        self.mlp = LevitMlp(dim, 2 * dim, drop=0.1)
        self.head = NormLinear(dim, classes, drop=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(dim=1))


class MLP(nn.Module):
    def __init__(self, features: int = 10, hidden: int = 16, classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DropoutHeads(nn.Module):
    """Conv features, then heads with eval-mode Dropout/Identity between BatchNorm1d and Linear (BNNeck/ReID
    and tabular heads): Linear -> Identity -> Dropout -> BatchNorm1d -> ReLU, BatchNorm1d -> Dropout -> Linear."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = conv_bn_act(3, 8, 3, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Sequential(
            nn.Linear(8, 16), nn.Identity(), nn.Dropout(0.1), nn.BatchNorm1d(16), nn.ReLU()
        )
        self.neck = nn.BatchNorm1d(16)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(torch.flatten(self.pool(self.features(x)), 1))
        return self.classifier(self.neck(x))


class Conv1dNet(nn.Module):
    """Conv1d with reflect and circular padding and groups."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(4, 8, 5, padding=2, padding_mode="reflect"), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=1, groups=2, padding_mode="circular", bias=False),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 6, 3, stride=2), nn.BatchNorm1d(6),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate"), nn.BatchNorm3d(4), nn.ReLU(),
            nn.Conv3d(4, 8, 3, stride=2, padding=1, groups=4, bias=False), nn.BatchNorm3d(8), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GroupedConvTranspose(nn.Module):
    """ConvTranspose1d/2d/3d with groups, each followed by BatchNorm; one BN with affine=False."""

    def __init__(self):
        super().__init__()
        self.up1d = nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), nn.BatchNorm1d(6))
        self.up2d = nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(6, affine=False)
        )
        self.up3d = nn.Sequential(nn.ConvTranspose3d(4, 8, 2, stride=2, groups=4), nn.BatchNorm3d(8))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.up1d(x1), self.up2d(x2), self.up3d(x3)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]]
    batchnorms_left: int  # BatchNorm modules bnfold must leave in place


def _image(channels: int = 3, size: int = 16) -> tuple[torch.Tensor]:
    return (torch.randn(4, channels, size, size),)


CASES = [
    Case("resnet", ResNet, _image, 0),
    Case("mobilenet_v2", MobileNetV2, _image, 0),
    Case("densenet", DenseNet, _image, 5),
    Case("unet", UNet, _image, 0),
    Case("efficientnet", EfficientNet, _image, 0),
    Case("timm_style", TimmStyleNet, _image, 0),
    Case("timm_conv", TimmConvNet, _image, 0),
    Case("detection_backbone", DetectionBackbone, _image, 0),
    Case("tf_mobilevit", TfMobileVit, lambda: _image(size=14), 0),
    # `negative` is on the path the example input does not take, `bn2` past a graph break from conv2.
    Case("value_branch", ValueBranchNet, _image, 2),
    Case("levit", Levit, _image, 0),
    Case("mlp", MLP, lambda: (torch.randn(8, 10),), 0),
    Case("dropout_heads", DropoutHeads, _image, 0),
    Case("conv1d", Conv1dNet, lambda: (torch.randn(4, 4, 20),), 0),
    Case("conv3d", Conv3dNet, lambda: (torch.randn(2, 2, 6, 6, 6),), 0),
    Case(
        "grouped_conv_transpose",
        GroupedConvTranspose,
        lambda: (torch.randn(4, 4, 7), torch.randn(4, 4, 5, 5), torch.randn(2, 4, 3, 3, 3)),
        0,
    ),
]


BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def batchnorm_modules(model: nn.Module) -> int:
    return sum(isinstance(m, BATCHNORM_TYPES) for m in model.modules())


def fuse_folds(model: nn.Module) -> int:
    """How many BatchNorm calls ``torch.fx.experimental.optimization.fuse`` removes from ``model``'s fx graph.

    Counted on the graphs, not on modules: fx traces through BatchNorm subclasses with their own forward and
    FrozenBatchNorm2d, so they vanish from the module tree of fuse's result without having been folded. A model
    torch.fx cannot trace, fuse cannot fuse (it raises): none.
    """
    if not fx_traceable(model):
        return 0
    return _batchnorm_calls(fx.symbolic_trace(model)) - _batchnorm_calls(fuse(model))


def fx_traceable(model: nn.Module) -> bool:
    """Whether torch.fx can trace ``model``, as ``fuse`` does before fusing anything."""
    try:
        fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - fx raises TraceError, TypeError, ... depending on the forward
        return False
    return True


def _batchnorm_calls(graph_module: fx.GraphModule) -> int:
    modules = dict(graph_module.named_modules())
    return sum(
        node.op == "call_module" and isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm)
        for node in graph_module.graph.nodes
    )


def trained_eval_model(case: Case, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``case``'s model with non-trivial BatchNorm statistics, after two training steps, in eval mode.

    Random statistics first (fresh ones are mean 0, variance 1, which hide scale/shift mistakes),
    then two SGD steps in train mode so the statistics and weights are also what training makes.
    """
    torch.manual_seed(seed)
    model = case.build()
    inputs = case.example_inputs()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BATCHNORM_TYPES):
                module.running_mean.normal_().mul_(0.5)
                module.running_var.uniform_(0.5, 2.0)
                if isinstance(module, FrozenBatchNorm2d) or module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_().mul_(0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        outputs = model(*inputs)
        loss = sum(o.square().mean() for o in (outputs if isinstance(outputs, tuple) else (outputs,)))
        loss.backward()
        optimizer.step()
    return model.eval(), inputs
