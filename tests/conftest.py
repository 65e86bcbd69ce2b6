"""Shared fixtures: tiny configs that train in seconds on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_STUDENT = {
    "name": "deeplabv3_mobilenetv2",
    "output_stride": 16,
    "width": 0.35,
    "aspp": False,
    "head_channels": 8,
    "dropout": 0.0,
}
TINY_TEACHER = {"name": "deeplabv3plus_resnet18", "output_stride": 8, "head_channels": 8}


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and two OpenMP threads on a busy 2-core
    machine make each forward pass ~100x slower (spinning threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(run_root: Path, name: str, **sections: Any) -> dict[str, Any]:
    """A config dict for a few-second run on 32x32 shapes; ``sections`` update it."""
    config = {
        "name": name,
        "output_dir": str(run_root),
        "seed": 0,
        "model": dict(TINY_STUDENT),
        "data": {
            "name": "shapes",
            "options": {"num_images": 32, "num_val_images": 7, "size": 32},
            "crop_size": [32, 32],
            "scale_range": [0.75, 1.25],
            "batch_size": 4,
            "val_batch_size": 2,
            "workers": 0,
        },
        "train": {
            "iterations": 6,
            "optimizer": "sgd",
            "lr": 0.02,
            "log_every": 1,
            "checkpoint_every": 1,
            "device": "cpu",
            "deterministic": True,
        },
        "eval": {"visuals": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_kaseg(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``python -m kaseg.cli ARGS`` and fails the test with its output on error."""
    result = subprocess.run(
        [sys.executable, "-m", "kaseg.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=REPO,
    )
    if result.returncode != 0:
        pytest.fail(f"kaseg {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
