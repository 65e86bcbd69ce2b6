"""Confusion-matrix metrics against a plain NumPy reference, and the poly schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaseg.engine.metrics import confusion_matrix, segmentation_metrics
from kaseg.engine.schedule import poly_lr, poly_lr_factor


def numpy_reference(prediction: np.ndarray, target: np.ndarray, num_classes: int):
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(target.ravel(), prediction.ravel()):
        if t != 255:
            matrix[t, p] += 1
    ious, accs = [], []
    for k in range(num_classes):
        tp = matrix[k, k]
        fn = matrix[k].sum() - tp
        fp = matrix[:, k].sum() - tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else None)
        accs.append(tp / matrix[k].sum() if matrix[k].sum() > 0 else None)
    present = [v for v in ious if v is not None]
    return {
        "matrix": matrix,
        "miou": 100 * sum(present) / len(present),
        "pixel_acc": 100 * np.trace(matrix) / matrix.sum(),
        "mean_acc": 100 * np.mean([a for a in accs if a is not None]),
        "iou": ious,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    num_classes = 6
    # Class 5 never appears anywhere; class 4 only in predictions.
    target = rng.integers(0, 4, size=(3, 17, 23))
    target[rng.random(target.shape) < 0.2] = 255
    prediction = rng.integers(0, 5, size=target.shape)
    reference = numpy_reference(prediction, target, num_classes)

    matrix = confusion_matrix(torch.from_numpy(prediction), torch.from_numpy(target), num_classes)
    np.testing.assert_array_equal(matrix.numpy(), reference["matrix"])
    metrics = segmentation_metrics(matrix, [f"c{k}" for k in range(num_classes)])
    assert metrics["miou"] == pytest.approx(reference["miou"], abs=1e-3)
    assert metrics["pixel_acc"] == pytest.approx(reference["pixel_acc"], abs=1e-3)
    assert metrics["mean_acc"] == pytest.approx(reference["mean_acc"], abs=1e-3)
    assert metrics["iou"]["c5"] is None
    assert metrics["absent_classes"] == ["c5"]
    assert metrics["iou"]["c4"] == 0.0  # predicted but never true: IoU 0, counted
    for k, value in enumerate(reference["iou"][:5]):
        assert metrics["iou"][f"c{k}"] == pytest.approx(100 * value, abs=1e-3)


def test_confusion_matrices_add_up_over_batches():
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.integers(0, 3, size=(4, 8, 8)))
    prediction = torch.from_numpy(rng.integers(0, 3, size=(4, 8, 8)))
    whole = confusion_matrix(prediction, target, 3)
    parts = sum(confusion_matrix(prediction[i : i + 1], target[i : i + 1], 3) for i in range(4))
    assert torch.equal(whole, parts)


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), 3)


def test_perfect_prediction():
    target = torch.tensor([[0, 1], [2, 255]])
    metrics = segmentation_metrics(confusion_matrix(target.clamp(max=2), target, 3))
    assert metrics["miou"] == 100.0 and metrics["pixel_acc"] == 100.0


def test_poly_schedule_values():
    assert poly_lr_factor(0, 100) == 1.0
    assert poly_lr_factor(50, 100, power=0.9) == pytest.approx(0.5**0.9)
    assert poly_lr_factor(100, 100) == 0.0
    assert poly_lr_factor(0, 100, warmup_iterations=10, warmup_factor=0.1) == pytest.approx(0.1)
    assert poly_lr_factor(5, 100, warmup_iterations=10, warmup_factor=0.1) == pytest.approx(
        (0.1 + 0.9 * 0.5) * (1 - 0.05) ** 0.9
    )
    assert poly_lr_factor(10, 100, warmup_iterations=10) == pytest.approx(0.9**0.9)


def test_poly_scheduler_steps_the_optimizer():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.01)
    scheduler = poly_lr(optimizer, 10, power=1.0)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.01 * (1 - i / 10) for i in range(10)])
