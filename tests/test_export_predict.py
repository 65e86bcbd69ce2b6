"""``kaseg export`` (ONNX checked with onnxruntime) and ``kaseg predict`` (palette PNG masks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kaseg.cli import main
from kaseg.config import Config, to_dict
from kaseg.data.shapes import PALETTE as SHAPES_PALETTE
from kaseg.engine.checkpoint import save_checkpoint
from kaseg.models import build_model
from kaseg.tools.export import export_onnx
from kaseg.tools.predict import MAX_WHOLE_IMAGE_SIDE, checkpoint_palette, palette_png, predict_files

try:
    import onnx
    import onnxruntime
except ImportError:  # predict does not need them
    onnx = onnxruntime = None

needs_onnx = pytest.mark.skipif(onnxruntime is None, reason="needs `pip install kaseg[onnx]`")

NUM_CLASSES = len(SHAPES_PALETTE)  # the default config's data set is the built-in shapes set


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny trained-looking segmenter checkpoint in kaseg's format (random weights, BN
    statistics perturbed so eval-mode batch norm is not the identity)."""
    torch.manual_seed(0)
    model = build_model(
        "deeplabv3_mobilenetv2", width=0.35, head_channels=16, aspp=False, output_stride=16,
        num_classes=NUM_CLASSES,
    )
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint({"arch": model.arch, "model": model.state_dict(), "config": to_dict(Config())}, path)
    return path


