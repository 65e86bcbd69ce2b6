"""Each on-disk layout, written in its real file format into tmp_path, read back exactly.

The fixtures draw a rectangle of class c in the image (a colour nothing else has) and
the same rectangle in the mask, so every test also checks that image and mask align
(same orientation, same size) and that raw label values map to the right class ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kaseg.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from kaseg.data.base import IGNORE_INDEX
from kaseg.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_TABLE,
    CityscapesDataset,
    label_ids_to_train_ids,
)
from kaseg.data.context import CONTEXT_CLASSES, PascalContextDataset
from kaseg.data.folder import FolderDataset
from kaseg.data.palettes import voc_colormap
from kaseg.data.voc import VOC_CLASSES, VOC_PALETTE, PascalVOCDataset

HEIGHT, WIDTH = 32, 40  # not square, so a transposed mask would not fit
MARK = (230, 20, 20)  # the colour of the marked rectangle in every image
BACKGROUND = (30, 60, 90)
BOX = (slice(8, 16), slice(16, 32))  # rows, columns: 8-aligned, off-centre both ways


def scene(raw_inside: int, raw_outside: int) -> tuple[np.ndarray, np.ndarray]:
    """An image with the MARK rectangle at BOX and a mask with ``raw_inside`` there."""
    image = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[BOX] = MARK
    mask = np.full((HEIGHT, WIDTH), raw_outside, dtype=np.uint8)
    mask[BOX] = raw_inside
    return image, mask


def save_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        Image.fromarray(image).save(path, quality=95, subsampling=0)
    else:
        Image.fromarray(image).save(path)


def save_palette_png(path: Path, ids: np.ndarray) -> None:
    """A VOC-style mask: mode 'P' storing ids as palette indices, with VOC's colour map."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(ids.astype(np.uint8), mode="P")
    mask.putpalette(voc_colormap(256).flatten().tolist())
    mask.save(path)


def save_gray_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def marked(image: np.ndarray) -> np.ndarray:
    """Pixels whose colour is (loosely, to allow for JPEG) the MARK colour."""
    distance = np.abs(image.astype(int) - np.array(MARK)).max(axis=-1)
    return distance < 40


def assert_aligned(image: np.ndarray, mask: np.ndarray, class_id: int, exact: bool) -> None:
    """The mask holds ``class_id`` exactly where the image shows the MARK colour."""
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    assert mask.shape == (HEIGHT, WIDTH) and mask.dtype == np.int64
    if exact:
        np.testing.assert_array_equal(mask == class_id, np.all(image == MARK, axis=-1))
    else:
        np.testing.assert_array_equal(mask == class_id, marked(image))


# --- Pascal VOC -------------------------------------------------------------------------


def write_voc(root: Path) -> dict[str, int]:
    """A VOC2012 folder; returns the class drawn into each id's image."""
    drawn = {"2007_000032": 1, "2007_000039": 15, "2008_000002": 20, "2009_000001": 7}
    for sample, class_id in drawn.items():
        image, ids = scene(class_id, 0)
        ids[BOX[0].start - 1, BOX[1]] = IGNORE_INDEX  # VOC's 255 border above the object
        save_image(root / "JPEGImages" / f"{sample}.jpg", image)
        save_palette_png(root / "SegmentationClass" / f"{sample}.png", ids)
        save_gray_png(root / "SegmentationClassAug" / f"{sample}.png", scene(class_id, 0)[1])
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    samples = list(drawn)
    (lists / "train.txt").write_text("\n".join(samples[:3]) + "\n")
    (lists / "val.txt").write_text(samples[3] + "\n")
    (lists / "trainval.txt").write_text("\n".join(samples) + "\n")
    # train_aug in the DeepLab form (image path, mask path) and the plain form mixed.
    (lists / "train_aug.txt").write_text(
        f"/JPEGImages/{samples[0]}.jpg /SegmentationClassAug/{samples[0]}.png\n"
        + "\n".join(samples[1:])
        + "\n"
    )
    return drawn


