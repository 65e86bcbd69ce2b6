"""Dense prediction of a whole image: whole-image, sliding-window, multi-scale and flip."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # B x 3 x H x W -> B x K x H x W


def sliding_window_logits(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """Averages the logits of overlapping crops; images smaller than a crop are zero-padded
    (zero is the mean colour after normalisation) and the padding is cut off again."""
    height, width = images.shape[-2:]
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    if stride_h < 1 or stride_w < 1 or stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"sliding stride {stride} must be between 1 and the crop size {crop_size}")
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h))
    full_h, full_w = padded.shape[-2:]
    rows = max(math.ceil((full_h - crop_h) / stride_h), 0) + 1
    cols = max(math.ceil((full_w - crop_w) / stride_w), 0) + 1
    logits = None
    counts = torch.zeros((1, 1, full_h, full_w), device=images.device)
    for row in range(rows):
        for col in range(cols):
            top = min(row * stride_h, full_h - crop_h)
            left = min(col * stride_w, full_w - crop_w)
            window = logits_fn(padded[..., top : top + crop_h, left : left + crop_w])
            if logits is None:
                logits = window.new_zeros((images.shape[0], window.shape[1], full_h, full_w))
            logits[..., top : top + crop_h, left : left + crop_w] += window
            counts[..., top : top + crop_h, left : left + crop_w] += 1
    return (logits / counts)[..., :height, :width]


def predict(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    *,
    mode: str = "whole",
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class scores B x K x H x W for normalised images B x 3 x H x W.

    With one scale and no flip these are the logits; otherwise the softmax probabilities
    averaged over scales (each resized back to H x W) and the flipped copies.
    """
    if mode not in ("whole", "sliding"):
        raise ValueError(f"inference mode must be 'whole' or 'sliding', got {mode!r}")
    if mode == "sliding":
        if crop_size is None:
            raise ValueError("sliding-window inference needs a crop size")
        stride = stride or (max(1, crop_size[0] * 2 // 3), max(1, crop_size[1] * 2 // 3))

    def single(batch: torch.Tensor) -> torch.Tensor:
        if mode == "sliding":
            return sliding_window_logits(logits_fn, batch, crop_size, stride)
        return logits_fn(batch)

    size = images.shape[-2:]
    if list(scales) == [1.0] and not flip:
        return single(images)
    total = None
    for scale in scales:
        scaled = images
        if scale != 1.0:
            scaled_size = [max(1, round(s * scale)) for s in size]
            scaled = F.interpolate(images, size=scaled_size, mode="bilinear", align_corners=False)
        variants = [(scaled, False)] + ([(scaled.flip(-1), True)] if flip else [])
        for batch, flipped in variants:
            logits = single(batch)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probabilities = logits.float().softmax(1)
            total = probabilities if total is None else total + probabilities
    return total / (len(scales) * (2 if flip else 1))
