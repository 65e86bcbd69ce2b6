"""The distillation methods knowledge adaptation is compared with.

Each method is a plain function (the formula) plus a small registered loss module that
picks its inputs out of :class:`DistillInputs`:

* ``kd``: pixel-wise logit distillation (Hinton et al., 2015),
* ``fitnet``: feature mimicking through a 1x1 adapter (Romero et al., ICLR 2015),
* ``pairwise``: pair-wise similarity distillation (Liu et al., CVPR 2019),
* ``cwd``: channel-wise distillation (Shu et al., ICCV 2021).

The teacher's tensors are targets: every function detaches them, so gradients reach
the student (and the loss's own adapter) only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from kaseg.data.base import IGNORE_INDEX
from kaseg.distill.functional import affinity_loss
from kaseg.distill.losses import LOSSES, DistillInputs, DistillLoss, FeatureDims

CWD_SOURCES = ("logits", "features")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_pool(pool: int) -> None:
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"pool must be an integer >= 1 (1 = no pooling), got {pool!r}")


def _teacher_on_grid(
    teacher: torch.Tensor, size: torch.Size | tuple[int, int], *, mode: Literal["bilinear", "pool"]
) -> torch.Tensor:
    """The detached teacher tensor resized to ``size``: logits bilinearly, features by
    adaptive average pooling (the finer teacher grid is summarised, not sampled)."""
    teacher = teacher.detach()
    if teacher.shape[-2:] == tuple(size):
        return teacher
    if mode == "bilinear":
        return F.interpolate(teacher, size=size, mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(teacher, size)


def _check_batch_and_channels(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} "
            "must be B x C x H x W with the same batch size and channel count"
        )


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixel-wise logit distillation (Hinton et al., 2015, "Distilling the Knowledge in a
    Neural Network"; applied to every pixel for segmentation by Liu et al., CVPR 2019).

    ``L_kd = T^2 / |V| * sum_{j in V} KL(p_t(j) || p_s(j))``, ``p(j) = softmax(z(j) / T)``

    over the classes, with ``V`` the pixels whose label is not ``ignore_index`` (all
    pixels without masks). A batch with no labelled pixel gives 0 (with zero gradients),
    not NaN. The T^2 keeps the gradient scale independent of the temperature.

    Args:
        student_logits: B x K x H x W.
        teacher_logits: B x K x H' x W'; resized bilinearly to H x W if they differ.
        masks: B x H x W labels, or None to average over all pixels.
        temperature: the softening temperature T > 0.
        ignore_index: the label of pixels left out of the average.
    """
    _check_temperature(temperature)
    _check_batch_and_channels(student_logits, teacher_logits, "logits")
    teacher_logits = _teacher_on_grid(teacher_logits, student_logits.shape[-2:], mode="bilinear")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)  # B x H x W
    if masks is None:
        return kl.mean() * temperature**2
    if masks.shape != kl.shape:
        raise ValueError(
            f"masks {tuple(masks.shape)} must be B x H x W at the logits' size {tuple(kl.shape)}"
        )
    valid = masks != ignore_index
    # Indexing, not multiplying by the mask: 0 * inf at an ignored pixel would be NaN.
    return kl[valid].sum() / valid.sum().clamp(min=1) * temperature**2


