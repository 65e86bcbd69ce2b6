"""Distillation: the knowledge-adaptation auto-encoder, adapter, losses and Distiller."""

from kaseg.distill.autoencoder import TeacherAutoEncoder, adapter, stride_ratio_layers
from kaseg.distill.distiller import AutoEncoderTraining, Distiller, ReconstructionProbe
from kaseg.distill.functional import affinity_loss, knowledge_adaptation_loss
from kaseg.distill.losses import LOSSES, DistillInputs, DistillLoss, FeatureDims, build_losses

__all__ = [
    "LOSSES",
    "AutoEncoderTraining",
    "DistillInputs",
    "DistillLoss",
    "Distiller",
    "FeatureDims",
    "ReconstructionProbe",
    "TeacherAutoEncoder",
    "adapter",
    "affinity_loss",
    "build_losses",
    "knowledge_adaptation_loss",
    "stride_ratio_layers",
]
