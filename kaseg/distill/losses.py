"""The distillation-loss registry and the loss modules of knowledge adaptation.

Every loss is a small module registered by name, built from a config entry
``{name: ..., weight: ..., <its parameters>}`` and called with the :class:`DistillInputs`
of one step. A loss that reads the teacher's code sets ``needs_teacher_code`` (the
Distiller then runs the encoder) and one that reads the adapted student features sets
``needs_adapter`` (the Distiller then builds and runs the adapter).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from kaseg.distill.functional import affinity_loss, knowledge_adaptation_loss
from kaseg.registry import Registry

LOSSES: Registry = Registry("distillation loss")


@dataclass(frozen=True)
class FeatureDims:
    """Channel counts a loss may need to size its own layers."""

    student_channels: int
    teacher_channels: int
    code_channels: int
    num_classes: int


@dataclass
class DistillInputs:
    """Everything a distillation loss may compare, for one batch.

    Attributes:
        student_logits, teacher_logits: B x K x H x W at the input size.
        student_features: F_s, B x C_s x h x w (the student's grid).
        teacher_features: F_t, B x C_t x h_t x w_t (the teacher's grid).
        masks: B x H x W labels, 255 = ignore.
        student_code: the adapter's output C_f(F_s), B x C_code x h x w, when needed.
        teacher_code: E(F_t) (or F_t resized without an auto-encoder), same shape.
    """

    student_logits: torch.Tensor
    student_features: torch.Tensor
    teacher_logits: torch.Tensor
    teacher_features: torch.Tensor
    masks: torch.Tensor
    student_code: torch.Tensor | None = None
    teacher_code: torch.Tensor | None = None


class DistillLoss(nn.Module):
    """Base class: ``forward(inputs) -> scalar``; subclasses say which inputs they read."""

    needs_teacher_code: bool = False
    needs_adapter: bool = False

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        raise NotImplementedError


@LOSSES.register("adapt")
class KnowledgeAdaptationLoss(DistillLoss):
    """Knowledge adaptation loss (He et al., CVPR 2019): normalised adapted student vs
    teacher code at every position; see :func:`knowledge_adaptation_loss`."""

    needs_teacher_code = True
    needs_adapter = True

    def __init__(self, dims: FeatureDims, *, p: float = 2.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        return knowledge_adaptation_loss(inputs.student_code, inputs.teacher_code, p=self.p, eps=self.eps)


@LOSSES.register("affinity")
class AffinityLoss(DistillLoss):
    """Affinity distillation loss (He et al., CVPR 2019); see :func:`affinity_loss`.

    Args:
        source: ``adapted`` compares the adapter's output with the teacher's code (the
            default); ``student`` takes the student's affinity from F_s directly.
    """

    needs_teacher_code = True

    def __init__(
        self, dims: FeatureDims, *, source: Literal["adapted", "student"] = "adapted", eps: float = 1e-6
    ) -> None:
        super().__init__()
        if source not in ("adapted", "student"):
            raise ValueError(f"affinity source must be 'adapted' or 'student', got {source!r}")
        self.source = source
        self.needs_adapter = source == "adapted"
        self.eps = eps

    def forward(self, inputs: DistillInputs) -> torch.Tensor:
        student = inputs.student_code if self.source == "adapted" else inputs.student_features
        return affinity_loss(student, inputs.teacher_code, eps=self.eps)


@dataclass
class WeightedLoss:
    key: str  # the name this term is logged under
    weight: float
    module: DistillLoss


def build_losses(specs: list[dict[str, Any]], dims: FeatureDims) -> list[WeightedLoss]:
    """Builds the configured losses; errors name the entry and list what is valid.

    Each spec is ``{name, weight (default 1), key (default: name), **parameters}``.
    """
    built: list[WeightedLoss] = []
    for index, spec in enumerate(specs):
        where = f"distill.losses[{index}]"
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"{where} must be a mapping with a 'name'; got {spec!r}")
        params = dict(spec)
        name = params.pop("name")
        weight = float(params.pop("weight", 1.0))
        key = str(params.pop("key", name))
        try:
            cls = LOSSES.get(name)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        valid = [
            p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is p.KEYWORD_ONLY
        ]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"{where}: loss {name!r} has no parameter(s) {unknown}; valid: "
                f"{['weight', 'key'] + valid}"
            )
        if key in {"ce"} | {w.key for w in built}:
            raise ValueError(f"{where}: loss key {key!r} is used twice; give one a distinct 'key'")
        built.append(WeightedLoss(key, weight, cls(dims, **params)))
    return built
