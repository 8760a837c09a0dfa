"""The backbone zoo: builders registered by name, and families of names.

A backbone maps an image batch ``[N, C, S, S]`` (already normalised, at
``input_size``) to flat features ``[N, out_features]``. Names resolve in one
registry (:data:`BACKBONES`):

- the built-ins ``small_cnn`` and ``mlp``, and ``inception_v3`` (its own entry
  for its auxiliary branch);
- the ``torchvision`` family: any classification model of
  ``torchvision.models.list_models(module=torchvision.models)``, by its name
  (``resnet18``, ``vit_b_16``, ``swin_t``, ``efficientnet_v2_s``, ...), built with
  ``torchvision.models.get_model``. Its classifier is found generically: the
  last ``nn.Linear`` (or 1x1 ``nn.Conv2d``: squeezenet) in module order with
  1000 outputs (ImageNet's classes, what every torchvision classifier is built
  with) is replaced by ``nn.Identity``; its input width is ``out_features``, its
  key prefix is ``replaced_keys``. Module names stay torchvision's, so state
  dicts match torchvision's files key for key (minus that layer). ViT and MaxViT
  take the input size at build time (``image_size``/``input_size``); pretrained
  ViT position embeddings are interpolated to it on load
  (``torchvision.models.vision_transformer.interpolate_embeddings``);
- the ``timm`` family: ``timm/<name>`` for any ``timm.list_models()`` name,
  built with ``timm.create_model(name, num_classes=0, in_chans=channels)``,
  plus ``img_size`` where timm marks the input size fixed (ViT, Swin, ...).
  timm is imported only for these names (``pip install 'transferlab[timm]'``).

What a "layer" is (``regularisation.freeze.first_n`` freezes the first N,
``optimizer.layer_decay`` scales their learning rates), for every family: the
backbone's child modules that hold parameters, in forward (registration)
order, where a child named ``features``, ``classifier``, ``layers``, ``blocks``,
``stages``, ``trunk_output`` or ``encoder`` is opened into its children (again
for such a grandchild: ViT's ``encoder.layers``). Parameters held directly by
the backbone (ViT's class token) join its first layer; those held directly by
an opened container (ViT's ``encoder.pos_embedding``) join the layer before
the container's children. So:

- resnet (torchvision and timm): ``conv1, bn1, layer1 .. layer4``;
- vgg16: its 13 convolutions, then the 2 Linear layers left in ``classifier``;
- mobilenet, efficientnet, convnext, swin, densenet, squeezenet, mnasnet
  (torchvision): the blocks of ``features`` / ``layers``, then what holds
  parameters in ``classifier`` or after it (a final norm);
- regnet (torchvision): ``stem``, the 4 stages of ``trunk_output``;
- ViT (torchvision): ``conv_proj+class_token+encoder.pos_embedding`` (the
  patch embedding with the class token and position embedding), each encoder
  block, ``encoder.ln``; timm's ViT likewise (``patch_embed+cls_token+pos_embed``,
  ``blocks.0 ..``, ``norm``), timm's convnext ``stem, stages.0 .. 3, head``
  (its final norm).

:func:`backbone_layers` lists them; every backbone parameter belongs to exactly
one layer, except inception_v3's auxiliary branch (no layer: it is a side head).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from transferlab.errors import ConfigError
from transferlab.models.activations import get_activation
from transferlab.registry import Registry

StateAdapter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class Backbone:
    module: nn.Module
    out_features: int
    family: str  # "builtin", "torchvision" or "timm"
    # Prefixes of the classifier keys that the new head replaces;
    # loading ignores them, and shape mismatches elsewhere are refused.
    replaced_keys: tuple[str, ...] = ()
    aux_features: int | None = None  # inception_v3 auxiliary branch
    skip_layers: tuple[str, ...] = field(default=())
    # Rewrites a state dict for this build before loading (ViT: position embeddings resized to the input size).
    adapt_state: StateAdapter | None = None


@dataclass(frozen=True)
class Layer:
    """One layer (see the module docstring): its name (the module path, ``+`` the loose parameters it
    holds too), the module's class and its parameters' names in the backbone's state dict."""

    name: str
    kind: str
    params: tuple[str, ...]


BackboneBuilder = Callable[..., Backbone]
# info: min_input_size (px); weights: where the entry's published weights come from (models/weights.py).
BACKBONES: Registry[BackboneBuilder] = Registry("backbone.name", what="backbone")
register_backbone = BACKBONES.register


def min_input_size(name: str) -> int:
    """The smallest input a backbone is sensible at (torchvision's nets downsample 32x)."""
    return int(BACKBONES[name].info.get("min_input_size", 1))


def list_backbones() -> list[str]:
    """The names with an entry of their own (families' names are not listed: see the module docstring)."""
    return BACKBONES.names()


