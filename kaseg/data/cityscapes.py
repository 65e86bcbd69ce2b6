"""Cityscapes fine annotations, mapped from the 34 label ids to the 19 train ids.

Layout (``root`` holds ``leftImg8bit`` and ``gtFine``)::

    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

Only the ``*_gtFine_labelIds.png`` files are read; the colour, instance and polygon
annotations need not be present. Label ids not in the 19-class evaluation table
(``unlabeled``, ``ego vehicle``, ``caravan``, ``trailer``, ...) become 255, as in the
official benchmark scripts.

``torchvision.datasets.Cityscapes`` reads this layout but is not used for file
discovery: it lists folders with ``os.listdir`` (so the sample order depends on the file
system), pairs every file in a city folder with a label name without checking either
exists, and unpacks any ``*.zip`` it finds in ``root`` when a folder is missing. A
sorted glob plus ``check_sample_files`` is shorter than correcting those. Its class table
serves as the reference for ours in the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kaseg.data.base import (
    DataError,
    FileSegmentationDataset,
    Sample,
    check_sample_files,
    label_lookup,
    require_dir,
)

# (name, label id, RGB colour) of the 19 evaluated classes; train id = position.
CITYSCAPES_TABLE = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
CITYSCAPES_CLASSES = tuple(name for name, _, _ in CITYSCAPES_TABLE)
CITYSCAPES_PALETTE = np.array([color for _, _, color in CITYSCAPES_TABLE], dtype=np.uint8)
LABEL_TO_TRAIN_ID = label_lookup(
    {label_id: train_id for train_id, (_, label_id, _) in enumerate(CITYSCAPES_TABLE)}
)
CITYSCAPES_SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Maps Cityscapes label ids (H x W) to train ids 0..18; every other value -> 255."""
    # Values outside 0..255 (a 16-bit PNG, or -1 for "license plate") clip onto 0 or 255,
    # both of which the table maps to 255.
    return LABEL_TO_TRAIN_ID[np.clip(label_ids, 0, LABEL_TO_TRAIN_ID.size - 1)]


def cityscapes_samples(root: Path, split: str) -> list[Sample]:
    """Pairs every ``*_leftImg8bit.png`` of the split with its ``*_gtFine_labelIds.png``."""
    images_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes image folder")
    labels_dir = require_dir(root / "gtFine" / split, "Cityscapes gtFine folder")
    samples = []
    for image in sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = image.name[: -len(IMAGE_SUFFIX)]
        samples.append(Sample(image, labels_dir / image.parent.name / f"{stem}{LABEL_SUFFIX}"))
    return samples


class CityscapesDataset(FileSegmentationDataset):
    """Cityscapes with fine labels: 19 classes, everything else 255.

    Args:
        root: the folder holding ``leftImg8bit`` and ``gtFine``.
        split: ``train``, ``val`` or ``test`` (the public test labels are all ignored,
            so ``test`` is only good for predicting).
    """

    def __init__(self, root: str, split: str) -> None:
        if split not in CITYSCAPES_SPLITS:
            raise ValueError(
                f"unknown Cityscapes split {split!r}; expected one of "
                f"{', '.join(CITYSCAPES_SPLITS)}"
            )
        base = require_dir(Path(root).expanduser(), "Cityscapes root")
        samples = cityscapes_samples(base, split)
        name = f"cityscapes {split}"
        if not samples:
            raise DataError(
                f"{name}: no '*{IMAGE_SUFFIX}' files in the city folders of "
                f"{str(base / 'leftImg8bit' / split)!r}"
            )
        check_sample_files(samples, name)
        super().__init__(
            samples,
            CITYSCAPES_CLASSES,
            CITYSCAPES_PALETTE,
            decode=label_ids_to_train_ids,
            name=name,
        )
