"""A generic layout for your own data: a folder of images, a folder of id masks, a YAML.

Layout::

    root/images/<stem>.{jpg,jpeg,png}
    root/masks/<stem>.png          single-channel PNG ('L' or 'P'): ids 0..K-1, 255 ignored
    root/classes.yaml              the class names (and optionally colours), id = position
    root/splits/{split}.txt        optional: one stem per line

``classes.yaml`` is either a list of names::

    [background, road, car]

or a list of mappings with a ``name`` and an optional ``color``::

    - {name: background, color: [0, 0, 0]}
    - {name: road}

Classes without a colour take the default palette's colour for their id.

Splits come from ``root/splits/{split}.txt`` when that folder exists. Without it, pass
``split_ratio``: the images are shuffled with a generator seeded by ``split_seed`` and the
first ``round(split_ratio * n)`` form ``train``, the rest ``val``, so the two never overlap
and every run (and every process) sees the same division.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kaseg.data.base import (
    IGNORE_INDEX,
    DataError,
    FileSegmentationDataset,
    Sample,
    check_sample_files,
    read_split_list,
    require_dir,
)
from kaseg.data.palettes import voc_colormap

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RATIO_SPLITS = ("train", "val")


def read_classes(path: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """Reads a classes YAML file (see the module docstring).

    Returns:
        The class names and their K x 3 uint8 palette.

    Raises:
        DataError: naming the file, and the entry and key at fault.
    """
    if not path.is_file():
        raise DataError(
            f"classes file {str(path)!r} does not exist; write the class names there as a "
            "YAML list (id = position), or pass classes_file"
        )
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"classes file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(entries, list) or not entries:
        raise DataError(
            f"classes file {str(path)!r} must hold a non-empty YAML list of class names or "
            f"of {{name: ..., color: [r, g, b]}} mappings; got {type(entries).__name__}"
        )
    if len(entries) > IGNORE_INDEX:
        raise DataError(
            f"classes file {str(path)!r} lists {len(entries)} classes; at most "
            f"{IGNORE_INDEX} fit, as id {IGNORE_INDEX} means 'ignore'"
        )
    names, palette = [], voc_colormap(len(entries))
    for index, entry in enumerate(entries):
        name, color = parse_class_entry(entry, f"classes file {str(path)!r}, entry {index}")
        if name in names:
            raise DataError(f"classes file {str(path)!r}: class name {name!r} appears twice")
        names.append(name)
        if color is not None:
            palette[index] = color
    return tuple(names), palette


def parse_class_entry(entry: Any, where: str) -> tuple[str, tuple[int, int, int] | None]:
    """One class entry: a name, or ``{name: ..., color: [r, g, b]}`` -> (name, colour)."""
    if isinstance(entry, str):
        return entry, None
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a class name or a mapping with 'name', got {entry!r}")
    unknown = set(entry) - {"name", "color"}
    if unknown:
        raise DataError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; valid: name, color")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: key 'name' must be a non-empty string, got {name!r}")
    color = entry.get("color")
    if color is None:
        return name, None
    if (
        not isinstance(color, list)
        or len(color) != 3
        or not all(type(c) is int and 0 <= c <= 255 for c in color)
    ):
        raise DataError(
            f"{where}: key 'color' must be [r, g, b] with integers 0..255, got {color!r}"
        )
    return name, tuple(color)


def find_images(images_dir: Path) -> dict[str, Path]:
    """Maps each stem in ``images_dir`` to its image file; two files with one stem is an error."""
    images: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in images:
            raise DataError(
                f"images {str(images[path.stem])!r} and {str(path)!r} share the stem "
                f"{path.stem!r}; a stem must name one image"
            )
        images[path.stem] = path
    if not images:
        raise DataError(f"image folder {str(images_dir)!r} holds no .jpg, .jpeg or .png files")
    return images


def listed_stems(images: dict[str, Path], split_list: Path) -> list[str]:
    """The stems in ``split_list``, each required to have an image."""
    stems = [Path(entry).stem for entry in read_split_list(split_list)]
    missing = [stem for stem in stems if stem not in images]
    if missing:
        raise DataError(
            f"split list {str(split_list)!r} names {len(missing)} stem(s) with no image in "
            f"{str(split_list.parent.parent / 'images')!r}; first: {missing[0]!r} "
            f"(expected {missing[0]}.jpg, .jpeg or .png)"
        )
    return stems


def ratio_stems(stems: list[str], split: str, split_ratio: float, split_seed: int) -> list[str]:
    """The ``train`` or ``val`` part of a seeded shuffle of ``stems`` (sorted first)."""
    if split not in RATIO_SPLITS:
        raise ValueError(f"with split_ratio the split must be 'train' or 'val', got {split!r}")
    if not 0.0 < split_ratio < 1.0:
        raise ValueError(f"split_ratio must be between 0 and 1 (exclusive), got {split_ratio}")
    order = np.random.default_rng(split_seed).permutation(len(stems))
    shuffled = [sorted(stems)[i] for i in order]
    num_train = round(split_ratio * len(stems))
    if not 0 < num_train < len(stems):
        raise ValueError(
            f"split_ratio {split_ratio} of {len(stems)} image(s) leaves train or val empty; "
            "add images or change split_ratio"
        )
    return shuffled[:num_train] if split == "train" else shuffled[num_train:]


class FolderDataset(FileSegmentationDataset):
    """Your own data in the ``images/``, ``masks/``, ``classes.yaml`` layout.

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        split: a split list name (``root/splits/{split}.txt``), or ``train`` / ``val``
            with ``split_ratio``.
        classes_file: the classes YAML, relative to ``root`` (or absolute).
        split_ratio: fraction of the images that forms ``train`` when ``root/splits``
            does not exist; the rest forms ``val``.
        split_seed: seed of the shuffle behind ``split_ratio``.
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        classes_file: str = "classes.yaml",
        split_ratio: float | None = None,
        split_seed: int = 0,
    ) -> None:
        base = require_dir(Path(root).expanduser(), "data set root")
        classes, palette = read_classes(base / classes_file)
        images = find_images(require_dir(base / "images", "image folder"))
        masks_dir = require_dir(base / "masks", "mask folder")
        splits_dir = base / "splits"
        if splits_dir.is_dir() and split_ratio is not None:
            raise ValueError(
                f"{str(base)!r} has split lists in {str(splits_dir)!r} and split_ratio="
                f"{split_ratio} was given; remove one of the two"
            )
        if split_ratio is None:
            if not splits_dir.is_dir():
                raise DataError(
                    f"split list folder {str(splits_dir)!r} does not exist; add "
                    f"splits/{split}.txt (one image stem per line) or pass split_ratio"
                )
            stems = listed_stems(images, splits_dir / f"{split}.txt")
        else:
            stems = ratio_stems(list(images), split, split_ratio, split_seed)
        samples = [Sample(images[stem], masks_dir / f"{stem}.png") for stem in stems]
        name = f"folder {str(base)!r} {split}"
        check_sample_files(samples, name)
        super().__init__(samples, classes, palette, name=name)
