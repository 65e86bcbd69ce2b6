"""The comparison losses (kd, fitnet, pairwise, cwd) against naive float64 references,
and their wiring into the Distiller."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kaseg.distill import (
    LOSSES,
    Distiller,
    DistillInputs,
    FeatureDims,
    build_losses,
    channel_wise_loss,
    feature_mimic_loss,
    logit_kd_loss,
    pairwise_distillation_loss,
)
from kaseg.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Naive references: loops over pixels, channels and windows, in float64.


def naive_kd(student, teacher, masks, temperature):
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for y in range(student.shape[2]):
            for x in range(student.shape[3]):
                if masks is not None and masks[b, y, x] == 255:
                    continue
                p_t = torch.softmax(teacher[b, :, y, x].double() / temperature, 0)
                log_p_s = torch.log_softmax(student[b, :, y, x].double() / temperature, 0)
                total = total + (p_t * (p_t.log() - log_p_s)).sum()
                count += 1
    return total / count * temperature**2


def naive_windows_mean(features, windows_y, windows_x):
    """Mean of ``features`` (B x C x H x W) over each (rows, cols) window pair."""
    out = torch.zeros(*features.shape[:2], len(windows_y), len(windows_x), dtype=torch.float64)
    for i, (y0, y1) in enumerate(windows_y):
        for j, (x0, x1) in enumerate(windows_x):
            out[:, :, i, j] = features[:, :, y0:y1, x0:x1].double().mean((2, 3))
    return out


def naive_adaptive_pool(features, size):
    def windows(n, out):
        return [(math.floor(i * n / out), math.ceil((i + 1) * n / out)) for i in range(out)]

    return naive_windows_mean(features, windows(features.shape[2], size[0]), windows(features.shape[3], size[1]))


def naive_ceil_pool(features, pool):
    def windows(n):
        return [(start, min(start + pool, n)) for start in range(0, n, pool)]

    return naive_windows_mean(features, windows(features.shape[2]), windows(features.shape[3]))


def naive_pairwise(student, teacher, pool):
    teacher = naive_ceil_pool(naive_adaptive_pool(teacher, student.shape[-2:]), pool)
    student = naive_ceil_pool(student, pool)
    losses = []
    for s, t in zip(student, teacher):
        s, t = s.flatten(1), t.flatten(1)
        s, t = s / s.norm(dim=0), t / t.norm(dim=0)
        losses.append(((s.T @ s - t.T @ t) ** 2).mean())
    return torch.stack(losses).mean()


def naive_cwd(student, teacher, temperature):
    total = 0.0
    for b in range(student.shape[0]):
        for c in range(student.shape[1]):
            p_t = torch.softmax(teacher[b, c].flatten().double() / temperature, 0)
            log_p_s = torch.log_softmax(student[b, c].flatten().double() / temperature, 0)
            total = total + (p_t * (p_t.log() - log_p_s)).sum()
    return total / (student.shape[0] * student.shape[1]) * temperature**2


def random_masks(shape, ignored=0.3):
    masks = torch.randint(0, 3, shape)
    masks[torch.rand(shape) < ignored] = 255
    return masks


def make_inputs(student_features, teacher_features, classes=3, size=(8, 8)):
    batch = student_features.shape[0]
    return DistillInputs(
        student_logits=torch.randn(batch, classes, *size, requires_grad=True),
        student_features=student_features,
        teacher_logits=torch.randn(batch, classes, *size),
        teacher_features=teacher_features,
        masks=random_masks((batch, *size)),
    )



# kd


@pytest.mark.parametrize("shape, temperature", [((2, 3, 4, 5), 1.0), ((1, 5, 6, 7), 2.5)])
def test_kd_matches_naive_values_and_gradients(shape, temperature):
    torch.manual_seed(0)
    student = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    masks = random_masks((shape[0], *shape[2:]))
    student_ref = student.detach().clone().requires_grad_(True)

    loss = logit_kd_loss(student, teacher, masks, temperature=temperature)
    reference = naive_kd(student_ref, teacher.detach(), masks, temperature)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-4, atol=1e-7)
    assert teacher.grad is None


def test_kd_without_masks_averages_all_pixels_and_resizes_teacher():
    torch.manual_seed(1)
    student = torch.randn(2, 4, 8, 6)
    teacher = torch.randn(2, 4, 4, 3)
    resized = F.interpolate(teacher, size=(8, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        logit_kd_loss(student, teacher, temperature=2.0).double(),
        naive_kd(student, resized, None, 2.0),
        rtol=1e-5,
        atol=1e-7,
    )


def test_kd_zero_for_identical_logits():
    logits = torch.randn(2, 5, 4, 4)
    assert logit_kd_loss(logits, logits, random_masks((2, 4, 4)), temperature=3.0).item() == pytest.approx(0, abs=1e-6)


def test_kd_ignored_pixels_do_not_contribute():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 5, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5, 5)
    masks = random_masks((2, 5, 5))
    ignored = (masks == 255).unsqueeze(1).expand_as(teacher)
    loss = logit_kd_loss(student, teacher, masks)
    loss.backward()
    assert (student.grad[ignored] == 0).all()

    changed_student = torch.where(ignored, torch.full_like(teacher, 1e4), student.detach())
    changed_teacher = torch.where(ignored, -1e4 * torch.ones_like(teacher), teacher)
    torch.testing.assert_close(logit_kd_loss(changed_student, changed_teacher, masks), loss.detach())


def test_kd_all_ignored_batch_is_zero_with_zero_gradient():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = logit_kd_loss(student, torch.randn(2, 3, 4, 4), torch.full((2, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_kd_rejects_masks_of_another_size():
    with pytest.raises(ValueError, match="masks"):
        logit_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))


# fitnet


@pytest.mark.parametrize(
    "student_shape, teacher_shape", [((2, 6, 3, 4), (2, 6, 12, 16)), ((1, 4, 5, 7), (1, 4, 17, 22))]
)
def test_feature_mimic_matches_naive(student_shape, teacher_shape):
    torch.manual_seed(3)
    student = torch.randn(student_shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(teacher_shape, dtype=torch.float64, requires_grad=True)
    loss = feature_mimic_loss(student, teacher)
    reference = ((student.detach() - naive_adaptive_pool(teacher.detach(), student_shape[-2:])) ** 2).mean()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_fitnet_zero_with_identity_adapter_and_adapter_learns():
    torch.manual_seed(4)
    module = LOSSES.get("fitnet")(FeatureDims(6, 6, 8, 3))
    with torch.no_grad():
        module.adapter.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
        module.adapter.bias.zero_()
    features = torch.randn(2, 6, 4, 4)
    assert module(make_inputs(features, features)).item() == pytest.approx(0, abs=1e-7)

    module = LOSSES.get("fitnet")(FeatureDims(5, 7, 8, 3))
    student = torch.randn(2, 5, 4, 4, requires_grad=True)
    module(make_inputs(student, torch.randn(2, 7, 16, 16, requires_grad=True))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.adapter.parameters())
    assert student.grad is not None


# pairwise


@pytest.mark.parametrize(
    "student_shape, teacher_shape, pool",
    [((2, 6, 5, 7), (2, 4, 20, 28), 2), ((1, 3, 8, 8), (1, 9, 32, 32), 4), ((2, 5, 3, 4), (2, 5, 11, 13), 1)],
)
def test_pairwise_matches_naive_values_and_gradients(student_shape, teacher_shape, pool):
    torch.manual_seed(5)
    student = torch.randn(student_shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(teacher_shape, dtype=torch.float64, requires_grad=True)
    student_ref = student.detach().clone().requires_grad_(True)
    loss = pairwise_distillation_loss(student, teacher, pool=pool)
    reference = naive_pairwise(student_ref, teacher.detach(), pool)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-4, atol=1e-6)
    assert teacher.grad is None


def test_pairwise_grid_smaller_than_pool_is_one_node():
    # One node: every cosine similarity is 1 on both sides.
    loss = pairwise_distillation_loss(torch.randn(1, 4, 3, 2), torch.randn(1, 6, 12, 8), pool=4)
    assert loss.item() == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_pairwise_zero_for_identical_features(pool):
    # 6 x 5 is not a multiple of 2 or 3: the partial border nodes must match too.
    features = torch.randn(2, 6, 6, 5)
    assert pairwise_distillation_loss(features, features, pool=pool).item() == pytest.approx(0, abs=1e-7)


# The peers' variants: pair-wise nodes by max pooling (SKD, CIRKD), KD at native resolution.
# kaseg's kd and affinity compute in float32: compared with float64 formulas at float32 precision.
FLOAT32 = dict(rtol=1e-5, atol=1e-7)


def skd_pairwise(feat_s, feat_t, scale=0.5):
    """SKD's code on one grid (irfanICMLL/structure_knowledge_distillation,
    utils/criterion.py CriterionPairWiseforWholeFeatAfterPool + utils/utils.py
    sim_dis_compute), written out: max-pool with kernel int(scale * size), ceil mode;
    norms + 1e-8, detached; sum of squared differences / N^2 / B."""
    kernel = (int(feat_t.shape[2] * scale), int(feat_t.shape[3] * scale))
    feat_s, feat_t = (F.max_pool2d(f, kernel, stride=kernel, ceil_mode=True) for f in (feat_s, feat_t))

    def similarity(feat):
        norm = (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8).detach()
        feat = (feat / norm).flatten(2)
        return torch.einsum("icm,icn->imn", feat, feat)

    positions = feat_t.shape[-1] * feat_t.shape[-2]
    return ((similarity(feat_t) - similarity(feat_s)) ** 2 / positions**2 / feat_t.shape[0]).sum()


def cirkd_pairwise(feat_s, feat_t):
    """CIRKD's code (winycg/CIRKD, losses/skd.py CriterionStructuralKD), written out: a
    fixed 2 x 2 max-pool, ceil mode; F.normalize; mean of the squared differences."""
    feat_s, feat_t = (F.normalize(F.max_pool2d(f, 2, stride=2, ceil_mode=True), dim=1) for f in (feat_s, feat_t))
    gram_s, gram_t = (f.flatten(2).transpose(1, 2) @ f.flatten(2) for f in (feat_s, feat_t))
    return ((gram_s - gram_t) ** 2).mean()


@pytest.mark.parametrize("shape", [(2, 6, 8, 10), (1, 4, 9, 7), (2, 3, 5, 5)])
def test_pairwise_skd_nodes_match_skd_code(shape):
    torch.manual_seed(20)
    student, teacher = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(
        pairwise_distillation_loss(student, teacher, nodes="skd").double(), skd_pairwise(student, teacher), **FLOAT32
    )
    # scale 0.25: 4 x 4 nodes on a 16 x 12 grid
    student, teacher = torch.randn(1, 5, 16, 12, dtype=torch.float64), torch.randn(1, 5, 16, 12, dtype=torch.float64)
    torch.testing.assert_close(
        pairwise_distillation_loss(student, teacher, nodes="skd", scale=0.25).double(),
        skd_pairwise(student, teacher, scale=0.25),
        **FLOAT32,
    )


@pytest.mark.parametrize("shape", [(2, 6, 8, 10), (1, 4, 9, 7)])
def test_pairwise_cirkd_nodes_match_cirkd_code_values_and_gradients(shape):
    torch.manual_seed(21)
    student = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, dtype=torch.float64)
    student_ref = student.detach().clone().requires_grad_(True)
    loss, reference = pairwise_distillation_loss(student, teacher, nodes="cirkd"), cirkd_pairwise(student_ref, teacher)
    torch.testing.assert_close(loss.double(), reference, **FLOAT32)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-4, atol=1e-6)


def test_pairwise_max_nodes_pool_a_finer_teacher_first():
    torch.manual_seed(22)
    student, teacher = torch.randn(2, 4, 6, 5, dtype=torch.float64), torch.randn(2, 7, 12, 10, dtype=torch.float64)
    pooled = naive_adaptive_pool(teacher, (6, 5))
    for nodes, reference in (("skd", skd_pairwise), ("cirkd", cirkd_pairwise)):
        torch.testing.assert_close(
            pairwise_distillation_loss(student, teacher, nodes=nodes).double(), reference(student, pooled), **FLOAT32
        )


def cirkd_kd(pred, soft, temperature):
    """CIRKD's code (winycg/CIRKD, losses/kd.py CriterionKD), written out."""
    classes = soft.shape[1]
    log_p_s = F.log_softmax(pred.permute(0, 2, 3, 1).reshape(-1, classes) / temperature, dim=1)
    p_t = F.softmax(soft.permute(0, 2, 3, 1).reshape(-1, classes) / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


def skd_pixel_wise(pred_s, pred_t):
    """SKD's code (utils/criterion.py CriterionPixelWise), written out: the cross-entropy
    summed over all pixels of all images, divided by h * w."""
    classes, height, width = pred_s.shape[1:]
    p_t = F.softmax(pred_t.permute(0, 2, 3, 1).reshape(-1, classes), dim=1)
    log_p_s = F.log_softmax(pred_s.permute(0, 2, 3, 1).reshape(-1, classes), dim=1)
    return (-p_t * log_p_s).sum() / width / height


def native_inputs(student_native, teacher_native, size=(16, 16)):
    batch, classes = student_native.shape[:2]
    return DistillInputs(
        student_logits=torch.randn(batch, classes, *size, dtype=torch.float64),
        student_features=torch.randn(batch, 4, *student_native.shape[-2:]),
        teacher_logits=torch.randn(batch, classes, *size, dtype=torch.float64),
        teacher_features=torch.randn(batch, 4, *teacher_native.shape[-2:]),
        masks=torch.full((batch, *size), 255),  # native KD uses every pixel, as the peers do
        student_native_logits=student_native,
        teacher_native_logits=teacher_native,
    )


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_native_matches_cirkd_and_skd_code(temperature):
    torch.manual_seed(23)
    student = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    module = LOSSES.get("kd")(FeatureDims(4, 4, 4, 5), temperature=temperature, resolution="native")
    assert module.needs_native_logits
    student_ref = student.detach().clone().requires_grad_(True)
    loss, reference = module(native_inputs(student, teacher)), cirkd_kd(student_ref, teacher, temperature)
    torch.testing.assert_close(loss.double(), reference, **FLOAT32)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-4, atol=1e-7)

    if temperature == 1.0:  # SKD: B x (KL + the teacher's mean entropy), same gradient / B
        skd_ref = student.detach().clone().requires_grad_(True)
        skd = skd_pixel_wise(skd_ref, teacher)
        p_t = torch.softmax(teacher, dim=1)
        entropy = -(p_t * p_t.log()).sum(1).mean()
        torch.testing.assert_close(skd / 2, loss.detach().double() + entropy, **FLOAT32)
        skd.backward()
        torch.testing.assert_close(skd_ref.grad / 2, student.grad, rtol=1e-4, atol=1e-7)


