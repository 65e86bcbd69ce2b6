"""The relational distillation methods users compare with today.

* ``dist``: DIST (Huang et al., NeurIPS 2022): Pearson correlations of the class
  probabilities, across classes at each pixel and across pixels for each class,
* ``cirkd``: CIRKD (Yang et al., CVPR 2022), its mini-batch form: the distributions of
  each pixel's similarities to every pixel of every image of the batch,
* ``ifvd``: IFVD (Wang et al., ECCV 2020): each pixel's cosine similarity to the mean
  feature of its class in its image.

Each is a plain function (the formula in its docstring) plus a small registered loss
module. Where the authors' code settles a detail the paper leaves open, the docstring
says what their code does and whether kaseg follows it. The teacher's tensors are
targets: every function detaches them, so gradients reach the student (and the loss's
own layers) only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kaseg.data.base import IGNORE_INDEX
from kaseg.distill.baselines import (
    LOGIT_RESOLUTIONS,
    _check_batch_and_channels,
    _check_choice,
    _check_temperature,
    _teacher_on_grid,
    logit_pair,
)
from kaseg.distill.losses import LOSSES, DistillInputs, DistillLoss, FeatureDims

CIRKD_PROJECTIONS = ("auto", "always", "none")

# Elements of one row block of CIRKD's similarity matrices (rows x B N): a block holds a
# few such matrices at once, so the extra memory is bounded whatever the batch and grid.
# Peak of forward + backward at B = 8, 65 x 65, C = 256 (inputs excluded): 2^20 -> 195 MB,
# 2^21 -> 244 MB, 2^22 -> 314 MB, 2^23 -> 490 MB; the times differed less than the noise
# of the loaded 2-core CPU they were measured on. 2^22 keeps the matrix products large.
CIRKD_BLOCK_ELEMENTS = 2**22


def _working_precision(tensor: torch.Tensor) -> torch.Tensor:
    """float64 stays float64, lower precisions compute in float32."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def masks_on_grid(masks: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """B x H x W labels nearest-downsampled to ``size`` (``F.interpolate(mode='nearest')``,
    what the peers' ``nn.Upsample(size, mode='nearest')`` does)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be B x H x W labels, got shape {tuple(masks.shape)}")
    if masks.shape[-2:] == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(masks.dtype)


def _check_weight(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_feature_batch(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features "
            "must be B x C x h x w with the same batch size"
        )


def _check_flag(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


# DIST


def _pearson(x: torch.Tensor, y: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """Pearson correlation of x and y along ``dim`` (eps added to the product of the norms,
    as the DIST code does)."""
    x = x - x.mean(dim, keepdim=True)
    y = y - y.mean(dim, keepdim=True)
    return (x * y).sum(dim) / (x.norm(dim=dim) * y.norm(dim=dim) + eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    eps: float = 1e-8,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger
    Teacher"), segmentation form.

    With ``p(j) = softmax(z(j) / tau)`` the class probabilities at pixel j, V the pixels
    used (all of the batch, or those whose label is not ``ignore_index``) and
    ``rho(u, v) = <u - mean(u), v - mean(v)> / (||u - mean(u)|| ||v - mean(v)|| + eps)``
    the Pearson correlation,

    ``L_inter = 1 - 1/|V| * sum_{j in V} rho(p_s(j), p_t(j))``  (across the K classes)

    ``L_intra = 1 - 1/K * sum_k rho(p_s[k, V], p_t[k, V])``  (across all pixels of the batch)

    ``L_dist = tau^2 * (beta * L_inter + gamma * L_intra)``, in [0, 2 tau^2 (beta + gamma)],

    0 for identical logits (up to eps; a pixel or class whose probabilities are constant
    counts as uncorrelated). A batch without any used pixel gives 0 (zero gradients).

    The authors' code (hunto/DIST_KD, ``segmentation/losses/dist_kd.py``) applies it to
    the logits of both nets before upsampling (one grid, stride 8), over all pixels (no
    ignore masks), with eps = 1e-8 and no temperature; tau with the tau^2 factor is from
    their classification code. Pass ``masks`` to leave out the ignore pixels.

    Args:
        student_logits: B x K x h x w.
        teacher_logits: B x K x h' x w'; resized bilinearly to h x w if they differ.
        masks: B x h x w labels at the logits' size, or None to use every pixel.
        beta, gamma: the weights of the inter- and intra-class terms.
        temperature: tau > 0.
        ignore_index: the label of pixels left out when ``masks`` is given.
        eps: added to the denominators of the correlations.
    """
    _check_temperature(temperature)
    _check_batch_and_channels(student_logits, teacher_logits, "logits")
    teacher_logits = _teacher_on_grid(teacher_logits, student_logits.shape[-2:], mode="bilinear")
    classes = student_logits.shape[1]
    p_s, p_t = (
        F.softmax(_working_precision(z) / temperature, dim=1).permute(0, 2, 3, 1).reshape(-1, classes)
        for z in (student_logits, teacher_logits)
    )  # pixels x K
    if masks is not None:
        if masks.shape != (student_logits.shape[0], *student_logits.shape[-2:]):
            raise ValueError(
                f"masks {tuple(masks.shape)} must be B x h x w at the logits' size "
                f"{(student_logits.shape[0], *student_logits.shape[-2:])}"
            )
        valid = (masks != ignore_index).flatten()
        p_s, p_t = p_s[valid], p_t[valid]
    if p_s.shape[0] == 0:
        return p_s.sum() * 0.0
    inter = 1 - _pearson(p_s, p_t, dim=1, eps=eps).mean()
    intra = 1 - _pearson(p_s, p_t, dim=0, eps=eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)


# CIRKD


def _log_similarity_distributions(
    rows: torch.Tensor, pixels: torch.Tensor, batch: int, temperature: float
) -> torch.Tensor:
    """``log softmax(<rows, pixels of image j> / tau)`` over each image's pixels:
    R x C rows against (B N) x C pixels -> R x B x N."""
    logits = (rows @ pixels.T).div_(temperature)
    return F.log_softmax(logits.view(rows.shape[0], batch, -1), dim=2)


def _cirkd_blocks(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, rows: int, with_gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CIRKD's loss on normalised B x N x C maps, row block by row block, and when asked
    its gradient with respect to ``student``.

    For one block of rows a, ``dL/dz_s[a, (j, b)] = (p_s - p_t)[a, (j, b)] / (B^2 N)``
    (each distribution sums to 1) and ``z_s = S S^T / tau``, so the block adds
    ``G S / tau`` to its own rows of dL/dS and ``G^T S[a] / tau`` to all of them.
    """
    batch, positions = student.shape[:2]
    pixels = batch * positions
    scale = 1.0 / (batch * batch * positions)
    student, teacher = student.reshape(pixels, -1), teacher.reshape(pixels, -1)
    gradient = torch.zeros_like(student) if with_gradient else None
    total = student.new_zeros(())
    for start in range(0, pixels, rows):
        block = slice(start, start + rows)
        log_p_s = _log_similarity_distributions(student[block], student, batch, temperature)
        log_p_t = _log_similarity_distributions(teacher[block], teacher, batch, temperature)
        p_t = log_p_t.exp()
        # In-place where possible: a block holds four R x B N matrices at most.
        total += log_p_t.sub_(log_p_s).mul_(p_t).sum()  # KL(p_t || p_s), summed
        if gradient is not None:
            g = log_p_s.exp_().sub_(p_t).mul_(scale / temperature).view(-1, pixels)
            gradient[block] += g @ student
            gradient += g.T @ student[block]
    return total * scale, gradient


class _CrossImageRelation(torch.autograd.Function):
    """CIRKD's loss with its gradient computed block by block in the forward pass, so
    that only the B N x C gradient, never a similarity matrix, waits for the backward."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, rows: int) -> torch.Tensor:
        loss, gradient = _cirkd_blocks(student, teacher, temperature, rows, with_gradient=True)
        ctx.save_for_backward(gradient.view_as(student))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (gradient,) = ctx.saved_tensors
        return grad_output * gradient, None, None, None


def cross_image_relation_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    temperature: float = 0.1,
    block_rows: int | None = None,
) -> torch.Tensor:
    """CIRKD's mini-batch pixel-to-pixel loss (Yang et al., CVPR 2022, "Cross-Image
    Relational Knowledge Distillation for Semantic Segmentation").

    With ``f_i[a]`` the L2-normalised feature of pixel a of image i (N = h * w pixels per
    image, B images) and, for every ordered pair (i, j), including i = j,

    ``p_ij[a, :] = softmax_b(<f_i[a], f_j[b]> / tau)``  (over the N pixels b of image j),

    ``L_cirkd = 1/B^2 * sum_{i,j} 1/N * sum_a KL(p^t_ij[a, :] || p^s_ij[a, :])``,

    i.e. CIRKD's code (winycg/CIRKD, ``losses/cirkd_mini_batch.py``
    CriterionMiniBatchCrossImagePair): ``kl_div(log p_s, p_t, reduction='batchmean')``
    per pair (the sum over the N x N entries / N), averaged over the B^2 pairs; no
    pooling (its later versions average-pool 4 x 4 when h and w are both >= 256, which no
    feature map here reaches). The similarities compare pixels within one net, so the
    channel counts may differ. The teacher's finer grid is first average-pooled to the
    student's (adaptive average pooling, as kaseg's other feature losses do); in CIRKD
    both nets share one grid.

    Memory: the B^2 N x N matrices (B N x B N in all) are never held at once. The loss
    goes over row blocks of ``block_rows`` pixels (default: CIRKD_BLOCK_ELEMENTS / (B N)
    rows) and, when the student needs a gradient, computes dL/dS block by block in the
    same pass (a custom autograd Function), so only a B N x C gradient waits for the
    backward pass. At B = 8, 65 x 65, C = 256 a forward + backward measured a 330 MB peak
    and 180 s, against 9.0 GB and 164 s for CIRKD's per-pair form (benchmarks/cirkd_memory.py;
    a 2-core CPU shared with training runs, so the times only compare with each other:
    the same arithmetic, in larger products). It is once differentiable.

    Args:
        student_features: B x C_s x h x w (raw or projected).
        teacher_features: B x C_t x h_t x w_t (pooled to h x w).
        temperature: tau > 0 (0.1 in CIRKD).
        block_rows: pixels per row block (None: the default above); B * N computes
            everything in one block.
    """
    _check_temperature(temperature)
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"block_rows must be an integer >= 1 or None, got {block_rows!r}")
    _check_feature_batch(student_features, teacher_features)
    teacher_features = _teacher_on_grid(teacher_features, student_features.shape[-2:], mode="pool")
    student, teacher = (
        F.normalize(_working_precision(x), p=2, dim=1).flatten(2).transpose(1, 2).contiguous()  # B x N x C
        for x in (student_features, teacher_features)
    )
    pixels = student.shape[0] * student.shape[1]
    rows = block_rows or max(1, CIRKD_BLOCK_ELEMENTS // pixels)
    if torch.is_grad_enabled() and student.requires_grad:
        return _CrossImageRelation.apply(student, teacher, temperature, rows)
    return _cirkd_blocks(student, teacher, temperature, rows, with_gradient=False)[0]


def cirkd_projection(in_channels: int, out_channels: int) -> nn.Sequential:
    """CIRKD's projection head (winycg/CIRKD, ``losses/cirkd_memory.py``,
    StudentSegContrast.project_head): 1x1 conv without bias, batch norm, ReLU, 1x1 conv
    without bias."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1, bias=False),
    )


