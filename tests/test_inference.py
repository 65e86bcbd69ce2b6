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


def _train_tiny(tmp_path, capsys) -> tuple[str, str]:
    from kaseg.cli import main

    config = str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "run", train={"iterations": 2})))
    main(["train", "--config", config])
    capsys.readouterr()
    return config, str(tmp_path / "run" / "checkpoints" / "last.pt")


def _eval_json(capsys, config: str, *model: str) -> dict:
    from kaseg.cli import main

    main(["eval", "--config", config, *model, "--json"])
    return json.loads(capsys.readouterr().out)


def test_kaseg_eval_onnx_matches_eager(tmp_path, capsys):
    """`kaseg eval --onnx` runs the exported file through the same split, transform and
    metrics: fp32 equals the PyTorch evaluation (same pixels, mIoU within 0.05 points,
    i.e. at most a few argmax ties), for a dynamic export and for a fixed-size one (whose
    batches of two run image by image)."""
    pytest.importorskip("onnxruntime")
    from kaseg.cli import main

    config, checkpoint = _train_tiny(tmp_path, capsys)
    eager = _eval_json(capsys, config, "--checkpoint", checkpoint)
    for name, options in (("dynamic", ["--dynamic"]), ("fixed", [])):
        model_file = str(tmp_path / f"{name}.onnx")
        main(["export", "--checkpoint", checkpoint, "--onnx", model_file, "--size", "32", "32", *options])
        capsys.readouterr()
        exported = _eval_json(capsys, config, "--onnx", model_file)
        assert exported["onnx"] == model_file and exported["precision"] == "fp32"
        assert exported["pixels"] == eager["pixels"]
        assert exported["miou"] == pytest.approx(eager["miou"], abs=0.05), name
        for cls, iou in eager["iou"].items():
            assert (iou is None) == (exported["iou"][cls] is None), cls


@pytest.mark.slow
def test_kaseg_export_int8_and_eval_onnx_commands(tmp_path, capsys):
    """The two commands a user runs for int8 accuracy, as subprocesses."""
    pytest.importorskip("onnxruntime")
    config, checkpoint = _train_tiny(tmp_path, capsys)
    model_file = str(tmp_path / "int8.onnx")
    report = json.loads(run_kaseg("export", "--checkpoint", checkpoint, "--onnx", model_file, "--int8",
                                  "--dynamic", "--calibration", "8", "--min-agreement", "0", "--json").stdout)
    assert report["precision"] == "int8" and 0 <= report["int8_argmax_agreement"] <= 1
    metrics = json.loads(run_kaseg("eval", "--config", config, "--onnx", model_file, "--json").stdout)
    assert metrics["precision"] == "int8" and 0 <= metrics["miou"] <= 100
    text = run_kaseg("eval", "--config", config, "--onnx", model_file).stdout
    assert f"{model_file}: onnxruntime int8" in text and f"mIoU {metrics['miou']:.2f}" in text


def test_kaseg_eval_onnx_of_another_size_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from kaseg.cli import main
    from kaseg.config import Config, to_dict
    from kaseg.engine.checkpoint import save_checkpoint
    from kaseg.models import build_model
    from kaseg.tools.export import export_onnx

    model = build_model(num_classes=len(CLASSES), **TINY_STUDENT)
    save_checkpoint({"arch": model.arch, "model": model.state_dict(), "config": to_dict(Config())}, tmp_path / "m.pt")
    export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx", size=(48, 48))
    config = str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "x")))  # 32 x 32 images
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--config", config, "--onnx", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "exported for 48 x 48 inputs and cannot run a 32 x 32 image" in message
    assert "--dynamic" in message and "--sliding 48" in message
    # A sliding window of the export's size runs it.
    main(["eval", "--config", config, "--onnx", str(tmp_path / "m.onnx"), "--sliding", "48", "32", "--json"])
    assert 0 <= json.loads(capsys.readouterr().out)["miou"] <= 100
