"""Joint image/mask transforms on torchvision.transforms.v2 (tv_tensors.Image + tv_tensors.Mask).

Training: random scale, random crop padded with the mean colour (image) and the ignore
label (mask), horizontal flip, optional photometric jitter, normalisation. Evaluation
keeps the full image and only normalises. Masks are always resized with nearest
neighbour (v2 does this for ``tv_tensors.Mask``), so labels are never blended.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from kaseg.data.base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomScale(v2.Transform):
    """Resizes image and mask by one factor drawn uniformly from ``scale_range``."""

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = torch.empty(()).uniform_(*self.scale_range).item()
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)


def to_tv_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """H x W x 3 uint8 and H x W int arrays -> 3 x H x W Image and H x W int64 Mask."""
    image_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    mask_t = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)).long())
    return image_t, mask_t


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std))]


def train_transform(
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    color_jitter: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The DeepLab training augmentation; output image 3 x crop_h x crop_w, mask crop_h x crop_w."""
    mean_pixel = [round(255 * m) for m in mean]
    steps: list[v2.Transform] = [
        RandomScale(scale_range),
        v2.RandomCrop(
            list(crop_size),
            pad_if_needed=True,
            fill={tv_tensors.Image: mean_pixel, tv_tensors.Mask: IGNORE_INDEX},
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    return v2.Compose(steps + _normalise(mean, std))


def eval_transform(
    *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    return v2.Compose(_normalise(mean, std))


class TransformedDataset(torch.utils.data.Dataset):
    """Applies a joint transform to a raw data set's (image, mask) arrays.

    Indexing with ``(index, seed)`` runs the transform under RNGs seeded with ``seed``,
    so each sample's augmentation is a pure function of the data order, whatever worker
    reads it: this is what makes resumed runs bit-identical. A plain integer index
    leaves the RNG alone.
    """

    def __init__(self, dataset: Any, transform: v2.Transform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.dataset[index]
        inputs = to_tv_tensors(image, mask)
        if seed is None:
            image_t, mask_t = self.transform(*inputs)
        else:
            # Forked so that seeding here never disturbs the caller's RNG streams.
            python_state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                image_t, mask_t = self.transform(*inputs)
            random.setstate(python_state)
        return image_t.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor)
