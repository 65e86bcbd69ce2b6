"""Reading and validating (image, mask) samples from files.

Every data set in kaseg yields raw samples ``(image H x W x 3 uint8, mask H x W int64)``
with class ids 0..K-1 and 255 for "ignore"; the joint transforms come afterwards
(``kaseg.data.transforms``). Problems are reported where a sample is read, naming the
file: a broken sample never reaches training or evaluation silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFile

IGNORE_INDEX = 255

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A sample or a data set layout is not what kaseg expected; the message names the file."""


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path


def read_image(path: Path) -> np.ndarray:
    """Reads an image as H x W x 3 uint8 RGB, failing with the file's name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {str(path)!r} does not exist")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {str(path)!r}: {error}") from error


def read_label_png(path: Path) -> np.ndarray:
    """Reads a single-channel label image (palette 'P', 'L', 'I' or 'I;16') as H x W int64.

    A palette PNG yields its palette indices, which is how Pascal VOC stores class ids.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file {str(path)!r} does not exist")
    try:
        with Image.open(path) as mask:
            mask.load()
            if mask.mode not in ("P", "L", "I", "I;16", "1"):
                raise DataError(
                    f"mask {str(path)!r} has mode {mask.mode} with {len(mask.getbands())} "
                    "channels; expected a single-channel label image of class ids "
                    "(PNG mode 'P' or 'L'). Colour-coded masks must be converted to ids first."
                )
            return np.asarray(mask).astype(np.int64)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read mask {str(path)!r}: {error}") from error


