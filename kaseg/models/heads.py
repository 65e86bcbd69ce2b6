"""Segmentation heads: ASPP (full or the MobileNetV2 light variant) and the DeepLabV3+ decoder.

Each head maps the backbone's list of feature maps to one final feature map, the layer
just before the classifier, which is the distillation tap.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# DeepLab's atrous rates for each output stride (rates scale inversely with the stride).
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1, stride: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """Global average pooling + 1x1 conv, broadcast back to the input's grid."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = conv_bn_relu(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.project(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., DeepLabV3, 2017).

    Branches: a 1x1 conv, one dilated 3x3 conv per rate, and image pooling; their
    concatenation is projected to ``out_channels``. With ``rates=()`` this is the light
    head of the MobileNetV2 paper (Sandler et al., 2018): 1x1 conv + image pooling.
    Input B x C_in x h x w, output B x out_channels x h x w.
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: tuple[int, ...], dropout: float = 0.1
    ) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_channels, out_channels)]
        branches += [conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates]
        branches.append(ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_bn_relu(len(branches) * out_channels, out_channels), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP on the last backbone level; its output is the final feature map."""

    def __init__(
        self, in_channels: int, channels: int, rates: tuple[int, ...], dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.aspp(features[-1])


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ (Chen et al., ECCV 2018): ASPP, then a decoder fusing low-level features.

    The ASPP output is upsampled to the low-level grid (stride 4 by default, the
    ``decoder_output_stride`` of the reference implementation), concatenated with a
    48-channel projection of the low-level features and refined by two 3x3 convs. The
    final feature map therefore has the low-level stride, whatever the output stride.
    """

    def __init__(
        self,
        low_level_channels: int,
        in_channels: int,
        channels: int,
        rates: tuple[int, ...],
        low_level_projection: int = 48,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates, dropout)
        self.low_level = conv_bn_relu(low_level_channels, low_level_projection)
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + low_level_projection, channels, 3),
            conv_bn_relu(channels, channels, 3),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        low_level = self.low_level(features[0])
        context = F.interpolate(
            self.aspp(features[-1]), size=low_level.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.fuse(torch.cat([context, low_level], dim=1))
