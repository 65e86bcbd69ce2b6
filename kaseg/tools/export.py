"""ONNX export of a trained segmenter, verified against PyTorch with onnxruntime.

Only the deployable segmenter is exported: a checkpoint's ``model`` entry (never a
teacher, auto-encoder or adapter), wrapped so that the graph has one input ``images``
(B x 3 x H x W, normalised) and one output ``logits`` (B x K x H x W at the input size).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kaseg.models import Segmenter
from kaseg.stages import load_segmenter

logger = logging.getLogger("kaseg")

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class LogitsOnly(nn.Module):
    """A segmenter whose forward returns only the logits B x K x H x W (the deployed output)."""

    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["logits"]


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or an ImportError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            f"ONNX export and timing need the onnx and onnxruntime packages ({error}); "
            "install them with `pip install kaseg[onnx]`"
        ) from error
    return onnx, onnxruntime


def write_onnx(
    model: Segmenter, path: str | Path, sample: torch.Tensor, *, dynamic: bool = False, opset: int = 17
) -> Path:
    """Exports ``model``'s logits to ``path`` (overwritten), traced with ``sample``.

    With ``dynamic`` the batch, height and width axes are symbolic; otherwise the graph
    only accepts ``sample``'s shape.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsOnly(model).eval()
    axes = {0: "batch", 2: "height", 3: "width"}
    # The TorchScript exporter (dynamo=False), not torch 2.14's default torch.export one:
    # for these models the dynamo exporter takes ~25x longer, cannot emit opset 17 (it
    # falls back to 18 after a failed version conversion, with a traceback in the log),
    # and writes the weights to a separate .onnx.data file. The TorchScript exporter
    # gives one self-contained file at the requested opset in under a second (both
    # handle the dynamic axes, and match PyTorch to ~1e-6). torch deprecates it; when it
    # is removed, switch to dynamo=True with dynamic_shapes and opset >= 18.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            wrapper,
            (sample,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if dynamic else None,
        )
    return path


def onnx_session(path: str | Path) -> Any:
    """An onnxruntime session on the CPU for the model file at ``path``."""
    _, onnxruntime = require_onnx()
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    *,
    size: tuple[int, int] = (512, 512),
    dynamic: bool = False,
    tolerance: float = 1e-3,
    opset: int = 17,
) -> dict[str, Any]:
    """Exports a checkpoint's segmenter to ONNX and checks it against PyTorch.

    The file is checked with ``onnx.checker`` and run in onnxruntime on a random input of
    ``size`` (with ``dynamic``, also on a batch of two at a second size, ``(H + 32, W - 32)``,
    or ``W + 32`` for ``W <= 32``); the largest absolute logit difference must not exceed
    ``tolerance``.

    Args:
        checkpoint: a segmenter checkpoint written by ``kaseg train`` or ``kaseg distill``.
        out_path: the ``.onnx`` file to write (an existing file is replaced).
        size: H, W of the example input (and the only accepted size unless ``dynamic``).
        dynamic: symbolic batch, height and width.
        tolerance: the largest absolute logit difference accepted.
        opset: the ONNX operator set version.

    Returns:
        ``{"path", "max_abs_diff", "input_size", "dynamic", "opset", "num_classes"}``.

    Raises:
        ImportError: onnx or onnxruntime is not installed.
        RuntimeError: onnxruntime's logits differ from PyTorch's by more than ``tolerance``
            (the file is kept for inspection).
    """
    onnx, _ = require_onnx()
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"export size must be two positive integers H W, got {tuple(size)}")
    model = load_segmenter(checkpoint)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 3, height, width, generator=generator)
    path = write_onnx(model, out_path, sample, dynamic=dynamic, opset=opset)
    onnx.checker.check_model(str(path))
    written_opset = next(
        (entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import
         if entry.domain in ("", "ai.onnx")),
        opset,
    )

    checks = [sample]
    if dynamic:
        second_width = width - 32 if width > 32 else width + 32
        checks.append(torch.randn(2, 3, height + 32, second_width, generator=generator))
    session = onnx_session(path)
    max_abs_diff, worst_shape = 0.0, tuple(sample.shape)
    for images in checks:
        with torch.inference_mode():
            expected = model(images)["logits"].numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        if actual.shape != expected.shape:
            raise RuntimeError(
                f"onnxruntime returned logits of shape {actual.shape} for input {tuple(images.shape)}; "
                f"PyTorch returned {expected.shape} ({str(path)!r})"
            )
        diff = float(np.abs(actual.astype(np.float64) - expected).max())
        if not diff <= max_abs_diff:  # also catches NaN
            max_abs_diff, worst_shape = diff, tuple(images.shape)
    if not max_abs_diff <= tolerance:
        raise RuntimeError(
            f"exported model {str(path)!r} differs from PyTorch by {max_abs_diff:.3g} (max abs "
            f"logit difference, input {worst_shape}), more than the tolerance {tolerance:g}; "
            "the file was kept for inspection"
        )
    logger.info("exported %s (max abs difference %.2e)", path, max_abs_diff)
    return {
        "path": str(path),
        "max_abs_diff": max_abs_diff,
        "input_size": [height, width],
        "dynamic": dynamic,
        "opset": int(written_opset),
        "num_classes": model.num_classes,
    }