def test_kd_native_resizes_a_finer_teacher_bilinearly_and_needs_native_logits():
    torch.manual_seed(24)
    student, teacher = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    module = LOSSES.get("kd")(FeatureDims(4, 4, 4, 3), resolution="native")
    resized = F.interpolate(teacher, size=(4, 4), mode="bilinear", align_corners=False)
    loss = module(native_inputs(student, teacher))
    torch.testing.assert_close(loss.double(), cirkd_kd(student, resized, 1.0), **FLOAT32)
    inputs = make_inputs(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="needs DistillInputs.student_native_logits"):
        module(inputs)
    # The input-size form (the default) is unchanged.
    default = LOSSES.get("kd")(FeatureDims(4, 4, 4, 3))
    assert not default.needs_native_logits
    torch.testing.assert_close(
        default(inputs), logit_kd_loss(inputs.student_logits, inputs.teacher_logits, inputs.masks)
    )


# cwd


@pytest.mark.parametrize("shape, temperature", [((2, 3, 4, 5), 4.0), ((1, 6, 7, 3), 1.0)])
def test_channel_wise_matches_naive_values_and_gradients(shape, temperature):
    torch.manual_seed(6)
    student = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    student_ref = student.detach().clone().requires_grad_(True)
    loss = channel_wise_loss(student, teacher, temperature=temperature)
    reference = naive_cwd(student_ref, teacher.detach(), temperature)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-4, atol=1e-7)
    assert teacher.grad is None


