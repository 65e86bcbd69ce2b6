"""DIST, CIRKD and IFVD against naive float64 references written from their papers (and
their authors' code where it settles a detail), and their wiring into the Distiller."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kaseg.distill import (
    LOSSES,
    Distiller,
    DistillInputs,
    FeatureDims,
    build_losses,
    cross_image_relation_loss,
    dist_loss,
    intra_class_variation_loss,
)
from kaseg.distill.relational import masks_on_grid
from kaseg.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def random_masks(shape, classes=3, ignored=0.3):
    masks = torch.randint(0, classes, shape)
    masks[torch.rand(shape) < ignored] = 255
    return masks


def leaf(*shape, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def detached_copy(tensor):
    return tensor.detach().clone().requires_grad_(True)


# DIST: the paper's definition, pixel by pixel and class by class.


def pearson(u, v):
    u, v = u - u.mean(), v - v.mean()
    return (u * v).sum() / (u.norm() * v.norm())


def naive_dist(student, teacher, masks, tau=1.0, beta=1.0, gamma=1.0):
    batch, classes, height, width = student.shape
    p_s_rows, p_t_rows = [], []
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if masks is not None and masks[b, y, x] == 255:
                    continue
                p_s_rows.append(torch.softmax(student[b, :, y, x] / tau, 0))
                p_t_rows.append(torch.softmax(teacher[b, :, y, x] / tau, 0))
    p_s, p_t = torch.stack(p_s_rows), torch.stack(p_t_rows)  # pixels x K
    inter = 1 - sum(pearson(p_s[j], p_t[j]) for j in range(len(p_s))) / len(p_s)
    intra = 1 - sum(pearson(p_s[:, k], p_t[:, k]) for k in range(classes)) / classes
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize(
    "shape, tau, beta, gamma, with_masks",
    [((2, 4, 3, 5), 1.0, 1.0, 1.0, False), ((2, 5, 4, 3), 2.0, 0.5, 2.0, True), ((1, 3, 6, 6), 1.0, 1.0, 0.0, True)],
)
def test_dist_matches_naive_values_and_gradients(shape, tau, beta, gamma, with_masks):
    student, teacher = leaf(*shape, seed=0), leaf(*shape)
    masks = random_masks((shape[0], *shape[2:])) if with_masks else None
    student_ref = detached_copy(student)
    # eps = 0: the paper's correlation exactly (the default 1e-8 shifts it by ~1e-8 / variance).
    loss = dist_loss(student, teacher, masks, beta=beta, gamma=gamma, temperature=tau, eps=0.0)
    reference = naive_dist(student_ref, teacher.detach(), masks, tau, beta, gamma)
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=1e-12)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-7, atol=1e-12)
    assert teacher.grad is None


def test_dist_resizes_a_finer_teacher_bilinearly():
    student, teacher = leaf(2, 4, 3, 4, seed=1), leaf(2, 4, 6, 8)
    resized = F.interpolate(teacher.detach(), size=(3, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        dist_loss(student, teacher, eps=0.0), naive_dist(student, resized, None), rtol=1e-9, atol=1e-12
    )


def test_dist_minimal_at_identical_logits():
    logits = torch.randn(2, 5, 4, 4, dtype=torch.float64) * 3
    at_teacher = dist_loss(logits, logits, temperature=2.0)
    assert at_teacher.item() == pytest.approx(0, abs=1e-6)  # eps in the denominators only
    assert dist_loss(logits + 0.5 * torch.randn_like(logits), logits).item() > 100 * at_teacher.item()


def test_dist_ignored_pixels_have_no_effect():
    student, teacher = leaf(2, 3, 5, 5, seed=2), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    masks = random_masks((2, 5, 5))
    ignored = (masks == 255).unsqueeze(1).expand_as(teacher)
    loss = dist_loss(student, teacher, masks)
    loss.backward()
    assert (student.grad[ignored] == 0).all() and (student.grad[~ignored] != 0).any()
    changed = dist_loss(torch.where(ignored, 50.0, student.detach()), torch.where(ignored, -50.0, teacher), masks)
    torch.testing.assert_close(changed, loss.detach())


def test_dist_all_ignored_is_zero_with_zero_gradient():
    student = leaf(1, 3, 2, 2, seed=3)
    loss = dist_loss(student, torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


def test_dist_matches_the_authors_code():
    """hunto/DIST_KD segmentation/losses/dist_kd.py, DIST.forward (tau = 1), written out."""

    def authors_dist(y_s, y_t, beta=1.0, gamma=1.0, eps=1e-8):
        def cosine(a, b):
            return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

        def pearson_rows(a, b):
            return cosine(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

        classes = y_s.shape[1]
        y_s = y_s.transpose(1, 3).reshape(-1, classes).softmax(dim=1)
        y_t = y_t.transpose(1, 3).reshape(-1, classes).softmax(dim=1)
        inter = 1 - pearson_rows(y_s, y_t).mean()
        intra = 1 - pearson_rows(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
        return beta * inter + gamma * intra

    student, teacher = leaf(3, 6, 4, 5, seed=4), torch.randn(3, 6, 4, 5, dtype=torch.float64)
    student_ref = detached_copy(student)
    loss, reference = dist_loss(student, teacher, beta=2.0), authors_dist(student_ref, teacher, beta=2.0)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-10, atol=1e-12)


# CIRKD: the paper's definition, pair by pair and row by row.


def naive_cirkd(student, teacher, tau=0.1):
    teacher = F.adaptive_avg_pool2d(teacher, student.shape[-2:])
    s = (student / student.norm(dim=1, keepdim=True)).flatten(2)  # B x C x N
    t = (teacher / teacher.norm(dim=1, keepdim=True)).flatten(2)
    batch, positions = s.shape[0], s.shape[2]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            pair = 0.0
            for a in range(positions):
                p_s = torch.softmax(s[i][:, a] @ s[j] / tau, 0)
                p_t = torch.softmax(t[i][:, a] @ t[j] / tau, 0)
                pair = pair + (p_t * (p_t.log() - p_s.log())).sum()
            total = total + pair / positions
    return total / batch**2


@pytest.mark.parametrize(
    "student_shape, teacher_shape, tau, block_rows",
    [
        ((2, 5, 3, 4), (2, 5, 3, 4), 0.1, None),
        ((3, 4, 2, 3), (3, 7, 4, 6), 0.5, 5),  # teacher pooled; blocks straddle images
        ((2, 6, 3, 3), (2, 3, 5, 5), 0.1, 1),
    ],
)
def test_cirkd_matches_naive_values_and_gradients(student_shape, teacher_shape, tau, block_rows):
    student, teacher = leaf(*student_shape, seed=5), leaf(*teacher_shape)
    student_ref = detached_copy(student)
    loss = cross_image_relation_loss(student, teacher, temperature=tau, block_rows=block_rows)
    reference = naive_cirkd(student_ref, teacher.detach(), tau)
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=1e-12)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-8, atol=1e-12)
    assert teacher.grad is None


@pytest.mark.parametrize("block_rows", [1, 4, 7, 23])
def test_cirkd_blocked_equals_unblocked(block_rows):
    student, teacher = leaf(3, 8, 3, 4, seed=6), torch.randn(3, 8, 6, 8, dtype=torch.float64)
    student_ref = detached_copy(student)
    blocked = cross_image_relation_loss(student, teacher, block_rows=block_rows)
    unblocked = cross_image_relation_loss(student_ref, teacher, block_rows=3 * 12)
    torch.testing.assert_close(blocked, unblocked, rtol=1e-12, atol=1e-14)
    blocked.backward()
    unblocked.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-10, atol=1e-14)


def test_cirkd_gradcheck_and_value_without_gradients():
    student, teacher = leaf(2, 4, 2, 3, seed=7), torch.randn(2, 4, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: cross_image_relation_loss(x, teacher, block_rows=5), (student,))
    with torch.no_grad():
        no_grad = cross_image_relation_loss(student, teacher, block_rows=5)
    torch.testing.assert_close(no_grad, cross_image_relation_loss(student, teacher))


def test_cirkd_zero_at_identical_features_and_float32_close():
    features = torch.randn(2, 6, 4, 4)
    assert cross_image_relation_loss(features, features).item() == pytest.approx(0, abs=1e-6)
    student, teacher = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(
        cross_image_relation_loss(student, teacher).double(),
        naive_cirkd(student.double(), teacher.double()),
        rtol=1e-5,
        atol=1e-6,
    )


def test_cirkd_module_projection_head():
    torch.manual_seed(8)
    student, teacher = torch.randn(2, 5, 3, 3, requires_grad=True), torch.randn(2, 7, 6, 6)
    inputs = DistillInputs(
        student_logits=torch.randn(2, 3, 12, 12), student_features=student,
        teacher_logits=torch.randn(2, 3, 12, 12), teacher_features=teacher, masks=random_masks((2, 12, 12)),
    )
    auto = LOSSES.get("cirkd")(FeatureDims(5, 7, 8, 3))
    head = auto.head  # CIRKD's layers: 1x1 conv (no bias), BN, ReLU, 1x1 conv (no bias)
    assert [type(m) for m in head] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert head[0].bias is None and head[3].bias is None and head[0].out_channels == 7 == head[3].out_channels
    loss = auto(inputs)
    torch.testing.assert_close(loss, cross_image_relation_loss(head(student), teacher))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert student.grad is not None

    assert LOSSES.get("cirkd")(FeatureDims(5, 7, 8, 3), projection="none").head is None
    assert LOSSES.get("cirkd")(FeatureDims(7, 7, 8, 3)).head is None
    assert LOSSES.get("cirkd")(FeatureDims(7, 7, 8, 3), projection="always").head is not None


# IFVD: the paper's definition, image by image and class by class.


def naive_ifvd(student, teacher, masks, classes):
    """Prototype = mean feature of a class in an image; M(j) = cos(f_j, its prototype);
    the squared differences over labelled pixels, divided by all pixels (as IFVD's MSE)."""
    teacher = F.adaptive_avg_pool2d(teacher, student.shape[-2:])
    labels = F.interpolate(masks[:, None].float(), size=student.shape[-2:], mode="nearest")[:, 0].long()
    total = 0.0
    for b in range(student.shape[0]):
        for k in range(classes):
            where = labels[b] == k
            if not where.any():
                continue
            s_pixels, t_pixels = student[b][:, where], teacher[b][:, where]  # C x n
            s_proto, t_proto = s_pixels.mean(1, keepdim=True), t_pixels.mean(1, keepdim=True)
            m_s = (s_pixels * s_proto).sum(0) / (s_pixels.norm(dim=0) * s_proto.norm())
            m_t = (t_pixels * t_proto).sum(0) / (t_pixels.norm(dim=0) * t_proto.norm())
            total = total + ((m_s - m_t) ** 2).sum()
    return total / labels.numel()


@pytest.mark.parametrize(
    "student_shape, teacher_shape, mask_size",
    [
        ((2, 5, 4, 4), (2, 5, 4, 4), (4, 4)),
        ((2, 6, 3, 5), (2, 4, 6, 10), (12, 20)),
        ((1, 3, 5, 4), (1, 8, 5, 4), (20, 16)),
    ],
)
def test_ifvd_matches_naive_values_and_gradients(student_shape, teacher_shape, mask_size):
    student, teacher = leaf(*student_shape, seed=9), leaf(*teacher_shape)
    masks = random_masks((student_shape[0], *mask_size), classes=3)
    student_ref = detached_copy(student)
    loss = intra_class_variation_loss(student, teacher, masks, num_classes=3)
    reference = naive_ifvd(student_ref, teacher.detach(), masks, 3)
    # IFVD's +1e-6 in the prototype's mean scales the prototype only: cosines are unchanged.
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=1e-12)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-7, atol=1e-12)
    assert teacher.grad is None


