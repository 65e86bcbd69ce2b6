"""Data sets (the built-in procedural one and the standard on-disk layouts), joint
transforms and resumable loaders."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from kaseg.data.ade20k import ADE20KDataset
from kaseg.data.base import IGNORE_INDEX, DataError, FileSegmentationDataset, drop_bad_samples
from kaseg.data.cityscapes import CityscapesDataset
from kaseg.data.context import PascalContextDataset
from kaseg.data.folder import FolderDataset
from kaseg.data.mosaic import MosaicDataset
from kaseg.data.procedural import ProceduralDataset
from kaseg.data.shapes import ShapesDataset
from kaseg.data.transforms import TransformedDataset, eval_transform, train_transform
from kaseg.data.voc import PascalVOCDataset

logger = logging.getLogger("kaseg")

# data.name in a config -> the class reading that layout.
DATASETS = {
    "mosaic": MosaicDataset,
    "shapes": ShapesDataset,
    "voc": PascalVOCDataset,
    "cityscapes": CityscapesDataset,
    "context": PascalContextDataset,
    "ade20k": ADE20KDataset,
    "folder": FolderDataset,
}


def build_raw_dataset(data: Any, split: str) -> Any:
    """The untransformed data set a DataConfig names, for ``split``.

    With ``data.skip_bad`` every sample of a file-based split is read once up front and
    the bad ones are dropped (each logged; more than ``max_bad_fraction`` is an error).
    """
    if data.name not in DATASETS:
        raise ValueError(f"unknown data set {data.name!r}; valid: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[data.name]
    valid = [
        p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(data.options) - set(valid))
    if unknown:
        raise ValueError(
            f"data.options {unknown} are not options of data set {data.name!r}; valid: {valid}"
        )
    if data.root is None and not issubclass(cls, ProceduralDataset):
        raise DataError(f"data set {data.name!r} needs data.root, the folder it is stored in")
    dataset = cls(data.root, split, **data.options)
    if data.skip_bad and isinstance(dataset, FileSegmentationDataset):
        dropped = drop_bad_samples(dataset, data.max_bad_fraction)
        logger.info("%s/%s: dropped %d bad sample(s)", data.name, split, len(dropped))
    return dataset


def build_train_dataset(data: Any) -> TransformedDataset:
    raw = build_raw_dataset(data, data.train_split)
    if data.hflip and not getattr(raw, "mirror_symmetric", True):
        raise ValueError(
            f"data.hflip: the classes of data set {data.name!r} are not mirror-symmetric "
            f"({raw.mirror_note}); set data.hflip=false"
        )
    return TransformedDataset(
        raw,
        train_transform(
            crop_size=tuple(data.crop_size),
            scale_range=tuple(data.scale_range),
            hflip=data.hflip,
            color_jitter=data.color_jitter,
            mean=data.mean,
            std=data.std,
        ),
    )


def build_val_dataset(data: Any) -> TransformedDataset:
    return TransformedDataset(
        build_raw_dataset(data, data.val_split), eval_transform(mean=data.mean, std=data.std)
    )


__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "ProceduralDataset",
    "DataError",
    "TransformedDataset",
    "build_raw_dataset",
    "build_train_dataset",
    "build_val_dataset",
]
