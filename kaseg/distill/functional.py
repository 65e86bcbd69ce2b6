"""The knowledge-adaptation losses as plain functions (He et al., CVPR 2019, arXiv:1903.04688)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Positions per block in the affinity loss: blocks keep the extra memory at a few MB
# (C x chunk buffers and C x C Gram matrices) whatever the image size. At C = 256 and
# 64 x 128 positions 512 measured 17 MB peak and 66 ms, 1024 20 MB and 63 ms, 256 12 MB and
# 73 ms (forward + backward, 2 CPU threads; benchmarks/affinity.py).
AFFINITY_CHUNK = 512


def knowledge_adaptation_loss(
    student_code: torch.Tensor,
    teacher_code: torch.Tensor,
    *,
    p: float = 2.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Pixel-wise knowledge adaptation loss.

    ``L_adapt = 1/|I| * sum_j || e_j / ||e_j||_p - a_j / ||a_j||_p ||_p``

    with ``e_j`` the teacher's code and ``a_j`` the adapted student feature at position
    ``j`` (vectors over channels), averaged over all positions of all images.

    Args:
        student_code: adapted student features ``C_f(F_s)``, B x C x h x w.
        teacher_code: encoded teacher features ``E(F_t)``, B x C x h x w (same grid).
        p: the norm used for the normalisation and the distance (the paper's p; 2 here).
        eps: lower bound of the norms in the normalisation.
    """
    if student_code.shape != teacher_code.shape:
        raise ValueError(
            f"student code {tuple(student_code.shape)} and teacher code "
            f"{tuple(teacher_code.shape)} must have the same shape"
        )
    student = F.normalize(student_code.float(), p=p, dim=1, eps=eps)
    teacher = F.normalize(teacher_code.float(), p=p, dim=1, eps=eps)
    # vector_norm's backward is 0 (a subgradient) where student and teacher coincide.
    return torch.linalg.vector_norm(student - teacher, ord=p, dim=1).mean()


