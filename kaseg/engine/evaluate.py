"""Evaluation over a whole split: confusion matrix summed over batches and processes."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kaseg.engine.distributed import all_reduce_sum, is_main_process
from kaseg.engine.inference import LogitsFn, predict
from kaseg.engine.metrics import confusion_matrix, segmentation_metrics


@torch.no_grad()
def evaluate(
    logits_fn: LogitsFn,
    loader: DataLoader,
    *,
    num_classes: int,
    class_names: Sequence[str],
    device: torch.device,
    inference: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs ``logits_fn`` over every batch of ``loader`` and returns the split's metrics.

    Args:
        logits_fn: normalised images B x 3 x H x W -> class scores B x K x H x W.
        loader: the (sharded) evaluation loader of this process.
        inference: keyword arguments of :func:`kaseg.engine.inference.predict` (mode,
            crop_size, stride, scales, flip).
        progress: show a progress bar (on the main process only).

    Returns:
        :func:`segmentation_metrics` of the confusion matrix summed over all processes.
    """
    matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    for images, masks in tqdm(
        loader, desc="eval", leave=False, disable=not (progress and is_main_process())
    ):
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        scores = predict(logits_fn, images, **(inference or {}))
        matrix += confusion_matrix(scores.argmax(1), masks, num_classes)
    all_reduce_sum(matrix)
    return segmentation_metrics(matrix.cpu(), class_names)


def inference_options(eval_config: Any, default_crop: tuple[int, int]) -> dict[str, Any]:
    """:func:`predict` keyword arguments from an EvalConfig."""
    return dict(
        mode=eval_config.mode,
        crop_size=tuple(eval_config.crop_size or default_crop),
        stride=tuple(eval_config.stride) if eval_config.stride else None,
        scales=tuple(eval_config.scales),
        flip=eval_config.flip,
    )
