"""Every bad input gives a DataError naming the offending file and what was expected.

Most cases use the generic folder layout; the layout-specific ones (split lists,
annotations missing for an image, raw label ranges) use the layout concerned.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kaseg.data.ade20k import ADE20KDataset
from kaseg.data.base import DataError, drop_bad_samples
from kaseg.data.cityscapes import CityscapesDataset
from kaseg.data.context import PascalContextDataset
from kaseg.data.folder import FolderDataset
from kaseg.data.voc import PascalVOCDataset

HEIGHT, WIDTH = 12, 20


def quoted(path: Path) -> str:
    """A regex matching ``path`` as the messages print it (quoted)."""
    return re.escape(repr(str(path)))


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def random_image(seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def ids_mask(value: int = 1, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2] = value
    return mask


def make_folder(root: Path, count: int = 3) -> list[str]:
    """A valid folder data set with 3 classes and ``count`` samples, all in splits/train."""
    stems = [f"s{i}" for i in range(count)]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    for i, stem in enumerate(stems):
        (root / "images" / f"{stem}.png").write_bytes(png_bytes(random_image(i)))
        (root / "masks" / f"{stem}.png").write_bytes(png_bytes(ids_mask(), mode="L"))
    (root / "splits" / "train.txt").write_text("\n".join(stems) + "\n")
    (root / "classes.yaml").write_text(yaml.safe_dump(["background", "road", "car"]))
    return stems


def make_voc(root: Path, ids: list[str], listed: list[str]) -> None:
    """A VOC2012 folder with files for ``ids`` and a train list of ``listed``."""
    for i, sample in enumerate(ids):
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "SegmentationClass").mkdir(exist_ok=True)
        (root / "JPEGImages" / f"{sample}.jpg").write_bytes(jpeg_bytes(random_image(i)))
        (root / "SegmentationClass" / f"{sample}.png").write_bytes(png_bytes(ids_mask(), "L"))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(listed) + "\n")


# --- layout problems, found at construction ---------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"root {quoted(root)} does not exist"):
        FolderDataset(str(root), "train")
    with pytest.raises(DataError, match=quoted(root)):
        PascalVOCDataset(str(root), "train")


def test_root_that_is_not_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{quoted(tmp_path)} holds no 'JPEGImages' folder"):
        PascalVOCDataset(str(tmp_path), "train")
    with pytest.raises(DataError, match=f"{quoted(tmp_path)} holds no 'annotations' folder"):
        ADE20KDataset(str(tmp_path), "train")


def test_missing_split_list(tmp_path: Path) -> None:
    make_voc(tmp_path, ["a"], ["a"])
    split_list = tmp_path / "ImageSets" / "Segmentation" / "val.txt"
    with pytest.raises(DataError, match=f"split list {quoted(split_list)} does not exist"):
        PascalVOCDataset(str(tmp_path), "val")


def test_missing_split_list_folder(tmp_path: Path) -> None:
    make_folder(tmp_path)
    with pytest.raises(DataError, match=quoted(tmp_path / "splits" / "val.txt")):
        FolderDataset(str(tmp_path), "val")
    (tmp_path / "splits" / "train.txt").unlink()
    (tmp_path / "splits").rmdir()
    with pytest.raises(DataError, match=f"{quoted(tmp_path / 'splits')}.*split_ratio"):
        FolderDataset(str(tmp_path), "train")


def test_listed_file_missing_names_first_and_count(tmp_path: Path) -> None:
    make_voc(tmp_path, ["a", "b"], ["a", "gone1", "b", "gone2"])
    first = tmp_path / "JPEGImages" / "gone1.jpg"
    # gone1 and gone2 each lack an image and a mask: 4 files.
    with pytest.raises(DataError, match=f"4 file\\(s\\) of 4 sample\\(s\\).*{quoted(first)}"):
        PascalVOCDataset(str(tmp_path), "train")


def test_folder_image_without_mask_names_it_and_counts(tmp_path: Path) -> None:
    make_folder(tmp_path, count=4)
    (tmp_path / "masks" / "s1.png").unlink()
    (tmp_path / "masks" / "s3.png").unlink()
    mask = tmp_path / "masks" / "s1.png"
    with pytest.raises(DataError, match=f"2 file\\(s\\).*mask {quoted(mask)}"):
        FolderDataset(str(tmp_path), "train")


def test_folder_split_list_names_unknown_stem(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "splits" / "train.txt").write_text("s0\nmissing\n")
    with pytest.raises(DataError, match=f"{quoted(tmp_path / 'splits' / 'train.txt')}.*'missing'"):
        FolderDataset(str(tmp_path), "train")


def test_cityscapes_image_without_gtfine_file(tmp_path: Path) -> None:
    images = tmp_path / "leftImg8bit" / "val" / "lindau"
    labels = tmp_path / "gtFine" / "val" / "lindau"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    (images / "lindau_000000_000019_leftImg8bit.png").write_bytes(png_bytes(random_image()))
    label = labels / "lindau_000000_000019_gtFine_labelIds.png"
    with pytest.raises(DataError, match=f"mask {quoted(label)}"):
        CityscapesDataset(str(tmp_path), "val")


def test_ade20k_image_without_annotation(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    image = root / "images" / "training" / "ADE_train_00000001.jpg"
    image.write_bytes(jpeg_bytes(random_image()))
    annotation = root / "annotations" / "training" / "ADE_train_00000001.png"
    with pytest.raises(DataError, match=f"mask {quoted(annotation)}"):
        ADE20KDataset(str(tmp_path), "train")


# --- classes.yaml validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{background: 0}", "must hold a non-empty YAML list"),
        ("[]", "must hold a non-empty YAML list"),
        ("[a, b, [c]", "is not valid YAML"),
        ("[a, {name: b, colour: [1, 2, 3]}]", "entry 1: unknown key\\(s\\) \\['colour'\\]"),
        ("[a, {color: [1, 2, 3]}]", "entry 1: key 'name'"),
        ("[a, {name: b, color: [1, 2]}]", "entry 1: key 'color' must be \\[r, g, b\\]"),
        ("[a, {name: b, color: [1, 2, 300]}]", "entry 1: key 'color'"),
        ("[a, b, a]", "class name 'a' appears twice"),
        ("[a, 3]", "entry 1: expected a class name"),
    ],
)
def test_bad_classes_yaml_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    make_folder(tmp_path)
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(DataError, match=f"{quoted(tmp_path / 'classes.yaml')}.*{expected}"):
        FolderDataset(str(tmp_path), "train")


def test_missing_classes_file(tmp_path: Path) -> None:
    make_folder(tmp_path)
    with pytest.raises(DataError, match=f"{quoted(tmp_path / 'labels.yaml')} does not exist"):
        FolderDataset(str(tmp_path), "train", classes_file="labels.yaml")


# --- sample problems, found where the sample is read ------------------------------------


def test_unreadable_image(tmp_path: Path) -> None:
    make_folder(tmp_path)
    image = tmp_path / "images" / "s0.png"
    image.unlink()
    image = image.with_suffix(".jpg")
    image.write_bytes(np.random.default_rng(0).bytes(600))
    ds = FolderDataset(str(tmp_path), "train")
    with pytest.raises(DataError, match=f"cannot read image {quoted(image)}"):
        ds[0]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path: Path, suffix: str) -> None:
    make_folder(tmp_path)
    (tmp_path / "images" / "s1.png").unlink()
    image = tmp_path / "images" / f"s1{suffix}"
    array = random_image(height=HEIGHT * 8, width=WIDTH * 8)  # big enough to cut mid-data
    whole = png_bytes(array) if suffix == ".png" else jpeg_bytes(array)
    image.write_bytes(whole[: len(whole) // 2])
    (tmp_path / "masks" / "s1.png").write_bytes(png_bytes(ids_mask(1, HEIGHT * 8, WIDTH * 8), "L"))
    ds = FolderDataset(str(tmp_path), "train")
    with pytest.raises(DataError, match=f"cannot read image {quoted(image)}.*truncated"):
        ds[1]


def test_truncated_mask(tmp_path: Path) -> None:
    make_folder(tmp_path)
    mask = tmp_path / "masks" / "s2.png"
    whole = png_bytes(np.random.default_rng(0).integers(0, 3, (96, 160), dtype=np.uint8), "L")
    mask.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=f"cannot read mask {quoted(mask)}"):
        FolderDataset(str(tmp_path), "train")[2]


def test_image_and_mask_of_different_sizes(tmp_path: Path) -> None:
    make_folder(tmp_path)
    mask = tmp_path / "masks" / "s0.png"
    mask.write_bytes(png_bytes(ids_mask(1, HEIGHT, WIDTH + 1), "L"))
    image = tmp_path / "images" / "s0.png"
    match = f"image {quoted(image)} is {WIDTH}x{HEIGHT} but its mask {quoted(mask)} is {WIDTH + 1}x"
    with pytest.raises(DataError, match=match):
        FolderDataset(str(tmp_path), "train")[0]


def test_label_values_out_of_range(tmp_path: Path) -> None:
    make_folder(tmp_path)
    mask = tmp_path / "masks" / "s1.png"
    values = ids_mask(77)
    values[-1, -1] = 3  # K = 3, so 3 is out of range too; 255 is allowed
    values[0, 0] = 255
    mask.write_bytes(png_bytes(values, "L"))
    match = f"mask {quoted(mask)} holds label value\\(s\\) 3, 77 outside 0..2"
    with pytest.raises(DataError, match=match):
        FolderDataset(str(tmp_path), "train")[1]


def test_raw_label_values_out_of_range_before_the_zero_shift(tmp_path: Path) -> None:
    # Context's PNGs hold 0..59; a 60 must be reported as 60, not as the shifted 59.
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClassContext").mkdir()
    (tmp_path / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (tmp_path / "ImageSets" / "SegmentationContext" / "train.txt").write_text("x\n")
    (tmp_path / "JPEGImages" / "x.jpg").write_bytes(jpeg_bytes(random_image()))
    mask = tmp_path / "SegmentationClassContext" / "x.png"
    mask.write_bytes(png_bytes(ids_mask(60), "L"))
    with pytest.raises(DataError, match=f"mask {quoted(mask)} holds raw label value\\(s\\) 60 "):
        PascalContextDataset(str(tmp_path), "train")[0]


def test_mask_with_colour_channels(tmp_path: Path) -> None:
    make_folder(tmp_path)
    mask = tmp_path / "masks" / "s0.png"
    mask.write_bytes(png_bytes(random_image()))  # an RGB "colour-coded" mask
    with pytest.raises(DataError, match=f"mask {quoted(mask)} has mode RGB with 3 channels"):
        FolderDataset(str(tmp_path), "train")[0]


# --- drop_bad_samples -------------------------------------------------------------------


def folder_with_one_bad_of_ten(root: Path) -> tuple[FolderDataset, Path]:
    make_folder(root, count=10)
    bad = root / "masks" / "s4.png"
    bad.write_bytes(png_bytes(ids_mask(77), "L"))
    return FolderDataset(str(root), "train"), bad


def test_drop_bad_samples_drops_and_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds, bad = folder_with_one_bad_of_ten(tmp_path)
    with caplog.at_level(logging.WARNING):
        problems = drop_bad_samples(ds, max_bad_fraction=0.2)
    assert len(problems) == 1 and str(bad) in problems[0] and "77" in problems[0]
    assert str(bad) in caplog.text
    assert len(ds) == 9 and all(sample.mask != bad for sample in ds.samples)
    for index in range(len(ds)):
        ds[index]  # every remaining sample reads


def test_drop_bad_samples_raises_above_the_fraction(tmp_path: Path) -> None:
    ds, bad = folder_with_one_bad_of_ten(tmp_path)
    with pytest.raises(DataError, match=f"1 of 10 samples are bad.*{quoted(bad)}"):
        drop_bad_samples(ds, max_bad_fraction=0.05)
    assert len(ds) == 10  # nothing dropped when it refuses


# --- unknown split names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "valid"),
    [(PascalVOCDataset, "train_aug"), (PascalContextDataset, "train, val"),
     (ADE20KDataset, "validation"), (CityscapesDataset, "train, val, test")],
)
def test_unknown_split_lists_valid_ones(tmp_path: Path, dataset: type, valid: str) -> None:
    with pytest.raises(ValueError, match=valid):
        dataset(str(tmp_path), "tran")
