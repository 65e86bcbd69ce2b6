"""ADE20K as released for the MIT Scene Parsing benchmark (ADEChallengeData2016).

Layout (``root`` is ``ADEChallengeData2016`` or its parent)::

    images/{training,validation}/ADE_{train,val}_{n:08d}.jpg
    annotations/{training,validation}/ADE_{train,val}_{n:08d}.png   ids 0..150

The PNGs store 0 = "other" (not one of the 150 classes) and 1..150 = classes; as in the
benchmark (and mmsegmentation's ``reduce_zero_label=True``), 0 becomes 255 (ignored) and
k becomes class k - 1.
"""

from __future__ import annotations

from pathlib import Path

from kaseg.data.base import (
    DataError,
    FileSegmentationDataset,
    Sample,
    check_sample_files,
    find_root,
    reduce_zero_label,
    require_dir,
)
from kaseg.data.palettes import voc_colormap

# The short names of objectInfo150 (the first name of each class), in id order.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ADE20K_PALETTE = voc_colormap(len(ADE20K_CLASSES))
# Split name -> folder name; the folder names are accepted as split names too.
ADE20K_SPLITS = {"train": "training", "val": "validation", "training": "training",
                 "validation": "validation"}


def ade20k_samples(root: Path, folder: str) -> list[Sample]:
    """Pairs every ``images/{folder}/*.jpg`` with ``annotations/{folder}/<stem>.png``."""
    images_dir = require_dir(root / "images" / folder, "ADE20K image folder")
    masks_dir = require_dir(root / "annotations" / folder, "ADE20K annotation folder")
    images = sorted(images_dir.glob("*.jpg"))
    return [Sample(image, masks_dir / f"{image.stem}.png") for image in images]


class ADE20KDataset(FileSegmentationDataset):
    """ADE20K scene parsing: 150 classes, the PNG's 0 ("other") ignored.

    Args:
        root: the ``ADEChallengeData2016`` folder, or the folder that contains it.
        split: ``train`` or ``val`` (or the folder names ``training``, ``validation``).
    """

    known_splits = tuple(ADE20K_SPLITS)

    def __init__(self, root: str, split: str) -> None:
        if split not in ADE20K_SPLITS:
            raise ValueError(
                f"unknown ADE20K split {split!r}; expected one of {', '.join(ADE20K_SPLITS)}"
            )
        base = find_root(root, "annotations", "ADEChallengeData2016", "ADE20K")
        samples = ade20k_samples(base, ADE20K_SPLITS[split])
        name = f"ade20k {split}"
        if not samples:
            images_dir = base / "images" / ADE20K_SPLITS[split]
            raise DataError(f"{name}: no '*.jpg' files in {str(images_dir)!r}")
        check_sample_files(samples, name)
        super().__init__(
            samples,
            ADE20K_CLASSES,
            ADE20K_PALETTE,
            decode=reduce_zero_label(len(ADE20K_CLASSES)),
            name=name,
        )
