"""Checkpoints: explicit dicts written atomically, read with clear mismatch errors.

A checkpoint is ``{"arch": ..., "model": state_dict, ...training state...}``; ``arch``
says what the state dict belongs to (a zoo model's build arguments, or an auto-encoder's
shape), so loading it into something else fails with a message naming both.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Writes ``state`` so that ``path`` is always either the old or the new complete file.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, and
    the file is renamed over ``path`` (atomic on POSIX); a crash at any point leaves the
    previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {error}") from error
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise CheckpointError(f"{str(path)!r} is not a kaseg checkpoint (no 'model'/'arch' entries)")
    return state


def check_arch(found: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Raises if a checkpoint's ``arch`` differs from the model it is loaded into."""
    differences = [
        f"{key}: checkpoint has {found.get(key)!r}, model has {expected.get(key)!r}"
        for key in sorted(set(found) | set(expected))
        if found.get(key) != expected.get(key)
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved from {_describe(found)} and cannot be loaded "
            f"into {_describe(expected)} ({'; '.join(differences)})"
        )


def _describe(arch: dict[str, Any]) -> str:
    name = arch.get("name", arch.get("type", "?"))
    details = ", ".join(f"{k}={v}" for k, v in arch.items() if k not in ("name", "type"))
    return f"{name}({details})"


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint's model weights into ``model`` (which has an ``arch``); returns it."""
    state = load_checkpoint(path)
    check_arch(state["arch"], model.arch, path)
    model.load_state_dict(state["model"])
    return state