# IFVD


def _prototype_similarity(
    features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """cos(f_j, prototype of j's class in j's image) at every pixel, B x N (0 where
    ``valid`` is False). features: B x C x N; labels, valid: B x N."""
    one_hot = F.one_hot(torch.where(valid, labels, num_classes), num_classes + 1)[..., :num_classes]
    one_hot = one_hot.to(features.dtype)  # B x N x K
    counts = one_hot.sum(1)  # B x K
    prototypes = (features @ one_hot) / (counts[:, None] + 1e-6)  # B x C x K, IFVD's 1e-6
    return F.cosine_similarity(features, prototypes @ one_hot.transpose(1, 2), dim=1)


def intra_class_variation_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    masks: torch.Tensor,
    *,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """IFVD (Wang et al., ECCV 2020, "Intra-class Feature Variation Distillation for
    Semantic Segmentation").

    With the labels nearest-downsampled to the student's grid, ``c_k`` the prototype of
    class k in an image (the mean feature of its pixels labelled k) and
    ``M(j) = cos(f_j, c_{y_j})`` each labelled pixel's similarity to its class prototype,

    ``L_ifv = 1/(B h w) * sum_{j labelled} (M_s(j) - M_t(j))^2``.

    As the authors' code (YukangWang/IFVD, ``utils/criterion.py`` CriterionIFV):
    prototypes per image and class, ``sum / (count + 1e-6)``, gradients through the
    student's prototypes, the student's raw features (no projection: the similarities are
    scalars, so channel counts may differ), and ``nn.MSELoss`` over all B h w pixels,
    where a pixel without a class (the ignore label) compares its feature with itself on
    both sides, i.e. contributes 0 but counts in the mean. So ignore pixels have no effect
    on the sum but the mean still divides by every pixel. The teacher's finer grid is
    average-pooled to the student's (in IFVD both nets share one grid).

    Args:
        student_features: F_s, B x C_s x h x w.
        teacher_features: F_t, B x C_t x h_t x w_t (pooled to h x w).
        masks: B x H x W labels (any size; nearest-downsampled to h x w).
        num_classes: K; labels other than ``ignore_index`` must be in [0, K).
        ignore_index: the label of pixels without a class.
    """
    _check_feature_batch(student_features, teacher_features)
    if masks.ndim != 3 or masks.shape[0] != student_features.shape[0]:
        raise ValueError(f"masks {tuple(masks.shape)} must be B x H x W with B = {student_features.shape[0]}")
    grid = student_features.shape[-2:]
    teacher_features = _teacher_on_grid(teacher_features, grid, mode="pool")
    labels = masks_on_grid(masks, grid).flatten(1).long()
    valid = labels != ignore_index
    if ((labels < 0) | (labels >= num_classes))[valid].any():
        found = labels[valid].unique().tolist()
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}, got {found}")
    student_map, teacher_map = (
        _prototype_similarity(_working_precision(x).flatten(2), labels, valid, num_classes)
        for x in (student_features, teacher_features)
    )
    squared = torch.where(valid, student_map - teacher_map, 0.0).pow(2)
    return squared.sum() / squared.numel()


