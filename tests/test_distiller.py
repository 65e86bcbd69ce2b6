"""The auto-encoder, the adapter and the Distiller: shapes, freezing and loss wiring."""

from __future__ import annotations

import pytest
import torch

from kaseg.distill import (
    LOSSES,
    AutoEncoderTraining,
    Distiller,
    FeatureDims,
    TeacherAutoEncoder,
    build_losses,
    stride_ratio_layers,
)
from kaseg.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_teacher(output_stride: int = 8):
    return build_model("deeplabv3plus_resnet18", num_classes=4, output_stride=output_stride, head_channels=16)


def tiny_student(output_stride: int = 16):
    return build_model(
        "deeplabv3_mobilenetv2", num_classes=4, output_stride=output_stride, width=0.35,
        aspp=False, head_channels=16,
    )


@pytest.mark.parametrize("teacher_stride, student_stride, layers", [(4, 16, 2), (4, 32, 3), (8, 16, 1), (8, 8, 0)])
def test_stride_ratio_layers(teacher_stride, student_stride, layers):
    assert stride_ratio_layers(teacher_stride, student_stride) == layers


@pytest.mark.parametrize("teacher_stride, student_stride", [(8, 24), (16, 8), (4, 12)])
def test_stride_ratio_not_power_of_two_is_an_error(teacher_stride, student_stride):
    with pytest.raises(ValueError, match="power of two"):
        stride_ratio_layers(teacher_stride, student_stride)


@pytest.mark.parametrize("downsample_layers", [0, 1, 2, 3])
@pytest.mark.parametrize("size", [(16, 16), (17, 25)])
def test_autoencoder_code_on_student_grid_and_reconstruction_shape(downsample_layers, size):
    autoencoder = TeacherAutoEncoder(12, 6, downsample_layers=downsample_layers)
    features = torch.randn(2, 12, *size)
    code, reconstruction = autoencoder(features)
    expected = list(size)
    for _ in range(downsample_layers):
        expected = [(s + 1) // 2 for s in expected]
    assert code.shape == (2, 6, *expected)
    assert reconstruction.shape == features.shape
    assert len(autoencoder.encoder) == max(3, downsample_layers)
    assert torch.equal(autoencoder.encode(features), code)


@pytest.mark.parametrize("student_stride", [16, 32])
@pytest.mark.parametrize("size", [(64, 64), (72, 100)])
def test_teacher_code_matches_student_grid(student_stride, size):
    teacher, student = tiny_teacher().eval(), tiny_student(student_stride).eval()
    layers = stride_ratio_layers(teacher.feature_stride, student.feature_stride)
    autoencoder = TeacherAutoEncoder(teacher.feature_channels, 8, downsample_layers=layers).eval()
    images = torch.randn(1, 3, *size)
    with torch.no_grad():
        code = autoencoder.encode(teacher(images)["features"])
        assert code.shape[-2:] == student(images)["features"].shape[-2:]


def bn_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def make_distiller(losses=None, autoencoder=True):
    torch.manual_seed(0)
    teacher, student = tiny_teacher(), tiny_student()
    layers = stride_ratio_layers(teacher.feature_stride, student.feature_stride)
    encoder = TeacherAutoEncoder(teacher.feature_channels, 8, downsample_layers=layers) if autoencoder else None
    dims = FeatureDims(student.feature_channels, teacher.feature_channels, 8 if autoencoder else 16, 4)
    specs = losses or [{"name": "adapt", "weight": 50.0}, {"name": "affinity", "weight": 1.0}]
    return Distiller(teacher, student, encoder=encoder, losses=build_losses(specs, dims))


def test_distiller_losses_and_frozen_parts():
    distiller = make_distiller().train()
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in distiller.encoder.state_dict().items()}
    assert not distiller.teacher.training and not distiller.encoder.training
    images = torch.randn(2, 3, 64, 64)
    masks = torch.randint(0, 4, (2, 64, 64))
    masks[:, :4] = 255
    losses = distiller(images, masks)
    assert set(losses) == {"ce", "adapt", "affinity"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    optimizer = torch.optim.SGD(distiller.trainable.parameters(), lr=0.1)
    optimizer.step()

    # Teacher and encoder: no gradients, unchanged weights and batch-norm statistics.
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert all(p.grad is None for p in distiller.encoder.parameters())
    for name, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    for name, value in distiller.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    # Student and adapter learn.
    assert all(p.grad is not None for p in distiller.student.parameters())
    assert all(p.grad is not None for p in distiller.adapter.parameters())
    assert set(distiller.trainable) == {"student", "losses", "adapter"}


def test_distiller_weights_scale_the_terms():
    torch.manual_seed(1)
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    one = make_distiller([{"name": "adapt", "weight": 1.0}]).eval()
    fifty = make_distiller([{"name": "adapt", "weight": 50.0}]).eval()
    with torch.no_grad():
        a, b = one(images, masks), fifty(images, masks)
    torch.testing.assert_close(b["adapt"], 50 * a["adapt"])
    torch.testing.assert_close(b["ce"], a["ce"])


def test_warmup_ramps_the_distillation_weights_not_the_cross_entropy():
    torch.manual_seed(1)
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    specs = [{"name": "adapt", "weight": 50.0}, {"name": "affinity", "weight": 1.0}]
    full = make_distiller(specs).eval()
    warm = make_distiller(specs).eval()
    warm.warmup_iterations = 4
    with torch.no_grad():
        reference = full(images, masks)
        for iteration, factor in ((1, 0.25), (3, 0.75), (4, 1.0), (9, 1.0)):
            warm.start_iteration(iteration)
            terms = warm(images, masks)
            torch.testing.assert_close(terms["ce"], reference["ce"])
            for key in ("adapt", "affinity"):
                torch.testing.assert_close(terms[key], factor * reference[key])
    full.start_iteration(1)  # no warm-up: nothing changes
    with torch.no_grad():
        torch.testing.assert_close(full(images, masks)["adapt"], reference["adapt"])


def test_distiller_without_autoencoder_adapts_to_resized_teacher():
    distiller = make_distiller(autoencoder=False).train()
    assert distiller.encoder is None
    assert distiller.adapter[-1][0].out_channels == distiller.teacher.feature_channels
    losses = distiller(torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64)))
    assert set(losses) == {"ce", "adapt", "affinity"}


