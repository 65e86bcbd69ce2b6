"""The segmenter (backbone + head + classifier), the model registry and the zoo builders."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kaseg.models.backbones import check_output_stride, create_backbone, timm_name
from kaseg.models.heads import ASPP_RATES, DeepLabV3Head, DeepLabV3PlusHead
from kaseg.registry import Registry

MODELS: Registry = Registry("model")

# timm feature level whose features the DeepLabV3+ decoder fuses, by their stride. The
# decoder output (the final feature map) has this stride: 4 is DeepLabV3+'s default; 8
# gives the paper's teacher, whose final features are at 1/8 of the input.
DECODER_LEVELS = {4: 1, 8: 2}


class Segmenter(nn.Module):
    """Backbone, head and a 1x1 classifier.

    ``forward`` returns ``{"logits": B x K x H x W at the input size, "features": the
    head's output B x C x h x w}``; ``features`` is the distillation tap, the layer just
    before the classifier, so no hooks are needed.

    Attributes:
        arch: the registry name and keyword arguments that rebuild this model.
        feature_channels: C of ``features``.
        feature_stride: input size / ``features`` size (up to rounding).
        output_stride: the backbone's output stride.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        num_classes: int,
        feature_channels: int,
        feature_stride: int,
        output_stride: int,
        arch: dict[str, Any],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classifier = nn.Conv2d(feature_channels, num_classes, 1)
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.feature_stride = feature_stride
        self.output_stride = output_stride
        self.arch = arch

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.head(self.backbone(images))
        return {"logits": self.classify(features, images.shape[-2:]), "features": features}

    def native_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's logits on the feature grid, B x K x h x w, before upsampling
        (what CIRKD, SKD and DIST distil)."""
        return self.classifier(features)

    def classify(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits at ``size`` from a final feature map (the original one or a reconstruction)."""
        return F.interpolate(self.native_logits(features), size=size, mode="bilinear", align_corners=False)


def _build(
    name: str,
    backbone: str,
    decoder: bool,
    *,
    num_classes: int = 21,
    output_stride: int = 16,
    pretrained: bool | str = False,
    width: float = 1.0,
    aspp: bool = True,
    aspp_rates: tuple[int, ...] | None = None,
    head_channels: int = 256,
    dropout: float = 0.1,
    decoder_stride: int = 4,
) -> Segmenter:
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    check_output_stride(output_stride)
    if aspp_rates is not None and not aspp:
        raise ValueError("aspp_rates needs aspp=True; aspp=False is the light head without rates")
    if decoder_stride not in DECODER_LEVELS:
        raise ValueError(f"decoder_stride must be one of {sorted(DECODER_LEVELS)}, got {decoder_stride!r}")
    if decoder_stride != 4 and not decoder:
        raise ValueError("decoder_stride applies to deeplabv3plus models, which have a decoder")
    if decoder_stride > output_stride:
        raise ValueError(f"decoder_stride {decoder_stride} cannot exceed output_stride {output_stride}")
    rates = tuple(aspp_rates) if aspp_rates is not None else ASPP_RATES[output_stride]
    rates = rates if aspp else ()
    body = create_backbone(
        timm_name(backbone, width),
        output_stride=output_stride,
        pretrained=pretrained,
        out_indices=(DECODER_LEVELS[decoder_stride], 4),
    )
    low_channels, high_channels = body.feature_info.channels()
    low_stride, _ = body.feature_info.reduction()
    if decoder:
        head = DeepLabV3PlusHead(low_channels, high_channels, head_channels, rates, dropout=dropout)
        feature_stride = low_stride
    else:
        head = DeepLabV3Head(high_channels, head_channels, rates, dropout=dropout)
        feature_stride = output_stride
    arch = dict(
        name=name,
        num_classes=num_classes,
        output_stride=output_stride,
        width=width,
        aspp=aspp,
        aspp_rates=list(aspp_rates) if aspp_rates is not None else None,
        head_channels=head_channels,
        dropout=dropout,
        decoder_stride=decoder_stride,
    )
    return Segmenter(
        body,
        head,
        num_classes=num_classes,
        feature_channels=head_channels,
        feature_stride=feature_stride,
        output_stride=output_stride,
        arch=arch,
    )


MODEL_ARGUMENTS = frozenset(
    p.name for p in inspect.signature(_build).parameters.values() if p.kind is p.KEYWORD_ONLY
)


def _register_family(backbone: str) -> None:
    for decoder, prefix in ((True, "deeplabv3plus"), (False, "deeplabv3")):
        name = f"{prefix}_{backbone}"

        def builder(*, _name: str = name, _decoder: bool = decoder, **kwargs: Any) -> Segmenter:
            return _build(_name, backbone, _decoder, **kwargs)

        builder.__name__ = name
        builder.__doc__ = (
            f"{'DeepLabV3+' if decoder else 'DeepLabV3'} on a timm {backbone} backbone. "
            "Keyword arguments: num_classes, output_stride (8, 16, 32), pretrained (bool or "
            "path), width (mobilenetv2 only), aspp (False = light head), aspp_rates, "
            "head_channels, dropout (after the ASPP projection), decoder_stride (4 or 8, "
            "deeplabv3plus only: the stride of the fused low-level features and the output)."
        )
        MODELS.register(name)(builder)


for _backbone in ("resnet18", "resnet50", "resnet101", "xception41", "mobilenetv2"):
    _register_family(_backbone)


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return MODELS.names()


def build_model(name: str, **kwargs: Any) -> Segmenter:
    """Builds a zoo model by name, e.g. ``build_model("deeplabv3_mobilenetv2", width=0.5)``."""
    valid = MODEL_ARGUMENTS
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"unknown model argument(s) {unknown} for {name!r}; valid: {sorted(valid)}"
        )
    return MODELS.get(name)(**kwargs)


def build_model_from_arch(arch: dict[str, Any]) -> nn.Module:
    """Rebuilds a model from its ``arch`` record (as stored in checkpoints), untrained.

    A zoo record holds the name and build arguments; a record whose ``source`` is
    torchvision, smp or python is rebuilt by :func:`kaseg.models.external.build_from_arch`.
    """
    if arch.get("source", "kaseg") != "kaseg":
        from kaseg.models.external import build_from_arch

        return build_from_arch(arch)
    arch = dict(arch)
    arch.pop("source", None)
    return build_model(arch.pop("name"), **arch)
