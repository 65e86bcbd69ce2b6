"""Reading a file never runs code: crafted pickles are refused by every command that reads
checkpoints or weights, and safetensors weights round-trip with their ``arch``."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import REPO, TINY_STUDENT, tiny_config, write_config
from PIL import Image
from safetensors.torch import load_file, save_file

from kaseg.cli import main
from kaseg.config import load_config, to_dict
from kaseg.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
    save_safetensors,
)
from kaseg.models import PretrainedWeightsError, build_model, build_model_from_arch, create_backbone
from kaseg.stages import load_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 8  # the shapes data set of tiny_config


class ShellPayload:
    """Unpickling this runs ``touch MARKER`` through the shell, as a crafted checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(num_classes=NUM_CLASSES, **TINY_STUDENT).eval()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A kaseg checkpoint of the tiny student (a valid teacher for the shapes configs)."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("genuine") / "best.pt"
    config = load_config(None, ["model.width=0.35"])
    save_checkpoint({"arch": model.arch, "model": model.state_dict(), "config": to_dict(config)}, path)
    return path


def crafted(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """A checkpoint that looks like kaseg's but runs a shell command when unpickled."""
    model = tiny_model()
    state = {"arch": model.arch, "model": model.state_dict(), "config": ShellPayload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def test_the_payload_is_live_when_loaded_unsafely(tmp_path):
    # The reference: the crafted file does run its command under weights_only=False (the
    # old behaviour), so the refusals below are refusals of a working exploit.
    marker = tmp_path / "ran"
    torch.load(crafted(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
def test_load_checkpoint_refuses_python_objects_in_every_format(tmp_path, fmt):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    if fmt == "raw-pickle":
        model = tiny_model()
        path.write_bytes(pickle.dumps({"arch": model.arch, "model": {}, "x": ShellPayload(marker)}))
    else:
        crafted(path, marker, legacy=fmt == "legacy")
    with pytest.raises(CheckpointError, match="evil.pt") as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    if fmt != "raw-pickle":  # torch names the callable it refused
        assert "posix.system" in message and "would run code" in message
    assert not marker.exists()


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    return folder


def _commands(tmp_path: Path, evil: Path, genuine: Path, images: Path) -> dict[str, list[str]]:
    """argv of each command, reading ``evil`` (train --resume: its copy as the run's last.pt)."""
    def config(name: str, **sections) -> str:
        return str(write_config(tmp_path / f"{name}.yaml", tiny_config(tmp_path / "runs", name, **sections)))

    resumed = tmp_path / "runs" / "resumed" / "checkpoints" / "last.pt"
    resumed.parent.mkdir(parents=True)
    os.link(evil, resumed)  # the same file under the run folder
    return {
        "predict": ["predict", "--checkpoint", str(evil), str(images), "--out", str(tmp_path / "masks")],
        "export": ["export", "--checkpoint", str(evil), "--onnx", str(tmp_path / "m.onnx"), "--size", "32", "32"],
        "info": ["info", str(evil), "--size", "32", "32"],
        "bench": ["bench", str(evil), "--size", "32", "32", "--runs", "1"],
        "convert": ["convert", "--checkpoint", str(evil), "--safetensors", str(tmp_path / "m.safetensors")],
        "eval": ["eval", "--config", config("eval"), "--checkpoint", str(evil)],
        "distill-teacher": ["distill", "--config", config("d1", teacher={"checkpoint": str(evil)})],
        "distill-autoencoder": ["distill", "--config", config(
            "d2", teacher={"checkpoint": str(genuine)}, autoencoder={"checkpoint": str(evil), "code_channels": 4},
        )],
        "train-ae": ["train-ae", "--config", config("ae", teacher={"checkpoint": str(evil)})],
        "train-resume": ["train", "--config", config("resumed"), "--resume"],
        "train-pretrained": ["train", "--config", config("pre", model={**TINY_STUDENT, "pretrained": str(evil)})],
    }


COMMANDS = [
    "predict", "export", "info", "bench", "convert", "eval", "distill-teacher", "distill-autoencoder", "train-ae",
    "train-resume", "train-pretrained",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_crafted_checkpoint(tmp_path, genuine, images, capsys, command):
    marker = tmp_path / "ran"
    evil = crafted(tmp_path / "evil" / "last.pt", marker)
    argv = _commands(tmp_path, evil, genuine, images)[command]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if f"kaseg {argv[0]}: error:" in line]
    assert len(errors) == 1, err
    read = tmp_path / "runs" / "resumed" / "checkpoints" / "last.pt" if command == "train-resume" else evil
    assert f"refusing to load '{read}'" in errors[0] and "would run code" in errors[0]
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.mark.slow  # a fresh interpreter importing torch: ~3 s idle, ~12 s on a loaded machine
def test_the_cli_refusal_is_one_line_without_traceback(tmp_path, images):
    # The same through a real process: stderr as a user sees it.
    marker = tmp_path / "ran"
    evil = crafted(tmp_path / "evil.pt", marker)
    result = subprocess.run(
        [sys.executable, "-m", "kaseg.cli", "predict", "--checkpoint", str(evil), str(images), "--out",
         str(tmp_path / "masks")],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"kaseg predict: error: refusing to load '{evil}'")
    assert not marker.exists() and not (tmp_path / "masks").exists()


# ---------------------------------------------------------------- safetensors


def test_safetensors_round_trip(tmp_path):
    model = tiny_model()
    config = to_dict(load_config(None, ["model.width=0.35", "data.mean=[0.5, 0.5, 0.5]"]))
    path = save_safetensors(model, tmp_path / "student.safetensors", model.arch, config)
    state = load_checkpoint(path)
    assert state["arch"] == model.arch and state["config"] == config
    reference = model.state_dict()
    assert state["model"].keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state["model"][key], value) and state["model"][key].dtype == value.dtype, key
    # The file is a plain state dict: the model's own class loads it without kaseg.
    plain = build_model_from_arch(model.arch)
    plain.load_state_dict(load_file(path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)["logits"]
        assert torch.equal(plain.eval()(images)["logits"], expected)
        assert torch.equal(load_segmenter(path, num_classes=NUM_CLASSES)(images)["logits"], expected)


def test_convert_cli_writes_the_checkpoints_model(tmp_path, genuine, capsys):
    out = tmp_path / "student.safetensors"
    main(["convert", "--checkpoint", str(genuine), "--safetensors", str(out)])
    assert str(out) in capsys.readouterr().out
    converted, original = load_checkpoint(out), load_checkpoint(genuine)
    assert converted["arch"] == original["arch"] and converted["config"] == original["config"]
    assert all(torch.equal(converted["model"][k], v) for k, v in original["model"].items())
    assert converted["model"].keys() == original["model"].keys()


def test_convert_to_half_precision(tmp_path, genuine):
    out = tmp_path / "half.safetensors"
    main(["convert", "--checkpoint", str(genuine), "--safetensors", str(out), "--fp16"])
    half, original = load_checkpoint(out)["model"], load_checkpoint(genuine)["model"]
    for key, value in original.items():
        if value.is_floating_point():
            assert half[key].dtype == torch.float16 and torch.equal(half[key], value.half()), key
        else:
            assert torch.equal(half[key], value), key
    model = load_segmenter(out, num_classes=NUM_CLASSES)  # cast back to the model's float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    full = tmp_path / "full.safetensors"
    main(["convert", "--checkpoint", str(genuine), "--safetensors", str(full)])
    assert out.stat().st_size < 0.55 * full.stat().st_size


def test_safetensors_with_tied_weights(tmp_path):
    shared = torch.nn.Linear(3, 3)
    module = torch.nn.Sequential(shared, shared)  # two keys, one storage
    path = save_safetensors(module, tmp_path / "tied.safetensors", {"name": "tied"})
    state = load_checkpoint(path)["model"]
    assert torch.equal(state["0.weight"], state["1.weight"]) and torch.equal(state["0.weight"], shared.weight)


def test_safetensors_without_or_with_corrupt_metadata_is_refused(tmp_path, capsys):
    tensors = {"w": torch.ones(2)}
    save_file(tensors, tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match=r"bare.safetensors.*no 'arch' in its metadata"):
        load_checkpoint(tmp_path / "bare.safetensors")
    save_file(tensors, tmp_path / "json.safetensors", metadata={"arch": "{not json"})
    with pytest.raises(CheckpointError, match=r"json.safetensors.*'arch' is not valid JSON"):
        load_checkpoint(tmp_path / "json.safetensors")
    save_file(tensors, tmp_path / "list.safetensors", metadata={"arch": "[1, 2]"})
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        load_checkpoint(tmp_path / "list.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    # Through the CLI: one line, exit code 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(tmp_path / "bare.safetensors"), "--size", "32", "32"])
    assert exit_info.value.code == 2
    assert "no 'arch' in its metadata" in capsys.readouterr().err


def test_safetensors_refuses_non_tensors(tmp_path):
    with pytest.raises(ValueError, match=r"tensors only.*\['step'\]"):
        save_safetensors({"w": torch.ones(1), "step": 3}, tmp_path / "x.safetensors", {"name": "x"})
    with pytest.raises(ValueError, match="plain data"):
        save_safetensors({"w": torch.ones(1)}, tmp_path / "x.safetensors", {"name": object()})
    assert not (tmp_path / "x.safetensors").exists()


def test_resuming_from_weights_only_is_a_clear_error(tmp_path, genuine):
    from kaseg.engine.trainer import TrainingJob, _prepare, _restore

    out = tmp_path / "student.safetensors"
    state = load_checkpoint(genuine)
    save_safetensors(state["model"], out, state["arch"])
    model = build_model_from_arch(state["arch"])
    job = TrainingJob(module=model, trainable=model, export=model, evaluate=dict)
    config = load_config(None, ["model.width=0.35"])
    loop = _prepare(job, config, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="holds weights but no training state"):
        _restore(loop, job, out, config)


# ---------------------------------------------------------------- plain weights files


def test_state_dict_file_unwraps_common_layouts(tmp_path):
    weights = {"conv.weight": torch.randn(2, 2), "conv.bias": torch.randn(2)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}, tmp_path / "a.pth")
    save_file(weights, tmp_path / "b.safetensors")
    for name in ("a.pth", "b.safetensors"):
        loaded = load_state_dict_file(tmp_path / name)
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], v) for k, v in weights.items())
    torch.save({"epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_state_dict_file(tmp_path / "c.pth")


def test_pretrained_backbone_file_is_read_safely(tmp_path):
    torch.manual_seed(0)
    classifier = timm.create_model("mobilenetv2_035")
    weights = tmp_path / "mobilenetv2_035.safetensors"
    save_file(classifier.state_dict(), weights)
    backbone = create_backbone("mobilenetv2_035", output_stride=16, pretrained=str(weights))
    torch.testing.assert_close(backbone.conv_stem.weight, classifier.conv_stem.weight, rtol=0, atol=0)

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({**classifier.state_dict(), "extra": ShellPayload(marker)}, evil)
    with pytest.raises(PretrainedWeightsError, match=r"mobilenetv2_035.*evil.pth.*would run code"):
        create_backbone("mobilenetv2_035", output_stride=16, pretrained=str(evil))
    assert not marker.exists()
