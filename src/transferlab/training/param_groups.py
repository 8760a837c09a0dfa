"""Optimiser parameter groups: a pure function of the model and the config.

Groups split along two axes: backbone or not (the backbone gets
``lr * backbone_lr_mult``), and decay or not (biases and norm weights, i.e.
every parameter with fewer than 2 dimensions, get no weight decay). Frozen
parameters of the ``zero_lr`` method get their own group with lr 0.

With layer-wise decay (``optimizer.layer_decay``, as timm and MMPretrain define
it) the backbone splits further, one group pair per layer: with ``L`` layers,
layer ``i`` (0-based, input first) gets ``lr * backbone_lr_mult * decay ** (L - i)``
and the head ``lr``. Backbone parameters outside every layer (inception_v3's
auxiliary branch) keep ``lr * backbone_lr_mult``. (timm groups a ViT's final
norm with the head; here it is the backbone's last layer, so each backbone
layer gets one factor of ``decay`` less than under timm.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


def param_groups(model: nn.Module, *, lr: float, backbone_lr_mult: float, weight_decay: float,
                 zero_lr: frozenset[str] | set[str] = frozenset(), exclude: frozenset[str] | set[str] = frozenset(),
                 backbone_prefix: str = "backbone.", layers: Sequence[Sequence[str]] = (),
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Each group carries ``name``, ``param_names``, ``lr``, ``lr_scale`` and
    ``weight_decay``; empty groups are dropped. ``layers``: the backbone's layers in forward order,
    each as its parameters' names in ``model`` (needed for ``layer_decay``)."""
    specs: dict[str, dict[str, Any]] = {}
    layer_of = {name: i for i, params in enumerate(layers) for name in params} if layer_decay is not None else {}

    def group(name: str, scale: float, wd: float) -> dict[str, Any]:
        return specs.setdefault(name, {"name": name, "params": [], "param_names": [], "lr": lr * scale,
                                       "lr_scale": scale, "weight_decay": wd})

    for name, param in model.named_parameters():
        if name in exclude:
            continue
        decay = param.ndim >= 2
        if name in zero_lr:
            g = group("frozen_zero_lr", 0.0, 0.0)
        elif name in layer_of:
            i = layer_of[name]
            scale = backbone_lr_mult * layer_decay ** (len(layers) - i)  # type: ignore[operator]
            g = group(f"backbone.{i}" if decay else f"backbone.{i}_no_decay", scale, weight_decay if decay else 0.0)
        elif name.startswith(backbone_prefix):
            g = group("backbone" if decay else "backbone_no_decay", backbone_lr_mult, weight_decay if decay else 0.0)
        else:
            g = group("head" if decay else "head_no_decay", 1.0, weight_decay if decay else 0.0)
        g["params"].append(param)
        g["param_names"].append(name)
    return [g for g in specs.values() if g["params"]]


def describe_groups(groups: list[dict[str, Any]]) -> str:
    """One line per group: what went where."""
    lines = []
    for g in groups:
        count = sum(p.numel() for p in g["params"])
        lines.append(f"{g['name']:<18} {len(g['params']):>4} tensors {count:>11,} params  "
                     f"lr={g['lr']:.3g} weight_decay={g['weight_decay']:.3g}")
    return "\n".join(lines)
