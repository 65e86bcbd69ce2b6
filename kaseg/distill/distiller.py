"""The modules the training loop runs for the two knowledge-adaptation stages.

* :class:`AutoEncoderTraining` (stage 1): frozen teacher, trainable auto-encoder.
* :class:`Distiller` (stage 2): frozen teacher and encoder, trainable student, adapter
  and any loss with parameters of its own.

Both return a dict of named, weighted loss terms; frozen parts run under
``torch.inference_mode`` and stay in eval mode whatever ``train()`` is called with, so
their batch-norm statistics never change.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kaseg.data.base import IGNORE_INDEX
from kaseg.distill.autoencoder import TeacherAutoEncoder, adapter, autoencoder_loss
from kaseg.distill.losses import DistillInputs, WeightedLoss
from kaseg.distill.teacher import TeacherFeatureStore, TeacherOutputs, freeze
from kaseg.models.segmenter import Segmenter


def _check_native_logits(model: nn.Module, role: str) -> None:
    if not callable(getattr(model, "native_logits", None)):
        raise TypeError(
            f"a configured loss reads the {role}'s logits before upsampling (resolution: native), but "
            f"{type(model).__name__} has no native_logits(features) method; add one (the classifier's "
            "output on the feature grid) or set the loss's resolution to 'input'"
        )


@torch.inference_mode()
def _teacher_native_logits(teacher: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return teacher.native_logits(features)


def _to_grid(features: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if features.shape[-2:] == size:
        return features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


class AutoEncoderTraining(nn.Module):
    """Stage 1: reconstruct the frozen teacher's final features through the code.

    ``teacher_cache_mb`` > 0 (or a shared ``teacher_store``) reuses the teacher's features
    of inputs seen before (see :class:`kaseg.distill.teacher.TeacherOutputs`).
    """

    def __init__(
        self,
        teacher: Segmenter,
        autoencoder: TeacherAutoEncoder,
        *,
        alpha: float,
        teacher_cache_mb: float = 0,
        teacher_store: TeacherFeatureStore | None = None,
    ) -> None:
        super().__init__()
        self.teacher = freeze(teacher)
        self.teacher_outputs = TeacherOutputs(self.teacher, cache_mb=teacher_cache_mb, store=teacher_store)
        self.autoencoder = autoencoder
        self.alpha = alpha

    def train(self, mode: bool = True) -> AutoEncoderTraining:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.teacher_outputs(images)["features"].clone()
        code, reconstruction = self.autoencoder(features)
        return autoencoder_loss(features, code, reconstruction, self.alpha)


class ReconstructionProbe:
    """Evaluation of an auto-encoder: the teacher's logits read from D(E(F_t)).

    Called like a logits function (so the usual mIoU evaluation applies) while it sums
    ``||F_t - D(E(F_t))||^2`` and ``||F_t||^2`` for the relative reconstruction error.
    """

    def __init__(self, teacher: Segmenter, autoencoder: TeacherAutoEncoder) -> None:
        self.teacher = teacher
        self.autoencoder = autoencoder
        self.sums = torch.zeros(2, dtype=torch.float64)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        output = self.teacher(images)
        features = output["features"]
        _, reconstruction = self.autoencoder(features)
        self.sums = self.sums.to(features.device)
        self.sums += torch.stack(
            [(features - reconstruction).double().pow(2).sum(), features.double().pow(2).sum()]
        )
        if not hasattr(self.teacher, "classify"):
            # No known classifier reads the tapped map (an external model tapped elsewhere):
            # the teacher's own logits, which train_autoencoder does not report.
            return output["logits"]
        return self.teacher.classify(reconstruction, images.shape[-2:])


class Distiller(nn.Module):
    """Stage 2: the student learns from labels, the teacher's code and its affinities.

    ``forward(images, masks)`` returns ``{"ce": ce_weight * CE, key: weight * loss, ...}``
    with one entry per configured loss (for the paper: ``adapt`` with weight 50 and
    ``affinity`` with weight 1).

    Args:
        teacher: the trained teacher (frozen here).
        student: the segmenter being trained; the only part that is exported.
        encoder: the trained auto-encoder (frozen; only E is used), or None to adapt the
            student straight to the teacher's features resized to the student's grid.
        losses: the weighted distillation losses; none gives the student alone trained
            through this stage (the paired baseline: same initialisation, data and steps).
        ce_weight: weight of the cross-entropy on the labels.
        warmup_iterations: the distillation weights grow linearly from 0 to their value over
            this many iterations, set by :meth:`start_iteration` (0: full weights throughout).
        teacher_cache_mb: memory for reusing the teacher's features of inputs seen before
            (deterministic augmentation only; see :class:`kaseg.distill.teacher.TeacherOutputs`).
        teacher_store: a feature store shared with another stage (instead of a new one).
    """

    def __init__(
        self,
        teacher: Segmenter,
        student: Segmenter,
        *,
        encoder: TeacherAutoEncoder | None,
        losses: list[WeightedLoss],
        ce_weight: float = 1.0,
        warmup_iterations: int = 0,
        teacher_cache_mb: float = 0,
        teacher_store: TeacherFeatureStore | None = None,
    ) -> None:
        super().__init__()
        self.teacher = freeze(teacher)
        self.teacher_outputs = TeacherOutputs(self.teacher, cache_mb=teacher_cache_mb, store=teacher_store)
        self.encoder = freeze(encoder) if encoder is not None else None
        self.student = student
        self.needs_teacher_code = any(loss.module.needs_teacher_code for loss in losses)
        self.needs_native_logits = any(loss.module.needs_native_logits for loss in losses)
        if self.needs_native_logits:
            _check_native_logits(teacher, "teacher")
            _check_native_logits(student, "student")
        code_channels = (
            encoder.arch["code_channels"] if encoder is not None else teacher.feature_channels
        )
        needs_adapter = any(loss.module.needs_adapter for loss in losses)
        self.adapter = adapter(student.feature_channels, code_channels) if needs_adapter else None
        self.losses = nn.ModuleList(loss.module for loss in losses)
        self.keys = [loss.key for loss in losses]
        self.weights = [loss.weight for loss in losses]
        self.ce_weight = ce_weight
        self.warmup_iterations = warmup_iterations
        # A tensor, not a float, so that torch.compile does not recompile as it changes.
        self.register_buffer("ramp", torch.ones(()), persistent=False)

    def start_iteration(self, iteration: int) -> None:
        """Sets the warm-up factor of the distillation weights for training iteration
        ``iteration`` (counted from 1): ``min(1, iteration / warmup_iterations)``."""
        if self.warmup_iterations > 0:
            self.ramp.fill_(min(1.0, iteration / self.warmup_iterations))

    @property
    def trainable(self) -> nn.ModuleDict:
        """Student, adapter and loss parameters: what the optimizer updates and resumes."""
        parts = nn.ModuleDict({"student": self.student, "losses": self.losses})
        if self.adapter is not None:
            parts["adapter"] = self.adapter
        return parts

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()
        if self.encoder is not None:
            self.encoder.eval()
        return self

    @torch.inference_mode()
    def _teacher_code(self, features: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        if self.encoder is not None:
            return _to_grid(self.encoder.encode(features), grid)
        return F.adaptive_avg_pool2d(features, grid)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        student = self.student(images)
        losses = {
            "ce": self.ce_weight
            * F.cross_entropy(student["logits"].float(), masks, ignore_index=IGNORE_INDEX)
        }
        if not self.losses:
            return losses
        teacher = self.teacher_outputs(images)
        grid = student["features"].shape[-2:]
        inputs = DistillInputs(
            student_logits=student["logits"],
            student_features=student["features"],
            # Inference tensors cannot be saved for backward; clones are ordinary tensors.
            teacher_logits=teacher["logits"].clone(),
            teacher_features=teacher["features"].clone(),
            masks=masks,
        )
        if self.needs_teacher_code:
            inputs.teacher_code = self._teacher_code(teacher["features"], grid).clone()
        if self.adapter is not None:
            inputs.student_code = self.adapter(student["features"])
        if self.needs_native_logits:
            inputs.student_native_logits = self.student.native_logits(student["features"])
            inputs.teacher_native_logits = _teacher_native_logits(self.teacher, teacher["features"]).clone()
        for key, weight, loss in zip(self.keys, self.weights, self.losses):
            losses[key] = weight * loss(inputs)
            if self.warmup_iterations > 0:
                losses[key] = self.ramp * losses[key]
        return losses
