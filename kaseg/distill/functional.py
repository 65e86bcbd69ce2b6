"""The knowledge-adaptation losses as plain functions (He et al., CVPR 2019, arXiv:1903.04688)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def affinity_loss(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """Affinity distillation loss on pairwise cosine similarities, without N x N matrices.

    For each image, with ``f_i`` the channel vector at position ``i`` normalised to unit
    length and ``N = h * w``, the affinity is ``A(i, j) = <f_i, f_j> / N`` and

    ``L_aff = sum_{i,j} (A_s(i, j) - A_t(i, j))^2 = 1/N^2 * sum_{i,j} (cos_s(i,j) - cos_t(i,j))^2``,

    i.e. the mean over all N^2 pairs of the squared difference of cosine similarities,
    averaged over the batch. (Scaling A by 1/N and summing over pairs keeps the loss in
    [0, 4] whatever the resolution, so the weight gamma = 1 does not depend on the input
    size.) With S (C_s x N) and T (C_t x N) the normalised maps,

    ``||S^T S - T^T T||_F^2 = ||S S^T||_F^2 - 2 ||S T^T||_F^2 + ||T T^T||_F^2``,

    which needs only C x C products: O(N C^2) time and O(C^2) memory. The three terms
    nearly cancel when student and teacher agree, so they are formed in float64.

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
    batch = student_feat.shape[0]
    positions = student_feat.shape[2] * student_feat.shape[3]
    with torch.autocast(student_feat.device.type, enabled=False):
        s = F.normalize(student_feat.double().flatten(2), dim=1, eps=eps)  # B x C_s x N
        t = F.normalize(teacher_feat.double().flatten(2), dim=1, eps=eps)  # B x C_t x N
        ss = s @ s.transpose(1, 2)
        st = s @ t.transpose(1, 2)
        tt = t @ t.transpose(1, 2)
        squared = ss.pow(2).sum((1, 2)) - 2 * st.pow(2).sum((1, 2)) + tt.pow(2).sum((1, 2))
        loss = squared.clamp(min=0).sum() / (batch * positions**2)
    return loss.float()
