"""Models from elsewhere with kaseg's contract: torchvision, segmentation_models_pytorch, your code.

Every source gives an ``nn.Module`` that returns logits in its own way (torchvision: a
dict with ``"out"``; segmentation_models_pytorch: a tensor; a user's factory: either, or a
dict with ``"logits"``). :class:`ExternalSegmenter` wraps one and reads the distillation
tap by module name with a forward hook (torchdistill and mmrazor do the same), so that
``forward`` returns kaseg's ``{"logits": B x K x H x W at the input size, "features":
the tapped map B x C x h x w}`` and the Distiller, evaluation, bench, export and predict
work unchanged.

A tap name is a module name from ``model.named_modules()``: its output is tapped, or,
with the suffix ``:input``, its (first) input (``classifier.high_classifier:input`` is
the map LR-ASPP's last classifier reads). The wrapper's state dict is the wrapped
model's own (no prefix), so weights trained in kaseg load into the user's class without
kaseg, and weights from elsewhere load into the wrapper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib
import inspect
import os
import re
import socket
import typing
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from kaseg.models.backbones import PretrainedWeightsError

SOURCES = ("kaseg", "torchvision", "smp", "python")
INPUT_SUFFIX = ":input"

# The dummy input of the one forward pass that measures an external model: channels,
# strides and number of classes (torchvision, smp and users' models publish no feature
# metadata as timm's do). Non-square, so that the maps of fixed-size pooling (1 x 1
# image pooling, PSP bins) never pass for strided maps: a map on a stride-s grid is
# exactly (64 / s) x (96 / s) for s up to 32.
PROBE_SIZE = (64, 96)

# Builder keyword arguments that only choose initial weights (hub downloads): left out of
# ``arch``, so rebuilding a model from a checkpoint never downloads anything.
HUB_WEIGHT_ARGUMENTS = {
    "torchvision": ("weights", "weights_backbone", "progress"),
    "smp": ("encoder_weights",),
    "python": (),
}

# ModelConfig fields that only the kaseg zoo reads, and their defaults.
_ZOO_ONLY = ("output_stride", "width", "aspp", "aspp_rates", "head_channels", "dropout", "decoder_stride", "pretrained")
_FACTORY_FORMAT = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_HUB_TIMEOUT_S = 3.0


class FeatureTapError(ValueError):
    """A feature tap name names no module of the model; the message lists the closest names."""


# ---------------------------------------------------------------- the wrapper


class ExternalSegmenter(nn.Module):
    """Any segmentation ``nn.Module`` with kaseg's contract.

    ``forward(images)`` returns ``{"logits": B x K x H x W at the input size (resized
    bilinearly when the model predicts a smaller map), "features": the tapped map
    B x C x h x w}``. Models that need input sides divisible by some number
    (segmentation_models_pytorch) get their input zero-padded at the bottom and right
    (zero is the mean colour after normalisation), and the outputs cropped back; not in
    an exported (traced) graph, which takes such sides only.

    Args:
        model: the network; ``model(images)`` returns a tensor of logits, a dict with
            ``"out"`` (torchvision) or ``"logits"``, or a tuple whose first element is the
            logits (segmentation_models_pytorch with a classification head).
        features: the tap: a module name from ``model.named_modules()``, optionally with
            the suffix ``:input``. A module whose output a later in-place operation
            overwrites (a conv followed by ``ReLU(inplace=True)``) gives the overwritten
            map: tap the in-place module instead.
        arch: the plain-data record that rebuilds the model (``source``, ``name``,
            ``kwargs``; see :func:`build_from_arch`); ``features`` and ``num_classes`` are
            added here.

    Attributes:
        arch: as stored in checkpoints.
        num_classes: K, the channels of the logits.
        feature_channels: C of ``features``.
        feature_stride: input size / ``features`` size.
        output_stride: the stride of the coarsest map the model computes (the backbone's
            output stride).
        input_multiple: the number the model needs its input sides divisible by (1: any).
    """

    def __init__(self, model: nn.Module, *, features: str, arch: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.features = features
        self._tap_module_name, self._tap_input = parse_tap(features)
        find_module(model, self._tap_module_name)  # fails early, listing close names
        self._tapped: torch.Tensor | None = None
        self.input_multiple = _input_multiple(model)
        measured = self._measure()
        self.num_classes = measured["num_classes"]
        self.feature_channels = measured["feature_channels"]
        self.feature_stride = measured["feature_stride"]
        self.output_stride = measured["output_stride"]
        self.arch = {**arch, "features": features, "num_classes": self.num_classes}
        # The state dict is the wrapped model's own: "backbone.conv1.weight", never
        # "model.backbone.conv1.weight" (also inside a larger module's state dict).
        self.register_state_dict_post_hook(_drop_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = images.shape[-2:]
        padded = _pad_to_multiple(images, self.input_multiple)
        # The hook lives for this call only: it always finds the module now at that name
        # (after SyncBatchNorm conversion or module fusion), and copies of the wrapper
        # (deepcopy, pickling) share no hook with it.
        module = self.model.get_submodule(self._tap_module_name)
        if self._tap_input:
            handle = module.register_forward_pre_hook(self._remember_input)
        else:
            handle = module.register_forward_hook(self._remember_output)
        self._tapped = None
        try:
            logits = _logits_of(self.model(padded), type(self.model).__name__)
            features = self._tapped
        finally:
            handle.remove()
            self._tapped = None
        if features is None:
            raise RuntimeError(
                f"the feature tap {self.features!r} did not run in the forward pass of "
                f"{type(self.model).__name__}; choose a module that the forward pass calls"
            )
        if torch.jit.is_tracing() or logits.shape[-2:] != padded.shape[-2:]:
            # Traced (ONNX export): always, so that the graph holds for every input size
            # (at equal sizes a bilinear resize returns its input exactly).
            logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        if padded is not images:
            logits = logits[..., :height, :width]
            stride = self.feature_stride
            features = features[..., : -(-height // stride), : -(-width // stride)]
        return {"logits": logits, "features": features}

    def _remember_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._tapped = _first_tensor(args)

    def _remember_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._tapped = _first_tensor(output)

    @torch.no_grad()
    def _measure(self) -> dict[str, int]:
        """Channels, strides and classes from one forward pass of a PROBE_SIZE input.

        torchvision, smp and users' models carry no feature metadata (unlike timm's
        ``feature_info``), so this is the one place kaseg sizes anything from a dummy
        forward. Eval mode, no gradients: no statistics or weights change.
        """
        height, width = PROBE_SIZE
        if height % self.input_multiple or width % self.input_multiple:
            raise ValueError(
                f"{type(self.model).__name__} needs input sides divisible by {self.input_multiple}; kaseg measures "
                f"models on a {height} x {width} input, so it supports multiples up to 32"
            )
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        grids: list[tuple[int, int]] = []

        def record(module: nn.Module, args: Any, output: Any) -> None:
            grids.extend(tuple(t.shape[-2:]) for t in _tensors(output) if t.dim() == 4)

        handles = [module.register_forward_hook(record) for module in self.model.modules()]
        was_training = self.training
        self.eval()
        try:
            output = self(torch.zeros(1, 3, height, width, device=device, dtype=dtype))
        finally:
            for handle in handles:
                handle.remove()
            self.train(was_training)
        features = output["features"]
        if features.dim() != 4:
            raise FeatureTapError(
                f"the feature tap {self.features!r} gives a tensor of shape {tuple(features.shape)}; "
                "the distillation losses need a map B x C x h x w"
            )
        feature_stride = _grid_stride(tuple(features.shape[-2:]))
        if feature_stride is None:
            raise FeatureTapError(
                f"the feature tap {self.features!r} gives a {features.shape[-2]} x {features.shape[-1]} map for a "
                f"{height} x {width} input, not a map on a regular grid of the input (pooled?); tap a "
                "convolutional feature map, such as the input of the final classifier"
            )
        strides = [s for s in map(_grid_stride, grids) if s is not None]
        return {
            "num_classes": int(output["logits"].shape[1]),
            "feature_channels": int(features.shape[1]),
            "feature_stride": feature_stride,
            "output_stride": max(strides + [feature_stride]),
        }


class ExternalSegmenterWithHead(ExternalSegmenter):
    """An :class:`ExternalSegmenter` whose tap feeds a known final classifier.

    Then the logits can be computed from any feature map (the teacher's reconstruction
    in the auto-encoder stage, cached teacher features, native-resolution logit losses).

    Args:
        head: the names of the modules that turn the tapped map into logits, in order
            (for torchvision's DeepLabV3 tapped at ``classifier.3``: ``("classifier.4",)``).
    """

    def __init__(self, model: nn.Module, *, features: str, arch: dict[str, Any], head: tuple[str, ...]) -> None:
        super().__init__(model, features=features, arch=arch)
        self.head = head

    def native_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's logits B x K x h x w on the feature grid, before any upsampling
        (the head's ``nn.Upsample`` modules, such as smp's, are skipped)."""
        return self._run_head(features, upsample=False)

    def classify(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits B x K x H x W at ``size`` from a tapped map (the original or a reconstruction).

        Equal to ``forward``'s logits when the input needed no padding. For a padded input
        the map ``forward`` returns was cropped to ceil(H / stride) x ceil(W / stride), and
        its logits are cropped to ``size`` in turn (the same pixels, up to the border).
        """
        logits = self._run_head(features, upsample=True)
        height, width = size
        if self.input_multiple > 1 and logits.shape[-2] >= height and logits.shape[-1] >= width:
            return logits[..., :height, :width]
        if tuple(logits.shape[-2:]) == (height, width):
            return logits
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)

    def _run_head(self, features: torch.Tensor, *, upsample: bool) -> torch.Tensor:
        for name in self.head:
            module = self.model.get_submodule(name)
            if upsample or not isinstance(module, nn.Upsample):
                features = module(features)
        return features


def wrap(model: nn.Module, *, features: str | None, arch: dict[str, Any]) -> ExternalSegmenter:
    """Wraps ``model`` with ``features`` (None: the architecture's default tap)."""
    features = features if features is not None else default_features(model)
    head = head_after_tap(model, features)
    if head is None:
        return ExternalSegmenter(model, features=features, arch=arch)
    return ExternalSegmenterWithHead(model, features=features, arch=arch, head=head)


def wrap_model(model: nn.Module, features: str | None = None) -> nn.Module:
    """Gives a network you built kaseg's contract, for your own training loop.

    ``features`` names the map the distillation losses read (see :func:`parse_tap`); None
    takes the default of a known architecture (torchvision's DeepLabV3, FCN and LR-ASPP,
    segmentation_models_pytorch models; see :func:`default_features`). The wrapper shares
    the network's parameters, and its state dict is the network's own. A kaseg model
    (already with the contract) is returned as it is.

    Example:
        >>> net = torchvision.models.segmentation.deeplabv3_resnet50(num_classes=21, weights_backbone=None)
        >>> teacher = kaseg.wrap_model(net)  # taps "classifier.3"
    """
    from kaseg.models.segmenter import Segmenter

    if isinstance(model, (Segmenter, ExternalSegmenter)):
        if features is not None:
            raise ValueError(f"{type(model).__name__} already has its feature tap; wrap the network inside it")
        return model
    cls = type(model)
    arch = {"source": "python", "name": None, "class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": {}}
    return wrap(model, features=features, arch=arch)


# ---------------------------------------------------------------- taps


def parse_tap(features: str) -> tuple[str, bool]:
    """``"a.b"`` -> ``("a.b", False)`` (the module's output); ``"a.b:input"`` -> ``("a.b", True)``."""
    if not isinstance(features, str) or not features.strip():
        raise FeatureTapError(f"a feature tap is a module name (optionally with {INPUT_SUFFIX!r}), got {features!r}")
    if features.endswith(INPUT_SUFFIX):
        return features[: -len(INPUT_SUFFIX)], True
    return features, False


def find_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, or a :class:`FeatureTapError` listing the closest names."""
    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return model.get_submodule(name)
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"the last modules are: {', '.join(names[-6:])}"
    raise FeatureTapError(
        f"{type(model).__name__} has no module {name!r} to tap; {hint} "
        f"(any name of model.named_modules(), with {INPUT_SUFFIX!r} to tap its input)"
    )


def default_features(model: nn.Module) -> str:
    """The default tap of a known architecture: the map its final classifier reads.

    * torchvision DeepLabV3: ``classifier.3`` (the head's last ReLU, input of the 1x1
      classifier ``classifier.4``), at the output stride (8 for ResNets, 16 for
      MobileNetV3).
    * torchvision FCN: ``classifier.2`` (the ReLU before the dropout and the 1x1
      classifier), stride 8.
    * torchvision LR-ASPP: ``classifier.high_classifier:input``: the high branch after
      its attention multiply, upsampled to the low branch's stride 8 (its information
      is at stride 16). The logits add a second 1x1 classifier of the stride-8 backbone
      features, so no single classifier reads this map. ``classifier.cbr`` taps the
      stride-16 map before the attention.
    * segmentation_models_pytorch: ``decoder`` (the decoder's output, the input of
      ``segmentation_head``), at the decoder's stride (Unet: 1, FPN and DeepLabV3+: 4,
      DeepLabV3: the encoder's output stride).

    Raises:
        FeatureTapError: the architecture is not known; name the tap.
    """
    known = _known_architecture(model)
    if known is not None:
        return known[0]
    names = [n for n, _ in model.named_modules() if n]
    raise FeatureTapError(
        f"kaseg has no default feature tap for {type(model).__name__}; name the map the distillation losses "
        f"read (model.features, or wrap_model(model, features=...)), for example the input of the final "
        f"classifier as '<name>{INPUT_SUFFIX}'; its last modules are: {', '.join(names[-6:])}"
    )


def head_after_tap(model: nn.Module, features: str) -> tuple[str, ...] | None:
    """The modules that turn the tapped map into the logits, when known; else None.

    Known for torchvision's DeepLabV3 and FCN (the ``classifier`` Sequential) and for
    segmentation_models_pytorch (``segmentation_head``, whose input is the ``decoder``
    output), when the tap is one of the head's maps.
    """
    known = _known_architecture(model)
    if known is None or known[1] is None:
        return None
    _, head, before_head = known
    name, tapped_input = parse_tap(features)
    children = tuple(f"{head}.{child}" for child, _ in model.get_submodule(head).named_children())
    if (name == before_head and not tapped_input) or (name == head and tapped_input):
        return children
    if name in children:
        index = children.index(name)
        return children[index if tapped_input else index + 1 :]
    return None


def _known_architecture(model: nn.Module) -> tuple[str, str | None, str | None] | None:
    """(default tap, head Sequential, module whose output is the head's input) by class."""
    from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3

    if isinstance(model, DeepLabV3):
        return "classifier.3", "classifier", None
    if isinstance(model, FCN):
        return "classifier.2", "classifier", None
    if isinstance(model, LRASPP):
        return "classifier.high_classifier" + INPUT_SUFFIX, None, None
    if _is_smp_model(model):
        return "decoder", "segmentation_head", "decoder"
    return None


def _is_smp_model(model: nn.Module) -> bool:
    # By class name along the MRO: importing smp just to ask would make it a dependency.
    return any(
        cls.__name__ == "SegmentationModel" and cls.__module__.startswith("segmentation_models_pytorch")
        for cls in type(model).__mro__
    )


def _input_multiple(model: nn.Module) -> int:
    if _is_smp_model(model) and getattr(model, "requires_divisible_input_shape", True):
        return int(model.encoder.output_stride)
    return 1


# ---------------------------------------------------------------- building


def build_external(
    source: str,
    *,
    name: str | None,
    num_classes: int | None,
    kwargs: Mapping[str, Any] | None = None,
    features: str | None = None,
) -> ExternalSegmenter:
    """A torchvision, segmentation_models_pytorch or factory-built model, wrapped.

    Args:
        source: ``torchvision``, ``smp`` or ``python``.
        name: the torchvision builder (``deeplabv3_resnet50``), the smp architecture
            (``DeepLabV3Plus``, as ``smp.create_model`` takes it) or the factory
            (``package.module:function``).
        num_classes: K. torchvision builders get it as ``num_classes``, smp as
            ``classes``, a factory as ``num_classes`` when it has that parameter; the
            built model must predict K classes. None (checking a config, before the data
            set is known): ``kwargs``' own number, or any.
        kwargs: the builder's keyword arguments. Hub weights are asked for by the
            builder's own arguments (torchvision ``weights``/``weights_backbone``, smp
            ``encoder_weights``); kaseg makes them None unless given, so nothing is
            downloaded by default (torchvision and smp download ImageNet weights by
            default).
        features: the tap (None: :func:`default_features`).

    Raises:
        PretrainedWeightsError: hub weights were asked for and are neither cached nor
            reachable (checked first: never hangs offline).
    """
    kwargs = dict(kwargs or {})
    requested = num_classes if num_classes is not None else kwargs.get("num_classes", kwargs.get("classes", 2))
    if source == "torchvision":
        model = _build_torchvision(name, requested, kwargs)
    elif source == "smp":
        model = _build_smp(name, requested, kwargs)
    elif source == "python":
        model = _build_python(name, requested, kwargs)
    else:
        raise ValueError(f"unknown model source {source!r}; valid: {', '.join(SOURCES)}")
    hub = HUB_WEIGHT_ARGUMENTS[source]
    arch = {"source": source, "name": name, "kwargs": {k: v for k, v in kwargs.items() if k not in hub}}
    model = wrap(model, features=features, arch=arch)
    if num_classes is not None and model.num_classes != num_classes:
        raise ValueError(
            f"{source} model {name!r} predicts {model.num_classes} classes but {num_classes} are needed; "
            "pass the number of classes to it through model.kwargs"
        )
    return model


def build_from_arch(arch: Mapping[str, Any]) -> ExternalSegmenter:
    """Rebuilds an external model from its ``arch`` record (as stored in checkpoints), untrained."""
    if arch.get("name") is None:
        raise ValueError(
            f"this model was wrapped from an instance of {arch.get('class', 'a user class')} (kaseg.wrap_model), "
            "which kaseg cannot rebuild; build it with your own code and load the checkpoint's 'model' "
            "state dict into it, or configure model.source=python with a factory"
        )
    return build_external(
        arch["source"],
        name=arch["name"],
        num_classes=arch["num_classes"],
        kwargs=arch.get("kwargs") or {},
        features=arch["features"],
    )


def torchvision_builders() -> list[str]:
    """Names of every builder in ``torchvision.models.segmentation``."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.segmentation)


def _build_torchvision(name: str | None, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    builders = torchvision_builders()
    if name not in builders:
        close = difflib.get_close_matches(str(name), builders, n=3)
        raise ValueError(
            f"unknown torchvision segmentation builder {name!r}"
            f"{f' (did you mean {close[0]!r}?)' if close else ''}; valid: {', '.join(builders)}"
        )
    _check_given_classes(kwargs, "num_classes", num_classes, f"torchvision {name}")
    builder = torchvision.models.get_model_builder(name)
    arguments = {"weights": None, "weights_backbone": None, **kwargs, "num_classes": num_classes}
    weights = torchvision_weights(name, arguments)
    for weight in weights:
        _require_torch_hub_file(weight.url, f"torchvision weights {weight}")
    try:
        with _tensor_only_hub_loading():
            model = builder(**arguments)
    except (TypeError, ValueError) as error:
        raise type(error)(f"torchvision {name}: {error} (model.kwargs: {sorted(kwargs)})") from None
    except Exception as error:
        if weights:
            raise PretrainedWeightsError(f"could not load torchvision weights for {name}: {error}") from error
        raise
    if "aux_loss" not in kwargs and getattr(model, "aux_classifier", None) is not None:
        # torchvision adds the auxiliary head when it loads published weights; kaseg never
        # trains it, and without it the state dict is that of `builder(num_classes=K)`.
        model.aux_classifier = None
    return model


@contextlib.contextmanager
def _tensor_only_hub_loading() -> Iterator[None]:
    """Published torchvision weights read with ``weights_only=True``, like every other file.

    torchvision's ``Weights.get_state_dict`` calls ``torch.hub.load_state_dict_from_url``,
    whose ``weights_only`` defaults to False (a full unpickle); the published files are
    plain state dicts, so they load the same way with the safe reader.
    """
    import torchvision.models._api as api

    original = getattr(api, "load_state_dict_from_url", None)
    if original is None:  # another torchvision layout: its own (hash-checked) loader
        yield
        return
    api.load_state_dict_from_url = functools.partial(torch.hub.load_state_dict_from_url, weights_only=True)
    try:
        yield
    finally:
        api.load_state_dict_from_url = original


def torchvision_weights(name: str, arguments: Mapping[str, Any]) -> list[Any]:
    """The torchvision ``Weights`` members that ``weights``/``weights_backbone`` ask for.

    Raises:
        ValueError: a value is not a weights name of the builder (the message lists them).
    """
    import torchvision

    parameters = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    found = []
    for key in ("weights", "weights_backbone"):
        value = arguments.get(key)
        if value is None or key not in parameters:
            continue
        enum = next(a for a in typing.get_args(parameters[key].annotation) if a is not type(None))
        try:
            found.append(enum.verify(value))
        except (KeyError, TypeError, ValueError):
            valid = ["DEFAULT"] + [member.name for member in enum]
            raise ValueError(
                f"model.kwargs.{key}: {value!r} is not a weights name of torchvision {name} "
                f"({enum.__name__}); valid: {', '.join(valid)}"
            ) from None
    return found


def _require_torch_hub_file(url: str, what: str) -> None:
    """Raises unless the file of ``url`` is in torch's hub cache or its host is reachable."""
    parsed = urllib.parse.urlparse(url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(parsed.path)
    if cached.is_file() or _host_reachable(parsed.hostname or ""):
        return
    raise PretrainedWeightsError(
        f"{what} are not in the local cache ({cached}) and {parsed.hostname} cannot be reached. Download them "
        "where the network is available, or give a local weights file as model.weights, or set the "
        "weights arguments in model.kwargs to null"
    )


def _host_reachable(host: str, timeout_s: float = _HUB_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def import_smp() -> Any:
    """The ``segmentation_models_pytorch`` module, or an ImportError saying how to install it."""
    try:
        import segmentation_models_pytorch
    except ImportError as error:
        raise ImportError(
            f"model.source=smp needs segmentation_models_pytorch ({error}); install it with "
            "`pip install 'kaseg[smp]'`"
        ) from None
    return segmentation_models_pytorch


def _build_smp(name: str | None, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    smp = import_smp()
    architectures = sorted(smp.MODEL_ARCHITECTURES_MAPPING)
    if str(name).lower() not in architectures:
        raise ValueError(
            f"unknown segmentation_models_pytorch architecture {name!r}; valid: {', '.join(architectures)}"
        )
    _check_given_classes(kwargs, "classes", num_classes, f"smp {name}")
    arguments = {"encoder_weights": None, **kwargs, "classes": num_classes}
    wants_weights = bool(arguments["encoder_weights"])
    if wants_weights and not os.environ.get("HF_HUB_OFFLINE") and not _host_reachable("huggingface.co"):
        raise PretrainedWeightsError(
            f"encoder_weights={arguments['encoder_weights']!r} of smp {name} come from huggingface.co, which "
            "cannot be reached. Download them where the network is available (with HF_HUB_OFFLINE=1 the "
            "Hugging Face cache is used), or give a local weights file as model.weights, or set "
            "model.kwargs.encoder_weights to null"
        )
    try:
        return smp.create_model(name, **arguments)
    except (KeyError, TypeError) as error:
        if wants_weights and "weights" in str(error):
            raise PretrainedWeightsError(f"smp {name}: {error}") from None
        raise ValueError(f"smp {name}: {error} (model.kwargs: {sorted(kwargs)})") from None
    except Exception as error:
        if wants_weights:
            raise PretrainedWeightsError(f"could not load the encoder weights of smp {name}: {error}") from error
        raise


def resolve_factory(factory: str | None) -> Any:
    """The callable named ``"package.module:function"`` (``function`` may be dotted)."""
    if not isinstance(factory, str) or not _FACTORY_FORMAT.match(factory):
        raise ValueError(f"model.factory must look like 'package.module:function', got {factory!r}")
    module_name, attribute = factory.split(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"model.factory {factory!r}: cannot import {module_name!r} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            raise ValueError(
                f"model.factory {factory!r}: {getattr(target, '__name__', target)!r} has no attribute {part!r}"
                f"{f'; closest: {close}' if close else ''}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model.factory {factory!r} is not callable")
    return target


def _build_python(factory: str | None, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    function = resolve_factory(factory)
    arguments = dict(kwargs)
    try:
        takes_classes = "num_classes" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins without a signature
        takes_classes = False
    if takes_classes:
        _check_given_classes(arguments, "num_classes", num_classes, f"factory {factory}")
        arguments["num_classes"] = num_classes
    model = function(**arguments)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.factory {factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_given_classes(kwargs: Mapping[str, Any], key: str, num_classes: int, what: str) -> None:
    if key in kwargs and kwargs[key] != num_classes:
        raise ValueError(
            f"model.kwargs.{key}={kwargs[key]!r} for {what}, but the data set has {num_classes} classes; "
            f"leave {key} out (kaseg passes the data set's number)"
        )


# ---------------------------------------------------------------- weights and configs


def load_model_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Loads a whole model's weights from a local file (safetensors, or a torch file read
    with ``weights_only=True``; a kaseg checkpoint's ``model`` entry works too).

    The keys are the network's own (``model.state_dict()`` of the class you built).

    Raises:
        kaseg.engine.checkpoint.CheckpointError: the file is missing, unsafe, unreadable,
            or its weights do not fit the model (the message names the file).
    """
    from kaseg.engine.checkpoint import CheckpointError, load_state_dict_file

    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        hint = ""
        if any(key.startswith("aux_classifier.") for key in state):
            hint = " (torchvision weights with an auxiliary head: set model.kwargs.aux_loss=true)"
        raise CheckpointError(f"weights file {str(path)!r} does not fit the model{hint}: {detail[:800]}") from None
    return model


def build_from_config(model_config: Any, num_classes: int | None) -> nn.Module:
    """The model a ``kaseg.config.ModelConfig`` describes, with ``model.weights`` loaded.

    ``source: kaseg`` builds a zoo model from the zoo fields; the other sources build
    with ``name`` (or ``factory``), ``kwargs`` and ``features``. ``num_classes`` is the
    data set's; None only checks that the model builds (see :func:`build_external`).
    """
    from kaseg.models.segmenter import build_model

    check_model_fields(model_config)
    if model_config.source == "kaseg":
        model = build_model(
            model_config.name,
            num_classes=num_classes if num_classes is not None else 2,
            **{field: getattr(model_config, field) for field in _ZOO_ONLY},
        )
    else:
        model = build_external(
            model_config.source,
            name=model_config.factory if model_config.source == "python" else model_config.name,
            num_classes=num_classes,
            kwargs=model_config.kwargs,
            features=model_config.features,
        )
    if model_config.weights is not None:
        load_model_weights(model, model_config.weights)
    return model


def check_model_fields(model_config: Any) -> None:
    """Raises a ValueError naming the key when fields of another source are set.

    The zoo fields (output_stride, width, ...) are checked against their defaults.
    """
    source = model_config.source
    if source not in SOURCES:
        raise ValueError(f"model.source: unknown source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "kaseg":
        for key in ("factory", "features"):
            if getattr(model_config, key) is not None:
                raise ValueError(
                    f"model.{key} applies to the sources torchvision, smp and python; kaseg zoo models tap their "
                    "head's output (set model.source to use it)"
                )
        if model_config.kwargs:
            raise ValueError(
                "model.kwargs applies to the sources torchvision, smp and python; kaseg zoo models take the "
                "fields model.output_stride, model.width, ..."
            )
        return
    defaults = type(model_config)()
    changed = [key for key in _ZOO_ONLY if getattr(model_config, key) != getattr(defaults, key)]
    if changed:
        raise ValueError(
            f"model.{changed[0]} applies to source kaseg only; for source {source} pass the builder's own "
            "arguments in model.kwargs (hub weights: torchvision weights/weights_backbone, smp encoder_weights)"
        )
    if source == "python" and model_config.factory is None:
        raise ValueError("model.source=python needs model.factory: 'package.module:function'")
    if source != "python" and model_config.factory is not None:
        raise ValueError(f"model.factory applies to source python; source {source} takes model.name")


def validate_model_config(model_config: Any) -> None:
    """Checks a ``ModelConfig`` before any data or checkpoint is read.

    The source and its fields, the builder name, the factory (imported), hub-weight
    names, that weight files exist (not reading them), and the feature tap: the model is
    built without any weights (for the number of classes in ``kwargs``, or any) and run
    once on a tiny input, which is what finds an unknown tap name.

    Raises:
        kaseg.config.ConfigError: one line naming the key and what was expected.
    """
    from kaseg.config import ConfigError

    try:
        check_model_fields(model_config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if model_config.weights is not None and not Path(model_config.weights).expanduser().is_file():
        raise ConfigError(f"model.weights: file {model_config.weights!r} does not exist")
    pretrained = model_config.pretrained
    if isinstance(pretrained, str) and not Path(pretrained).expanduser().is_file():
        raise ConfigError(f"model.pretrained: file {pretrained!r} does not exist (or set true / false)")
    offline = dataclasses.replace(
        model_config, kwargs=_without_hub_weights(model_config), weights=None, pretrained=False
    )
    try:
        if model_config.source == "torchvision" and model_config.name in torchvision_builders():
            torchvision_weights(model_config.name, model_config.kwargs)
        with torch.random.fork_rng(devices=[]):  # checking draws no numbers from the run's streams
            build_from_config(offline, None)
    except FeatureTapError as error:
        raise ConfigError(f"model.features: {error}") from None
    except (ValueError, TypeError, KeyError, ImportError, AttributeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise ConfigError(f"model (source {model_config.source}): {message}") from None


def _without_hub_weights(model_config: Any) -> dict[str, Any]:
    hub = HUB_WEIGHT_ARGUMENTS.get(model_config.source, ())
    return {k: v for k, v in model_config.kwargs.items() if k not in hub}


# ---------------------------------------------------------------- small helpers


def _drop_inner_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: ``<prefix>model.<key>`` -> ``<prefix><key>``."""
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == inner[:-1] or k.startswith(inner)]:
            metadata[prefix[:-1] if key == inner[:-1] else prefix + key[len(inner) :]] = metadata.pop(key)


def _add_inner_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: every ``<prefix><key>`` belongs to the wrapped model."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "model." + key[len(prefix) :]] = state_dict.pop(key)


def _grid_stride(size: tuple[int, ...]) -> int | None:
    """s when ``size`` is (H / s, W / s) for the PROBE_SIZE input (H, W), else None."""
    (height, width), (h, w) = PROBE_SIZE, size
    if h < 1 or w < 1 or height % h or width % w or height // h != width // w:
        return None
    return height // h


def _pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    # Not while tracing (ONNX export): a traced pad would be a constant of the example's
    # size; an exported smp model takes sides divisible by `multiple`, as smp's own export.
    if multiple <= 1 or torch.jit.is_tracing():
        return images
    pad_h, pad_w = -images.shape[-2] % multiple, -images.shape[-1] % multiple
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def _logits_of(output: Any, model_name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, Mapping) and ("out" in output or "logits" in output):
        logits = output["out"] if "out" in output else output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        keys = f" with keys {sorted(output)}" if isinstance(output, Mapping) else ""
        raise TypeError(
            f"{model_name} returned a {type(output).__name__}{keys}; kaseg reads the logits from a tensor, a dict "
            "with 'out' (torchvision) or 'logits', or the first element of a tuple"
        )
    if logits.dim() != 4:
        raise TypeError(f"{model_name} returned logits of shape {tuple(logits.shape)}; expected B x K x H x W")
    return logits


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next(_tensors(value), None)