# The registered modules


@LOSSES.register("dist")
class DISTLoss(DistillLoss):
    """DIST on the class probabilities; see :func:`dist_loss`.

    Args:
        beta, gamma: weights of the inter- and intra-class relations (1 and 1).
        temperature: tau > 0 (1; the loss is scaled by tau^2).
        resolution: ``native`` (the default, as the authors' code) compares the logits
            before upsampling, the teacher's resized bilinearly to the student's grid;
            ``input`` compares the logits at the input size.
        exclude_ignore: False (the default, as the authors' code) uses every pixel; True
            leaves out the pixels labelled 255 (labels nearest-downsampled to the grid).
    """

    def __init__(
        self,
        dims: FeatureDims,
        *,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        resolution: Literal["input", "native"] = "native",
        exclude_ignore: bool = False,
    ) -> None:
        super().__init__()
        _check_weight("dist beta", beta)
        _check_weight("dist gamma", gamma)
        _check_temperature(temperature)
        _check_choice("dist resolution", resolution, LOGIT_RESOLUTIONS)
        _check_flag("dist exclude_ignore", exclude_ignore)
        self.beta, self.gamma, self.temperature = beta, gamma, temperature
        self.resolution = resolution
        self.exclude_ignore = exclude_ignore
        self.needs_native_logits = resolution == "native"

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        student, teacher = logit_pair(inputs, self.resolution)
        masks = masks_on_grid(inputs.masks, student.shape[-2:]) if self.exclude_ignore else None
        return dist_loss(
            student, teacher, masks, beta=self.beta, gamma=self.gamma, temperature=self.temperature
        )


