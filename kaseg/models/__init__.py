"""Segmentation models: timm backbones, DeepLab heads and the model registry."""

from kaseg.models.backbones import PretrainedWeightsError, create_backbone
from kaseg.models.segmenter import (
    MODELS,
    Segmenter,
    build_model,
    build_model_from_arch,
    list_models,
)

__all__ = [
    "MODELS",
    "PretrainedWeightsError",
    "Segmenter",
    "build_model",
    "build_model_from_arch",
    "create_backbone",
    "list_models",
]