def test_channel_wise_zero_for_identical_maps():
    maps = torch.randn(2, 4, 5, 5)
    assert channel_wise_loss(maps, maps, temperature=4.0).item() == pytest.approx(0, abs=1e-6)


def test_cwd_module_on_logits_and_on_features():
    torch.manual_seed(7)
    dims = FeatureDims(5, 7, 8, 3)
    inputs = make_inputs(torch.randn(2, 5, 4, 4, requires_grad=True), torch.randn(2, 7, 16, 16))
    on_logits = LOSSES.get("cwd")(dims, temperature=2.0)
    assert on_logits.adapter is None
    torch.testing.assert_close(
        on_logits(inputs).double(), naive_cwd(inputs.student_logits, inputs.teacher_logits, 2.0), rtol=1e-5, atol=1e-7
    )

    on_features = LOSSES.get("cwd")(dims, on="features")
    loss = on_features(inputs)
    adapted = on_features.adapter(inputs.student_features)
    reference = naive_cwd(adapted, naive_adaptive_pool(inputs.teacher_features, (4, 4)), 4.0)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert all(p.grad is not None for p in on_features.adapter.parameters())
    assert inputs.student_features.grad is not None


# Configuration and the Distiller


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "kd", "temperature": 0}, "temperature must be"),
        ({"name": "cwd", "temperature": -1.0}, "temperature must be"),
        ({"name": "cwd", "temperature": float("nan")}, "temperature must be"),
        ({"name": "cwd", "on": "both"}, r"'on' must be one of \['logits', 'features'\]"),
        ({"name": "pairwise", "pool": 0}, "pool must be an integer >= 1"),
        ({"name": "pairwise", "pool": 1.5}, "pool must be an integer >= 1"),
        ({"name": "kd", "T": 2}, r"no parameter\(s\) \['T'\]; valid: .*'temperature'"),
        ({"name": "kd", "resolution": "full"}, r"kd resolution must be one of \['input', 'native'\]"),
        ({"name": "pairwise", "nodes": "min"}, r"pairwise nodes must be one of \['avg', 'skd', 'cirkd'\]"),
        ({"name": "pairwise", "nodes": "skd", "scale": 0}, r"scale must be a number in \(0, 1\]"),
        ({"name": "pairwise", "scale": 1.5}, r"scale must be a number in \(0, 1\]"),
    ],
)
def test_parameter_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_losses([spec], FeatureDims(16, 16, 8, 4))


