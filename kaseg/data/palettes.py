"""Colour palettes for drawing class-id masks.

One generator serves every data set: the Pascal VOC colour map, which spreads the bits
of the class id over the red, green and blue channels. It is VOC's official palette
(and the one stored in VOC's palette PNGs), and it gives distinct colours for any number
of classes up to 2**24, so data sets without an official palette use it too.
"""

from __future__ import annotations

import numpy as np


def voc_colormap(num_colors: int = 256) -> np.ndarray:
    """The Pascal VOC bit-interleaving colour map.

    Bit ``3 * j + c`` of the index (channel c = red, green, blue) becomes bit ``7 - j``
    of that channel, so 0 is black, 1 is (128, 0, 0), 2 is (0, 128, 0), 3 is
    (128, 128, 0) and so on.

    Args:
        num_colors: how many colours (rows) to return.

    Returns:
        ``num_colors x 3`` uint8 RGB colours; row i is the colour of id i.
    """
    if num_colors < 0:
        raise ValueError(f"num_colors must be >= 0, got {num_colors}")
    ids = np.arange(num_colors, dtype=np.int64)
    palette = np.zeros((num_colors, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)
