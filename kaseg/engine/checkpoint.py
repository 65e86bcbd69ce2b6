"""Checkpoints: explicit dicts written atomically, read without running code.

A checkpoint is ``{"arch": ..., "model": state_dict, ...training state...}``; ``arch``
says what the state dict belongs to (a zoo model's build arguments, or an auto-encoder's
shape), so loading it into something else fails with a message naming both.

Reading a file never runs code. ``.pt`` files are read with ``torch.load(...,
weights_only=True)``, which only rebuilds tensors and plain data (dicts, lists, tuples,
strings, numbers); a file holding any other Python object (which unpickling would
construct by calling code named in the file) is refused with a :class:`CheckpointError`
naming the file. The training state kaseg writes (optimizer, scheduler, scaler, RNG
states, config) is kept in those types, so every kaseg checkpoint reads this way.
``.safetensors`` files hold the weights of one model, with its ``arch`` (and optionally
the run config) as JSON in the file's metadata: the format for sharing weights.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

SAFETENSORS_SUFFIX = ".safetensors"
# The keys under which common training scripts nest a model's weights in a checkpoint
# (timm, torchvision references, Lightning, kaseg); see :func:`load_state_dict_file`.
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------- writing


def _write_atomically(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Calls ``write(file)`` so that ``path`` is always either the old or the new complete file.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, and
    the file is renamed over ``path`` (atomic on POSIX); a crash at any point leaves the
    previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates the file private (0600); give it the permissions of an ordinary new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Writes ``state`` atomically (see :func:`_write_atomically`) with ``torch.save``.

    ``state`` must hold only tensors and plain data, so that :func:`load_checkpoint` can
    read it back with ``weights_only=True``.
    """
    _write_atomically(path, lambda file: torch.save(state, file))


def save_safetensors(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    arch: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> Path:
    """Writes a model's weights to a ``.safetensors`` file that :func:`load_checkpoint` reads.

    The file holds the plain state dict (the keys of ``model.state_dict()``, no kaseg
    prefixes, so it also loads into the model's own class without kaseg) and, as JSON in
    its metadata, ``arch`` (what the weights belong to, as stored in kaseg checkpoints) and
    ``config`` (the run config, which ``kaseg predict`` reads for normalisation and palette).

    Args:
        model_or_state: a module or its state dict.
        path: the file to write (replaced atomically); conventionally ``*.safetensors``.
        arch: the model's ``arch`` record; must be JSON-serialisable.
        config: optional run config (``kaseg.config.to_dict``), JSON-serialisable.

    Returns:
        ``path``.
    """
    from safetensors.torch import save

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"a safetensors file holds tensors only; these entries are not: {not_tensors}")
    metadata = {"format": "pt", "arch": _to_json(arch, "arch")}
    if config is not None:
        metadata["config"] = _to_json(config, "config")
    # Own contiguous CPU copies: safetensors refuses tensors that share memory (tied
    # weights), and each key must be loadable on its own.
    tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}
    payload = save(tensors, metadata=metadata)
    path = Path(path)
    _write_atomically(path, lambda file: file.write(payload))
    return path


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must hold plain data (JSON) to go into safetensors metadata: {error}") from None


def convert_to_safetensors(checkpoint: str | Path, out: str | Path, *, fp16: bool = False) -> Path:
    """The model weights, ``arch`` and run config of a kaseg checkpoint as a safetensors file.

    This is what ``kaseg convert`` runs; the training state (optimizer, RNG, ...) is left out.
    With ``fp16`` the floating-point tensors are stored in half precision (half the file;
    loading casts them back to the model's float32 parameters).
    """
    state = load_checkpoint(checkpoint)
    weights = state["model"]
    if fp16:
        weights = {key: value.half() if value.is_floating_point() else value for key, value in weights.items()}
    return save_safetensors(weights, out, state["arch"], state.get("config"))