def test_function_parameter_errors():
    maps = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="temperature"):
        logit_kd_loss(maps, maps, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        channel_wise_loss(maps, maps, temperature=-2.0)
    with pytest.raises(ValueError, match="pool"):
        pairwise_distillation_loss(maps, maps, pool=0)
    with pytest.raises(ValueError, match="same shape"):
        channel_wise_loss(maps, torch.randn(1, 3, 4, 5), temperature=1.0)


def test_baselines_train_with_the_distiller():
    torch.manual_seed(8)
    teacher = build_model("deeplabv3plus_resnet18", num_classes=4, output_stride=8, head_channels=16)
    student = build_model(
        "deeplabv3_mobilenetv2", num_classes=4, output_stride=16, width=0.35, aspp=False, head_channels=16
    )
    dims = FeatureDims(student.feature_channels, teacher.feature_channels, teacher.feature_channels, 4)
    specs = [
        {"name": "kd", "weight": 1, "temperature": 2},
        {"name": "kd", "resolution": "native", "key": "kd_native"},
        {"name": "cwd", "on": "features"},
        {"name": "fitnet"},
        {"name": "pairwise"},
        {"name": "pairwise", "nodes": "skd", "key": "pairwise_skd"},
        {"name": "pairwise", "nodes": "cirkd", "key": "pairwise_cirkd"},
    ]
    distiller = Distiller(teacher, student, encoder=None, losses=build_losses(specs, dims)).train()
    assert distiller.adapter is None  # none of these needs the teacher code
    assert distiller.needs_native_logits

    masks = torch.randint(0, 4, (2, 64, 64))
    masks[:, :8] = 255
    losses = distiller(torch.randn(2, 3, 64, 64), masks)
    assert set(losses) == {"ce", "kd", "kd_native", "cwd", "fitnet", "pairwise", "pairwise_skd", "pairwise_cirkd"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()

    trainable = {id(p) for p in distiller.trainable.parameters()}
    adapters = [distiller.losses[distiller.keys.index(key)].adapter for key in ("cwd", "fitnet")]
    for adapter in adapters:
        assert all(id(p) in trainable for p in adapter.parameters())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())
    assert all(p.grad is not None for p in distiller.student.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_registry_has_the_baselines():
    assert {"kd", "fitnet", "pairwise", "cwd"} <= set(LOSSES.names())
    for name in ("kd", "fitnet", "pairwise", "cwd"):
        assert not LOSSES.get(name).needs_teacher_code and not LOSSES.get(name).needs_adapter
