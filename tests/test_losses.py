"""Knowledge-adaptation and affinity losses against naive float64 references."""

from __future__ import annotations

import pytest
import torch

from kaseg.distill import affinity_loss, knowledge_adaptation_loss


def naive_affinity(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The N x N definition: A = cos / N, loss = sum over pairs of squared differences,
    averaged over the batch (equivalently the mean over pairs of squared cosine gaps)."""
    losses = []
    for s, t in zip(student.double(), teacher.double()):
        s = s.flatten(1)
        t = t.flatten(1)
        n = s.shape[1]
        s = s / s.norm(dim=0, keepdim=True).clamp(min=1e-6)
        t = t / t.norm(dim=0, keepdim=True).clamp(min=1e-6)
        a_s = s.T @ s / n
        a_t = t.T @ t / n
        losses.append(((a_s - a_t) ** 2).sum())
    return torch.stack(losses).mean()


def naive_adaptation(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for y in range(student.shape[2]):
            for x in range(student.shape[3]):
                a = student[b, :, y, x].double()
                e = teacher[b, :, y, x].double()
                a = a / a.norm(p).clamp(min=1e-6)
                e = e / e.norm(p).clamp(min=1e-6)
                total = total + (e - a).norm(p)
                count += 1
    return total / count


@pytest.mark.parametrize(
    "shape_s, shape_t",
    [((2, 8, 5, 7), (2, 8, 5, 7)), ((1, 16, 9, 9), (1, 4, 9, 9)), ((3, 5, 4, 6), (3, 12, 4, 6))],
)
def test_affinity_matches_naive_values_and_gradients(shape_s, shape_t):
    torch.manual_seed(0)
    student = torch.randn(shape_s, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape_t, dtype=torch.float64)
    student_ref = student.detach().clone().requires_grad_(True)

    loss = affinity_loss(student, teacher)
    reference = naive_affinity(student_ref, teacher)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)

    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("teacher_channels", [6, 9])
def test_affinity_over_several_blocks_with_zero_vectors(teacher_channels):
    # 40 x 60 = 2400 positions: several blocks of AFFINITY_CHUNK; some all-zero positions
    # exercise the clamped norms (values and gradients).
    torch.manual_seed(7)
    student = torch.randn(2, 6, 40, 60, dtype=torch.float64)
    student[:, :, 3, 5:9] = 0
    teacher = torch.randn(2, teacher_channels, 40, 60, dtype=torch.float64)
    teacher[:, :, 10, :4] = 0
    student.requires_grad_(True)
    student_ref = student.detach().clone().requires_grad_(True)
    loss, reference = affinity_loss(student, teacher), naive_affinity(student_ref, teacher)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-8)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-4, atol=1e-9)


def test_affinity_gradient_reaches_the_student_only():
    student = torch.randn(1, 4, 5, 5, requires_grad=True)
    teacher = torch.randn(1, 4, 5, 5, requires_grad=True)
    affinity_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_affinity_float32_inputs_match_float64_reference():
    torch.manual_seed(1)
    student = torch.randn(2, 32, 16, 16)
    teacher = torch.randn(2, 32, 16, 16)
    torch.testing.assert_close(
        affinity_loss(student, teacher).double(), naive_affinity(student, teacher), rtol=1e-5, atol=0
    )


def test_affinity_accurate_when_student_nearly_equals_teacher():
    # The three Gram terms nearly cancel here; plain float32 loses 8-20% of the value.
    torch.manual_seed(2)
    teacher = torch.randn(2, 64, 32, 32)
    student = teacher + 1e-3 * torch.randn_like(teacher)
    reference = naive_affinity(student, teacher)
    value = affinity_loss(student, teacher).double()
    assert reference > 0
    assert abs(value - reference) / reference < 1e-3


def test_affinity_zero_for_identical_and_invariant_to_position_scaling():
    torch.manual_seed(3)
    features = torch.randn(2, 6, 5, 5)
    assert affinity_loss(features, features).item() == pytest.approx(0.0, abs=1e-7)
    scale = torch.rand(2, 1, 5, 5) * 10 + 0.1
    teacher = torch.randn(2, 9, 5, 5)
    torch.testing.assert_close(affinity_loss(features * scale, teacher), affinity_loss(features, teacher))


def test_affinity_rejects_mismatched_grids():
    with pytest.raises(ValueError, match="grid"):
        affinity_loss(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 6, 5))


@pytest.mark.parametrize("shape", [(2, 8, 3, 4), (1, 3, 5, 5)])
def test_adaptation_matches_naive_values_and_gradients(shape):
    torch.manual_seed(4)
    student = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, dtype=torch.float64)
    student_ref = student.detach().clone().requires_grad_(True)
    loss = knowledge_adaptation_loss(student, teacher)
    reference = naive_adaptation(student_ref, teacher)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, student_ref.grad.float().double(), rtol=1e-4, atol=1e-6)


def test_adaptation_p_norm_option_matches_reference():
    torch.manual_seed(5)
    student, teacher = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(
        knowledge_adaptation_loss(student, teacher, p=1.0).double(),
        naive_adaptation(student, teacher, p=1.0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_adaptation_zero_with_finite_gradient_for_identical_inputs():
    teacher = torch.randn(2, 4, 3, 3)
    student = teacher.clone().requires_grad_(True)
    loss = knowledge_adaptation_loss(student, teacher)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(student.grad).all()


def test_adaptation_invariant_to_position_scaling():
    torch.manual_seed(6)
    student, teacher = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    scale = torch.rand(2, 1, 4, 4) + 0.5
    torch.testing.assert_close(
        knowledge_adaptation_loss(student * scale, teacher / scale),
        knowledge_adaptation_loss(student, teacher),
    )


def test_adaptation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        knowledge_adaptation_loss(torch.randn(1, 4, 3, 3), torch.randn(1, 5, 3, 3))