def test_ifvd_matches_the_authors_code():
    """YukangWang/IFVD utils/criterion.py, CriterionIFV.forward, written out (one grid)."""

    def authors_ifvd(feat_s, feat_t, target, classes):
        size = feat_s.shape[2:]
        tar_s = F.interpolate(target.unsqueeze(1).float(), size, mode="nearest").expand(feat_s.size())
        tar_t = F.interpolate(target.unsqueeze(1).float(), size, mode="nearest").expand(feat_t.size())
        center_s, center_t = feat_s.clone(), feat_t.clone()
        for i in range(classes):
            mask_s, mask_t = (tar_s == i).double(), (tar_t == i).double()
            proto_s = (mask_s * feat_s).sum(-1).sum(-1) / (mask_s.sum(-1).sum(-1) + 1e-6)
            proto_t = (mask_t * feat_t).sum(-1).sum(-1) / (mask_t.sum(-1).sum(-1) + 1e-6)
            center_s = (1 - mask_s) * center_s + mask_s * proto_s[..., None, None]
            center_t = (1 - mask_t) * center_t + mask_t * proto_t[..., None, None]
        sim_s = F.cosine_similarity(feat_s, center_s, dim=1)
        sim_t = F.cosine_similarity(feat_t, center_t, dim=1)
        return F.mse_loss(sim_s, sim_t)

    student, teacher = leaf(2, 6, 4, 5, seed=10), torch.randn(2, 9, 4, 5, dtype=torch.float64)
    masks = random_masks((2, 16, 20), classes=4)
    student_ref = detached_copy(student)
    loss = intra_class_variation_loss(student, teacher, masks, num_classes=4)
    reference = authors_ifvd(student_ref, teacher, masks, 4)
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=1e-12)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-6, atol=1e-12)


