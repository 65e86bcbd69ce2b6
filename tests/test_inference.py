"""Whole-image, sliding-window, multi-scale and flip inference, and `kaseg eval`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_STUDENT, run_kaseg, tiny_config, write_config

from kaseg.data.shapes import CLASSES
from kaseg.engine.inference import predict, sliding_window_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def pointwise(images: torch.Tensor) -> torch.Tensor:
    """A per-pixel 'model': its logits at a pixel depend only on that pixel."""
    weight = torch.arange(12, dtype=torch.float32).reshape(4, 3, 1, 1) / 10
    return F.conv2d(images, weight)


@pytest.mark.parametrize("size", [(20, 33), (8, 8), (5, 40)])
@pytest.mark.parametrize("crop, stride", [((8, 8), (8, 8)), ((8, 8), (5, 3)), ((16, 12), (10, 12))])
def test_sliding_window_equals_whole_image_for_a_pointwise_model(size, crop, stride):
    images = torch.randn(2, 3, *size)
    torch.testing.assert_close(sliding_window_logits(pointwise, images, crop, stride), pointwise(images))


def test_sliding_window_averages_overlaps():
    calls = []

    def constant(batch):
        calls.append(batch.shape[-2:])
        return torch.full((batch.shape[0], 1, *batch.shape[-2:]), float(len(calls)))

    out = sliding_window_logits(constant, torch.zeros(1, 3, 4, 6), (4, 4), (4, 2))
    # Windows at columns 0, 2 (both 4 wide): columns 2-3 average windows 1 and 2.
    assert len(calls) == 2
    assert out[0, 0, 0].tolist() == [1.0, 1.0, 1.5, 1.5, 2.0, 2.0]


def test_multiscale_and_flip_average_probabilities():
    images = torch.randn(1, 3, 16, 16)
    scores = predict(pointwise, images, scales=(1.0,), flip=True)
    # Pointwise models are flip-equivariant: the flipped copy agrees exactly.
    torch.testing.assert_close(scores, pointwise(images).softmax(1))
    multi = predict(pointwise, images, scales=(0.5, 1.0, 1.5))
    assert multi.shape == (1, 4, 16, 16)
    torch.testing.assert_close(multi.sum(1), torch.ones(1, 16, 16))


def test_bad_inference_options():
    with pytest.raises(ValueError, match="whole' or 'sliding"):
        predict(pointwise, torch.zeros(1, 3, 4, 4), mode="tiles")
    with pytest.raises(ValueError, match="stride"):
        sliding_window_logits(pointwise, torch.zeros(1, 3, 4, 4), (4, 4), (5, 5))


def test_kaseg_eval_json_in_every_mode(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "run", train={"iterations": 2}))
    run_kaseg("train", "--config", str(config))
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.pt")
    whole = json.loads(run_kaseg("eval", "--config", str(config), "--checkpoint", checkpoint, "--json").stdout)
    trained = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert whole["miou"] == pytest.approx([e for e in trained if e["split"] == "val"][-1]["miou"])
    assert list(whole["iou"]) == list(CLASSES)
    extra = run_kaseg(
        "eval", "--config", str(config), "--checkpoint", checkpoint, "--json",
        "--multi-scale", "0.75,1.0,1.25", "--flip", "--sliding", "24", "16",
    )
    metrics = json.loads(extra.stdout)
    assert 0 <= metrics["miou"] <= 100 and metrics["pixels"] == whole["pixels"]


def test_eval_refuses_a_checkpoint_for_another_class_count(tmp_path):
    from kaseg.config import load_config
    from kaseg.engine.checkpoint import CheckpointError, save_checkpoint
    from kaseg.models import build_model
    from kaseg.stages import evaluate_checkpoint

    model = build_model(num_classes=3, **TINY_STUDENT)
    save_checkpoint({"arch": model.arch, "model": model.state_dict()}, tmp_path / "three.pt")
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "x")))
    with pytest.raises(CheckpointError, match="predicts 3 classes but the data set has 8"):
        evaluate_checkpoint(config, tmp_path / "three.pt")
