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


# ---------------------------------------------------------------- int8 export, predict --onnx

SHAPES_DATA = {
    "name": "shapes",
    "options": {"num_images": 48, "num_val_images": 8, "size": 32},
    "crop_size": [32, 32],
    "workers": 0,
}


def _shapes_samples(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images (normalised as in training, N x 3 x 32 x 32) and masks of the tiny shapes split."""
    from kaseg.config import DataConfig
    from kaseg.data import build_raw_dataset
    from kaseg.data.transforms import TransformedDataset, eval_transform

    data = DataConfig(**{**SHAPES_DATA, "crop_size": (32, 32)})
    dataset = TransformedDataset(build_raw_dataset(data, split), eval_transform(mean=data.mean, std=data.std))
    images, masks = zip(*(dataset[i] for i in range(count)))
    return torch.stack(images), torch.stack(masks)


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory) -> Path:
    """A tiny student fitted for a few full-batch steps to 32 shapes images, so that it has
    the activation ranges and class margins of a trained model (a random classifier's
    margins are near zero, and any rounding flips its classes), with a run config naming
    the tiny shapes set."""
    torch.manual_seed(0)
    model = build_model(
        "deeplabv3_mobilenetv2", width=0.35, head_channels=16, aspp=False, output_stride=16,
        num_classes=NUM_CLASSES,
    )
    images, masks = _shapes_samples("train", 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the `one_thread` fixture
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images)["logits"], masks, ignore_index=255).backward()
        optimizer.step()
    torch.set_num_threads(threads)
    config = to_dict(Config())
    config["data"].update(SHAPES_DATA)
    path = tmp_path_factory.mktemp("shapes-run") / "best.pt"
    save_checkpoint({"arch": model.arch, "model": model.eval().state_dict(), "config": config}, path)
    return path


@needs_onnx
def test_int8_export_round_trip(shapes_checkpoint: Path, tmp_path: Path) -> None:
    """The int8 file is valid ONNX with int8 per-channel weights and, on training images,
    close to PyTorch's fp32 logits: mean absolute difference <= 3% of the largest logit,
    99th percentile <= 15%, same class on >= 95% of the pixels (measured: 1.3%, 7%, 100%)."""
    from kaseg.stages import load_segmenter
    from kaseg.tools.export import read_metadata

    out = tmp_path / "int8.onnx"
    report = export_onnx(shapes_checkpoint, out, size=(32, 32), int8=True, calibration=24)
    assert report["precision"] == "int8" and report["path"] == str(out)
    assert report["calibration_images"] == 24 and report["calibration_data"] == "shapes:train"
    assert report["check_images"] == 8 and report["int8_argmax_agreement"] >= 0.95

    graph = onnx.load(str(out))
    onnx.checker.check_model(graph, full_check=True)
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "convolution weights are stored as int8"
    scales = {t.name: t for t in graph.graph.initializer}
    per_channel = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
                   {t.name for t in int8_weights}]
    assert all(len(scales[n.input[1]].dims) == 1 for n in per_channel)  # one scale per output channel
    assert read_metadata(out)["precision"] == "int8"
    assert read_metadata(out)["data"]["name"] == "shapes"

    # The reference: PyTorch fp32 logits on training images (calibration-like inputs).
    images, _ = _shapes_samples("train", 16)
    with torch.inference_mode():
        expected = load_segmenter(shapes_checkpoint)(images)["logits"].numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    actual = np.concatenate([session.run(None, {"images": image[None].numpy()})[0] for image in images])
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).mean() <= 0.03 * scale
    assert np.quantile(np.abs(actual - expected), 0.99) <= 0.15 * scale
    assert (actual.argmax(1) == expected.argmax(1)).mean() >= 0.95


@needs_onnx
def test_int8_export_without_readable_data_names_the_data_set(shapes_checkpoint: Path, tmp_path: Path,
                                                              capsys) -> None:
    from kaseg.config import DataConfig
    from kaseg.data import DataError

    missing = DataConfig(name="voc", root=str(tmp_path / "VOCdevkit"))
    with pytest.raises(DataError, match=r"'voc' \(root '.*VOCdevkit'"):
        export_onnx(shapes_checkpoint, tmp_path / "x.onnx", size=(32, 32), int8=True, data=missing)
    assert not (tmp_path / "x.onnx").exists()  # it fails before exporting anything

    config = tmp_path / "voc.yaml"
    config.write_text(f"data: {{name: voc, root: {tmp_path / 'VOCdevkit'}}}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(shapes_checkpoint), "--onnx", str(tmp_path / "x.onnx"), "--int8",
              "--config", str(config)])
    assert exit_info.value.code == 2
    assert "cannot read int8 calibration images from data set 'voc'" in capsys.readouterr().err


@needs_onnx
def test_int8_export_cli(shapes_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli-int8.onnx"
    main(["export", "--checkpoint", str(shapes_checkpoint), "--onnx", str(out), "--size", "32", "32",
          "--int8", "--calibration", "8", "--dynamic"])
    text = capsys.readouterr().out
    assert f"wrote {out} (int8)" in text and "argmax agreement" in text and "8 images of shapes:train" in text
    with pytest.raises(RuntimeError, match="predicts the same class as PyTorch on only"):
        export_onnx(shapes_checkpoint, out, size=(32, 32), int8=True, calibration=8, min_agreement=1.01)


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as mask:
        return np.asarray(mask)


@needs_onnx
@pytest.mark.parametrize("int8", [False, True])
def test_predict_onnx_matches_eager(shapes_checkpoint: Path, tmp_path: Path, int8: bool) -> None:
    """Masks through onnxruntime equal the PyTorch ones (fp32: identical up to exact ties;
    int8: >= 95% of the pixels), with normalisation and palette read from the file's metadata."""
    model_file = tmp_path / "model.onnx"
    export_onnx(shapes_checkpoint, model_file, size=(32, 32), dynamic=True, int8=int8, calibration=16)
    folder = tmp_path / "images"
    folder.mkdir()
    _write_png(folder / "a.png", 40, 56, seed=11)
    _write_png(folder / "b.png", 32, 32, seed=12)
    eager = predict_files(shapes_checkpoint, [str(folder)], tmp_path / "eager", memory_format="contiguous")
    exported = predict_files(None, [str(folder)], tmp_path / "onnx", onnx=model_file)
    assert exported["failed"] == {} and exported["path"].startswith(f"onnxruntime {'int8' if int8 else 'fp32'}")
    assert eager["path"] == "PyTorch eager fp32 contiguous (cpu)"
    for name in ("a.png", "b.png"):
        agreement = (_read_mask(tmp_path / "eager" / name) == _read_mask(tmp_path / "onnx" / name)).mean()
        assert agreement >= (0.95 if int8 else 0.999), name
        with Image.open(tmp_path / "onnx" / name) as mask:
            palette = np.asarray(mask.getpalette()[: 3 * NUM_CLASSES], dtype=np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette, SHAPES_PALETTE)


@needs_onnx
def test_predict_fixed_size_onnx_runs_windows(shapes_checkpoint: Path, tmp_path: Path, capsys) -> None:
    model_file = tmp_path / "fixed.onnx"
    export_onnx(shapes_checkpoint, model_file, size=(32, 32))
    _write_png(tmp_path / "wide.png", 24, 70, seed=13)
    main(["predict", "--onnx", str(model_file), str(tmp_path / "wide.png"), "--out", str(tmp_path / "o")])
    assert "onnxruntime fp32 (CPU, 1 threads), 32 x 32 windows (fixed-size export)" in capsys.readouterr().out
    assert _read_mask(tmp_path / "o" / "wide.png").shape == (24, 70)


def test_predict_uses_channels_last_on_the_cpu(checkpoint: Path, tmp_path: Path) -> None:
    _write_png(tmp_path / "x.png", 48, 40, seed=14)
    fast = predict_files(checkpoint, [str(tmp_path / "x.png")], tmp_path / "fast", device="cpu")
    plain = predict_files(checkpoint, [str(tmp_path / "x.png")], tmp_path / "plain", device="cpu",
                          memory_format="contiguous")
    assert fast["path"] == "PyTorch eager fp32 channels_last (cpu)"
    assert plain["path"] == "PyTorch eager fp32 contiguous (cpu)"
    # Same model, another memory layout: the same classes up to floating-point ties.
    assert (_read_mask(tmp_path / "fast" / "x.png") == _read_mask(tmp_path / "plain" / "x.png")).mean() >= 0.999
