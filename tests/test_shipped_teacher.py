"""The trained teacher shipped for the built-in benchmark still loads and still scores what
the README says, so a change of the data generator or the model code cannot stale it silently."""

from __future__ import annotations

import pytest
import torch

from kaseg.config import load_config
from kaseg.stages import SegmentationEvaluator, load_segmenter
from kaseg.tools.demo import CONFIGS, SHIPPED_TEACHER

pytestmark = pytest.mark.usefixtures("one_thread")

# mIoU of the shipped teacher on the first SLICE validation images, measured when it was shipped
# (on the CPU; the tolerance allows for other BLAS kernels, not for another generator or model).
SLICE = 48
EXPECTED_MIOU = 85.2378  # the whole 500-image split: 85.50


def test_shipped_teacher_loads_and_scores_on_a_validation_slice():
    assert SHIPPED_TEACHER.is_file(), "the shipped teacher is missing; see the README for its command"
    assert SHIPPED_TEACHER.stat().st_size < 30 * 2**20
    config = load_config(CONFIGS / "student.yaml", [f"data.options.num_val_images={SLICE}", "data.workers=0"])
    evaluator = SegmentationEvaluator(config, torch.device("cpu"))
    teacher = load_segmenter(SHIPPED_TEACHER, num_classes=evaluator.num_classes)
    assert teacher.arch["name"] == "deeplabv3plus_resnet18" and teacher.feature_stride == 8
    with torch.inference_mode():
        metrics = evaluator.evaluate(lambda images: teacher(images)["logits"])
    assert metrics["miou"] == pytest.approx(EXPECTED_MIOU, abs=0.05)