def check_labels(mask: np.ndarray, num_classes: int, path: Path | str) -> None:
    """Raises if ``mask`` holds values other than 0..num_classes-1 and 255."""
    values = np.unique(mask)
    bad = values[((values >= num_classes) & (values != IGNORE_INDEX)) | (values < 0)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise DataError(
            f"mask {str(path)!r} holds label value(s) {shown} outside 0..{num_classes - 1} "
            f"and the ignore label {IGNORE_INDEX}"
        )


def label_lookup(mapping: dict[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    """A 256-entry table mapping raw mask values to train ids (unlisted values -> default)."""
    table = np.full(256, default, dtype=np.int64)
    for raw, train_id in mapping.items():
        table[raw] = train_id
    return table


def reduce_zero_label(num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """A decoder for masks that store 0 = unlabelled and 1..K = classes (ADE20K, Context).

    The returned function maps 0 -> 255 (ignored), k -> k - 1 for k in 1..K and keeps 255
    (mmsegmentation's ``reduce_zero_label=True``). Any other raw value raises
    ``DataError`` naming the raw value, rather than being shifted into a wrong class id.

    Args:
        num_classes: K, the number of classes after the shift (at most 254).
    """
    if not 0 < num_classes < IGNORE_INDEX:
        raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX - 1}, got {num_classes}")
    table = np.full(256, -1, dtype=np.int64)
    table[0] = IGNORE_INDEX
    table[1 : num_classes + 1] = np.arange(num_classes)
    table[IGNORE_INDEX] = IGNORE_INDEX

    def decode(raw: np.ndarray) -> np.ndarray:
        inside = (raw >= 0) & (raw < table.size)
        ids = np.where(inside, table[np.clip(raw, 0, table.size - 1)], -1)
        if (ids < 0).any():
            shown = ", ".join(str(int(v)) for v in np.unique(raw[ids < 0])[:10])
            raise DataError(
                f"holds raw label value(s) {shown} outside 0..{num_classes} and "
                f"{IGNORE_INDEX} (0 = unlabelled, k = class k - 1)"
            )
        return ids

    return decode


class FileSegmentationDataset:
    """Samples stored as an image file and a label file, decoded to class ids.

    Args:
        samples: the (image, mask) file pairs of the split, in a fixed order.
        classes: class names, index = class id.
        palette: K x 3 uint8 colours for visualisation.
        decode: maps the raw label array to ids (for example Cityscapes labelIds to train
            ids); identity when None.
        name: the data set's name for messages.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        palette: np.ndarray,
        *,
        decode: Callable[[np.ndarray], np.ndarray] | None = None,
        name: str = "dataset",
    ) -> None:
        if not samples:
            raise DataError(f"{name}: the split lists no samples")
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.palette = np.asarray(palette, dtype=np.uint8)
        if self.palette.shape != (len(self.classes), 3):
            raise ValueError(
                f"{name}: palette has shape {self.palette.shape}; expected "
                f"({len(self.classes)}, 3), one RGB colour per class"
            )
        self.decode = decode
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def source(self, index: int) -> str:
        return str(self.samples[index].image)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = read_label_png(sample.mask)
        if self.decode is not None:
            try:
                mask = self.decode(mask)
            except DataError as error:
                raise DataError(f"mask {str(sample.mask)!r} {error}") from error
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"image {str(sample.image)!r} is {image.shape[1]}x{image.shape[0]} but its mask "
                f"{str(sample.mask)!r} is {mask.shape[1]}x{mask.shape[0]} (width x height)"
            )
        check_labels(mask, len(self.classes), sample.mask)
        return image, mask


def drop_bad_samples(dataset: FileSegmentationDataset, max_bad_fraction: float) -> list[str]:
    """Reads every sample once and removes those that fail, logging each (``skip_bad``).

    Returns the messages of the dropped samples. Raises if more than ``max_bad_fraction``
    of the split is bad, so a broken copy of a data set is never used quietly.
    """
    good, problems = [], []
    for index, sample in enumerate(dataset.samples):
        try:
            dataset[index]
        except DataError as error:
            problems.append(str(error))
            logger.warning("skipping bad sample %d of %s: %s", index, dataset.name, error)
        else:
            good.append(sample)
    fraction = len(problems) / len(dataset.samples)
    if fraction > max_bad_fraction:
        raise DataError(
            f"{dataset.name}: {len(problems)} of {len(dataset.samples)} samples are bad "
            f"({fraction:.1%} > max_bad_fraction {max_bad_fraction:.1%}); first: {problems[0]}"
        )
    if not good:
        raise DataError(f"{dataset.name}: every sample is bad; first: {problems[0]}")
    if problems:
        logger.warning(
            "%s: skipped %d bad sample(s) of %d", dataset.name, len(problems), len(dataset.samples)
        )
    dataset.samples = good
    return problems


def read_split_list(path: Path) -> list[str]:
    """Reads a split file: one sample id per line, blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split list {str(path)!r} does not exist")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split list {str(path)!r} is empty")
    return ids


def require_dir(path: Path, what: str) -> Path:
    """Returns ``path`` if it is a folder, else raises naming it as ``what``."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} {str(path)!r} does not exist or is not a folder")
    return path


def find_root(root: str | Path, marker: str, nested: str, what: str) -> Path:
    """Accepts a data set folder given directly or as the parent of its usual folder.

    Args:
        root: the folder the user passed.
        marker: a sub-folder every copy of the data set has (e.g. ``JPEGImages``).
        nested: where the data set folder sits below a parent (e.g. ``VOCdevkit/VOC2012``).
        what: the data set's name for messages.

    Returns:
        ``root`` or ``root / nested``, whichever holds ``marker``.
    """
    root = require_dir(Path(root).expanduser(), f"{what} root")
    for candidate in (root, root / nested):
        if (candidate / marker).is_dir():
            return candidate
    raise DataError(
        f"{what} root {str(root)!r} holds no {marker!r} folder, neither directly nor under "
        f"{nested!r}; pass the folder that contains {marker!r}"
    )


def check_sample_files(samples: Sequence[Sample], name: str) -> None:
    """Raises if any image or mask of ``samples`` is missing, naming the first and the count.

    Run at construction so a half-copied data set fails before training starts.
    """
    missing = [
        (sample, path)
        for sample in samples
        for path in (sample.image, sample.mask)
        if not Path(path).is_file()
    ]
    if not missing:
        return
    sample, path = missing[0]
    if path == sample.image:
        first = f"image {str(path)!r}"
    else:
        first = f"mask {str(path)!r} (for image {str(sample.image)!r})"
    raise DataError(
        f"{name}: {len(missing)} file(s) of {len(samples)} sample(s) are missing; "
        f"first: {first} does not exist"
    )