def test_ifvd_ignored_pixels_have_no_effect_and_zero_at_identical():
    student, teacher = leaf(2, 4, 4, 4, seed=11), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    masks = random_masks((2, 4, 4))
    ignored = (masks == 255).unsqueeze(1).expand_as(student)
    loss = intra_class_variation_loss(student, teacher, masks, num_classes=3)
    loss.backward()
    assert (student.grad[ignored] == 0).all() and (student.grad[~ignored] != 0).any()
    changed = intra_class_variation_loss(
        torch.where(ignored, 7.0, student.detach()), torch.where(ignored, -3.0, teacher), masks, num_classes=3
    )
    torch.testing.assert_close(changed, loss.detach())
    assert intra_class_variation_loss(teacher, teacher, masks, num_classes=3).item() == pytest.approx(0, abs=1e-12)


def test_ifvd_rejects_labels_outside_the_classes():
    features = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) or 255"):
        intra_class_variation_loss(features, features, torch.full((1, 2, 2), 3), num_classes=3)


def test_masks_on_grid_is_nearest():
    masks = torch.arange(16).view(1, 4, 4)
    assert torch.equal(masks_on_grid(masks, (2, 2)), torch.tensor([[[0, 2], [8, 10]]]))
    assert masks_on_grid(masks, (4, 4)) is masks