def feature_mimic_loss(adapted_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Feature mimicking, FitNets (Romero et al., ICLR 2015): the "direct" baseline.

    ``L_fit = mean over b, c, j of ( r(F_s)[b, c, j] - pool(F_t)[b, c, j] )^2``

    with ``r`` the trainable adapter (applied by the caller) and ``pool`` the adaptive
    average pooling of the teacher's features to the student's grid.

    Args:
        adapted_student: r(F_s), B x C_t x h x w.
        teacher_features: F_t, B x C_t x h_t x w_t (pooled to h x w).
    """
    _check_batch_and_channels(adapted_student, teacher_features, "features")
    teacher = _teacher_on_grid(teacher_features, adapted_student.shape[-2:], mode="pool")
    return F.mse_loss(adapted_student.float(), teacher.float())


def pairwise_distillation_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, *, pool: int = 2
) -> torch.Tensor:
    """Pair-wise distillation (Liu et al., CVPR 2019, "Structured Knowledge Distillation
    for Semantic Segmentation").

    The teacher's map is first summarised on the student's grid (adaptive average
    pooling, as for the other feature losses), then both are average-pooled into nodes of
    ``pool x pool`` positions, in ceil mode: a grid of ``ceil(h / pool) x ceil(w / pool)``
    nodes whose border nodes average the positions they cover (a grid smaller than
    ``pool`` is one node). Student and teacher nodes thus cover the same image regions,
    and

    ``L_pa = 1/N^2 * sum_{i,j} (cos_s(i, j) - cos_t(i, j))^2``

    over all pairs of the N nodes, averaged over the batch; see
    :func:`kaseg.distill.functional.affinity_loss`.

    Args:
        student_features: F_s, B x C_s x h x w (raw, no adapter).
        teacher_features: F_t, B x C_t x h_t x w_t; channel counts may differ.
        pool: the node size on the student's grid, >= 1 (1 keeps every position).
    """
    _check_pool(pool)
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(
            f"student {tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)} "
            "features must have the same batch size"
        )
    teacher = _teacher_on_grid(teacher_features, student_features.shape[-2:], mode="pool")
    student, teacher = (F.avg_pool2d(x, pool, stride=pool, ceil_mode=True) for x in (student_features, teacher))
    return affinity_loss(student, teacher)


def channel_wise_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021, "Channel-wise Knowledge
    Distillation for Dense Prediction").

    Each channel becomes a distribution over the N = h * w positions,
    ``phi(y_c)_j = softmax_j(y_c / T)``, and

    ``L_cwd = T^2 / (B * C) * sum_{b, c} sum_j phi(y^t_c)_j * log(phi(y^t_c)_j / phi(y^s_c)_j)``.

    Args:
        student_map: B x C x h x w (logits, or adapted features).
        teacher_map: B x C x h x w (same shape).
        temperature: T > 0.
    """
    _check_temperature(temperature)
    if student_map.shape != teacher_map.shape:
        raise ValueError(
            f"student {tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)} maps "
            "must have the same shape"
        )
    log_p_s = F.log_softmax(student_map.float().flatten(2) / temperature, dim=2)  # B x C x N
    log_p_t = F.log_softmax(teacher_map.detach().float().flatten(2) / temperature, dim=2)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(2)  # B x C
    return kl.mean() * temperature**2


@LOSSES.register("kd")
class LogitDistillationLoss(DistillLoss):
    """Pixel-wise KD on the logits, ignore pixels excluded; see :func:`logit_kd_loss`."""

    def __init__(self, dims: FeatureDims, *, temperature: float = 1.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        return logit_kd_loss(
            inputs.student_logits, inputs.teacher_logits, inputs.masks, temperature=self.temperature
        )


@LOSSES.register("fitnet")
class FitNetLoss(DistillLoss):
    """FitNets feature mimicking with its own 1x1 conv adapter C_s -> C_t; see
    :func:`feature_mimic_loss`."""

    def __init__(self, dims: FeatureDims) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(dims.student_channels, dims.teacher_channels, kernel_size=1)

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        return feature_mimic_loss(self.adapter(inputs.student_features), inputs.teacher_features)


@LOSSES.register("pairwise")
class PairwiseDistillationLoss(DistillLoss):
    """Structured pair-wise distillation on raw F_s and F_t; see
    :func:`pairwise_distillation_loss`."""

    def __init__(self, dims: FeatureDims, *, pool: int = 2) -> None:
        super().__init__()
        _check_pool(pool)
        self.pool = pool

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        return pairwise_distillation_loss(inputs.student_features, inputs.teacher_features, pool=self.pool)


@LOSSES.register("cwd")
class ChannelWiseDistillationLoss(DistillLoss):
    """Channel-wise distillation; see :func:`channel_wise_loss`.

    Args:
        temperature: T > 0 (4 in the paper).
        on: ``logits`` compares the class maps (teacher resized bilinearly if needed);
            ``features`` compares a 1x1 conv adapter's r(F_s) (C_s -> C_t, owned here)
            with F_t pooled to the student's grid.
    """

    def __init__(
        self, dims: FeatureDims, *, temperature: float = 4.0, on: Literal["logits", "features"] = "logits"
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        if on not in CWD_SOURCES:
            raise ValueError(f"cwd 'on' must be one of {list(CWD_SOURCES)}, got {on!r}")
        self.temperature = temperature
        self.on = on
        self.adapter = (
            nn.Conv2d(dims.student_channels, dims.teacher_channels, kernel_size=1) if on == "features" else None
        )

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        if self.adapter is None:
            student = inputs.student_logits
            teacher = _teacher_on_grid(inputs.teacher_logits, student.shape[-2:], mode="bilinear")
        else:
            student = self.adapter(inputs.student_features)
            teacher = _teacher_on_grid(inputs.teacher_features, student.shape[-2:], mode="pool")
        return channel_wise_loss(student, teacher, temperature=self.temperature)
