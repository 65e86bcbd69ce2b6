"""Run logging: ``metrics.jsonl`` (one JSON object per logged step or evaluation) and,
when the tensorboard package is installed, TensorBoard events. Only rank 0 writes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("kaseg")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[prefix + key] = float(value)
    return flat


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, iteration: int, split: str, values: dict[str, Any]) -> None:
        """Appends ``{"iteration", "split", **values}`` to metrics.jsonl and scalars to TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps({"iteration": iteration, "split": split, **values}) + "\n")
        if self.writer is not None:
            for key, value in _flatten(values).items():
                self.writer.add_scalar(f"{split}/{key}", value, iteration)

    def log_image(self, iteration: int, tag: str, image: np.ndarray) -> None:
        """An H x W x 3 uint8 picture (for example predictions beside ground truth)."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, iteration, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
