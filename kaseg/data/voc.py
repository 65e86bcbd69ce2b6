"""Pascal VOC 2012 segmentation, with the SBD-augmented ``train_aug`` split.

Layout (``root`` is the ``VOC2012`` folder, or a folder holding ``VOCdevkit/VOC2012``)::

    JPEGImages/{id}.jpg
    SegmentationClass/{id}.png          palette PNG: indices 0..20, 255 on object borders
    SegmentationClassAug/{id}.png       train_aug masks (grayscale or palette ids)
    ImageSets/Segmentation/{train,val,trainval,train_aug}.txt

A split list holds one id per line; lines in the DeepLab form
``/JPEGImages/{id}.jpg /SegmentationClassAug/{id}.png`` are accepted too (the id is
taken from the first path).

``torchvision.datasets.VOCSegmentation`` is not used for file discovery: it requires
``root`` to be the parent of ``VOCdevkit/VOC2012`` (we take the ``VOC2012`` folder
itself), knows no ``train_aug`` split or ``SegmentationClassAug`` masks, checks no file
exists and fails with a generic ``RuntimeError`` suggesting a download. Reading the list
ourselves is three lines (``read_split_list``) and gives messages that name the file.
"""

from __future__ import annotations

from pathlib import Path

from kaseg.data.base import (
    FileSegmentationDataset,
    Sample,
    check_sample_files,
    find_root,
    read_split_list,
)
from kaseg.data.palettes import voc_colormap

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
VOC_PALETTE = voc_colormap(len(VOC_CLASSES))
VOC_SPLITS = ("train", "val", "trainval", "train_aug")


def voc_root(root: str | Path) -> Path:
    """The ``VOC2012`` folder: ``root`` itself or ``root/VOCdevkit/VOC2012``."""
    return find_root(root, "JPEGImages", "VOCdevkit/VOC2012", "Pascal VOC")


def sample_id(entry: str) -> str:
    """The id in a split-list entry: ``2007_000032`` or ``/JPEGImages/2007_000032.jpg``."""
    return Path(entry).stem


class PascalVOCDataset(FileSegmentationDataset):
    """Pascal VOC 2012: 21 classes (background included), 255 ignored.

    Args:
        root: the ``VOC2012`` folder, or a folder that contains ``VOCdevkit/VOC2012``.
        split: ``train``, ``val``, ``trainval`` or ``train_aug`` (the 10,582-image
            SBD-augmented training set, masks from ``aug_mask_dir``).
        aug_mask_dir: folder under the VOC2012 root holding the ``train_aug`` masks.
    """

    def __init__(
        self, root: str, split: str, *, aug_mask_dir: str = "SegmentationClassAug"
    ) -> None:
        if split not in VOC_SPLITS:
            raise ValueError(
                f"unknown Pascal VOC split {split!r}; expected one of {', '.join(VOC_SPLITS)}"
            )
        base = voc_root(root)
        entries = read_split_list(base / "ImageSets" / "Segmentation" / f"{split}.txt")
        mask_dir = base / (aug_mask_dir if split == "train_aug" else "SegmentationClass")
        samples = [
            Sample(base / "JPEGImages" / f"{i}.jpg", mask_dir / f"{i}.png")
            for i in map(sample_id, entries)
        ]
        name = f"pascal_voc {split}"
        check_sample_files(samples, name)
        super().__init__(samples, VOC_CLASSES, VOC_PALETTE, name=name)