def test_voc_reads_palette_masks_and_aligns(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    drawn = write_voc(root)
    ds = PascalVOCDataset(str(root), "train")
    assert len(ds) == 3
    assert ds.classes == VOC_CLASSES and len(ds.classes) == 21 and ds.classes[0] == "background"
    assert ds.classes[15] == "person" and ds.classes[20] == "tvmonitor"
    assert ds.palette.shape == (21, 3) and ds.palette.dtype == np.uint8
    for index, (sample, class_id) in enumerate(list(drawn.items())[:3]):
        image, mask = ds[index]
        assert Path(ds.source(index)).name == f"{sample}.jpg"
        assert set(np.unique(mask).tolist()) == {0, class_id, IGNORE_INDEX}
        assert (mask[BOX[0].start - 1, BOX[1]] == IGNORE_INDEX).all()
        assert_aligned(image, mask, class_id, exact=False)


def test_voc_palette_is_the_official_colour_map() -> None:
    # Colours as published in the VOC devkit (VOCcode/VOClabelcolormap.m).
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]  # aeroplane
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]  # person
    assert VOC_PALETTE[20].tolist() == [0, 64, 128]  # tvmonitor
    assert voc_colormap(256)[255].tolist() == [224, 224, 192]  # the border colour
    assert len({tuple(c) for c in voc_colormap(256)}) == 256


def test_voc_accepts_vocdevkit_parent_and_other_splits(tmp_path: Path) -> None:
    write_voc(tmp_path / "VOCdevkit" / "VOC2012")
    assert len(PascalVOCDataset(str(tmp_path), "val")) == 1
    assert len(PascalVOCDataset(str(tmp_path), "trainval")) == 4


