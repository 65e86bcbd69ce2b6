"""Models from torchvision, segmentation_models_pytorch and users' factories: the contract,
feature taps by name, checkpoints that load without kaseg, ONNX export, the recipes and the
Python API of the README."""

from __future__ import annotations

import functools
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import REPO, tiny_config, write_config

import kaseg
from kaseg.config import ConfigError, ModelConfig, load_config
from kaseg.engine.checkpoint import CheckpointError
from kaseg.models import (
    ExternalSegmenter,
    FeatureTapError,
    PretrainedWeightsError,
    build_external,
    build_from_config,
    build_model_from_arch,
    validate_model_config,
)
from kaseg.models import external as external_module
from kaseg.stages import distill, load_segmenter, train_autoencoder, train_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")

TV = torchvision.models.segmentation
NUM_CLASSES = 8  # the built-in shapes data set

# A user's own model: stride-4 features, logits at 1/4 of the input (kaseg resizes them).
FACTORY_SOURCE = textwrap.dedent(
    '''
    import torch.nn as nn


    class TinyNet(nn.Module):
        def __init__(self, num_classes, width=8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.cls = nn.Conv2d(width, num_classes, 1)

        def forward(self, x):
            return {"logits": self.cls(self.body(self.stem(x)))}


    def tiny_net(num_classes, width=8):
        return TinyNet(num_classes, width)


    def five_class_net():
        return TinyNet(5)
    '''
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """``kaseg_test_factory:tiny_net`` importable in this process and in child processes."""
    (tmp_path / "kaseg_test_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{REPO}")
    sys.modules.pop("kaseg_test_factory", None)
    yield "kaseg_test_factory"
    sys.modules.pop("kaseg_test_factory", None)


def smp_or_skip():
    return pytest.importorskip("segmentation_models_pytorch")


def has_smp() -> bool:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- the contract


# (builder, channels, feature stride, output stride, class of the wrapper); the strides are
# torchvision's: ResNets dilated to 8, MobileNetV3 to 16, LR-ASPP's high branch upsampled to 8.
TORCHVISION_CASES = [
    ("deeplabv3_mobilenet_v3_large", 256, 16, 16, "classifier.3"),
    ("lraspp_mobilenet_v3_large", 128, 8, 16, "classifier.high_classifier:input"),
    pytest.param("deeplabv3_resnet50", 256, 8, 8, "classifier.3", marks=pytest.mark.slow),
    pytest.param("fcn_resnet50", 512, 8, 8, "classifier.2", marks=pytest.mark.slow),
    pytest.param("deeplabv3_resnet101", 256, 8, 8, "classifier.3", marks=pytest.mark.slow),
    pytest.param("fcn_resnet101", 512, 8, 8, "classifier.2", marks=pytest.mark.slow),
]


def check_contract(model: ExternalSegmenter, size: tuple[int, int] = (40, 56)) -> dict[str, torch.Tensor]:
    """Logits at the input size, features on the declared grid, state dict = the network's."""
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        output = model.eval()(images)
    stride = model.feature_stride
    assert output["logits"].shape == (2, model.num_classes, *size)
    assert output["features"].shape == (2, model.feature_channels, -(-size[0] // stride), -(-size[1] // stride))
    assert list(model.state_dict()) == list(model.model.state_dict())
    return output


@pytest.mark.parametrize("name, channels, feature_stride, output_stride, tap", TORCHVISION_CASES)
def test_torchvision_builders_honour_the_contract(name, channels, feature_stride, output_stride, tap):
    model = build_external("torchvision", name=name, num_classes=3)
    assert (model.features, model.feature_channels, model.feature_stride, model.output_stride) == (
        tap, channels, feature_stride, output_stride,
    )
    assert model.arch == {"source": "torchvision", "name": name, "kwargs": {}, "features": tap, "num_classes": 3}
    check_contract(model)
    # torchvision already returns logits at the input size: the wrapper passes them on.
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(images)["logits"], model.model(images)["out"])


def test_deeplabv3_tap_is_the_classifier_input():
    model = build_external("torchvision", name="deeplabv3_mobilenet_v3_large", num_classes=3).eval()
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        output = model(images)
        # Reference: the head run by hand up to its last ReLU, then the 1x1 classifier.
        features = model.model.backbone(images)["out"]
        for layer in list(model.model.classifier)[:4]:
            features = layer(features)
        torch.testing.assert_close(output["features"], features, rtol=0, atol=0)
        logits = F.interpolate(model.model.classifier[4](features), size=(48, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(output["logits"], logits, rtol=0, atol=0)
        assert torch.equal(model.classify(output["features"], (48, 64)), output["logits"])


def test_lraspp_input_tap_and_no_known_classifier():
    model = build_external("torchvision", name="lraspp_mobilenet_v3_large", num_classes=3).eval()
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        parts = model.model.backbone(images)
        head = model.model.classifier
        high = head.cbr(parts["high"]) * head.scale(parts["high"])
        expected = F.interpolate(high, size=parts["low"].shape[-2:], mode="bilinear", align_corners=False)
        assert torch.equal(model(images)["features"], expected)
    # Its logits also read the low branch: no single classifier turns the tap into logits.
    assert not hasattr(model, "classify") and not hasattr(model, "native_logits")


def test_smp_models_honour_the_contract_and_pad_their_input():
    smp_or_skip()
    model = build_external(
        "smp", name="DeepLabV3Plus", num_classes=3, kwargs={"encoder_name": "resnet18", "decoder_channels": 16}
    ).eval()
    assert (model.features, model.feature_channels, model.feature_stride, model.output_stride) == ("decoder", 16, 4, 16)
    assert model.input_multiple == 16
    output = check_contract(model, size=(40, 56))  # not multiples of 16: padded to 48 x 64
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        padded = model.model(F.pad(images, (0, 8, 0, 8)))
        assert torch.equal(model(images)["logits"], padded[..., :40, :56])
        torch.testing.assert_close(model.classify(output["features"][:1], (40, 56)).shape, (1, 3, 40, 56))
        exact = torch.randn(1, 3, 48, 64)
        result = model(exact)
        assert torch.equal(model.classify(result["features"], (48, 64)), result["logits"])
        # Native logits: the head's 3x3 conv on the stride-4 grid, without its x4 upsampling.
        native = model.native_logits(result["features"])
        assert native.shape == (1, 3, 12, 16)
        assert torch.equal(native, model.model.segmentation_head[0](result["features"]))


def test_python_factory_honours_the_contract(factory_module):
    model = build_external("python", name=f"{factory_module}:tiny_net", num_classes=5, features="body")
    assert (model.feature_channels, model.feature_stride, model.output_stride, model.num_classes) == (8, 4, 4, 5)
    assert model.arch["kwargs"] == {}  # num_classes was passed because the factory takes it
    check_contract(model)
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        native = model.model(images)["logits"]  # 10 x 14: resized to the input
        expected = F.interpolate(native, size=(40, 56), mode="bilinear", align_corners=False)
        assert torch.equal(model(images)["logits"], expected)
    rebuilt = build_model_from_arch(model.arch)
    assert isinstance(rebuilt, ExternalSegmenter) and rebuilt.arch == model.arch


def test_kaseg_info_reports_the_feature_stride_of_every_source(factory_module, capsys):
    from kaseg.cli import main

    specs = [
        (["torchvision:lraspp_mobilenet_v3_large"], 8, 16, [128, 8, 8]),
        ([f"python:{factory_module}:tiny_net", "features=body", "num_classes=3"], 4, 4, [8, 16, 16]),
    ]
    if has_smp():
        specs.append((["smp:Unet", "encoder_name=resnet18", "features=decoder.blocks.2"], 4, 32, [64, 16, 16]))
    for arguments, feature_stride, output_stride, shape in specs:
        main(["info", *arguments, "--size", "64", "64", "--json"])
        info = json.loads(capsys.readouterr().out)
        assert (info["feature_stride"], info["output_stride"], info["feature_shape"]) == (
            feature_stride, output_stride, shape,
        ), arguments


# ---------------------------------------------------------------- taps and state dicts


def test_unknown_feature_name_lists_close_matches(capsys):
    net = TV.deeplabv3_mobilenet_v3_large(num_classes=3, weights_backbone=None)
    with pytest.raises(FeatureTapError, match=r"no module 'classifer\.3' to tap; closest: classifier\.3"):
        kaseg.wrap_model(net, features="classifer.3")
    # In a config: found when the config is loaded, one line naming the key.
    config = ModelConfig(source="torchvision", name="deeplabv3_mobilenet_v3_large", features="classifer.3")
    with pytest.raises(ConfigError, match=r"^model\.features: .*closest: classifier\.3"):
        validate_model_config(config)
    # On the command line: one line, exit code 2, no traceback.
    from kaseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["info", "torchvision:deeplabv3_mobilenet_v3_large", "features=classifer.3", "--size", "32", "32"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "closest: classifier.3" in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_a_model_of_unknown_class_needs_a_tap(factory_module):
    from kaseg_test_factory import tiny_net

    with pytest.raises(FeatureTapError, match="no default feature tap for TinyNet.*cls"):
        kaseg.wrap_model(tiny_net(3))
    with pytest.raises(FeatureTapError, match="not a map on a regular grid"):
        kaseg.wrap_model(torch.nn.Sequential(tiny_net(3).stem, torch.nn.AdaptiveAvgPool2d(3)), features="1")


def test_state_dict_is_the_networks_own_also_nested():
    net = TV.lraspp_mobilenet_v3_large(num_classes=3, weights_backbone=None)
    model = kaseg.wrap_model(net)
    own = net.state_dict()
    assert list(model.state_dict()) == list(own)
    # Inside a larger module (a Distiller's trainable parts, saved for resuming).
    parts = torch.nn.ModuleDict({"student": model, "adapter": torch.nn.Conv2d(1, 1, 1)})
    saved = parts.state_dict()
    assert [k for k in saved if k.startswith("student.")] == [f"student.{k}" for k in own]
    fresh = torch.nn.ModuleDict(
        {"student": kaseg.wrap_model(TV.lraspp_mobilenet_v3_large(num_classes=3, weights_backbone=None)),
         "adapter": torch.nn.Conv2d(1, 1, 1)}
    )
    fresh.load_state_dict(saved)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_weights_from_a_local_file(tmp_path, factory_module):
    from kaseg_test_factory import tiny_net
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = tiny_net(NUM_CLASSES).eval()
    save_file(reference.state_dict(), tmp_path / "net.safetensors")
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "net.pt")
    images = torch.randn(1, 3, 32, 32)
    for file in ("net.safetensors", "net.pt"):
        config = ModelConfig(source="python", factory=f"{factory_module}:tiny_net", features="body",
                             weights=str(tmp_path / file))
        model = build_from_config(config, NUM_CLASSES).eval()
        with torch.no_grad():
            assert torch.equal(model.model(images)["logits"], reference(images)["logits"]), file
    with pytest.raises(CheckpointError, match="does not fit the model"):
        build_from_config(dataclass_replace(config, kwargs={"width": 4}), NUM_CLASSES)
    # The same file for `kaseg info` / `bench`.
    from kaseg.tools.bench import load_any_model

    spec = {"features": "body", "num_classes": NUM_CLASSES, "weights_file": str(tmp_path / "net.safetensors")}
    model = load_any_model(f"python:{factory_module}:tiny_net", spec)
    with torch.no_grad():
        assert torch.equal(model.model(images)["logits"], reference(images)["logits"])


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_weights_file_that_would_run_code_is_refused(tmp_path, factory_module):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"cls.weight": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(marker)},
               tmp_path / "evil.pt")
    config = ModelConfig(source="python", factory=f"{factory_module}:tiny_net", features="body",
                         weights=str(tmp_path / "evil.pt"))
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.* would run code"):
        build_from_config(config, NUM_CLASSES)
    assert not marker.exists()


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------- configs and hub weights


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"source": "torchvision", "name": "deeplabv3_resnet5"},
         "unknown torchvision segmentation builder.*deeplabv3_resnet50"),
        ({"source": "torchvision", "name": "fcn_resnet50", "width": 0.5},
         r"^model\.width applies to source kaseg only"),
        ({"source": "torchvision", "name": "lraspp_mobilenet_v3_large", "kwargs": {"weights": "COCO_V9"}},
         "model.kwargs.weights: 'COCO_V9' is not a weights name.*COCO_WITH_VOC_LABELS_V1"),
        ({"source": "python", "factory": "not a factory"}, "must look like 'package.module:function'"),
        ({"source": "python", "factory": "no_such_package_kaseg:build"}, "cannot import 'no_such_package_kaseg'"),
        ({"source": "python"}, "needs model.factory"),
        ({"features": "head"}, r"^model\.features applies to the sources torchvision, smp and python"),
        ({"source": "torchvision", "name": "lraspp_mobilenet_v3_large", "weights": "/no/such/file.pt"},
         r"^model\.weights: file '/no/such/file\.pt' does not exist"),
        ({"pretrained": "/no/such/backbone.pth"}, r"^model\.pretrained: file '/no/such/backbone\.pth' does not exist"),
    ],
)
def test_model_config_errors_name_the_key(changes, match):
    with pytest.raises(ConfigError, match=match):
        validate_model_config(ModelConfig(**changes))


