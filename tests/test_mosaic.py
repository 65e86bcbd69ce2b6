"""The built-in benchmark data set (texture mosaics): determinism, splits, balance, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaseg.config import DataConfig
from kaseg.data import build_train_dataset
from kaseg.data.mosaic import CLASSES, PALETTE, MosaicDataset

SIZE = 64  # the properties hold at any size; small keeps the test fast


def test_deterministic_per_seed_and_index():
    a = MosaicDataset(split="train", seed=5, size=SIZE)
    b = MosaicDataset(split="train", seed=5, size=SIZE)
    for index in (0, 3, 1999):
        (image_a, mask_a), (image_b, mask_b) = a[index], b[index]
        assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    other_seed = MosaicDataset(split="train", seed=6, size=SIZE)
    assert not np.array_equal(a[0][0], other_seed[0][0])
    assert not np.array_equal(a[0][0], a[1][0])
    with pytest.raises(IndexError):
        a[2000]


def test_splits_are_disjoint():
    train = MosaicDataset(split="train", size=SIZE, num_images=300)
    val = MosaicDataset(split="val", size=SIZE, num_val_images=300)
    test = MosaicDataset(split="test", size=SIZE, num_val_images=300)
    seen = {train[i][0].tobytes() for i in range(len(train))}
    assert not any(val[i][0].tobytes() in seen for i in range(len(val)))
    seen |= {val[i][0].tobytes() for i in range(len(val))}
    assert not any(test[i][0].tobytes() in seen for i in range(len(test)))


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_class_present_and_balanced(split):
    dataset = MosaicDataset(split=split, size=SIZE, num_images=200, num_val_images=200)
    pixels = np.zeros(len(CLASSES), dtype=np.int64)
    images_with = np.zeros(len(CLASSES), dtype=np.int64)
    for index in range(len(dataset)):
        image, mask = dataset[index]
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.int64
        counts = np.bincount(mask.ravel(), minlength=len(CLASSES))
        pixels += counts
        images_with += counts > 0
    share = pixels / pixels.sum()
    # Uniform class draws: each class holds 1/8 of the pixels up to sampling noise.
    assert share.min() > 0.5 / len(CLASSES) and share.max() < 1.5 / len(CLASSES), share
    assert (images_with >= 0.25 * len(dataset)).all(), images_with


def test_regions_are_large_against_a_stride_16_grid():
    dataset = MosaicDataset(split="train", size=128, num_images=30)
    for index in range(len(dataset)):
        _, mask = dataset[index]
        # Voronoi regions of one class: no class covers less than a 16x16 cell's worth of an image it is in.
        counts = np.bincount(mask.ravel(), minlength=len(CLASSES))
        assert counts[counts > 0].min() >= 16 * 16 // 2


def test_class_is_the_texture_not_the_colour():
    """Mean colour carries no class information: per-class mean colours are all alike."""
    dataset = MosaicDataset(split="train", size=SIZE, num_images=150)
    sums = np.zeros((len(CLASSES), 3))
    counts = np.zeros(len(CLASSES))
    for index in range(len(dataset)):
        image, mask = dataset[index]
        for label in np.unique(mask):
            sums[label] += image[mask == label].mean(0)
            counts[label] += 1
    means = sums / counts[:, None]
    assert np.ptp(means, axis=0).max() < 25, means


def test_stripes_orientation_is_the_class():
    """The dominant spatial frequency of a stripes region points along its class angle."""
    dataset = MosaicDataset(split="train", size=128, num_images=60, difficulty=0.0, min_regions=1, max_regions=1)
    checked = 0
    for index in range(len(dataset)):
        image, mask = dataset[index]
        label = int(mask[0, 0])
        if not CLASSES[label].startswith("stripes"):
            continue
        grey = image.mean(2) - image.mean()
        power = np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2
        power[64, 64] = 0
        fy, fx = np.unravel_index(power.argmax(), power.shape)
        # The intensity varies across the stripes: the frequency vector is perpendicular to them.
        across = np.degrees(np.arctan2(fy - 64, fx - 64)) % 180
        along = (across - 90) % 180
        expected = float(CLASSES[label].split("_")[1])
        difference = min(abs(along - expected), 180 - abs(along - expected))
        assert difference <= 12 + 6, (index, CLASSES[label], along)
        checked += 1
    assert checked >= 10


def test_palette_has_a_colour_per_class():
    assert PALETTE.shape == (len(CLASSES), 3)
    assert len({tuple(c) for c in PALETTE}) == len(CLASSES)


@pytest.mark.parametrize(
    "option, value",
    [("size", 8), ("difficulty", -0.1), ("min_regions", 0), ("num_images", 0), ("orientation_jitter", 30.0)],
)
def test_rejects_bad_parameters(option, value):
    with pytest.raises(ValueError, match=option):
        MosaicDataset(**{option: value})


def test_training_with_mirror_flips_is_refused():
    config = DataConfig(name="mosaic", options={"num_images": 4, "size": 32}, crop_size=(32, 32), hflip=True)
    with pytest.raises(ValueError, match="data.hflip.*stripes_45 into stripes_135"):
        build_train_dataset(config)
    assert len(build_train_dataset(DataConfig(name="mosaic", options={"num_images": 4, "size": 32},
                                              crop_size=(32, 32), hflip=False))) == 4


@pytest.mark.parametrize("dataset_class", ["mosaic", "shapes"])
def test_cache_returns_the_drawn_images_and_is_not_changed_by_callers(dataset_class):
    from kaseg.data import DATASETS

    cls = DATASETS[dataset_class]
    drawn = cls(split="val", size=SIZE, num_val_images=5)
    cached = cls(split="val", size=SIZE, num_val_images=5, cache=True)
    for index in (0, 4):
        first_image, first_mask = cached[index]
        assert first_mask.dtype == drawn[index][1].dtype
        first_image[:] = 0  # a caller changing its copy in place
        first_mask[:] = 0
        again_image, again_mask = cached[index]
        assert np.array_equal(again_image, drawn[index][0]) and np.array_equal(again_mask, drawn[index][1])
    assert sorted(cached._cache) == [0, 4]  # drawn once each, then kept


def test_cache_is_a_data_option_and_changes_no_batch():
    options = {"num_images": 6, "size": 32}
    common = dict(name="mosaic", crop_size=(32, 32), hflip=False, scale_range=(1.0, 1.0))  # the mosaic configs'
    plain = build_train_dataset(DataConfig(options=options, **common))
    cached = build_train_dataset(DataConfig(options={**options, "cache": True}, **common))
    for index in range(6):
        for _ in range(2):
            (image_a, mask_a), (image_b, mask_b) = plain[index], cached[index]
            assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
