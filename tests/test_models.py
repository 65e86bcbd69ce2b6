"""The model zoo: shapes, strides, the forward contract, the registry and pretrained weights."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import kaseg
from kaseg.models import MODELS, PretrainedWeightsError, backbones, build_model, create_backbone
from kaseg.registry import Registry

SIZES = [(64, 64), (65, 97), (50, 34)]  # 65x97 and 50x34 are not multiples of 32


def small_kwargs(name: str) -> dict:
    return {"num_classes": 5, "head_channels": 16} | (
        {"width": 0.35} if name.endswith("mobilenetv2") else {}
    )


HEAVY = ("resnet50", "resnet101", "xception41")


def zoo_cases() -> list:
    """Every model at OS 16; the light ones at every stride, the heavy ones on request."""
    cases = []
    for name in kaseg.list_models():
        for stride in (8, 16, 32):
            slow = stride != 16 and name.endswith(HEAVY)
            cases.append(pytest.param(name, stride, marks=[pytest.mark.slow] if slow else []))
    return cases


@pytest.mark.parametrize("name, output_stride", zoo_cases())
def test_every_zoo_model_shapes_and_strides(name, output_stride):
    model = build_model(name, output_stride=output_stride, **small_kwargs(name)).eval()
    expected_stride = 4 if name.startswith("deeplabv3plus") else output_stride
    assert model.feature_stride == expected_stride
    assert model.output_stride == output_stride
    assert model.feature_channels == 16
    with torch.no_grad():
        for height, width in SIZES:
            out = model(torch.randn(1, 3, height, width))
            assert set(out) == {"logits", "features"}
            assert out["logits"].shape == (1, 5, height, width)
            features = out["features"]
            assert features.shape[:2] == (1, 16)
            # Every stride-2 layer rounds up: ceil(size / stride).
            assert features.shape[2:] == (
                math.ceil(height / expected_stride),
                math.ceil(width / expected_stride),
            )


def test_registry_lists_the_required_names():
    required = {
        "deeplabv3plus_resnet50",
        "deeplabv3plus_resnet101",
        "deeplabv3plus_xception41",
        "deeplabv3plus_resnet18",
        "deeplabv3_mobilenetv2",
    }
    assert required <= set(kaseg.list_models())


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(ValueError, match="deeplabv3_mobilenetv2") as error:
        build_model("deeplabv3_mobilenetv3")
    assert "unknown model 'deeplabv3_mobilenetv3'" in str(error.value)


def test_unknown_model_argument_is_an_error():
    with pytest.raises(TypeError, match="valid"):
        build_model("deeplabv3_mobilenetv2", widht=0.5)


def test_registry_refuses_duplicates():
    registry = Registry("thing")
    registry.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(lambda: 2)
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("deeplabv3_mobilenetv2")(lambda: None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"output_stride": 4}, "output_stride must be one of"),
        ({"width": 0.6}, "width must be one of"),
        ({"aspp": False, "aspp_rates": (1, 2)}, "aspp_rates needs aspp=True"),
    ],
)
def test_bad_student_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("deeplabv3_mobilenetv2", **kwargs)


def test_width_only_for_mobilenetv2():
    with pytest.raises(ValueError, match="only available for mobilenetv2"):
        build_model("deeplabv3plus_resnet18", width=0.5)


@pytest.mark.parametrize("width, timm_name", sorted(backbones.MOBILENETV2_WIDTHS.items()))
def test_student_widths_use_timm_variants(width, timm_name):
    model = build_model("deeplabv3_mobilenetv2", width=width, head_channels=8)
    reference = timm.create_model(timm_name, features_only=True, out_indices=(1, 4))
    assert model.backbone.feature_info.channels() == reference.feature_info.channels()


def test_light_head_matches_mobilenetv2_paper_size():
    # MobileNetV2 paper, Table 7: MNV2 + light DeepLabV3 head, OS 16: 2.11M params.
    model = build_model("deeplabv3_mobilenetv2", num_classes=21, output_stride=16, aspp=False)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 2.11e6) / 2.11e6 < 0.1
    full = build_model("deeplabv3_mobilenetv2", num_classes=21, output_stride=16, aspp=True)
    assert sum(p.numel() for p in full.parameters()) > params


def test_gradients_reach_every_parameter():
    model = build_model("deeplabv3plus_resnet18", num_classes=3, output_stride=16, head_channels=8)
    out = model(torch.randn(2, 3, 64, 64))
    (out["logits"].mean() + out["features"].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_pretrained_offline_fails_clearly(monkeypatch):
    monkeypatch.setattr(backbones, "_cached_weights_file", lambda name: None)
    monkeypatch.setattr(backbones, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(PretrainedWeightsError, match="cannot be reached"):
        build_model("deeplabv3_mobilenetv2", pretrained=True)


def test_pretrained_missing_file_fails_clearly(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_model("deeplabv3_mobilenetv2", pretrained=str(tmp_path / "nope.pth"))


def test_pretrained_from_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    classifier = timm.create_model("mobilenetv2_035")
    path = tmp_path / "mobilenetv2_035.pth"
    torch.save(classifier.state_dict(), path)
    backbone = create_backbone("mobilenetv2_035", output_stride=16, pretrained=str(path))
    torch.testing.assert_close(backbone.conv_stem.weight, classifier.conv_stem.weight)
    model = build_model("deeplabv3_mobilenetv2", width=0.35, pretrained=str(path))
    torch.testing.assert_close(model.backbone.conv_stem.weight, classifier.conv_stem.weight)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_decoder_stride_8_gives_the_papers_teacher_tap(output_stride):
    model = build_model(
        "deeplabv3plus_resnet18", num_classes=3, output_stride=output_stride, decoder_stride=8, head_channels=8
    ).eval()
    assert model.feature_stride == 8 and model.arch["decoder_stride"] == 8
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 97))
    assert out["features"].shape == (1, 8, 9, 13) and out["logits"].shape == (1, 3, 65, 97)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("deeplabv3plus_resnet18", {"decoder_stride": 16}, "decoder_stride must be one of"),
        ("deeplabv3_resnet18", {"decoder_stride": 8}, "deeplabv3plus models"),
        ("deeplabv3plus_resnet18", {"decoder_stride": 8, "output_stride": 32}, None),
    ],
)
def test_decoder_stride_errors(name, kwargs, match):
    if match is None:
        assert build_model(name, **kwargs).feature_stride == 8
        return
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)
