"""The built-in benchmark: texture mosaics whose classes take depth to recognise.

Every image is drawn on the fly from ``(seed, split, index)``: nothing is downloaded,
and the splits never share an image (each split has its own seed salt). A 128 x 128
image takes about 3 ms (2-core AMD EPYC), so long schedules set ``cache: true`` (the
mosaic configs do): each image is drawn once and then kept in memory.

An image is a Voronoi partition of the plane into a few large regions (each spans
several cells of a stride-16 grid), and each region is filled with a procedural texture
in two random colours. The class of a region is its texture, never its colour or
brightness:

* ``smooth``: a soft shading, no texture;
* ``stripes_0``, ``stripes_45``, ``stripes_90``, ``stripes_135``: sinusoidal gratings
  whose orientation (within ``orientation_jitter`` degrees) is the class, at a random
  period and phase;
* ``checker``: the product of two orthogonal gratings (a lattice) at a random angle;
* ``blobs``: low-pass noise (smooth random blobs);
* ``grain``: high-pass noise (fine random grain).

Telling these apart needs oriented filters combined over a neighbourhood (a lattice
contains both orientations of a diagonal pair; low-contrast stripes hide under the
pixel noise), which a deep teacher learns better than a small student, while every
region is large enough that the class can be predicted on the student's grid: what
the teacher knows lives at the student's resolution. Boundaries between regions are
straight (Voronoi), so a stride-16 grid can follow them closely.

``difficulty`` in [0, 1] lowers the textures' contrast and raises the pixel noise.
"""

from __future__ import annotations

import numpy as np

from kaseg.data.procedural import ProceduralDataset

CLASSES = (
    "smooth",
    "stripes_0",
    "stripes_45",
    "stripes_90",
    "stripes_135",
    "checker",
    "blobs",
    "grain",
)

PALETTE = np.array(
    [
        (40, 40, 40),
        (230, 159, 0),
        (240, 228, 66),
        (0, 158, 115),
        (86, 180, 233),
        (0, 114, 178),
        (213, 94, 0),
        (204, 121, 167),
    ],
    dtype=np.uint8,
)

_SPLIT_SALT = {"train": 11, "val": 12, "test": 13}
_STRIPE_ANGLES = {1: 0.0, 2: 45.0, 3: 90.0, 4: 135.0}


class MosaicDataset(ProceduralDataset):
    """Procedural texture-mosaic segmentation data set (see the module docstring).

    Args:
        root: unused; present so every data set shares one constructor signature.
        split: ``train``, ``val`` or ``test``.
        num_images: images in the train split.
        num_val_images: images in the val and test splits.
        size: image height and width in pixels.
        seed: base seed; the same seed always gives the same images.
        min_regions, max_regions: Voronoi regions per image.
        difficulty: 0 (high contrast, little noise) to 1 (faint textures, strong noise).
        orientation_jitter: largest deviation (degrees) of a grating from its class angle.
        cache: keep every drawn image in memory (see :class:`ProceduralDataset`).
    """

    kind = "mosaic"
    classes = CLASSES
    palette = PALETTE
    split_salts = _SPLIT_SALT
    # Orientation is a class: a mirror image is another labelling, not an augmentation.
    mirror_symmetric = False
    mirror_note = "a horizontal flip turns stripes_45 into stripes_135"

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        *,
        num_images: int = 2000,
        num_val_images: int = 500,
        size: int = 128,
        seed: int = 0,
        min_regions: int = 4,
        max_regions: int = 7,
        difficulty: float = 0.5,
        orientation_jitter: float = 12.0,
        cache: bool = False,
    ) -> None:
        super().__init__(
            split, num_images=num_images, num_val_images=num_val_images, size=size, seed=seed, difficulty=difficulty,
            cache=cache,
        )
        if not 1 <= min_regions <= max_regions:
            raise ValueError(
                f"mosaic: need 1 <= min_regions <= max_regions, got {min_regions}, {max_regions}"
            )
        if not 0 <= orientation_jitter < 22.5:
            raise ValueError(
                f"mosaic: orientation_jitter must be in [0, 22.5) degrees (classes are 45 apart), "
                f"got {orientation_jitter}"
            )
        self.min_regions = min_regions
        self.max_regions = max_regions
        self.orientation_jitter = orientation_jitter

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        regions = int(rng.integers(self.min_regions, self.max_regions + 1))
        return draw_mosaic(rng, self.size, regions, self.difficulty, self.orientation_jitter)


