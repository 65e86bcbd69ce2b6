"""Segmentation metrics from a confusion matrix accumulated over a whole split.

Rows of the confusion matrix are ground truth, columns predictions. Pixels labelled
255 are ignored. A class that appears neither in the ground truth nor in the
predictions of the split has no defined IoU: it is reported as ``None`` and left out of
the mean, which is the convention of the VOC and Cityscapes evaluation scripts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kaseg.data.base import IGNORE_INDEX


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """K x K int64 counts of (ground truth, prediction) pairs; ignore-label pixels skipped.

    Args:
        prediction: class ids, any shape.
        target: class ids or 255, same shape as ``prediction``.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    valid = target != IGNORE_INDEX
    if bool(((target[valid] < 0) | (target[valid] >= num_classes)).any()):
        raise ValueError(f"target holds ids outside 0..{num_classes - 1} and {IGNORE_INDEX}")
    pairs = target[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(
    matrix: torch.Tensor, class_names: Sequence[str] | None = None
) -> dict[str, object]:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy, in percent.

    Returns:
        ``miou``, ``pixel_acc``, ``mean_acc`` (floats, or None on an empty matrix),
        ``pixels`` (how many labelled pixels were counted),
        ``iou`` and ``acc`` (per-class dicts keyed by class name, None where undefined),
        and ``absent_classes`` (names with neither ground truth nor predictions).
    """
    matrix = matrix.double()
    num_classes = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix")
    true_positive = matrix.diag()
    gt_pixels = matrix.sum(1)
    predicted_pixels = matrix.sum(0)
    union = gt_pixels + predicted_pixels - true_positive
    present = union > 0
    iou = torch.where(present, true_positive / union.clamp(min=1), torch.nan)
    acc = torch.where(gt_pixels > 0, true_positive / gt_pixels.clamp(min=1), torch.nan)
    total = matrix.sum()

    def percent(value: torch.Tensor) -> float | None:
        return None if torch.isnan(value) else round(float(value) * 100, 4)

    return {
        "miou": percent(iou[present].mean()) if present.any() else None,
        "pixel_acc": percent(true_positive.sum() / total) if total > 0 else None,
        "mean_acc": percent(acc[gt_pixels > 0].mean()) if (gt_pixels > 0).any() else None,
        "pixels": int(total),
        "iou": {name: percent(value) for name, value in zip(names, iou)},
        "acc": {name: percent(value) for name, value in zip(names, acc)},
        "absent_classes": [name for name, p in zip(names, present) if not p],
    }