def affinity_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Affinity distillation loss on pairwise cosine similarities, without N x N matrices.

    For each image, with ``f_i`` the channel vector at position ``i`` normalised to unit
    length and ``N = h * w``, the affinity is ``A(i, j) = <f_i, f_j> / N`` and

    ``L_aff = sum_{i,j} (A_s(i, j) - A_t(i, j))^2 = 1/N^2 * sum_{i,j} (cos_s(i,j) - cos_t(i,j))^2``,

    i.e. the mean over all N^2 pairs of the squared difference of cosine similarities,
    averaged over the batch. (Scaling A by 1/N and summing over pairs keeps the loss in
    [0, 4] whatever the resolution, so the weight gamma = 1 does not depend on the input
    size.) With S (C_s x N) and T (C_t x N) the normalised maps,

    ``||S^T S - T^T T||_F^2 = ||S S^T||_F^2 - 2 ||S T^T||_F^2 + ||T T^T||_F^2``,

    which needs only C x C products: O(N C^2) time, and here O(C^2 + C * 512) memory
    beyond the inputs and the gradient, since the Gram matrices are accumulated over
    blocks of positions and the backward pass is computed block by block too.

    The three terms nearly cancel when student and teacher agree. With equal channel
    counts the loss is therefore computed from ``D = S - T``,

    ``||S^T S - T^T T||^2 = 2<SS^T, DD^T> + 2<DS^T, SD^T> - 4<DS^T, DD^T> + ||DD^T||^2``,

    whose terms are all small together (float32 products, float64 sums); with different
    channel counts the three-term form is evaluated in float64.

    Gradients flow to ``student_feat`` only: the teacher's features are a target.

    Args:
        student_feat: B x C_s x h x w (adapted or raw student features).
        teacher_feat: B x C_t x h x w (the teacher's code); channel counts may differ.
        eps: lower bound of the norms in the normalisation.
    """
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(
            f"student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} "
            "features must share batch size and grid"
        )
    with torch.autocast(student_feat.device.type, enabled=False):
        return _GramAffinity.apply(student_feat, teacher_feat.detach(), eps, AFFINITY_CHUNK)


def _normalised(block: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of a C x n block scaled to unit length; also the clamped norms (1 x n)."""
    norms = block.norm(dim=0, keepdim=True).clamp(min=eps)
    return block / norms, norms


def _work_dtype(student: torch.Tensor, same_channels: bool) -> torch.dtype:
    """float32 products suffice for the difference form; the three-term form needs float64."""
    return torch.float32 if same_channels and student.dtype != torch.float64 else torch.float64


class _GramAffinity(torch.autograd.Function):
    """Blockwise forward and backward of :func:`affinity_loss` (see its docstring).

    With ``L_b = ||S^T S - T^T T||^2 / N^2``, ``dL_b/dS = 4 (SS^T S - ST^T T) / N^2``,
    rewritten with D = S - T as ``4 (SS^T D + SD^T S - SD^T D) / N^2`` for equal channel
    counts; then through the normalisation ``s = x / max(||x||, eps)``.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, eps: float, chunk: int) -> torch.Tensor:
        batch, _, height, width = student.shape
        positions = height * width
        same = student.shape[1] == teacher.shape[1]
        work = _work_dtype(student, same)
        xs, ys = student.flatten(2), teacher.flatten(2)
        grams, total = [], torch.zeros((), dtype=torch.float64, device=student.device)
        student_channels, other_channels = xs.shape[1], ys.shape[1]
        for b in range(batch):
            first = xs.new_zeros(student_channels, student_channels, dtype=torch.float64)
            second = xs.new_zeros(student_channels, other_channels, dtype=torch.float64)
            third = xs.new_zeros(other_channels, other_channels, dtype=torch.float64)
            for start in range(0, positions, chunk):
                s, _ = _normalised(xs[b, :, start : start + chunk].to(work), eps)
                t, _ = _normalised(ys[b, :, start : start + chunk].to(work), eps)
                other = s - t if same else t  # D = S - T, or T itself
                first += (s @ s.T).double()
                second += (s @ other.T).double()
                third += (other @ other.T).double()
            if same:  # first = SS^T, second = SD^T, third = DD^T
                value = (
                    2 * (first * third).sum() + 2 * (second.T * second).sum()
                    - 4 * (second.T * third).sum() + third.pow(2).sum()
                )
            else:  # first = SS^T, second = ST^T, third = TT^T
                value = first.pow(2).sum() - 2 * second.pow(2).sum() + third.pow(2).sum()
            total = total + value.clamp(min=0)
            grams.append((first, second))
        ctx.save_for_backward(student, teacher)
        ctx.grams, ctx.eps, ctx.chunk, ctx.same = grams, eps, chunk, same
        return (total / (batch * positions**2)).to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        student, teacher = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        batch, channels, height, width = student.shape
        positions = height * width
        work = _work_dtype(student, ctx.same)
        scale = 4 * grad_output.double() / (batch * positions**2)
        xs, ys = student.flatten(2), teacher.flatten(2)
        grad = torch.empty_like(xs)
        for b, (first, second) in enumerate(ctx.grams):
            first, second = (scale * first).to(work), (scale * second).to(work)
            for start in range(0, positions, ctx.chunk):
                block = slice(start, start + ctx.chunk)
                s, norms = _normalised(xs[b, :, block].to(work), ctx.eps)
                t, _ = _normalised(ys[b, :, block].to(work), ctx.eps)
                if ctx.same:
                    d = s - t
                    grad_s = first @ d + second @ s - second @ d
                else:
                    grad_s = first @ s - second @ t
                # Through s = x / max(||x||, eps): project out s where the norm was not clamped.
                radial = (s * grad_s).sum(0, keepdim=True) * (norms > ctx.eps)
                grad[b, :, block] = ((grad_s - s * radial) / norms).to(grad.dtype)
        return grad.view_as(student), None, None, None