def create_backbone(name: str, *, channels: int, input_size: int, width: int = 32, depth: int = 3,
                    hidden: list[int] | tuple[int, ...] = (), activation: str = "relu") -> Backbone:
    """Build backbone ``name`` with freshly initialised weights."""
    return BACKBONES[name].build(name=name, channels=channels, input_size=input_size, width=width, depth=depth,
                                 hidden=list(hidden), activation=activation)


@contextmanager
def skeleton() -> Iterator[None]:
    """Build modules without allocating or initialising their weights: every parameter and buffer is
    moved to the ``meta`` device as it is registered. Unlike ``with torch.device("meta")``, the tensors
    a builder computes with stay real (torchvision's regnet derives its block widths with ``.tolist()``).
    Not thread-safe: it swaps ``nn.Module``'s registration methods while it lasts."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)

    def buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(self, name, tensor, persistent)
        if tensor is not None:
            self._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


# Containers opened into their children when listing layers (see the module docstring).
OPENED = frozenset({"features", "classifier", "layers", "blocks", "stages", "trunk_output", "encoder"})


def backbone_layers(backbone: Backbone) -> list[Layer]:
    """The backbone's layers in forward order (see the module docstring)."""
    units: list[tuple[str, nn.Module, list[str]]] = []  # module path, module, loose parameters it takes
    early: list[str] = []  # loose parameters met before the first layer

    def loose(name: str) -> None:
        (units[-1][2] if units else early).append(name)

    def walk(module: nn.Module, prefix: str) -> None:
        for name, _ in module.named_parameters(recurse=False):
            loose(prefix + name)
        for name, child in module.named_children():
            path = prefix + name
            if path in backbone.skip_layers:
                continue
            if name in OPENED and any(True for _ in child.children()):
                walk(child, path + ".")
            elif _has_params(child):
                units.append((path, child, []))

    walk(backbone.module, "")
    if not units:  # no module holds parameters (the pixel-passing mlp): its loose ones, if any, are one layer
        return [Layer("+".join(early), type(backbone.module).__name__, tuple(early))] if early else []
    units[0][2][:0] = early
    return [Layer("+".join([path, *extra]), type(module).__name__,
                  tuple([f"{path}.{n}" for n, _ in module.named_parameters()] + extra))
            for path, module, extra in units]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# -- built-in backbones --------------------------------------------------------


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, widths doubling, a 2x2 max-pool after every
    second block, global average pooling. Made for digit-sized images."""

    def __init__(self, channels: int, width: int, depth: int) -> None:
        super().__init__()
        in_ch = channels
        for i in range(depth):
            out_ch = width * 2 ** min(i, 3)
            block = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            if i % 2 == 1 and i < depth - 1:
                block.append(nn.MaxPool2d(2, ceil_mode=True))
            self.add_module(f"block{i + 1}", nn.Sequential(*block))
            in_ch = out_ch
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


@register_backbone("small_cnn", keys=("width", "depth"))
def _small_cnn(*, channels: int, width: int, depth: int, **_: object) -> Backbone:
    net = SmallCNN(channels, width, depth)
    return Backbone(net, net.out_features, "builtin")


class MLP(nn.Module):
    """Flatten the image, then Linear + activation per hidden size.
    With no hidden sizes it passes the flattened pixels on (the Keras
    example's 784 inputs)."""

    def __init__(self, in_features: int, hidden: list[int], activation: str) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        size = in_features
        for i, h in enumerate(hidden):
            self.add_module(f"fc{i + 1}", nn.Sequential(nn.Linear(size, h), get_activation(activation)))
            size = h
        self.out_features = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


@register_backbone("mlp", keys=("hidden", "activation"))
def _mlp(*, channels: int, input_size: int, hidden: list[int], activation: str, **_: object) -> Backbone:
    net = MLP(channels * input_size * input_size, hidden, activation)
    return Backbone(net, net.out_features, "builtin")


# -- the torchvision family -------------------------------------------------------

IMAGENET_CLASSES = 1000  # what every torchvision and timm classifier is built with
# Torchvision's fixed-size models take their input size at build time, by this keyword (per builder module).
SIZE_KEYWORDS = {"torchvision.models.vision_transformer": "image_size", "torchvision.models.maxvit": "input_size"}


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _is_torchvision_model(name: str) -> bool:
    return name in torchvision_names()


def cut_classifier(net: nn.Module, *, name: str) -> tuple[str, int]:
    """Replace the model's classifier by ``nn.Identity``; return its path and its input width.

    The classifier is the last ``nn.Linear``, or 1x1 ``nn.Conv2d``, in module order with 1000 outputs."""
    found = [(path, m) for path, m in net.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == IMAGENET_CLASSES)
             or (isinstance(m, nn.Conv2d) and m.out_channels == IMAGENET_CLASSES and m.kernel_size == (1, 1))]
    if not found:
        raise ConfigError(f"backbone.name: {name} has no classifier with {IMAGENET_CLASSES} outputs to replace")
    path, last = found[-1]
    net.set_submodule(path, nn.Identity())
    return path, int(last.in_features if isinstance(last, nn.Linear) else last.in_channels)


