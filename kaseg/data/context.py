"""Pascal Context with 59 classes, in the common converted layout.

Layout (``root`` is a ``VOC2012``-like folder, or one holding ``VOCdevkit/VOC2012``)::

    JPEGImages/{id}.jpg
    SegmentationClassContext/{id}.png             ids 0..59
    ImageSets/SegmentationContext/{train,val}.txt

This is the layout mmsegmentation's ``tools/dataset_converters/pascal_context.py``
writes. Its PNGs store 0 = background (everything outside the 59 most frequent classes)
and 1..59 = classes. We follow the benchmark protocol of mmsegmentation's
``PascalContextDataset59`` (``reduce_zero_label=True``): background is ignored, so the
PNG value 0 becomes 255 and k becomes class k - 1. Results are therefore comparable with
the published "Pascal Context 59" numbers, not with the 60-class variant that counts
background.
"""

from __future__ import annotations

from kaseg.data.base import (
    FileSegmentationDataset,
    Sample,
    check_sample_files,
    find_root,
    read_split_list,
    reduce_zero_label,
)
from kaseg.data.palettes import voc_colormap

CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood",
)
CONTEXT_PALETTE = voc_colormap(len(CONTEXT_CLASSES))
CONTEXT_SPLITS = ("train", "val")


class PascalContextDataset(FileSegmentationDataset):
    """Pascal Context, 59 classes; the PNG's background (0) is ignored.

    Args:
        root: the ``VOC2012`` folder, or a folder that contains ``VOCdevkit/VOC2012``.
        split: ``train`` or ``val``.
        mask_dir: folder under the root holding the 0..59 label PNGs.
        split_dir: folder under the root holding ``{split}.txt``.
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        mask_dir: str = "SegmentationClassContext",
        split_dir: str = "ImageSets/SegmentationContext",
    ) -> None:
        if split not in CONTEXT_SPLITS:
            raise ValueError(
                f"unknown Pascal Context split {split!r}; expected one of "
                f"{', '.join(CONTEXT_SPLITS)}"
            )
        base = find_root(root, "JPEGImages", "VOCdevkit/VOC2012", "Pascal Context")
        ids = read_split_list(base / split_dir / f"{split}.txt")
        samples = [
            Sample(base / "JPEGImages" / f"{i}.jpg", base / mask_dir / f"{i}.png") for i in ids
        ]
        name = f"pascal_context {split}"
        check_sample_files(samples, name)
        super().__init__(
            samples,
            CONTEXT_CLASSES,
            CONTEXT_PALETTE,
            decode=reduce_zero_label(len(CONTEXT_CLASSES)),
            name=name,
        )