@LOSSES.register("cirkd")
class CrossImageRelationLoss(DistillLoss):
    """CIRKD's mini-batch pixel-to-pixel distillation; see :func:`cross_image_relation_loss`.

    Args:
        temperature: tau > 0 (0.1 in CIRKD).
        projection: ``auto`` (the default) puts :func:`cirkd_projection` (C_s -> C_t, owned
            and trained here) on the student's features when the channel counts differ;
            ``always`` / ``none`` always / never. CIRKD's published mini-batch loss reads
            the raw features (its head belongs to its memory-bank loss), which ``none``
            reproduces; with equal channel counts ``auto`` is the same.
    """

    def __init__(
        self,
        dims: FeatureDims,
        *,
        temperature: float = 0.1,
        projection: Literal["auto", "always", "none"] = "auto",
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        _check_choice("cirkd projection", projection, CIRKD_PROJECTIONS)
        self.temperature = temperature
        project = projection == "always" or (
            projection == "auto" and dims.student_channels != dims.teacher_channels
        )
        self.head = cirkd_projection(dims.student_channels, dims.teacher_channels) if project else None

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        student = inputs.student_features if self.head is None else self.head(inputs.student_features)
        return cross_image_relation_loss(student, inputs.teacher_features, temperature=self.temperature)


@LOSSES.register("ifvd")
class IntraClassVariationLoss(DistillLoss):
    """IFVD's class-prototype similarity maps on raw F_s and F_t, with the labels; see
    :func:`intra_class_variation_loss`."""

    def __init__(self, dims: FeatureDims) -> None:
        super().__init__()
        self.num_classes = dims.num_classes

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        return intra_class_variation_loss(
            inputs.student_features, inputs.teacher_features, inputs.masks, num_classes=self.num_classes
        )
