"""Distillation: the knowledge-adaptation auto-encoder, adapter, losses and Distiller."""

from kaseg.distill.autoencoder import TeacherAutoEncoder, adapter, stride_ratio_layers
from kaseg.distill.baselines import (  # importing registers kd, fitnet, pairwise and cwd
    channel_wise_loss,
    feature_mimic_loss,
    logit_kd_loss,
    pairwise_distillation_loss,
)
from kaseg.distill.distiller import AutoEncoderTraining, Distiller, ReconstructionProbe
from kaseg.distill.functional import affinity_loss, knowledge_adaptation_loss
from kaseg.distill.losses import LOSSES, DistillInputs, DistillLoss, FeatureDims, build_losses
from kaseg.distill.relational import (  # importing registers dist, cirkd and ifvd
    cirkd_projection,
    cross_image_relation_loss,
    dist_loss,
    intra_class_variation_loss,
)

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
    "channel_wise_loss",
    "cirkd_projection",
    "cross_image_relation_loss",
    "dist_loss",
    "feature_mimic_loss",
    "intra_class_variation_loss",
    "knowledge_adaptation_loss",
    "logit_kd_loss",
    "pairwise_distillation_loss",
    "stride_ratio_layers",
]
