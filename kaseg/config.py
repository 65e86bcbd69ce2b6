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
    """The model: a zoo model (``kaseg.list_models()``) and its build arguments, or one from
    torchvision, segmentation_models_pytorch or a factory of yours (``source``)."""

    # kaseg (the zoo), torchvision (a torchvision.models.segmentation builder), smp
    # (segmentation_models_pytorch.create_model) or python (`factory`).
    source: Literal["kaseg", "torchvision", "smp", "python"] = "kaseg"
    # The zoo name, the torchvision builder (deeplabv3_resnet50) or the smp architecture (Unet).
    name: str = "deeplabv3_mobilenetv2"
    factory: str | None = None  # source python: "package.module:function" returning an nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)  # the builder's or factory's keyword arguments
    # Sources other than kaseg: the module whose output the distillation losses read
    # (suffix ":input" for its input); None: the architecture's default.
    features: str | None = None
    weights: str | None = None  # the whole model's weights: a .safetensors or .pt state dict file
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
    amp: Literal["off", "bf16", "fp16"] = "off"  # bf16: CPUs and GPUs; fp16: GPUs (with a grad scaler)
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
    # MiB for reusing the frozen teacher's features of inputs seen before (0: off). Pays
    # when the augmentation is deterministic (flips at most): each distinct input then
    # costs one teacher forward per run instead of one per visit.
    cache_mb: float = 0.0


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
    # The distillation weights grow linearly from 0 to their value over the first
    # warmup_iterations steps (the cross-entropy keeps its weight): against the slow start of
    # feature losses on short schedules. 0: full weights from the first step.
    warmup_iterations: int = 0
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
    """Reads a YAML config (following ``base:`` links), applies ``key.sub=value`` overrides
    and checks the result (:func:`validate_config`) before anything else is read."""
    values = _read_yaml_with_bases(Path(path)) if path is not None else {}
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(values, key, value)
    config = from_dict(Config, values)
    validate_config(config)
    return config


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


