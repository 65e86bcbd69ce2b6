"""The distillation methods knowledge adaptation is compared with.

Each method is a plain function (the formula) plus a small registered loss module that
picks its inputs out of :class:`DistillInputs`:

* ``kd``: pixel-wise logit distillation (Hinton et al., 2015), on the logits at the
  input size or, as CIRKD's and SKD's code do, at their native resolution,
* ``fitnet``: feature mimicking through a 1x1 adapter (Romero et al., ICLR 2015),
* ``pairwise``: pair-wise similarity distillation (Liu et al., CVPR 2019), with nodes
  average-pooled or max-pooled as in SKD's or CIRKD's code,
* ``cwd``: channel-wise distillation (Shu et al., ICCV 2021).

The relational methods (DIST, CIRKD, IFVD) are in :mod:`kaseg.distill.relational`.

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
LOGIT_RESOLUTIONS = ("input", "native")
PAIRWISE_NODES = ("avg", "skd", "cirkd")


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}")


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


def _check_scale(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0 < scale <= 1):
        raise ValueError(f"scale must be a number in (0, 1] (the node size as a fraction of the map), got {scale!r}")


def logit_pair(inputs: DistillInputs, resolution: Literal["input", "native"]) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's logits at the input size (``input``) or on their
    own feature grids before upsampling (``native``; the teacher's grid may be finer, the
    loss resizes it)."""
    if resolution == "input":
        return inputs.student_logits, inputs.teacher_logits
    if inputs.student_native_logits is None or inputs.teacher_native_logits is None:
        raise ValueError(
            "resolution 'native' needs DistillInputs.student_native_logits and teacher_native_logits; the "
            "Distiller fills them for losses with needs_native_logits = True"
        )
    return inputs.student_native_logits, inputs.teacher_native_logits


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


def _pairwise_nodes(
    features: torch.Tensor, nodes: Literal["avg", "skd", "cirkd"], pool: int, scale: float
) -> torch.Tensor:
    """The node features of pair-wise distillation, B x C x h' x w' (see below)."""
    if nodes == "avg":
        return F.avg_pool2d(features, pool, stride=pool, ceil_mode=True)
    if nodes == "cirkd":
        return F.max_pool2d(features, pool, stride=pool, ceil_mode=True)
    kernel = tuple(max(1, int(size * scale)) for size in features.shape[-2:])
    return F.max_pool2d(features, kernel, stride=kernel, ceil_mode=True)


def pairwise_distillation_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    pool: int = 2,
    nodes: Literal["avg", "skd", "cirkd"] = "avg",
    scale: float = 0.5,
) -> torch.Tensor:
    """Pair-wise distillation (Liu et al., CVPR 2019, "Structured Knowledge Distillation
    for Semantic Segmentation").

    The teacher's map is first summarised on the student's grid (adaptive average
    pooling, as for the other feature losses), then both are pooled into nodes, so that
    student and teacher nodes cover the same image regions, and

    ``L_pa = 1/N^2 * sum_{i,j} (cos_s(i, j) - cos_t(i, j))^2``

    over all pairs of the N nodes, averaged over the batch; see
    :func:`kaseg.distill.functional.affinity_loss`. The nodes:

    * ``avg`` (kaseg's default): average pooling of ``pool x pool`` positions in ceil
      mode, a grid of ``ceil(h / pool) x ceil(w / pool)`` nodes whose border nodes average
      the positions they cover (a grid smaller than ``pool`` is one node).
    * ``skd``: as SKD's code (irfanICMLL/structure_knowledge_distillation,
      ``utils/criterion.py`` CriterionPairWiseforWholeFeatAfterPool): max pooling, ceil
      mode, with kernel = stride = ``(int(h * scale), int(w * scale))`` (truncated, as
      ``int()`` there; at least 1), i.e. 2 x 2 nodes at the default ``scale`` 0.5 on an
      even grid (3 on an odd side: the remainder row/column is a node of its own). SKD's
      ``similarity`` divides by a detached norm + 1e-8, so its gradients differ from the
      ones here (which differentiate through the normalisation); the values agree.
    * ``cirkd``: as CIRKD's code (winycg/CIRKD, ``losses/skd.py``
      CriterionStructuralKD): max pooling of ``pool x pool`` (fixed 2 x 2 there, the
      default ``pool``), ceil mode, then ``F.normalize`` and the mean over B x N x N.

    Args:
        student_features: F_s, B x C_s x h x w (raw, no adapter).
        teacher_features: F_t, B x C_t x h_t x w_t; channel counts may differ.
        pool: the node size on the student's grid for ``avg`` and ``cirkd``, >= 1 (1
            keeps every position).
        nodes: ``avg``, ``skd`` or ``cirkd``, as above.
        scale: the node size as a fraction of the grid for ``skd``, in (0, 1].
    """
    _check_pool(pool)
    _check_choice("pairwise nodes", nodes, PAIRWISE_NODES)
    _check_scale(scale)
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(
            f"student {tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)} "
            "features must have the same batch size"
        )
    teacher = _teacher_on_grid(teacher_features, student_features.shape[-2:], mode="pool")
    student, teacher = (_pairwise_nodes(x, nodes, pool, scale) for x in (student_features, teacher))
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
    """Pixel-wise KD on the logits; see :func:`logit_kd_loss`.

    Args:
        temperature: T > 0.
        resolution: ``input`` (the default) compares the logits upsampled to the input
            size, ignore pixels excluded. ``native`` compares them on their own grids,
            before upsampling, over all pixels, as CIRKD's code (winycg/CIRKD,
            ``losses/kd.py`` CriterionKD: ``kl_div(..., reduction='batchmean') * T^2``
            over the B*h*w pixels) and SKD's (``utils/criterion.py`` CriterionPixelWise,
            T = 1: the cross-entropy ``-sum p_t log p_s`` summed over pixels and images and
            divided by h*w only, i.e. B x (this loss + the teacher's mean entropy, a
            constant): the same gradient up to the factor B). The peers' teachers share the
            student's grid; here a finer teacher grid is resized bilinearly to the
            student's.
    """

    def __init__(
        self, dims: FeatureDims, *, temperature: float = 1.0, resolution: Literal["input", "native"] = "input"
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        _check_choice("kd resolution", resolution, LOGIT_RESOLUTIONS)
        self.temperature = temperature
        self.resolution = resolution
        self.needs_native_logits = resolution == "native"

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        student, teacher = logit_pair(inputs, self.resolution)
        masks = inputs.masks if self.resolution == "input" else None
        return logit_kd_loss(student, teacher, masks, temperature=self.temperature)


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
    :func:`pairwise_distillation_loss` for the nodes (``avg``, SKD's ``skd``, CIRKD's
    ``cirkd``), ``pool`` (avg, cirkd) and ``scale`` (skd)."""

    def __init__(
        self,
        dims: FeatureDims,
        *,
        pool: int = 2,
        nodes: Literal["avg", "skd", "cirkd"] = "avg",
        scale: float = 0.5,
    ) -> None:
        super().__init__()
        _check_pool(pool)
        _check_choice("pairwise nodes", nodes, PAIRWISE_NODES)
        _check_scale(scale)
        self.pool = pool
        self.nodes = nodes
        self.scale = scale

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        return pairwise_distillation_loss(
            inputs.student_features, inputs.teacher_features, pool=self.pool, nodes=self.nodes, scale=self.scale
        )


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
        _check_choice("cwd 'on'", on, CWD_SOURCES)
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