def test_affinity_on_raw_student_features():
    distiller = make_distiller([{"name": "affinity", "source": "student"}]).train()
    losses = distiller(torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64)))
    losses["affinity"].backward()
    # The loss reads the teacher's code but not the adapter, so no adapter is built
    # (an unused adapter would also break DistributedDataParallel).
    assert distiller.adapter is None and "adapter" not in distiller.trainable
    assert any(p.grad is not None for p in distiller.student.parameters())


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "nope"}, "unknown distillation loss 'nope'"),
        ({"name": "adapt", "q": 3}, r"no parameter\(s\) \['q'\]; valid: .*'p'"),
        ({"weight": 1}, "must be a mapping with a 'name'"),
        ({"name": "affinity", "source": "elsewhere"}, "source must be"),
    ],
)
def test_loss_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_losses([spec], FeatureDims(16, 16, 8, 4))


def test_duplicate_loss_keys_need_a_key():
    dims = FeatureDims(16, 16, 8, 4)
    with pytest.raises(ValueError, match="used twice"):
        build_losses([{"name": "affinity"}, {"name": "affinity", "source": "student"}], dims)
    built = build_losses([{"name": "affinity"}, {"name": "affinity", "source": "student", "key": "affinity_raw"}], dims)
    assert [b.key for b in built] == ["affinity", "affinity_raw"]


def test_autoencoder_training_keeps_teacher_frozen():
    torch.manual_seed(2)
    teacher = tiny_teacher()
    autoencoder = TeacherAutoEncoder(teacher.feature_channels, 8, downsample_layers=2)
    module = AutoEncoderTraining(teacher, autoencoder, alpha=1e-7).train()
    before = bn_state(teacher)
    losses = module(torch.randn(2, 3, 64, 64))
    assert set(losses) == {"reconstruction", "sparsity"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in autoencoder.parameters())
    for name, value in bn_state(teacher).items():
        assert torch.equal(value, before[name]), name


def test_loss_registry_has_the_paper_losses():
    assert {"adapt", "affinity"} <= set(LOSSES.names())


def test_autoencoder_for_another_teacher_or_code_size_is_refused(tmp_path):
    from kaseg.engine.checkpoint import CheckpointError, save_checkpoint
    from kaseg.stages import load_autoencoder

    teacher = tiny_teacher()
    autoencoder = TeacherAutoEncoder(teacher.feature_channels, 8, downsample_layers=2, teacher_arch=teacher.arch)
    path = tmp_path / "ae.pt"
    save_checkpoint({"arch": autoencoder.arch, "model": autoencoder.state_dict()}, path)
    assert load_autoencoder(path, teacher, 8, 2).arch == autoencoder.arch
    with pytest.raises(CheckpointError, match="code_channels: checkpoint has 8, model has 16"):
        load_autoencoder(path, teacher, 16, 2)
    other_teacher = build_model("deeplabv3plus_resnet18", num_classes=4, output_stride=16, head_channels=16)
    with pytest.raises(CheckpointError, match="teacher: checkpoint has .*'output_stride': 8"):
        load_autoencoder(path, other_teacher, 8, 2)
    with pytest.raises(CheckpointError, match="kaseg train-ae"):
        load_autoencoder(None, teacher, 8, 2)
