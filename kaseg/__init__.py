"""kaseg: knowledge adaptation for efficient semantic segmentation."""

from kaseg.models import build_model, list_models, wrap_model

__version__ = "0.1.0"
__all__ = ["__version__", "build_model", "list_models", "wrap_model"]
