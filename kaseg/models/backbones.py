"""timm backbones with a dilated output stride and explicit pretrained-weight handling.

Heads are sized from timm's ``feature_info`` metadata (channels and reductions), never
from a dummy forward pass.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import timm
import torch
import torch.nn as nn

from kaseg.engine.checkpoint import CheckpointError, load_state_dict_file

VALID_OUTPUT_STRIDES = (8, 16, 32)

# timm model names for the MobileNetV2 width multipliers it publishes.
MOBILENETV2_WIDTHS = {
    0.35: "mobilenetv2_035",
    0.5: "mobilenetv2_050",
    0.75: "mobilenetv2_075",
    1.0: "mobilenetv2_100",
    1.4: "mobilenetv2_140",
}

_HUB_HOST = "huggingface.co"


class PretrainedWeightsError(RuntimeError):
    """Raised when pretrained weights were asked for but cannot be obtained."""


def check_output_stride(output_stride: int) -> int:
    if output_stride not in VALID_OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride!r}"
        )
    return output_stride


def timm_name(backbone: str, width: float) -> str:
    """Maps a kaseg backbone name and width multiplier to a timm model name."""
    if backbone == "mobilenetv2":
        if width not in MOBILENETV2_WIDTHS:
            raise ValueError(
                f"mobilenetv2 width must be one of {sorted(MOBILENETV2_WIDTHS)}, got {width!r}"
            )
        return MOBILENETV2_WIDTHS[width]
    if width != 1.0:
        raise ValueError(f"width multipliers are only available for mobilenetv2, not {backbone!r}")
    return backbone


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def create_backbone(
    name: str,
    *,
    output_stride: int,
    pretrained: bool | str = False,
    out_indices: tuple[int, ...] = (1, 4),
) -> nn.Module:
    """Creates a timm ``features_only`` backbone.

    Args:
        name: timm model name, for example ``resnet50`` or ``mobilenetv2_100``.
        output_stride: 8, 16 or 32; timm turns the strides below it into dilation.
        pretrained: ``False`` for random initialisation, ``True`` for timm's published
            weights (downloaded from the Hugging Face hub or read from its cache), or the
            path of a local checkpoint of the timm model (``.safetensors``, or a torch
            file of tensors and plain data: see
            :func:`kaseg.engine.checkpoint.load_state_dict_file`).
        out_indices: which feature levels the backbone returns (1 is stride 4, 4 is the
            last stage).

    Raises:
        PretrainedWeightsError: weights were asked for but the file is missing or the hub
            cannot be reached; never falls back to a random initialisation.
    """
    check_output_stride(output_stride)
    kwargs = dict(features_only=True, output_stride=output_stride, out_indices=out_indices)
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(
                f"pretrained weights file {str(path)!r} for backbone {name!r} does not exist"
            )
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": _read_weights(path, name)}, **kwargs
        )
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    cached = _cached_weights_file(name)
    if cached is not None:
        # Load the cached file directly: going through the hub would first ask the
        # network for a newer revision, which offline costs a minute of retries.
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": _read_weights(Path(cached), name)}, **kwargs
        )
    if not _hub_reachable():
        raise PretrainedWeightsError(
            f"pretrained weights for backbone {name!r} are not in the local cache and "
            f"{_HUB_HOST} cannot be reached. Download them where the network is available "
            "(they land in the Hugging Face cache), or pass the path of a local checkpoint "
            "as `pretrained`, or set `pretrained: false` to train from scratch."
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:
        raise PretrainedWeightsError(
            f"could not load pretrained weights for backbone {name!r}: {error}"
        ) from error


def _read_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read without running code (safetensors, or torch's
    ``weights_only=True``). timm gets the tensors, never the file, so how a given timm
    version would read the file does not matter."""
    try:
        return load_state_dict_file(path)
    except CheckpointError as error:
        raise PretrainedWeightsError(f"pretrained weights for backbone {name!r}: {error}") from None


def _cached_weights_file(name: str) -> str | None:
    """The path of timm's weights for ``name`` in the Hugging Face cache, if present."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None
