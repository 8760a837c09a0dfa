"""The backbone zoo: builders registered by name.

A backbone maps an image batch ``[N, C, S, S]`` (already normalised, at
``input_size``) to flat features ``[N, out_features]``. Torchvision models
keep their own module names, with the classifier's last layer replaced by
``nn.Identity``, so their state dicts match torchvision's files key for key
(minus that layer).

What a "layer" is (for ``regularisation.freeze.first_n``): the backbone's
top-level child modules that hold parameters, in forward order; a top-level
``features`` or ``classifier`` Sequential is opened into its children.
So resnet's layers are ``conv1, bn1, layer1 .. layer4``; vgg16's are its 13
convolutions then 2 linear layers; mobilenet/efficientnet/convnext's are the
blocks of ``features`` (then the Linear/LayerNorm left in ``classifier``).
:func:`backbone_layers` lists them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from transferlab.models.activations import get_activation
from transferlab.registry import Registry


@dataclass
class Backbone:
    module: nn.Module
    out_features: int
    family: str  # "builtin" or "torchvision"
    # Prefixes of the torchvision classifier keys that the new head replaces;
    # loading ignores them, and shape mismatches elsewhere are refused.
    replaced_keys: tuple[str, ...] = ()
    aux_features: int | None = None  # inception_v3 auxiliary branch
    skip_layers: tuple[str, ...] = field(default=())


BackboneBuilder = Callable[..., Backbone]
# info: torchvision (bool: torchvision has weights for it), min_input_size (px).
BACKBONES: Registry[BackboneBuilder] = Registry("backbone.name", what="backbone")
register_backbone = BACKBONES.register


def min_input_size(name: str) -> int:
    """The smallest input a backbone is sensible at (torchvision's nets downsample 32x)."""
    return int(BACKBONES[name].info.get("min_input_size", 1))


def list_backbones() -> list[str]:
    return BACKBONES.names()


def is_torchvision(name: str) -> bool:
    return name in BACKBONES and bool(BACKBONES[name].info.get("torchvision"))


def create_backbone(name: str, *, channels: int, input_size: int, width: int = 32, depth: int = 3,
                    hidden: list[int] | tuple[int, ...] = (), activation: str = "relu") -> Backbone:
    """Build backbone ``name`` with freshly initialised weights."""
    return BACKBONES[name].build(channels=channels, input_size=input_size, width=width, depth=depth,
                                 hidden=list(hidden), activation=activation)


def backbone_layers(backbone: Backbone) -> list[tuple[str, nn.Module]]:
    """The backbone's layers in forward order (see the module docstring)."""
    layers = []
    for name, child in backbone.module.named_children():
        if name in backbone.skip_layers:
            continue
        if name in ("features", "classifier") and isinstance(child, nn.Sequential):
            layers += [(f"{name}.{sub}", m) for sub, m in child.named_children() if _has_params(m)]
        elif _has_params(child):
            layers.append((name, child))
    return layers


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


# -- torchvision backbones -------------------------------------------------------


def _torchvision(name: str, classifier: str, **kwargs: object) -> Backbone:
    """Build torchvision model ``name`` untrained and cut its last layer.

    ``classifier`` is the dotted path of the final Linear to replace.
    """
    import torchvision

    net = torchvision.models.get_model(name, weights=None, **kwargs)
    parent_path, _, attr = classifier.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    last = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    out_features = last.in_features
    if attr.isdigit():
        parent[int(attr)] = nn.Identity()
    else:
        setattr(parent, attr, nn.Identity())
    return Backbone(net, out_features, "torchvision", replaced_keys=(classifier + ".",))


def _register_torchvision(name: str, classifier: str) -> None:
    @register_backbone(name, torchvision=True, min_input_size=32)
    def build(**_: object) -> Backbone:
        return _torchvision(name, classifier)

    build.__name__ = f"_{name}"


for _name, _classifier in {
    "resnet18": "fc",
    "resnet50": "fc",
    "mobilenet_v3_small": "classifier.3",
    "mobilenet_v3_large": "classifier.3",
    "efficientnet_b0": "classifier.1",
    "vgg16": "classifier.6",
    "convnext_tiny": "classifier.2",
}.items():
    _register_torchvision(_name, _classifier)


# The auxiliary classifier reads a 17x17 map at 299 pixels and cannot run on
# the much smaller maps of small inputs.
INCEPTION_AUX_MIN_SIZE = 299


@register_backbone("inception_v3", torchvision=True, min_input_size=75)
def _inception_v3(*, input_size: int, **_: object) -> Backbone:
    aux = input_size >= INCEPTION_AUX_MIN_SIZE
    if not aux:
        warnings.warn(f"inception_v3 at {input_size} px: the auxiliary logits need >= "
                      f"{INCEPTION_AUX_MIN_SIZE} px and are switched off", stacklevel=2)
    backbone = _torchvision("inception_v3", "fc", aux_logits=True, init_weights=False)
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
