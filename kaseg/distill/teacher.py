"""The frozen teacher of a distillation stage, with an optional cache of its outputs.

A distillation step spends most of its time in the teacher's forward pass, although
the teacher never changes. When the training augmentation is deterministic (no random
scale or crop, so every epoch shows the same images, at most flipped), the teacher's
final features can be computed once per distinct input and reused: that is what
``teacher.cache_mb`` turns on.

The cache is keyed by a hash of the exact bytes of each input image, so a hit can only
return the features of that very input; random augmentation simply never hits (and the
cache stops growing at its size limit). Misses are computed one image at a time: a
convolution's result for one image can differ in the last bit between batch sizes (on
the CPU, batch 1 takes another code path), and computing every entry the same way makes
a cached run, and a resumed one, independent of how the images were batched. The logits
are recomputed from the cached features with the teacher's classifier (a 1x1 conv and
an upsampling, negligible next to the backbone).
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn as nn

logger = logging.getLogger("kaseg")


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for good: the module is a fixed function from now on."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class TeacherFeatureStore:
    """Cached final features of one frozen teacher, keyed by input digest.

    One store may serve several stages of one process (the demo's auto-encoder and
    distillation stages read the same teacher on the same images): it remembers the
    fingerprint of the teacher it was filled by and refuses another.

    Args:
        cache_mb: memory for the features in MiB; when full, new inputs are computed every
            time (with one warning).
    """

    def __init__(self, cache_mb: float) -> None:
        if cache_mb < 0:
            raise ValueError(f"teacher.cache_mb must be >= 0, got {cache_mb}")
        self.capacity = int(cache_mb * 2**20)
        self.fingerprint: bytes | None = None
        self._features: dict[bytes, torch.Tensor] = {}
        self._bytes = 0
        self._full_warned = False

    def __len__(self) -> int:
        return len(self._features)

    def claim(self, teacher: nn.Module) -> None:
        """Binds the store to ``teacher`` (its weights, dtype and memory format)."""
        fingerprint = teacher_fingerprint(teacher)
        if self.fingerprint is None:
            self.fingerprint = fingerprint
        elif self.fingerprint != fingerprint:
            raise ValueError(
                "this teacher feature store was filled by another teacher (different weights, dtype or "
                "memory format); give each teacher its own store"
            )

    def get(self, key: bytes) -> torch.Tensor | None:
        return self._features.get(key)

    def put(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if self._bytes + size <= self.capacity:
            self._features[key] = features
            self._bytes += size
        elif not self._full_warned:
            self._full_warned = True
            logger.warning(
                "teacher cache full at %d entries (%.0f MiB); later inputs are computed every time "
                "(raise teacher.cache_mb, or set it to 0 when the augmentation is random)",
                len(self._features), self._bytes / 2**20,
            )


def teacher_fingerprint(teacher: nn.Module) -> bytes:
    """A digest of the teacher's weights, buffers, dtype and memory format."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape), tensor.is_contiguous())).encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


class TeacherOutputs:
    """``outputs(images) -> {"logits", "features"}`` of a frozen teacher, under inference mode.

    A plain callable, not a module: the teacher stays registered where it is owned (the
    Distiller's ``teacher``), and the cache is run state, never saved in a checkpoint.

    Args:
        teacher: a frozen segmenter (``forward`` returns ``{"logits", "features"}``). With
            a cache it must also have ``classify(features, size)``.
        cache_mb: memory for cached final features in MiB; 0 turns the cache off.
        store: a store to share with other stages (its own size applies); by default a
            new one of ``cache_mb``.

    Attributes:
        hits, misses: cache lookups so far (both 0 without a cache).
    """

    def __init__(self, teacher: nn.Module, *, cache_mb: float = 0, store: TeacherFeatureStore | None = None) -> None:
        if store is None and cache_mb > 0:
            store = TeacherFeatureStore(cache_mb)
        elif cache_mb < 0:
            raise ValueError(f"teacher.cache_mb must be >= 0, got {cache_mb}")
        if store is not None and not hasattr(teacher, "classify"):
            raise ValueError(
                f"teacher.cache_mb needs a teacher whose logits can be computed from its features "
                f"(a `classify(features, size)` method); {type(teacher).__name__} has none: set "
                "teacher.cache_mb=0"
            )
        self.teacher = teacher
        self.store = store
        self._claimed = False
        self.hits = 0
        self.misses = 0

    @property
    def cached_entries(self) -> int:
        return 0 if self.store is None else len(self.store)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.store is None:
            return self.teacher(images)
        if not self._claimed:  # on first use: the training loop may have moved or reformatted the teacher
            self.store.claim(self.teacher)
            self._claimed = True
        features = torch.stack([self._cached_features(image) for image in images])
        return {"logits": self.teacher.classify(features, images.shape[-2:]), "features": features}

    def _cached_features(self, image: torch.Tensor) -> torch.Tensor:
        key = _digest(image)
        found = self.store.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        features = self.teacher(image[None])["features"][0]
        self.store.put(key, features)
        return features


def _digest(image: torch.Tensor) -> bytes:
    data = image.detach().contiguous().cpu()
    return hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest() + bytes(
        str((tuple(data.shape), data.dtype)), "ascii"
    )
