"""The built-in procedural data set: shapes whose class needs context and fine resolution.

Every image is drawn on the fly from ``(seed, split, index)``, so nothing is downloaded
and the train and val splits never share an image (their seeds differ by the split's
salt). Drawing a 64x64 image takes well under a millisecond, so generating on the fly is
cheaper than caching to disk and never goes stale when a parameter changes (``cache=True``
keeps the drawn images in memory instead).

What makes it a distillation problem rather than a toy:

* **Non-local context.** Every image belongs to one of two scenes, "day" or "night",
  told apart only by the colour of a thin frame at the image border. Discs and boxes
  take a different class in each scene (``disc_day`` vs ``disc_night``), so classifying
  an object in the middle of the image needs information from its edge.
* **Fine structure.** ``wire`` objects are lines one or two pixels wide and ``dot``
  objects are a few pixels across: a network that predicts at 1/16 or 1/32 of the input
  resolution cannot place them, one that predicts at 1/4 can.
* **Clutter.** Each object kind has a colour family with random jitter, drawn over a
  greyish random gradient with pixel noise; objects overlap and occlude each other.

``difficulty`` in [0, 1] scales the pixel noise, the colour jitter and how thin the
wires are.
"""

from __future__ import annotations

import numpy as np

from kaseg.data.procedural import ProceduralDataset

CLASSES = (
    "background",
    "disc_day",
    "disc_night",
    "box_day",
    "box_night",
    "triangle",
    "wire",
    "dot",
)

PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 159, 0),
        (86, 180, 233),
        (240, 228, 66),
        (0, 114, 178),
        (0, 158, 115),
        (213, 94, 0),
        (204, 121, 167),
    ],
    dtype=np.uint8,
)

_SPLIT_SALT = {"train": 1, "val": 2, "test": 3}
_FRAME_COLOURS = {0: (250, 250, 235), 1: (25, 25, 40)}  # day: near white, night: near black
# Object kinds have colour families (hue in degrees); the scene, not the colour, tells
# disc_day from disc_night.
_HUES = {"disc": 0.0, "box": 120.0, "triangle": 230.0, "wire": 55.0, "dot": 295.0}


class ShapesDataset(ProceduralDataset):
    """Procedural segmentation data set (see the module docstring).

    Args:
        root: unused; present so every data set shares one constructor signature.
        split: ``train``, ``val`` or ``test``.
        num_images: images in the train split.
        num_val_images: images in the val and test splits.
        size: image height and width in pixels.
        seed: base seed; the same seed always gives the same images.
        min_objects, max_objects: objects per image (wires and dots included).
        difficulty: 0 (clean) to 1 (noisy colours, thinner wires).
        cache: keep every drawn image in memory (see :class:`ProceduralDataset`).
    """

    kind = "shapes"
    classes = CLASSES
    palette = PALETTE
    split_salts = _SPLIT_SALT

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        *,
        num_images: int = 2000,
        num_val_images: int = 500,
        size: int = 64,
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 5,
        difficulty: float = 0.5,
        cache: bool = False,
    ) -> None:
        super().__init__(
            split, num_images=num_images, num_val_images=num_val_images, size=size, seed=seed, difficulty=difficulty,
            cache=cache,
        )
        if not 1 <= min_objects <= max_objects:
            raise ValueError(
                f"shapes: need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}"
            )
        self.min_objects = min_objects
        self.max_objects = max_objects

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return draw_scene(rng, self.size, self.min_objects, self.max_objects, self.difficulty)


def draw_scene(
    rng: np.random.Generator, size: int, min_objects: int, max_objects: int, difficulty: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one image (size x size x 3 uint8) and its mask (size x size int64)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, yy, xx, size)
    mask = np.zeros((size, size), dtype=np.int64)
    night = int(rng.integers(2))
    frame = max(2, size // 32)
    inner = slice(frame, size - frame)

    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        kind = rng.choice(["disc", "box", "triangle", "wire", "dot"], p=[0.22, 0.22, 0.2, 0.21, 0.15])
        shape = _draw_shape(rng, kind, yy, xx, size, frame, difficulty)
        label = {
            "disc": 1 + night,
            "box": 3 + night,
            "triangle": 5,
            "wire": 6,
            "dot": 7,
        }[kind]
        colour = _object_colour(rng, kind, difficulty)
        image[shape] = colour
        mask[shape] = label

    # The frame is drawn last and labelled background: it is the scene cue, not an object.
    frame_mask = np.ones((size, size), dtype=bool)
    frame_mask[inner, inner] = False
    image[frame_mask] = _FRAME_COLOURS[night]
    mask[frame_mask] = 0

    noise = rng.normal(0.0, 6 + 20 * difficulty, size=image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, mask


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    # Greyish: each end of the gradient is a grey level plus a small tint.
    start, end = rng.uniform(70, 180, size=(2, 1)) + rng.uniform(-15, 15, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(angle) * xx + np.sin(angle) * yy) / size + 1) / 2
    return start + (end - start) * t[..., None]


def _object_colour(rng: np.random.Generator, kind: str, difficulty: float) -> np.ndarray:
    """A saturated colour around the kind's hue; difficulty widens the hue jitter."""
    hue = _HUES[kind] + rng.uniform(-1, 1) * (10 + 30 * difficulty)
    saturation = rng.uniform(0.75, 1.0) - 0.25 * difficulty * rng.uniform()
    value = rng.uniform(0.7, 1.0)
    return _hsv_to_rgb(hue, saturation, value) * 255


def _hsv_to_rgb(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    h = (hue_degrees % 360) / 60
    c = value * saturation
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return np.array(rgb) + (value - c)


def _draw_shape(
    rng: np.random.Generator,
    kind: str,
    yy: np.ndarray,
    xx: np.ndarray,
    size: int,
    frame: int,
    difficulty: float,
) -> np.ndarray:
    margin = frame + 2
    if kind == "wire":
        (y0, y1), (x0, x1) = rng.uniform(margin, size - margin, size=(2, 2))
        width = rng.uniform(0.5, 1.0) * (1.5 - 0.5 * difficulty)
        return _segment_distance(yy, xx, y0, x0, y1, x1) <= width
    if kind == "dot":
        radius = rng.uniform(1.2, 2.5)
    else:
        radius = rng.uniform(0.14, 0.26) * size
    cy, cx = rng.uniform(margin + radius, size - margin - radius, size=2)
    dy, dx = yy - cy, xx - cx
    if kind in ("disc", "dot"):
        return dy**2 + dx**2 <= radius**2
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    if kind == "box":
        half = radius * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # Equilateral triangle: three half-planes at the circumradius' half.
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        theta = 2 * np.pi * k / 3
        inside &= np.cos(theta) * u + np.sin(theta) * v <= radius / 2
    return inside


def _segment_distance(
    yy: np.ndarray, xx: np.ndarray, y0: float, x0: float, y1: float, x1: float
) -> np.ndarray:
    dy, dx = y1 - y0, x1 - x0
    length_sq = max(dy * dy + dx * dx, 1e-6)
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / length_sq, 0, 1)
    return np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
