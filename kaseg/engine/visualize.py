"""Pictures of predictions: colour masks, overlays and side-by-side grids (uint8 RGB)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kaseg.data.base import IGNORE_INDEX

IGNORE_COLOUR = (255, 255, 255)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """H x W ids -> H x W x 3 colours; the ignore label is drawn white."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    table[IGNORE_INDEX] = IGNORE_COLOUR
    return table[np.asarray(mask, dtype=np.int64).clip(0, 255)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blends the colour mask over the image where the class is not background/ignore."""
    colours = colorize(mask, palette).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colours * alpha
    keep = (np.asarray(mask) == 0) | (np.asarray(mask) == IGNORE_INDEX)
    blend[keep] = image[keep]
    return blend.round().astype(np.uint8)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised 3 x H x W tensor back to H x W x 3 uint8."""
    mean_t = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    pixels = ((image * std_t + mean_t) * 255).clamp(0, 255).round().byte()
    return pixels.permute(1, 2, 0).cpu().numpy()


def grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tiles equally sized H x W x 3 pictures into rows and columns with white gaps."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    canvas = np.full(
        (len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            if picture.shape[:2] != (height, width):
                raise ValueError(f"picture {r},{c} is {picture.shape[:2]}, expected {(height, width)}")
            top, left = r * (height + gap), c * (width + gap)
            canvas[top : top + height, left : left + width] = picture
    return canvas