def check_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked against the type ``hint`` as config fields are (and converted the
    same way); a ConfigError names ``key``. Raises TypeError for a hint of another kind."""
    return _convert(hint, value, key)


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


# ---------------------------------------------------------------- validation


def validate_config(config: Config) -> None:
    """Every check a config allows without reading a file or building a data set.

    The types were checked while loading; this checks the values: numbers in range, the
    model (``kaseg.models.validate_model_config``: name, source and build arguments), the
    data set name and options, the evaluation windows and each ``distill.losses`` entry
    (``kaseg.distill.losses.check_loss_specs``). Paths (data.root, checkpoints, weights)
    are not opened: that happens where they are used.

    Raises:
        ConfigError: one line naming the key and what is valid.
    """
    for key, check, expected in _RANGE_RULES:
        value = _get_dotted(config, key)
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(check(v) for v in values):
            raise ConfigError(f"{key}: expected {expected}, got {_plain_value(value)!r}")
    _check_device(config.train.device)
    _check_data(config.data)
    _check_eval(config.eval, config.data)
    from kaseg.distill.losses import check_loss_specs
    from kaseg.models import validate_model_config

    check_loss_specs(config.distill.losses)
    validate_model_config(config.model)


def _finite(low: float, high: float = float("inf"), *, low_open: bool = False, high_open: bool = True):
    def check(value: Any) -> bool:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            and abs(value) != float("inf")
            and (low < value if low_open else low <= value)
            and (value < high if high_open else value <= high)
        )

    return check


_AT_LEAST_1 = _finite(1)
_AT_LEAST_0 = _finite(0)
_POSITIVE = _finite(0, low_open=True)

# (key, check of the value or of each element of a tuple, what is expected).
_RANGE_RULES = (
    ("seed", _finite(0, 2**32), "an integer in [0, 2^32)"),
    ("model.head_channels", _AT_LEAST_1, "an integer >= 1"),
    ("model.dropout", _finite(0, 1), "a number in [0, 1)"),
    ("model.width", _POSITIVE, "a number > 0"),
    ("model.aspp_rates", _AT_LEAST_1, "a list of integers >= 1 (atrous rates) or null"),
    ("data.crop_size", _AT_LEAST_1, "two integers >= 1 (height, width)"),
    ("data.scale_range", _POSITIVE, "two numbers > 0 (low <= high)"),
    ("data.color_jitter", _AT_LEAST_0, "a number >= 0"),
    ("data.mean", _finite(-float("inf")), "three finite numbers"),
    ("data.std", _POSITIVE, "three numbers > 0"),
    ("data.batch_size", _AT_LEAST_1, "an integer >= 1 (per process)"),
    ("data.val_batch_size", _AT_LEAST_1, "an integer >= 1"),
    ("data.workers", _AT_LEAST_0, "an integer >= 0"),
    ("data.max_bad_fraction", _finite(0, 1, high_open=False), "a number in [0, 1]"),
    ("train.iterations", _AT_LEAST_1, "an integer >= 1"),
    ("train.lr", _POSITIVE, "a number > 0"),
    ("train.momentum", _finite(0, 1), "a number in [0, 1)"),
    ("train.weight_decay", _AT_LEAST_0, "a number >= 0"),
    ("train.poly_power", _AT_LEAST_0, "a number >= 0"),
    ("train.warmup_iterations", _AT_LEAST_0, "an integer >= 0"),
    ("train.warmup_factor", _finite(0, 1, high_open=False), "a number in [0, 1]"),
    ("train.grad_clip", _POSITIVE, "a number > 0 or null"),
    ("train.log_every", _AT_LEAST_1, "an integer >= 1"),
    ("train.eval_every", _AT_LEAST_0, "an integer >= 0 (0: at the end only)"),
    ("train.checkpoint_every", _AT_LEAST_1, "an integer >= 1"),
    ("eval.crop_size", _AT_LEAST_1, "two integers >= 1 or null"),
    ("eval.stride", _AT_LEAST_1, "two integers >= 1 or null"),
    ("eval.scales", _POSITIVE, "a non-empty list of numbers > 0"),
    ("eval.visuals", _AT_LEAST_0, "an integer >= 0"),
    ("teacher.cache_mb", _AT_LEAST_0, "a number >= 0 (MiB; 0: off)"),
    ("autoencoder.code_channels", _AT_LEAST_1, "an integer >= 1"),
    ("autoencoder.alpha", _AT_LEAST_0, "a number >= 0"),
    ("distill.ce_weight", _AT_LEAST_0, "a number >= 0"),
    ("distill.warmup_iterations", _AT_LEAST_0, "an integer >= 0"),
)


def _get_dotted(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"train.device: {device!r} is not a device; use auto, cpu, cuda, cuda:<index> or another "
            "torch device type (mps, xpu, ...)"
        ) from None


def _check_data(data: DataConfig) -> None:
    import inspect

    from kaseg.data import DATASETS, ProceduralDataset

    low, high = data.scale_range
    if low > high:
        raise ConfigError(f"data.scale_range: expected low <= high, got {[low, high]}")
    if data.name not in DATASETS:
        raise ConfigError(f"data.name: unknown data set {data.name!r}; valid: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[data.name]
    parameters = inspect.signature(cls.__init__).parameters
    valid = [p.name for p in parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(data.options) - set(valid))
    if unknown:
        raise ConfigError(
            f"data.options: {', '.join(unknown)} {'is not an option' if len(unknown) == 1 else 'are not options'} "
            f"of data set {data.name!r}; valid: {', '.join(valid) or 'none'}"
        )
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: the data set checks its options
        hints = {}
    for option, value in data.options.items():
        if option in hints:
            try:
                check_value(hints[option], value, f"data.options.{option}")
            except TypeError:  # a type the config types do not cover
                pass
    # Data sets with a fixed set of splits name them (the others read split lists from disk).
    splits = cls.split_salts if issubclass(cls, ProceduralDataset) else getattr(cls, "known_splits", None)
    for key in ("train_split", "val_split"):
        if splits is not None and getattr(data, key) not in splits:
            raise ConfigError(
                f"data.{key}: data set {data.name!r} has no split {getattr(data, key)!r}; valid: {', '.join(splits)}"
            )
    if data.root is None and not issubclass(cls, ProceduralDataset):
        raise ConfigError(f"data.root: data set {data.name!r} needs data.root, the folder it is stored in")
    if data.hflip and not getattr(cls, "mirror_symmetric", True):
        raise ConfigError(
            f"data.hflip: the classes of data set {data.name!r} are not mirror-symmetric "
            f"({getattr(cls, 'mirror_note', 'a flip changes the labels')}); set data.hflip=false"
        )


def _check_eval(evaluation: EvalConfig, data: DataConfig) -> None:
    if not evaluation.scales:
        raise ConfigError("eval.scales: expected a non-empty list of numbers > 0, got []")
    crop = evaluation.crop_size or data.crop_size
    if evaluation.stride is not None and any(s > c for s, c in zip(evaluation.stride, crop)):
        source = "eval.crop_size" if evaluation.crop_size else "data.crop_size"
        raise ConfigError(
            f"eval.stride: {list(evaluation.stride)} must not exceed the sliding window {list(crop)} ({source}), "
            "or the windows would leave gaps"
        )