def _write_png(path: Path, height: int, width: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------- export


@needs_onnx
@pytest.mark.parametrize("dynamic", [False, True])
def test_export_round_trip(checkpoint: Path, tmp_path: Path, dynamic: bool) -> None:
    out = tmp_path / "model.onnx"
    report = export_onnx(checkpoint, out, size=(64, 64), dynamic=dynamic)
    assert report["path"] == str(out) and out.is_file()
    assert 0 <= report["max_abs_diff"] <= 1e-3
    assert report["input_size"] == [64, 64]
    assert report["dynamic"] is dynamic and report["opset"] == 17
    assert report["num_classes"] == NUM_CLASSES

    graph = onnx.load(str(out))
    onnx.checker.check_model(graph, full_check=True)
    assert [o.name for o in graph.graph.output] == ["logits"]  # the features are not exported
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    if dynamic:
        assert all(isinstance(d, str) for i, d in enumerate(shape) if i != 1)
        (logits,) = session.run(None, {"images": np.zeros((3, 3, 48, 80), dtype=np.float32)})
        assert logits.shape == (3, NUM_CLASSES, 48, 80)
    else:
        assert shape == [1, 3, 64, 64]


@needs_onnx
def test_export_overwrites_the_named_file(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "model.onnx"
    out.parent.mkdir()
    out.write_bytes(b"old")
    export_onnx(checkpoint, out, size=(32, 32))
    onnx.checker.check_model(str(out))


@needs_onnx
def test_export_tolerance_failure(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"differs from PyTorch by .* tolerance -1"):
        export_onnx(checkpoint, tmp_path / "model.onnx", size=(32, 32), tolerance=-1)


@needs_onnx
def test_export_cli_json(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.onnx"
    main(["export", "--checkpoint", str(checkpoint), "--onnx", str(out), "--size", "32", "32", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["max_abs_diff"] <= 1e-3


# ---------------------------------------------------------------- predict


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    _write_png(folder / "a.png", 40, 56, seed=1)
    _write_png(folder / "b.png", 33, 47, seed=2)
    (folder / "bad.png").write_bytes(np.random.default_rng(3).bytes(300))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_folder_with_a_corrupt_file(checkpoint: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "masks"  # created by predict
    result = predict_files(checkpoint, [str(image_folder)], out, overlay=True, device="cpu")

    assert list(result["failed"]) == [str(image_folder / "bad.png")]
    assert "bad.png" in result["failed"][str(image_folder / "bad.png")]
    assert result["written"] == [str(out / "a.png"), str(out / "b.png")]
    assert result["overlays"] == [str(out / "a_overlay.png"), str(out / "b_overlay.png")]
    for stem, size in (("a", (56, 40)), ("b", (47, 33))):
        with Image.open(out / f"{stem}.png") as mask:
            assert mask.format == "PNG" and mask.mode == "P" and mask.size == size
            ids = np.asarray(mask)
            palette = np.asarray(mask.getpalette()[: 3 * NUM_CLASSES], dtype=np.uint8).reshape(-1, 3)
        assert ids.max() < NUM_CLASSES
        np.testing.assert_array_equal(palette, SHAPES_PALETTE)
        with Image.open(out / f"{stem}_overlay.png") as picture:
            assert picture.mode == "RGB" and picture.size == size
    assert not (out / "bad.png").exists()


def test_predict_matches_the_model(checkpoint: Path, tmp_path: Path) -> None:
    """The mask is the argmax of the model's logits on the image normalised as in training."""
    from kaseg.stages import load_segmenter

    _write_png(tmp_path / "x.png", 48, 40, seed=4)
    predict_files(checkpoint, [str(tmp_path / "x.png")], tmp_path / "out", device="cpu")
    config = Config()
    pixels = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"), dtype=np.float32) / 255
    images = torch.from_numpy((pixels - config.data.mean) / config.data.std).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        expected = load_segmenter(checkpoint)(images)["logits"].argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), expected)


def test_predict_sliding_window(checkpoint: Path, tmp_path: Path) -> None:
    _write_png(tmp_path / "wide.png", 40, 100, seed=5)
    result = predict_files(checkpoint, [str(tmp_path / "wide.png")], tmp_path / "out", crop_size=(32, 32))
    assert result["failed"] == {}
    with Image.open(tmp_path / "out" / "wide.png") as mask:
        assert mask.size == (100, 40) and mask.mode == "P"
    assert MAX_WHOLE_IMAGE_SIDE >= 1024  # larger images switch to the sliding window


def test_predict_same_stem_is_not_overwritten(checkpoint: Path, tmp_path: Path) -> None:
    for folder, seed in (("one", 6), ("two", 7)):
        (tmp_path / folder).mkdir()
        _write_png(tmp_path / folder / "same.png", 32, 32, seed=seed)
    first, second = tmp_path / "one" / "same.png", tmp_path / "two" / "same.png"
    result = predict_files(checkpoint, [str(first), str(second)], tmp_path / "out")
    assert result["written"] == [str(tmp_path / "out" / "same.png")]
    message = result["failed"][str(second)]
    assert str(first) in message and str(second) in message
    expected = predict_files(checkpoint, [str(first)], tmp_path / "first")
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "same.png")),
        np.asarray(Image.open(expected["written"][0])),
    )


def test_predict_cli_exits_non_zero_on_failure(
    checkpoint: Path, image_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--checkpoint", str(checkpoint), str(image_folder), "--out", str(out), "--overlay"])
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert "bad.png" in captured.err
    assert "wrote 2 mask(s)" in captured.out
    assert (out / "a_overlay.png").is_file() and (out / "b.png").is_file()


def test_predict_cli_succeeds_without_failures(checkpoint: Path, tmp_path: Path, capsys) -> None:
    _write_png(tmp_path / "ok.png", 24, 24, seed=8)
    main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "ok.png"), "--out", str(tmp_path / "o")])
    assert (tmp_path / "o" / "ok.png").is_file()
    assert "0 failed" in capsys.readouterr().out


def test_palette_of_checkpoint_data_sets() -> None:
    from kaseg.data.voc import VOC_PALETTE

    np.testing.assert_array_equal(checkpoint_palette({"name": "shapes"}, NUM_CLASSES), SHAPES_PALETTE)
    np.testing.assert_array_equal(checkpoint_palette({"name": "voc"}, 21), VOC_PALETTE)
    # A class count the data set does not have, or an unknown set: the VOC colour map.
    assert checkpoint_palette({"name": "shapes"}, 3).shape == (3, 3)
    assert checkpoint_palette({"name": "folder", "root": "/nonexistent"}, 5).shape == (5, 3)
    picture = palette_png(np.array([[0, 1], [2, 255]]), SHAPES_PALETTE[:3])
    assert picture.mode == "P" and picture.getpalette()[3 * 255 : 3 * 256] == [255, 255, 255]


def test_predict_empty_folder_is_a_failure(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = predict_files(checkpoint, [str(tmp_path / "empty")], tmp_path / "out")
    assert result["written"] == [] and "holds no images" in result["failed"][str(tmp_path / "empty")]