def test_number_of_classes_comes_from_the_data_set(factory_module):
    config = ModelConfig(source="torchvision", name="lraspp_mobilenet_v3_large", kwargs={"num_classes": 21})
    validate_model_config(config)  # the data set is not known yet
    with pytest.raises(ValueError, match="num_classes=21 .* the data set has 8 classes"):
        build_from_config(config, NUM_CLASSES)
    # A factory without a num_classes parameter: its model must predict the data set's classes.
    config = ModelConfig(source="python", factory=f"{factory_module}:five_class_net", features="body")
    validate_model_config(config)
    assert build_from_config(config, 5).num_classes == 5
    with pytest.raises(ValueError, match="predicts 5 classes but 8 are needed"):
        build_from_config(config, NUM_CLASSES)


def test_hub_weights_fail_at_once_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(external_module, "_host_reachable", lambda host, timeout_s=0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    builds = []

    @functools.wraps(TV.fcn_resnet50)
    def recording_builder(**kwargs):
        builds.append(kwargs)
        return TV.fcn_resnet50(**kwargs)

    monkeypatch.setattr(torchvision.models, "get_model_builder", lambda name: recording_builder)
    with pytest.raises(PretrainedWeightsError, match="not in the local cache .*download.pytorch.org cannot be reached"):
        build_external("torchvision", name="fcn_resnet50", num_classes=21, kwargs={"weights_backbone": "DEFAULT"})
    assert builds == []  # refused before building (and downloading) anything
    if has_smp():
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        with pytest.raises(PretrainedWeightsError, match="huggingface.co, which cannot be reached"):
            build_external("smp", name="Unet", num_classes=3, kwargs={"encoder_weights": "imagenet"})


# ---------------------------------------------------------------- three-step distillations


TRAIN = {"iterations": 3, "checkpoint_every": 3, "log_every": 1}


def run_flow(root: Path, teacher_model: dict, student_model: dict, *, base: dict | None = None) -> Path:
    """teacher (kaseg train) -> auto-encoder (train-ae) -> distill, 3 steps each; returns the run root."""
    def config(name: str, model: dict, **sections) -> Path:
        values = tiny_config(root, name, train=TRAIN, **sections)
        values.update(base or {})
        values["model"] = model
        return write_config(root / f"{name}.yaml", values)

    train_segmenter(load_config(config("teacher", teacher_model)), progress=False)
    teacher = {"checkpoint": str(root / "teacher/checkpoints/last.pt")}
    metrics = train_autoencoder(
        load_config(config("ae", student_model, teacher=teacher, autoencoder={"code_channels": 8})), progress=False
    )
    assert metrics["relative_error"] > 0
    code = {"code_channels": 8, "checkpoint": str(root / "ae/checkpoints/last.pt")}
    metrics = distill(load_config(config("distill", student_model, teacher=teacher, autoencoder=code)), progress=False)
    assert 0 <= metrics["miou"] <= 100
    return root


@pytest.fixture(scope="module")
def torchvision_flow(tmp_path_factory):
    """torchvision LR-ASPP (stride 8) -> torchvision DeepLabV3-MobileNetV3 (stride 16)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("tv")
        return run_flow(
            root,
            {"source": "torchvision", "name": "lraspp_mobilenet_v3_large"},
            {"source": "torchvision", "name": "deeplabv3_mobilenet_v3_large"},
        )
    finally:
        torch.set_num_threads(threads)


def test_distill_torchvision_to_torchvision(torchvision_flow):
    state = torch.load(torchvision_flow / "distill/checkpoints/last.pt", weights_only=True)
    assert state["iteration"] == 3
    assert state["arch"] == {
        "source": "torchvision", "name": "deeplabv3_mobilenet_v3_large", "kwargs": {},
        "features": "classifier.3", "num_classes": NUM_CLASSES,
    }
    # The auto-encoder of a teacher tapped where no known classifier reads: error only.
    ae = torch.load(torchvision_flow / "ae/checkpoints/last.pt", weights_only=True)
    assert set(ae["metrics"]) == {"relative_error"}


def test_distilled_student_loads_into_the_users_class_without_kaseg(torchvision_flow):
    state = torch.load(torchvision_flow / "distill/checkpoints/last.pt", weights_only=True)
    net = TV.deeplabv3_mobilenet_v3_large(num_classes=NUM_CLASSES, weights_backbone=None)
    net.load_state_dict(state["model"])  # strict: no missing, unexpected or prefixed keys
    images = torch.randn(2, 3, 32, 48)
    kaseg_model = load_segmenter(torchvision_flow / "distill/checkpoints/last.pt")
    with torch.no_grad():
        assert torch.equal(net.eval()(images)["out"], kaseg_model(images)["logits"])


def test_onnx_export_of_a_wrapped_student(torchvision_flow, tmp_path):
    pytest.importorskip("onnxruntime")
    from kaseg.tools.export import export_onnx

    checkpoint = torchvision_flow / "distill/checkpoints/last.pt"
    report = export_onnx(checkpoint, tmp_path / "student.onnx", size=(64, 64), tolerance=float("inf"))
    # Three steps from scratch leave MobileNetV3's batch-norm statistics near their
    # initial values, and logits of ~1e6 in eval mode: compare relative to their size.
    with torch.no_grad():
        scale = load_segmenter(checkpoint)(torch.randn(1, 3, 64, 64))["logits"].abs().max().item()
    assert report["num_classes"] == NUM_CLASSES and report["max_abs_diff"] <= 1e-5 * max(scale, 1.0)


def test_distill_smp_to_kaseg(tmp_path):
    smp_or_skip()
    from conftest import TINY_STUDENT

    teacher = {"source": "smp", "name": "DeepLabV3Plus", "features": "decoder",
               "kwargs": {"encoder_name": "resnet18", "decoder_channels": 16}}
    root = run_flow(tmp_path, teacher, dict(TINY_STUDENT))
    ae = torch.load(root / "ae/checkpoints/last.pt", weights_only=True)
    # smp's segmentation_head reads the decoder output: the teacher's mIoU through the
    # reconstruction is measured.
    assert "miou" in ae["metrics"] and ae["arch"]["downsample_layers"] == 2  # stride 4 -> 16


def test_distill_python_factory_to_kaseg(tmp_path, factory_module):
    from conftest import TINY_STUDENT

    teacher = {"source": "python", "factory": f"{factory_module}:tiny_net", "kwargs": {"width": 8},
               "features": "body"}
    root = run_flow(tmp_path, teacher, dict(TINY_STUDENT))
    state = torch.load(root / "teacher/checkpoints/last.pt", weights_only=True)
    assert state["arch"]["name"] == f"{factory_module}:tiny_net"
    from kaseg_test_factory import tiny_net

    # The trained teacher is the user's class with plain keys.
    net = tiny_net(NUM_CLASSES, width=8).eval()
    net.load_state_dict(state["model"])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = F.interpolate(net(images)["logits"], size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.equal(logits, load_segmenter(root / "teacher/checkpoints/last.pt")(images)["logits"])


def test_resumed_external_model_matches_an_uninterrupted_run(tmp_path, factory_module, monkeypatch):
    import shutil

    from kaseg.engine import trainer

    def keep_iteration_2(state, path):  # a copy of the run's state halfway through
        save(state, path)
        if state["iteration"] == 2:
            shutil.copy(path, tmp_path / "halfway.pt")

    save = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", keep_iteration_2)

    def run(name: str, resume: str | None = None) -> dict:
        values = tiny_config(tmp_path, name, train={"iterations": 4, "checkpoint_every": 2, "resume": resume})
        values["model"] = {"source": "python", "factory": f"{factory_module}:tiny_net", "features": "body"}
        train_segmenter(load_config(write_config(tmp_path / f"{name}.yaml", values)), progress=False)
        return torch.load(tmp_path / name / "checkpoints/last.pt", weights_only=True)

    straight = run("straight")
    resumed = run("resumed", resume=str(tmp_path / "halfway.pt"))
    assert resumed["iteration"] == 4
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_checkpoint_of_a_wrapped_instance_names_the_fix(tmp_path):
    from kaseg.engine.checkpoint import save_checkpoint

    model = kaseg.wrap_model(TV.lraspp_mobilenet_v3_large(num_classes=3, weights_backbone=None))
    save_checkpoint({"arch": model.arch, "model": model.state_dict()}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="wrapped from an instance of torchvision.*LRASPP.*cannot rebuild"):
        load_segmenter(tmp_path / "m.pt")


# ---------------------------------------------------------------- recipes


def recipe_flow(root: Path, recipe: str, model_overrides: dict[str, dict]) -> None:
    """Every stage of a recipe, unchanged but for the data (built-in), size, steps and no hub weights."""
    folder = REPO / "kaseg/configs/recipes" / recipe
    tiny = tiny_config(root, "x", train=TRAIN)
    tiny["data"].update(train_split="train", val_split="val", root=None)
    checkpoints = {
        "teacher": {"checkpoint": str(root / f"{recipe}-teacher/checkpoints/last.pt")},
        "autoencoder": {"checkpoint": str(root / f"{recipe}-autoencoder/checkpoints/last.pt"), "code_channels": 8},
    }
    runs = [("teacher", train_segmenter), ("student", train_segmenter), ("autoencoder", train_autoencoder),
            ("distill", distill)]
    for stage, run in runs:
        role = "teacher" if stage == "teacher" else "student"
        values = {"base": str(folder / f"{stage}.yaml"), "name": f"{recipe}-{stage}", "output_dir": str(root),
                  "data": tiny["data"], "train": tiny["train"], "eval": tiny["eval"],
                  "model": model_overrides[role]}
        if stage in ("autoencoder", "distill"):
            values["teacher"] = checkpoints["teacher"]
            values["autoencoder"] = checkpoints["autoencoder"]
        config = load_config(write_config(root / f"{stage}.yaml", values))
        metrics = run(config, progress=False)
        assert metrics, stage
        state = torch.load(root / f"{recipe}-{stage}/checkpoints/last.pt", weights_only=True)
        assert state["iteration"] == 3


@pytest.mark.slow
def test_recipe_torchvision_voc_trains(tmp_path):
    recipe_flow(
        tmp_path,
        "torchvision-voc",
        {"teacher": {"kwargs": {"weights": None}}, "student": {"kwargs": {"weights_backbone": None}}},
    )


@pytest.mark.slow
def test_recipe_smp_voc_trains(tmp_path):
    smp_or_skip()
    recipe_flow(tmp_path, "smp-voc", {role: {"kwargs": {"encoder_weights": None}} for role in ("teacher", "student")})


def test_recipes_load_and_ask_for_hub_weights():
    for recipe, teacher_weights in (("torchvision-voc", "weights"), ("smp-voc", "encoder_weights")):
        if recipe == "smp-voc":
            smp_or_skip()
        folder = REPO / "kaseg/configs/recipes" / recipe
        assert sorted(p.name for p in folder.glob("*.yaml")) == [
            "autoencoder.yaml", "distill.yaml", "student.yaml", "teacher.yaml"
        ]
        teacher = load_config(folder / "teacher.yaml")
        distill_config = load_config(folder / "distill.yaml")
        assert teacher.model.source != "kaseg" and teacher_weights in teacher.model.kwargs
        assert distill_config.teacher.checkpoint.startswith(f"runs/{teacher.name}/")
        assert [loss["name"] for loss in distill_config.distill.losses] == ["adapt", "affinity"]


# ---------------------------------------------------------------- the README's example


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### In your own training loop"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_training_loop_example(tmp_path, monkeypatch):
    code = readme_example()
    assert "kaseg.wrap_model" in code and "for images, masks in loader" in code
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    masks = torch.randint(0, 21, (2, 32, 32))
    masks[:, :2] = 255
    loader = [(torch.randn(2, 3, 32, 32), masks)]
    namespace = {"loader": loader}
    exec(compile(code, "README.md", "exec"), namespace)

    terms = namespace["terms"]
    assert set(terms) == {"ce", "adapt", "affinity"} and all(torch.isfinite(v) for v in terms.values())
    student_net = namespace["student_net"]
    assert all(p.grad is not None for p in student_net.parameters() if p.requires_grad)
    assert all(not p.requires_grad for p in namespace["teacher_net"].parameters())
    # The saved student loads into a fresh torchvision model, without kaseg, and agrees.
    fresh = TV.lraspp_mobilenet_v3_large(num_classes=21, weights_backbone=None)
    fresh.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images)["out"], student_net.eval()(images)["out"])


class _TouchOnUnpickle:
    """A pickled object that creates a file when it is unpickled: the stand-in for code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _cache_torchvision_weights(tmp_path, monkeypatch, payload) -> Path:
    """Puts ``payload`` in an empty torch hub cache as MobileNetV3-Large's ImageNet weights."""
    weights = torchvision.models.MobileNet_V3_Large_Weights.DEFAULT
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(payload, cached)
    return cached


def test_torchvision_hub_weights_load_as_tensors_only(tmp_path, monkeypatch):
    state = torchvision.models.mobilenet_v3_large().state_dict()
    _cache_torchvision_weights(tmp_path, monkeypatch, state)
    model = build_external("torchvision", name="lraspp_mobilenet_v3_large", num_classes=21,
                           kwargs={"weights_backbone": "DEFAULT"})
    loaded = model.model.backbone.state_dict()
    assert loaded and all(torch.equal(value, state[f"features.{key}"]) for key, value in loaded.items())


def test_torchvision_hub_weights_that_hold_code_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    _cache_torchvision_weights(tmp_path, monkeypatch, {"features.0.0.weight": _TouchOnUnpickle(marker)})
    with pytest.raises(PretrainedWeightsError, match="could not load torchvision weights"):
        build_external("torchvision", name="lraspp_mobilenet_v3_large", num_classes=21,
                       kwargs={"weights_backbone": "DEFAULT"})
    assert not marker.exists()
    # The loader torchvision uses is restored afterwards.
    import torchvision.models._api as api

    assert api.load_state_dict_from_url is torch.hub.load_state_dict_from_url