# Configuration and the Distiller


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "dist", "temperature": 0}, "temperature must be"),
        ({"name": "dist", "beta": -1}, "beta must be a finite number >= 0"),
        ({"name": "dist", "resolution": "full"}, r"resolution must be one of \['input', 'native'\]"),
        ({"name": "dist", "exclude_ignore": "yes"}, "exclude_ignore must be true or false"),
        ({"name": "cirkd", "temperature": -0.1}, "temperature must be"),
        ({"name": "cirkd", "projection": "maybe"}, r"projection must be one of \['auto', 'always', 'none'\]"),
        ({"name": "ifvd", "classes": 3}, r"no parameter\(s\) \['classes'\]"),
    ],
)
def test_parameter_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_losses([spec], FeatureDims(16, 16, 8, 4))


def tiny_pair():
    teacher = build_model("deeplabv3plus_resnet18", num_classes=4, output_stride=8, head_channels=16)
    student = build_model(
        "deeplabv3_mobilenetv2", num_classes=4, output_stride=16, width=0.35, aspp=False, head_channels=12, dropout=0.0
    )
    return teacher, student


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "dist"},
        {"name": "dist", "resolution": "input", "exclude_ignore": True, "temperature": 2.0},
        {"name": "cirkd"},
        {"name": "cirkd", "projection": "none"},
        {"name": "ifvd"},
    ],
    ids=["dist", "dist-input-masked", "cirkd-projected", "cirkd-raw", "ifvd"],
)
def test_new_losses_train_with_the_distiller(spec):
    torch.manual_seed(12)
    teacher, student = tiny_pair()
    dims = FeatureDims(student.feature_channels, teacher.feature_channels, teacher.feature_channels, 4)
    distiller = Distiller(teacher, student, encoder=None, losses=build_losses([spec], dims), ce_weight=0.0)
    # Batch norm on running statistics: with the batch statistics of two tiny images the
    # loss jumps from step to step; this way a few small steps must lower it every time.
    distiller.eval()
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable.parameters(), lr=0.01)
    images = torch.randn(2, 3, 64, 64)
    masks = torch.randint(0, 4, (2, 64, 64))
    masks[:, :16] = 255
    history = []
    for _ in range(4):
        losses = distiller(images, masks)
        assert set(losses) == {"ce", spec["name"]} and all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in distiller.teacher.parameters())
        optimizer.step()
        history.append(losses[spec["name"]].item())
    assert all(later < earlier for earlier, later in zip(history, history[1:])), history
    for name, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_distiller_native_logits_are_the_classifiers_outputs():
    torch.manual_seed(13)
    teacher, student = tiny_pair()
    dims = FeatureDims(student.feature_channels, teacher.feature_channels, teacher.feature_channels, 4)
    specs = [{"name": "kd", "resolution": "native"}]
    distiller = Distiller(teacher, student, encoder=None, losses=build_losses(specs, dims)).eval()
    seen = {}
    distiller.losses[0].register_forward_pre_hook(lambda module, args: seen.update(inputs=args[0]))
    images = torch.randn(1, 3, 64, 64)
    distiller(images, torch.zeros(1, 64, 64, dtype=torch.long))
    inputs = seen["inputs"]
    with torch.no_grad():
        torch.testing.assert_close(inputs.student_native_logits, student.classifier(student(images)["features"]))
        torch.testing.assert_close(inputs.teacher_native_logits, teacher.classifier(teacher(images)["features"]))
    assert inputs.student_native_logits.shape[-2:] == (64 // student.feature_stride,) * 2
    assert inputs.teacher_native_logits.shape[-2:] == (64 // teacher.feature_stride,) * 2
    assert inputs.student_native_logits.requires_grad and not inputs.teacher_native_logits.requires_grad


def test_native_logits_need_a_model_that_has_them():
    class Plain(nn.Module):
        feature_channels = 16

        def forward(self, images):
            return {"logits": images[:, :4], "features": images.repeat(1, 6, 1, 1)[:, :16]}

    teacher, _ = tiny_pair()
    dims = FeatureDims(16, 16, 16, 4)
    with pytest.raises(TypeError, match="Plain has no native_logits"):
        Distiller(teacher, Plain(), encoder=None, losses=build_losses([{"name": "dist"}], dims))
    # The input-size forms do not need it.
    Distiller(teacher, Plain(), encoder=None, losses=build_losses([{"name": "dist", "resolution": "input"}], dims))


def test_registry_has_the_relational_losses():
    assert {"dist", "cirkd", "ifvd"} <= set(LOSSES.names())
    assert LOSSES.get("dist")(FeatureDims(4, 4, 4, 3)).needs_native_logits
    assert not LOSSES.get("dist")(FeatureDims(4, 4, 4, 3), resolution="input").needs_native_logits
    for name in ("cirkd", "ifvd"):
        module = LOSSES.get(name)(FeatureDims(4, 4, 4, 3))
        assert not (module.needs_native_logits or module.needs_teacher_code or module.needs_adapter)
