"""The distillation-loss registry and the loss modules of knowledge adaptation.

Every loss is a small module registered by name, built from a config entry
``{name: ..., weight: ..., <its parameters>}`` and called with the :class:`DistillInputs`
of one step. A loss that reads the teacher's code sets ``needs_teacher_code`` (the
Distiller then runs the encoder), one that reads the adapted student features sets
``needs_adapter`` (the Distiller then builds and runs the adapter), and one that reads
the logits before upsampling sets ``needs_native_logits`` (the Distiller then fills
``student_native_logits`` and ``teacher_native_logits``).
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn as nn

from kaseg.config import ConfigError, check_value
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
        student_native_logits: the classifier's output on the student's feature grid,
            B x K x h x w, before upsampling; set when a loss has ``needs_native_logits``.
        teacher_native_logits: the same for the teacher, B x K x h_t x w_t (its own grid),
            computed from the teacher's features without gradient.
    """

    student_logits: torch.Tensor
    student_features: torch.Tensor
    teacher_logits: torch.Tensor
    teacher_features: torch.Tensor
    masks: torch.Tensor
    student_code: torch.Tensor | None = None
    teacher_code: torch.Tensor | None = None
    student_native_logits: torch.Tensor | None = None
    teacher_native_logits: torch.Tensor | None = None


class DistillLoss(nn.Module):
    """Base class: ``forward(inputs) -> scalar``; subclasses say which inputs they read."""

    needs_teacher_code: bool = False
    needs_adapter: bool = False
    needs_native_logits: bool = False

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


@dataclass(frozen=True)
class LossSpec:
    """One checked ``distill.losses`` entry."""

    name: str
    key: str  # the name the term is logged under
    weight: float
    cls: type[DistillLoss]
    params: dict[str, Any]


# Channel counts for trial constructions: any valid value will do, nothing is allocated.
_TRIAL_DIMS = FeatureDims(student_channels=1, teacher_channels=1, code_channels=1, num_classes=1)


def check_loss_specs(specs: Sequence[Any]) -> list[LossSpec]:
    """Checks ``distill.losses`` entries: the one check, run when a config is loaded
    (``kaseg.config.validate_config``) and again by :func:`build_losses`.

    Each spec is ``{name, weight (default 1), key (default: name), **parameters}``: a
    registered name, a finite weight >= 0, a key used once, and parameters that are
    keyword-only parameters of the loss's constructor with values it accepts. The values
    are checked by constructing the loss on the meta device, which allocates nothing and
    draws no random numbers, so every check a constructor makes runs without data or
    channel counts; then against the parameters' annotated types.

    Raises:
        ConfigError: naming the entry (``distill.losses[i]``) or its key and what is valid.
    """
    checked: list[LossSpec] = []
    for index, spec in enumerate(specs):
        where = f"distill.losses[{index}]"
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(
                f"{where} must be a mapping with a 'name' (one of {', '.join(LOSSES.names())}); got {spec!r}"
            )
        params = dict(spec)
        name = params.pop("name")
        if not isinstance(name, str) or name not in LOSSES:
            raise ConfigError(f"{where}.name: unknown distillation loss {name!r}; valid: {', '.join(LOSSES.names())}")
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ConfigError(f"{where}.weight: expected a finite number >= 0, got {weight!r}")
        key = params.pop("key", name)
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}.key: expected a non-empty string, got {key!r}")
        if key in {"ce"} | {c.key for c in checked}:
            raise ConfigError(f"{where}.key: loss key {key!r} is used twice; give one a distinct 'key'")
        cls = LOSSES.get(name)
        _check_loss_parameters(cls, name, params, where)
        checked.append(LossSpec(name=name, key=key, weight=float(weight), cls=cls, params=params))
    return checked


def _check_loss_parameters(cls: type[DistillLoss], name: str, params: dict[str, Any], where: str) -> None:
    valid = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: loss {name!r} has no parameter(s) {unknown}; valid: {['weight', 'key'] + valid}")
    try:
        with torch.device("meta"):
            cls(_TRIAL_DIMS, **params)
    except (ValueError, TypeError) as error:
        named = next((p for p in params if re.search(rf"\b{re.escape(p)}\b", str(error))), None)
        raise ConfigError(f"{where}{'.' + named if named else ''}: loss {name!r}: {error}") from None
    except Exception:  # a constructor that cannot run on the meta device: the real build checks
        pass
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: the constructor's checks stand alone
        hints = {}
    for param, value in params.items():
        if param in hints:
            try:
                check_value(hints[param], value, f"{where}.{param}")
            except TypeError:  # a type the config types do not cover
                pass


def build_losses(specs: Sequence[Any], dims: FeatureDims) -> list[WeightedLoss]:
    """Builds the configured losses (checked by :func:`check_loss_specs`)."""
    return [WeightedLoss(spec.key, spec.weight, spec.cls(dims, **spec.params)) for spec in check_loss_specs(specs)]
