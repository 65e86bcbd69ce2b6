"""Stage 1 of knowledge adaptation: the auto-encoder that translates the teacher's features.

The encoder E maps the teacher's final feature map F_t to a compact code at the
student's resolution; the decoder D maps the code back to F_t's shape. It is trained on
the frozen teacher with ``L_ae = ||F_t - D(E(F_t))||^2 + alpha * ||E(F_t)||_1``; after this
stage E is frozen and D is discarded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kaseg.models.heads import conv_bn_relu


def stride_ratio_layers(teacher_stride: int, student_stride: int) -> int:
    """log2(student_stride / teacher_stride): the number of stride-2 layers E and D need.

    Raises:
        ValueError: the ratio is not a power of two (>= 1).
    """
    ratio = student_stride / teacher_stride
    if ratio < 1 or not float(ratio).is_integer() or not math.log2(ratio).is_integer():
        raise ValueError(
            f"the student's feature stride ({student_stride}) must be the teacher's "
            f"({teacher_stride}) times a power of two; got a ratio of {ratio:g}. Choose "
            "output strides so that it is 1, 2, 4 or 8."
        )
    return int(math.log2(ratio))


class _DeconvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(
            in_channels, out_channels, 3, stride=stride, padding=1, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # output_size resolves the transposed conv's ambiguity (odd or even target size).
        return F.relu(self.bn(self.deconv(x, output_size=list(size))), inplace=True)


class TeacherAutoEncoder(nn.Module):
    """Encoder (conv 3x3 + BN + ReLU) x L and decoder (deconv 3x3 + BN + ReLU) x L.

    ``L = max(3, k)`` with ``k = log2(student stride / teacher stride)``; the first k
    encoder layers and the first k decoder layers have stride 2, so the code
    (B x code_channels x h_s x w_s) lies on the student's grid and the reconstruction
    has F_t's shape (B x C_t x h_t x w_t).

    Attributes:
        arch: what this auto-encoder was built for (its teacher included), stored in
            checkpoints so that loading it for another teacher or code size fails.
    """

    def __init__(
        self,
        in_channels: int,
        code_channels: int,
        *,
        downsample_layers: int,
        teacher_arch: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        layers = max(3, downsample_layers)
        strides = [2 if i < downsample_layers else 1 for i in range(layers)]
        self.encoder = nn.ModuleList(
            conv_bn_relu(in_channels if i == 0 else code_channels, code_channels, 3, stride=stride)
            for i, stride in enumerate(strides)
        )
        self.decoder = nn.ModuleList(
            _DeconvBNReLU(code_channels, in_channels if i == layers - 1 else code_channels, stride)
            for i, stride in enumerate(strides)
        )
        self.arch = {
            "type": "autoencoder",
            "in_channels": in_channels,
            "code_channels": code_channels,
            "downsample_layers": downsample_layers,
            "teacher": teacher_arch,
        }

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder:
            features = layer(features)
        return features

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(code, reconstruction)`` for teacher features B x C_t x h_t x w_t."""
        downsampled_from = []  # the input size of each stride-2 encoder layer
        code = features
        for layer in self.encoder:
            if layer[0].stride[0] == 2:
                downsampled_from.append(tuple(code.shape[-2:]))
            code = layer(code)
        # The decoder upsamples first, retracing the encoder's sizes, then refines at F_t's size.
        targets = downsampled_from[::-1]
        targets += [tuple(features.shape[-2:])] * (len(self.decoder) - len(targets))
        reconstruction = code
        for layer, size in zip(self.decoder, targets):
            reconstruction = layer(reconstruction, size)
        return code, reconstruction


def adapter(in_channels: int, out_channels: int) -> nn.Sequential:
    """The feature adapter C_f: three conv 3x3 + BN + ReLU, student channels -> code channels.

    It exists only during training; the exported student never contains it.
    """
    return nn.Sequential(
        conv_bn_relu(in_channels, out_channels, 3),
        conv_bn_relu(out_channels, out_channels, 3),
        conv_bn_relu(out_channels, out_channels, 3),
    )


def autoencoder_loss(
    features: torch.Tensor, code: torch.Tensor, reconstruction: torch.Tensor, alpha: float
) -> dict[str, torch.Tensor]:
    """``{"reconstruction": mean squared error per element, "sparsity": alpha * L1 of the
    code per image, averaged over the batch}``; their sum is L_ae."""
    return {
        "reconstruction": F.mse_loss(reconstruction.float(), features.float()),
        "sparsity": alpha * code.float().abs().sum() / code.shape[0],
    }
