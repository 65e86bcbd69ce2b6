"""Segmentation models: timm backbones, DeepLab heads, the model registry, and models from
torchvision, segmentation_models_pytorch or your own code with the same contract."""

from kaseg.models.backbones import PretrainedWeightsError, create_backbone
from kaseg.models.external import (
    ExternalSegmenter,
    FeatureTapError,
    build_external,
    build_from_config,
    load_model_weights,
    validate_model_config,
    wrap_model,
)
from kaseg.models.segmenter import (
    MODELS,
    Segmenter,
    build_model,
    build_model_from_arch,
    list_models,
)

__all__ = [
    "MODELS",
    "ExternalSegmenter",
    "FeatureTapError",
    "PretrainedWeightsError",
    "Segmenter",
    "build_external",
    "build_from_config",
    "build_model",
    "build_model_from_arch",
    "create_backbone",
    "list_models",
    "load_model_weights",
    "validate_model_config",
    "wrap_model",
]