# ---------------------------------------------------------------- reading


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A kaseg checkpoint (``.pt``) or safetensors weights file, read without running code.

    Returns:
        The checkpoint dict; it has at least ``arch`` and ``model``. A ``.safetensors``
        file gives ``{"arch", "model", "config"}`` (``config`` None when not stored).

    Raises:
        CheckpointError: the file is missing, unreadable, holds Python objects other than
            tensors and plain data, or is not a kaseg checkpoint; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path)
    state = _torch_load(path)
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise CheckpointError(f"{str(path)!r} is not a kaseg checkpoint (no 'model'/'arch' entries)")
    if not isinstance(state["arch"], dict) or not isinstance(state["model"], Mapping):
        raise CheckpointError(f"{str(path)!r} is not a kaseg checkpoint ('arch' and 'model' must be mappings)")
    return state


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain weights file (``.safetensors``, or a ``.pt``/``.pth``/``.bin`` read with
    ``weights_only=True``) as a state dict, for weights made outside kaseg.

    A torch file may nest the weights under one of :data:`STATE_DICT_KEYS` (the first
    present wins); a ``module.`` prefix left by DataParallel/DDP is removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)[0]
    state = _torch_load(path)
    if isinstance(state, dict):
        nested = next((key for key in STATE_DICT_KEYS if isinstance(state.get(key), Mapping)), None)
        state = state[nested] if nested is not None else state
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"weights file {str(path)!r} holds no state dict (a mapping of names to tensors, "
            f"at the top level or under one of {list(STATE_DICT_KEYS)})"
        )
    return {key.removeprefix("module."): value for key, value in state.items()}


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(_refusal(path, error)) from None


def _refusal(path: Path, error: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused or failed on ``path``."""
    text = str(error)
    objects = sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))
    if objects:
        return (
            f"refusing to load {str(path)!r}: it holds Python objects ({', '.join(objects)}) that would "
            "run code when loaded; kaseg only reads tensors and plain data (a kaseg checkpoint or a "
            ".safetensors file)"
        )
    if "Weights only load failed" in text:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        return (
            f"cannot read checkpoint {str(path)!r}: it is not a PyTorch checkpoint that can be read "
            f"without running code (a raw pickle, or a damaged file{': ' + detail.group(1).strip() if detail else ''})"
        )
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return f"cannot read checkpoint {str(path)!r}: {first_line}"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {first_line}") from None
    return tensors, metadata


def _load_safetensors(path: Path) -> dict[str, Any]:
    tensors, metadata = _read_safetensors(path)
    if "arch" not in metadata:
        raise CheckpointError(
            f"safetensors file {str(path)!r} has no 'arch' in its metadata, so kaseg cannot tell which "
            "model the weights belong to; write it with `kaseg convert` or kaseg.engine.checkpoint.save_safetensors"
        )
    state: dict[str, Any] = {"model": tensors}
    for key in ("arch", "config"):
        try:
            state[key] = json.loads(metadata[key]) if key in metadata else None
        except json.JSONDecodeError as error:
            raise CheckpointError(
                f"safetensors file {str(path)!r}: metadata {key!r} is not valid JSON ({error})"
            ) from None
    if not isinstance(state["arch"], dict):
        raise CheckpointError(f"safetensors file {str(path)!r}: metadata 'arch' must be a JSON object")
    return state


# ---------------------------------------------------------------- checking


def check_arch(found: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Raises if a checkpoint's ``arch`` differs from the model it is loaded into.

    Tuples and lists compare equal (a safetensors file stores ``arch`` as JSON).
    """
    differences = [
        f"{key}: checkpoint has {found.get(key)!r}, model has {expected.get(key)!r}"
        for key in sorted(set(found) | set(expected))
        if _plain(found.get(key)) != _plain(expected.get(key))
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved from {_describe(found)} and cannot be loaded "
            f"into {_describe(expected)} ({'; '.join(differences)})"
        )


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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
