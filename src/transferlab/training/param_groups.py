"""Optimiser parameter groups: a pure function of the model and the config.

Groups split along two axes: backbone or not (the backbone gets
``lr * backbone_lr_mult``), and decay or not (biases and norm weights, i.e.
every parameter with fewer than 2 dimensions, get no weight decay). Frozen
parameters of the ``zero_lr`` method get their own group with lr 0.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def param_groups(model: nn.Module, *, lr: float, backbone_lr_mult: float, weight_decay: float,
                 zero_lr: frozenset[str] | set[str] = frozenset(), exclude: frozenset[str] | set[str] = frozenset(),
                 backbone_prefix: str = "backbone.") -> list[dict[str, Any]]:
    """Each group carries ``name``, ``param_names``, ``lr``, ``lr_scale`` and
    ``weight_decay``; empty groups are dropped."""
    specs: dict[str, dict[str, Any]] = {}

    def group(name: str, scale: float, wd: float) -> dict[str, Any]:
        return specs.setdefault(name, {"name": name, "params": [], "param_names": [], "lr": lr * scale,
                                       "lr_scale": scale, "weight_decay": wd})

    for name, param in model.named_parameters():
        if name in exclude:
            continue
        decay = param.ndim >= 2
        if name in zero_lr:
            g = group("frozen_zero_lr", 0.0, 0.0)
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