def build_torchvision(name: str, *, input_size: int, **kwargs: Any) -> Backbone:
    """Build torchvision model ``name`` untrained, at ``input_size`` where it takes one, and cut its classifier."""
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    keyword = SIZE_KEYWORDS.get(builder.__module__)
    if keyword is not None:
        kwargs[keyword] = input_size if keyword == "image_size" else (input_size, input_size)
    try:
        net = builder(weights=None, **kwargs)
    except (AssertionError, ValueError) as err:  # e.g. a ViT input size that is no multiple of its patch size
        raise ConfigError(f"backbone.input_size: {name} cannot be built at {input_size} px: {err}") from None
    path, out_features = cut_classifier(net, name=name)
    adapt = None
    if keyword == "image_size":
        adapt = _vit_position_embeddings(input_size, net.patch_size)
    return Backbone(net, out_features, "torchvision", replaced_keys=(path + ".",), adapt_state=adapt)


def _vit_position_embeddings(image_size: int, patch_size: int) -> StateAdapter:
    def adapt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from collections import OrderedDict

        from torchvision.models.vision_transformer import interpolate_embeddings

        if "encoder.pos_embedding" not in state:
            return state
        return dict(interpolate_embeddings(image_size, patch_size, OrderedDict(state)))

    return adapt


@register_backbone("torchvision", claims=_is_torchvision_model, choices=torchvision_names,
                   describe="any torchvision classification model (torchvision.models.list_models())",
                   min_input_size=32, weights="torchvision")
def _torchvision_family(*, name: str, input_size: int, **_: object) -> Backbone:
    with warnings.catch_warnings():  # googlenet's note that its default init will change: it is initialised here
        warnings.filterwarnings("ignore", message="The default weight initialization", category=FutureWarning)
        return build_torchvision(name, input_size=input_size,
                                 **({"aux_logits": False} if name == "googlenet" else {}))


# The auxiliary classifier reads a 17x17 map at 299 pixels and cannot run on
# the much smaller maps of small inputs.
INCEPTION_AUX_MIN_SIZE = 299


@register_backbone("inception_v3", min_input_size=75, weights="torchvision")
def _inception_v3(*, input_size: int, **_: object) -> Backbone:
    aux = input_size >= INCEPTION_AUX_MIN_SIZE
    if not aux:
        warnings.warn(f"inception_v3 at {input_size} px: the auxiliary logits need >= "
                      f"{INCEPTION_AUX_MIN_SIZE} px and are switched off", stacklevel=2)
    backbone = build_torchvision("inception_v3", input_size=input_size, aux_logits=True, init_weights=False)
    net = backbone.module
    replaced = ("fc.", "AuxLogits.fc.")
    if aux:
        backbone.aux_features = net.AuxLogits.fc.in_features
        net.AuxLogits.fc = nn.Identity()
    else:
        net.aux_logits = False
        net.AuxLogits = None
    # Torchvision only turns this on with its own pretrained weights; inputs
    # here are already normalised by the model's preprocessing.
    net.transform_input = False
    backbone.replaced_keys = replaced
    backbone.skip_layers = ("AuxLogits",)
    return backbone


# -- the timm family ---------------------------------------------------------------

TIMM_PREFIX = "timm/"


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError("backbone.name: timm/<name> needs timm: pip install 'transferlab[timm]'") from None
    return timm


def _is_timm_model(name: str) -> bool:
    return name.startswith(TIMM_PREFIX) and bool(import_timm().is_model(name[len(TIMM_PREFIX):]))


def timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return [TIMM_PREFIX + n for n in timm.list_models()]


def timm_build_kwargs(arch: str, *, channels: int, input_size: int) -> dict[str, Any]:
    """``timm.create_model``'s arguments for a backbone: no classifier, the channels, and the input size
    where timm marks it fixed (``pretrained_cfg.fixed_input_size``: ViT, Swin, ...)."""
    timm = import_timm()
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": channels}
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = input_size
    return kwargs


@register_backbone("timm", claims=_is_timm_model, choices=timm_names,
                   describe="timm/<any timm.list_models() name>", min_input_size=32, weights="timm")
def _timm_family(*, name: str, channels: int, input_size: int, **_: object) -> Backbone:
    timm = import_timm()
    arch = name[len(TIMM_PREFIX):]
    net = timm.create_model(arch, pretrained=False, **timm_build_kwargs(arch, channels=channels,
                                                                         input_size=input_size))
    classifiers = net.pretrained_cfg.get("classifier") or "head"  # a name, or several (deit's distillation head)
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    return Backbone(net, int(getattr(net, "head_hidden_size", None) or net.num_features), "timm",
                    replaced_keys=tuple(c + "." for c in classifiers))
