"""The built-in data set, the joint transforms and the resumable samplers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kaseg.config import DataConfig
from kaseg.data import DataError, build_raw_dataset, build_train_dataset
from kaseg.data.loader import ShardSampler, TrainSampler, collate
from kaseg.data.shapes import CLASSES, ShapesDataset
from kaseg.data.transforms import TransformedDataset, eval_transform, train_transform


def test_shapes_is_deterministic_and_splits_differ():
    a, b = ShapesDataset(split="train", seed=3), ShapesDataset(split="train", seed=3)
    for index in (0, 7, 1999):
        assert np.array_equal(a[index][0], b[index][0]) and np.array_equal(a[index][1], b[index][1])
    val = ShapesDataset(split="val", seed=3)
    train_images = {a[i][0].tobytes() for i in range(200)}
    assert not any(val[i][0].tobytes() in train_images for i in range(200))
    assert len(ShapesDataset(split="val", num_val_images=37)) == 37


def test_shapes_has_every_class_with_the_right_structure():
    dataset = ShapesDataset(split="train", size=64)
    counts = np.zeros(len(CLASSES), dtype=np.int64)
    for index in range(300):
        image, mask = dataset[index]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.min() >= 0 and mask.max() < len(CLASSES)
        # The frame (the scene cue) is background; day and night classes never mix.
        assert (mask[:2] == 0).all() and (mask[:, -2:] == 0).all()
        present = set(np.unique(mask).tolist())
        assert not ({1, 3} & present and {2, 4} & present)
        counts += np.bincount(mask.ravel(), minlength=len(CLASSES))
    assert (counts > 0).all()
    # Wires are thin: much less area per object than discs.
    assert counts[CLASSES.index("wire")] < counts[CLASSES.index("disc_day")]


def test_shapes_scene_cue_is_the_frame_colour():
    dataset = ShapesDataset(split="train", difficulty=0.0)
    for index in range(40):
        image, mask = dataset[index]
        frame_brightness = image[0].mean()
        present = set(np.unique(mask).tolist())
        if {1, 3} & present:
            assert frame_brightness > 150  # day: light frame
        if {2, 4} & present:
            assert frame_brightness < 100  # night: dark frame


@pytest.mark.parametrize("option, value", [("size", 8), ("difficulty", 2.0), ("min_objects", 0), ("num_images", 0)])
def test_shapes_rejects_bad_parameters(option, value):
    with pytest.raises(ValueError, match=option):
        ShapesDataset(**{option: value})


def test_unknown_dataset_and_options_are_errors():
    with pytest.raises(ValueError, match="unknown data set 'nope'; valid: .*shapes"):
        build_raw_dataset(DataConfig(name="nope"), "train")
    with pytest.raises(ValueError, match=r"\['sizee'\] are not options of data set 'shapes'"):
        build_raw_dataset(DataConfig(name="shapes", options={"sizee": 3}), "train")
    with pytest.raises(DataError, match="needs data.root"):
        build_raw_dataset(DataConfig(name="voc"), "train")


class Stripes:
    """A raw data set whose mask can be recomputed from the image: class = column // 24 % 4,
    drawn as a distinct grey level, so any misalignment after a transform is visible."""

    classes = ("a", "b", "c", "d")

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        columns = np.arange(96 + 8 * index)
        labels = (columns // 24) % 4
        mask = np.tile(labels, (30, 1))
        image = np.repeat((40 + 60 * mask)[..., None], 3, axis=2).astype(np.uint8)
        return image, mask


@pytest.mark.parametrize("seed", range(8))
def test_train_transform_keeps_mask_on_image(seed):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    dataset = TransformedDataset(
        Stripes(), train_transform(crop_size=(24, 24), scale_range=(0.5, 2.0), mean=mean, std=std)
    )
    image, mask = dataset[(seed % 4, seed)]
    assert image.shape == (3, 24, 24) and mask.shape == (24, 24) and mask.dtype == torch.int64
    grey = (image[0] * std[0] + mean[0]) * 255
    labelled = mask != 255
    # Away from stripe edges (where bilinear resizing blends greys), grey level = class.
    expected = 40 + 60 * mask[labelled].float()
    close = (grey[labelled] - expected).abs() < 6
    assert close.float().mean() > 0.7
    # Padding (scale < 1) is the ignore label on the mask and the mean colour on the image.
    if not labelled.all():
        assert torch.allclose(image[:, ~labelled], torch.zeros(()), atol=0.02)


def test_transform_is_a_function_of_the_seed_only():
    dataset = TransformedDataset(Stripes(), train_transform(crop_size=(16, 16)))
    torch.manual_seed(0)
    first = dataset[(1, 42)]
    torch.manual_seed(123)
    second = dataset[(1, 42)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    state = torch.get_rng_state()
    dataset[(2, 7)]
    assert torch.equal(state, torch.get_rng_state()), "seeded transforms must not touch the global RNG"


def test_eval_transform_keeps_full_image():
    image, mask = TransformedDataset(Stripes(), eval_transform())[(3, 0)]
    assert image.shape == (3, 30, 120) and mask.shape == (30, 120)


def test_train_dataset_from_config():
    config = DataConfig(name="shapes", options={"num_images": 10, "size": 32}, crop_size=(24, 20))
    image, mask = build_train_dataset(config)[(0, 1)]
    assert image.shape == (3, 24, 20) and mask.shape == (24, 20)


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_train_sampler_resumes_and_shards_like_one_big_batch():
    whole = take(TrainSampler(10, 6, seed=1), 36)  # 6 iterations of batch 6, 3.6 epochs
    resumed = take(TrainSampler(10, 6, seed=1, start_iteration=4), 12)
    assert resumed == whole[24:36]
    rank0 = take(TrainSampler(10, 3, seed=1, rank=0, world_size=2), 18)
    rank1 = take(TrainSampler(10, 3, seed=1, rank=1, world_size=2), 18)
    for iteration in range(6):
        batch = whole[6 * iteration : 6 * iteration + 6]
        assert rank0[3 * iteration : 3 * iteration + 3] + rank1[3 * iteration : 3 * iteration + 3] == batch
    # Each epoch is a permutation of the data set.
    assert sorted(index for index, _ in whole[:10]) == list(range(10))
    assert len({seed for _, seed in whole}) == len(whole)


def test_shard_sampler_counts_every_sample_once():
    shards = [list(ShardSampler(11, rank, 3)) for rank in range(3)]
    assert sorted(itertools.chain(*shards)) == list(range(11))


def test_collate_refuses_mixed_sizes_with_a_fix():
    with pytest.raises(ValueError, match="val_batch_size=1"):
        collate([(torch.zeros(3, 4, 4), torch.zeros(4, 4)), (torch.zeros(3, 5, 4), torch.zeros(5, 4))])
