"""Diagnostics: fitted-grid ceilings against hand-made cases, and `kaseg diagnose` on tiny runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_STUDENT, tiny_config

from kaseg import stages
from kaseg.cli import main
from kaseg.config import Config, from_dict
from kaseg.tools.diagnose import _still_rising, fitted_grid_predictions, grid_ceiling, notes

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["a", "b", "c"]


def test_grid_fitted_to_the_truth_at_stride_one_is_perfect():
    truth = torch.randint(0, 3, (2, 16, 16))
    truth[0, :2] = 255
    assert grid_ceiling(truth, truth, NAMES, 1, steps=100)["miou"] == 100.0


def test_a_coarse_grid_draws_blocks_but_not_a_checkerboard():
    halves = torch.zeros(1, 32, 32, dtype=torch.long)
    halves[:, :, 16:] = 1  # the edge lies between two cell centres of the stride-8 grid
    assert grid_ceiling(halves, halves, NAMES, 8, steps=150)["miou"] == 100.0
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2  # 1-pixel checkerboard
    fitted = fitted_grid_predictions(checker[None], 3, 8, steps=50)
    assert (fitted == checker).float().mean() < 0.75  # a stride-8 grid cannot alternate every pixel


def test_the_ceiling_scores_a_target_against_the_truth():
    truth = torch.zeros(1, 16, 16, dtype=torch.long)
    truth[:, :, 8:] = 1
    wrong_half = truth.clone()
    wrong_half[:, :8] = 2  # a "teacher" wrong on the top half
    result = grid_ceiling(wrong_half, truth, NAMES, 1, steps=10)
    # Against the truth: class a top-left is predicted c (IoU 0 for c), the rest is right.
    assert result["iou"]["b"] == pytest.approx(50.0)
    assert result["iou"]["a"] == pytest.approx(50.0)
    assert result["iou"]["c"] == 0.0


def test_still_rising_and_notes():
    assert _still_rising([(i, 10.0 * i) for i in range(1, 9)]) is True
    assert _still_rising([(i, 50.0) for i in range(1, 9)]) is False
    assert _still_rising([(1, 10.0)]) is None
    result = {
        "runs": [
            {"name": "alone", "train_miou": 60.0, "val_miou": 59.5, "gap": 0.5, "still_rising": True,
             "iou": {"a": 50.0, "b": 70.0}},
            {"name": "distilled", "train_miou": 66.0, "val_miou": 62.0, "gap": 4.0, "still_rising": False,
             "iou": {"a": 58.0, "b": 66.0}},
        ],
        "teacher": {"val_miou": 75.0},
        "headroom": {"stride": 16, "teacher_grid_miou": 70.0, "ground_truth_grid_miou": 85.0},
    }
    text = "\n".join(notes(result))
    assert "alone: train 60.0 vs val 59.5 mIoU: no generalisation gap" in text
    assert "alone: validation mIoU was still rising" in text
    assert "distilled" not in text.split("\n")[0]
    assert "stride-16 grid would score 70.0 (+8.0 over the best run here)" in text
    assert "distilled vs alone: +2.50 mIoU; most gained a (+8.0), most lost b (-4.0)" in text


def test_kaseg_diagnose_on_tiny_runs(tmp_path, capsys):
    data = {"name": "mosaic", "options": {"num_images": 8, "num_val_images": 6, "size": 32},
            "crop_size": [32, 32], "scale_range": [1.0, 1.0], "hflip": False}

    def config(name, **sections):
        return from_dict(Config, tiny_config(tmp_path, name, data=data, **sections))

    stages.train_segmenter(config("teacher", train={"iterations": 2}, model={
        "name": "deeplabv3plus_resnet18", "output_stride": 8, "decoder_stride": 8, "head_channels": 8,
        "width": 1.0, "aspp": True}), progress=False)
    checkpoint = tmp_path / "teacher" / "checkpoints" / "last.pt"
    stages.train_segmenter(config("student", train={"iterations": 3, "eval_every": 1}, model=TINY_STUDENT),
                           progress=False)
    stages.distill(config("distilled", train={"iterations": 3}, model=TINY_STUDENT,
                          teacher={"checkpoint": str(checkpoint)},
                          distill={"autoencoder": False, "losses": [{"name": "kd"}]}), progress=False)

    capsys.readouterr()
    main(["diagnose", str(tmp_path / "student"), str(tmp_path / "distilled"), "--steps", "5",
          "--train-images", "4", "--out", str(tmp_path / "diag"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "diag" / "diagnosis.json").read_text()) == report
    assert [run["name"] for run in report["runs"]] == ["student", "distilled"]
    alone = report["runs"][0]
    assert [iteration for iteration, _ in alone["curve"]] == [1, 2, 3]
    assert alone["gap"] == pytest.approx(alone["train_miou"] - alone["val_miou"])
    assert report["train_images"] == 4 and report["val_images"] == 6
    assert report["teacher"]["checkpoint"] == str(checkpoint)  # found in the distillation run's config
    assert report["headroom"]["stride"] == 16
    assert 0 <= report["headroom"]["teacher_grid_miou"] <= 100
    main(["diagnose", str(tmp_path / "student"), "--steps", "2", "--train-images", "2"])
    text = capsys.readouterr().out
    assert "train mIoU" in text and "student" in text and report["headroom"] is not None
