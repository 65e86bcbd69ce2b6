"""Run configuration: frozen dataclasses filled from YAML and ``key.sub=value`` overrides.

A YAML file may name a ``base:`` file (relative to itself) whose values it overrides, so
the configs of one experiment share their data and schedule. Unknown keys are errors
that list the valid ones; values are checked against the field types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """A zoo model (``kaseg.list_models()``) and its build arguments."""

    name: str = "deeplabv3_mobilenetv2"
    output_stride: int = 16
    width: float = 1.0
    aspp: bool = True
    aspp_rates: tuple[int, ...] | None = None
    head_channels: int = 256
    dropout: float = 0.1
    decoder_stride: int = 4  # deeplabv3plus only: 4 (DeepLabV3+) or 8 (the paper's teacher)
    # False, True (timm's weights from the hub or its cache) or a local checkpoint path.
    pretrained: bool | str = False


@dataclass(frozen=True)
class DataConfig:
    name: str = "shapes"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    # Keyword arguments of the data set class (for example the shapes generator's size).
    options: dict[str, Any] = field(default_factory=dict)
    crop_size: tuple[int, int] = (513, 513)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    color_jitter: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = 8  # per process
    val_batch_size: int = 1
    workers: int = 2
    skip_bad: bool = False
    max_bad_fraction: float = 0.01


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 30000
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_iterations: int = 0
    warmup_factor: float = 0.1
    grad_clip: float | None = None
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    device: str = "auto"
    deterministic: bool = False
    log_every: int = 20
    eval_every: int = 0  # 0: evaluate once, at the end
    checkpoint_every: int = 1000
    # None: start fresh (refuses a run folder that already holds checkpoints);
    # "auto": continue from the run folder's last.pt when there is one; or a path.
    resume: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    mode: Literal["whole", "sliding"] = "whole"
    crop_size: tuple[int, int] | None = None  # sliding window size; data.crop_size if None
    stride: tuple[int, int] | None = None  # sliding window step; 2/3 of the window if None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    visuals: int = 4  # validation images drawn into TensorBoard per evaluation


@dataclass(frozen=True)
class TeacherConfig:
    # best.pt or last.pt of the teacher's `kaseg train` run; the architecture is read
    # from the checkpoint.
    checkpoint: str | None = None


@dataclass(frozen=True)
class AutoEncoderConfig:
    code_channels: int = 128
    alpha: float = 1e-7  # weight of the L1 sparsity term on the code
    checkpoint: str | None = None  # the `kaseg train-ae` run's checkpoint, read by distill


@dataclass(frozen=True)
class DistillConfig:
    # Each entry: {name: <kaseg.distill.LOSSES name>, weight: float, <loss parameters>}.
    losses: tuple[dict[str, Any], ...] = (
        {"name": "adapt", "weight": 50.0},
        {"name": "affinity", "weight": 1.0},
    )
    ce_weight: float = 1.0
    # False: no auto-encoder; the adapter maps straight to the teacher's feature map
    # resized to the student's grid (the paper's "w/o auto-encoder" ablation).
    autoencoder: bool = True


@dataclass(frozen=True)
class Config:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    teacher: TeacherConfig = TeacherConfig()
    autoencoder: AutoEncoderConfig = AutoEncoderConfig()
    distill: DistillConfig = DistillConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a YAML config (following ``base:`` links) and applies ``key.sub=value`` overrides."""
    values = _read_yaml_with_bases(Path(path)) if path is not None else {}
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(values, key, value)
    return from_dict(Config, values)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r}: {error}") from error
    return key.strip(), value


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {str(path)!r} includes itself through `base:`")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    base = values.pop("base", None)
    if base is None:
        return values
    merged = _read_yaml_with_bases(path.parent / base, seen + (path,))
    _deep_merge(merged, values)
    return merged


def _deep_merge(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict) and key != "options":
            _deep_merge(target[key], value)
        else:
            target[key] = value


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, values: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Builds dataclass ``cls`` from a mapping, checking keys and value types.

    Keys absent from ``values`` keep their value in ``base`` (a ``cls`` instance), or the
    field default; nested sections merge the same way.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"in section {prefix.rstrip('.')!r}" if prefix else "at the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} {where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    base = base if base is not None else cls()
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], value, prefix + name + ".", getattr(base, name))
        else:
            kwargs[name] = _convert(hints[name], value, prefix + name)
    return dataclasses.replace(base, **kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {_describe(hint)}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