def draw_mosaic(
    rng: np.random.Generator, size: int, regions: int, difficulty: float, orientation_jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """One image (size x size x 3 uint8) and its mask (size x size int64)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    owner = _voronoi(rng, yy, xx, size, regions)
    labels = rng.integers(len(CLASSES), size=regions)
    image = np.zeros((size, size, 3), dtype=np.float32)
    for region, label in enumerate(labels):
        inside = owner == region
        pattern = _texture(rng, int(label), yy, xx, size, orientation_jitter)
        contrast = rng.uniform(0.35, 1.0) * (1.0 - 0.5 * difficulty)
        image[inside] = _colourise(rng, pattern[inside], contrast)
    noise = rng.normal(0.0, 4 + 20 * difficulty, size=image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, labels[owner].astype(np.int64)


def _voronoi(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int, regions: int) -> np.ndarray:
    """size x size index of the nearest of ``regions`` seeds, kept apart so no region is a sliver."""
    seeds = [rng.uniform(0, size, size=2)]
    min_gap = size / (1.5 * np.sqrt(regions))
    for _ in range(50 * regions):
        if len(seeds) == regions:
            break
        candidate = rng.uniform(0, size, size=2)
        if min(np.hypot(*(candidate - s)) for s in seeds) >= min_gap:
            seeds.append(candidate)
    while len(seeds) < regions:  # crowded: accept the rest unconstrained
        seeds.append(rng.uniform(0, size, size=2))
    points = np.array(seeds, dtype=np.float32)
    distances = (yy[None] - points[:, 0, None, None]) ** 2 + (xx[None] - points[:, 1, None, None]) ** 2
    return distances.argmin(0)


def _grating(yy: np.ndarray, xx: np.ndarray, angle_degrees: float, period: float, phase: float) -> np.ndarray:
    theta = np.deg2rad(angle_degrees)
    # Stripes run along the angle: the intensity varies across it.
    across = -np.sin(theta) * xx + np.cos(theta) * yy
    return np.sin(2 * np.pi * across / period + phase)


def _spectral_noise(rng: np.random.Generator, size: int, low: float, high: float) -> np.ndarray:
    """White noise band-passed to spatial frequencies in [low, high] cycles per pixel."""
    spectrum = np.fft.rfft2(rng.normal(size=(size, size)))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.hypot(fy, fx)
    noise = np.fft.irfft2(spectrum * ((radius >= low) & (radius <= high)), s=(size, size))
    return noise / (np.abs(noise).max() + 1e-8)


def _texture(
    rng: np.random.Generator, label: int, yy: np.ndarray, xx: np.ndarray, size: int, orientation_jitter: float
) -> np.ndarray:
    """The class's pattern over the whole image, values in [-1, 1]."""
    name = CLASSES[label]
    period = rng.uniform(4.0, 11.0)
    phase = rng.uniform(0, 2 * np.pi)
    if name == "smooth":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
        return np.clip(2 * (ramp - ramp.mean()), -1, 1)
    if name.startswith("stripes"):
        angle = _STRIPE_ANGLES[label] + rng.uniform(-orientation_jitter, orientation_jitter)
        return _grating(yy, xx, angle, period, phase)
    if name == "checker":
        angle = rng.uniform(0, 90)
        other_phase = rng.uniform(0, 2 * np.pi)
        return _grating(yy, xx, angle, period, phase) * _grating(yy, xx, angle + 90, period, other_phase)
    if name == "blobs":
        return _spectral_noise(rng, size, 0.0, rng.uniform(0.03, 0.06))
    return _spectral_noise(rng, size, rng.uniform(0.3, 0.4), 0.75)  # grain


def _colourise(rng: np.random.Generator, pattern: np.ndarray, contrast: float) -> np.ndarray:
    """Maps pattern values in [-1, 1] between two random colours ``contrast`` apart (n x 3)."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    amplitude = 0.5 * contrast * 200
    centre = rng.uniform(amplitude / np.sqrt(3) + 20, 235 - amplitude / np.sqrt(3), size=3)
    return centre + pattern[:, None] * amplitude * direction