def test_voc_train_aug_reads_grayscale_masks(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    drawn = write_voc(root)
    ds = PascalVOCDataset(str(root), "train_aug")
    assert len(ds) == 4
    assert "SegmentationClassAug" in str(ds.samples[0].mask)
    for index, class_id in enumerate(drawn.values()):
        image, mask = ds[index]
        assert set(np.unique(mask).tolist()) == {0, class_id}  # no border in the aug masks
        assert_aligned(image, mask, class_id, exact=False)


def test_voc_aug_mask_dir_option(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    write_voc(root)
    (root / "SegmentationClassAug").rename(root / "SegAugIds")
    ds = PascalVOCDataset(str(root), "train_aug", aug_mask_dir="SegAugIds")
    assert ds.samples[0].mask.parent.name == "SegAugIds"


def test_voc_unknown_split_lists_the_valid_ones(tmp_path: Path) -> None:
    write_voc(tmp_path)
    with pytest.raises(ValueError, match="train_aug"):
        PascalVOCDataset(str(tmp_path), "test")


# --- Cityscapes -------------------------------------------------------------------------

# raw label id drawn in the box -> expected train id; the rest of each mask is label 0.
CITYSCAPES_CASES = {
    ("aachen", "aachen_000000_000019"): (7, 0),  # road
    ("aachen", "aachen_000001_000019"): (26, 13),  # car
    ("bremen", "bremen_000000_000019"): (33, 18),  # bicycle
    ("bremen", "bremen_000001_000019"): (29, IGNORE_INDEX),  # caravan: not evaluated
}


def write_cityscapes(root: Path, split: str = "train") -> None:
    for (city, stem), (label_id, _) in CITYSCAPES_CASES.items():
        image, label_ids = scene(label_id, 0)
        save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
        save_gray_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
    # Files the loader must not pick up.
    (root / "leftImg8bit" / split / "aachen" / "README.txt").write_text("not an image")
    (root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_color.png").touch()


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    write_cityscapes(tmp_path)
    ds = CityscapesDataset(str(tmp_path), "train")
    assert len(ds) == 4
    assert len(ds.classes) == 19 and ds.classes[0] == "road" and ds.classes[18] == "bicycle"
    assert ds.palette[13].tolist() == [0, 0, 142]  # car
    for index, ((_city, stem), (_label_id, train_id)) in enumerate(CITYSCAPES_CASES.items()):
        assert Path(ds.source(index)).name == f"{stem}_leftImg8bit.png"  # sorted order
        image, mask = ds[index]
        assert (mask[BOX] == train_id).all()
        outside = np.ones(mask.shape, dtype=bool)
        outside[BOX] = False
        assert (mask[outside] == IGNORE_INDEX).all()  # label 0 'unlabeled' -> 255
        if train_id != IGNORE_INDEX:
            assert_aligned(image, mask, train_id, exact=True)


def test_cityscapes_full_label_table() -> None:
    label_ids = np.arange(256).reshape(16, 16)
    train_ids = label_ids_to_train_ids(label_ids).ravel()
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for raw in range(256):
        assert train_ids[raw] == expected.get(raw, IGNORE_INDEX), raw
    assert label_ids_to_train_ids(np.array([-1, 300])).tolist() == [IGNORE_INDEX] * 2


def test_cityscapes_table_matches_torchvision() -> None:
    from torchvision.datasets import Cityscapes

    reference = sorted(
        (c.train_id, c.name, c.id, c.color) for c in Cityscapes.classes if not c.ignore_in_eval
    )
    ours = [(i, *row) for i, row in enumerate(CITYSCAPES_TABLE)]
    assert ours == reference
    assert CITYSCAPES_CLASSES == tuple(name for _, name, _, _ in reference)


# --- Pascal Context ---------------------------------------------------------------------


def write_context(root: Path, mask_dir: str = "SegmentationClassContext",
                  split_dir: str = "ImageSets/SegmentationContext") -> dict[str, tuple[int, int]]:
    """Returns raw PNG value in the box -> expected class id, per sample id."""
    drawn = {"2008_000002": (1, 0), "2008_000003": (59, 58), "2008_000007": (15, 14)}
    for sample, (raw, _) in drawn.items():
        image, ids = scene(raw, 0)  # 0 = background around the object
        save_image(root / "JPEGImages" / f"{sample}.jpg", image)
        save_gray_png(root / mask_dir / f"{sample}.png", ids)
    (root / split_dir).mkdir(parents=True)
    (root / split_dir / "train.txt").write_text("\n".join(list(drawn)[:2]) + "\n")
    (root / split_dir / "val.txt").write_text(list(drawn)[2] + "\n")
    return drawn


def test_context_ignores_background_and_shifts_classes(tmp_path: Path) -> None:
    drawn = write_context(tmp_path)
    ds = PascalContextDataset(str(tmp_path), "train")
    assert len(ds) == 2
    assert len(ds.classes) == 59 and ds.classes[0] == "aeroplane" and ds.classes[-1] == "wood"
    assert ds.classes[14] == "cat" and ds.palette.shape == (59, 3)
    for index, (_raw, class_id) in enumerate(list(drawn.values())[:2]):
        image, mask = ds[index]
        assert set(np.unique(mask).tolist()) == {class_id, IGNORE_INDEX}
        assert_aligned(image, mask, class_id, exact=False)


def test_context_options_and_val_split(tmp_path: Path) -> None:
    write_context(tmp_path / "VOCdevkit" / "VOC2012", mask_dir="ctx59", split_dir="lists")
    ds = PascalContextDataset(str(tmp_path), "val", mask_dir="ctx59", split_dir="lists")
    image, mask = ds[0]
    assert set(np.unique(mask).tolist()) == {14, IGNORE_INDEX}  # raw 15 = cat
    assert CONTEXT_CLASSES[14] == "cat"


# --- ADE20K -----------------------------------------------------------------------------


def write_ade20k(root: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """An ADEChallengeData2016 folder; returns folder -> stem -> (raw in box, class id)."""
    drawn = {
        "training": {"ADE_train_00000001": (1, 0), "ADE_train_00000002": (150, 149)},
        "validation": {"ADE_val_00000001": (13, 12)},
    }
    for folder, samples in drawn.items():
        for stem, (raw, _) in samples.items():
            image, ids = scene(raw, 0)  # 0 = "other" around the object
            save_image(root / "images" / folder / f"{stem}.jpg", image)
            save_gray_png(root / "annotations" / folder / f"{stem}.png", ids)
    return drawn


def test_ade20k_shifts_labels_and_ignores_zero(tmp_path: Path) -> None:
    drawn = write_ade20k(tmp_path / "ADEChallengeData2016")
    ds = ADE20KDataset(str(tmp_path / "ADEChallengeData2016"), "train")
    assert len(ds) == 2
    assert len(ds.classes) == 150 and len(set(ds.classes)) == 150
    assert ds.classes[0] == "wall" and ds.classes[12] == "person"
    assert ds.classes[149] == "flag" and ds.classes[44] == "chest of drawers"
    for index, (_raw, class_id) in enumerate(drawn["training"].values()):
        image, mask = ds[index]
        assert set(np.unique(mask).tolist()) == {class_id, IGNORE_INDEX}
        assert_aligned(image, mask, class_id, exact=False)


@pytest.mark.parametrize("split", ["val", "validation"])
def test_ade20k_accepts_parent_root_and_folder_names(tmp_path: Path, split: str) -> None:
    write_ade20k(tmp_path / "ADEChallengeData2016")
    ds = ADE20KDataset(str(tmp_path), split)
    assert len(ds) == 1 and Path(ds.source(0)).name == "ADE_val_00000001.jpg"
    assert set(np.unique(ds[0][1]).tolist()) == {12, IGNORE_INDEX}
    assert ADE20K_CLASSES[12] == "person"


# --- Generic folder ---------------------------------------------------------------------


def write_folder(root: Path, classes: object, count: int = 6) -> list[str]:
    """``count`` samples; sample i marks class 1 + i % 2 on 0 or 255, PNG or JPEG images."""
    stems = [f"img_{i:02d}" for i in range(count)]
    for i, stem in enumerate(stems):
        image, ids = scene(1 + i % 2, IGNORE_INDEX if i % 3 else 0)
        save_image(root / "images" / f"{stem}{'.png' if i % 2 else '.jpg'}", image)
        save_gray_png(root / "masks" / f"{stem}.png", ids)
    (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    return stems


def test_folder_with_split_lists(tmp_path: Path) -> None:
    stems = write_folder(tmp_path, ["background", "road", "car"])
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("img_01\nimg_03\nimg_04\n")
    ds = FolderDataset(str(tmp_path), "train")
    assert len(ds) == 3 and ds.classes == ("background", "road", "car")
    assert ds.palette.tolist() == voc_colormap(3).tolist()  # no colours given
    for index, i in enumerate([1, 3, 4]):
        assert Path(ds.source(index)).stem == stems[i]
        image, mask = ds[index]
        # PNG images (odd i) are pixel exact; JPEG ones are compared loosely.
        assert_aligned(image, mask, 1 + i % 2, exact=bool(i % 2))


def test_folder_classes_with_colours(tmp_path: Path) -> None:
    write_folder(tmp_path, [{"name": "background", "color": [1, 2, 3]}, {"name": "road"},
                            {"name": "car", "color": [0, 0, 142]}])
    ds = FolderDataset(str(tmp_path), "train", split_ratio=0.5)
    assert ds.classes == ("background", "road", "car")
    assert ds.palette.tolist() == [[1, 2, 3], voc_colormap(2)[1].tolist(), [0, 0, 142]]


def test_folder_split_ratio_is_disjoint_and_seeded(tmp_path: Path) -> None:
    stems = write_folder(tmp_path, ["a", "b", "c"], count=10)
    classes_file = tmp_path / "names.yaml"
    (tmp_path / "classes.yaml").rename(classes_file)

    def split_stems(split: str, seed: int) -> list[str]:
        ds = FolderDataset(
            str(tmp_path), split, classes_file=str(classes_file), split_ratio=0.7, split_seed=seed
        )
        return [Path(ds.source(i)).stem for i in range(len(ds))]

    train, val = split_stems("train", 0), split_stems("val", 0)
    assert len(train) == 7 and len(val) == 3
    assert not set(train) & set(val) and sorted(train + val) == stems
    assert split_stems("train", 0) == train  # deterministic
    assert {tuple(split_stems("train", seed)) for seed in range(5)} != {tuple(train)}


def test_folder_split_ratio_and_split_lists_conflict(tmp_path: Path) -> None:
    write_folder(tmp_path, ["a", "b", "c"])
    (tmp_path / "splits").mkdir()
    with pytest.raises(ValueError, match="split_ratio"):
        FolderDataset(str(tmp_path), "train", split_ratio=0.5)
