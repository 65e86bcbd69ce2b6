"""What the built-in data sets share: images drawn on the fly from ``(seed, split, index)``.

Nothing is downloaded; the same arguments always give the same image, and the splits never
share one (each split has its own seed salt, and each data set its own salts). With
``cache=True`` each image is drawn once and then kept in memory (uint8, about 65 kB per
128 px image): a run of 32 epochs then draws every image once instead of 32 times.
"""

from __future__ import annotations

import numpy as np


class ProceduralDataset:
    """Base of the built-in data sets; subclasses set ``kind``, ``classes``, ``palette`` and
    ``split_salts`` and implement :meth:`draw`.

    Args:
        split: ``train``, ``val`` or ``test``.
        num_images: images in the train split.
        num_val_images: images in the val and test splits.
        size: image height and width in pixels (at least 32).
        seed: base seed; the same seed always gives the same images.
        difficulty: in [0, 1]; what it changes is the subclass's.
        cache: keep every drawn image and mask in memory (each process keeps its own:
            with ``data.workers > 0`` the loader's persistent workers hold it).
    """

    kind: str
    classes: tuple[str, ...]
    palette: np.ndarray
    split_salts: dict[str, int]

    def __init__(
        self,
        split: str,
        *,
        num_images: int,
        num_val_images: int,
        size: int,
        seed: int,
        difficulty: float,
        cache: bool = False,
    ) -> None:
        if split not in self.split_salts:
            raise ValueError(f"{self.kind}: unknown split {split!r}; valid: {sorted(self.split_salts)}")
        if size < 32:
            raise ValueError(f"{self.kind}: size must be at least 32 pixels, got {size}")
        if not 0 <= difficulty <= 1:
            raise ValueError(f"{self.kind}: difficulty must be in [0, 1], got {difficulty}")
        if num_images < 1 or num_val_images < 1:
            raise ValueError(
                f"{self.kind}: num_images and num_val_images must be positive, got {num_images}, {num_val_images}"
            )
        self.split = split
        self.num_images = num_images if split == "train" else num_val_images
        self.size = size
        self.seed = seed
        self.difficulty = difficulty
        self.name = f"{self.kind}/{split}"
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def source(self, index: int) -> str:
        return f"{self.kind}:{self.split}:{self.seed}:{index}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if self._cache is None:
            return self.draw(self._rng(index))
        if index not in self._cache:
            image, mask = self.draw(self._rng(index))
            small = mask.min() >= 0 and mask.max() <= 255
            self._cache[index] = image, mask.astype(np.uint8) if small else mask
        image, mask = self._cache[index]
        # Copies: the caller may change what it gets; the cache must not see it.
        return image.copy(), mask.astype(np.int64)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.split_salts[self.split], index])

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One image (size x size x 3 uint8) and its mask (size x size int64)."""
        raise NotImplementedError
