"""Output heads: hidden layers (optional) and an output layer of the right shape.

Every head maps features ``[N, F]`` to *class logits*. The loss and the
class probabilities therefore work the same for every head, except
``binary``, whose single logit goes through a sigmoid.

The over-complete head (``overcomplete``) has more output units than
classes. Units are split into contiguous groups, one per class: with U
units and C classes, every class gets ``U // C`` units and the first
``U % C`` classes one more (14 units for 10 digits: classes 0-3 own 2 units,
classes 4-9 one). A class's logit pools its group's unit logits:

- ``logsumexp`` (default): softmax over the class logits then equals the sum
  of the softmax over all units within each group, so a class may spread its
  probability mass over variants (a 7 with and without a bar);
- ``max``: the class is as likely as its most confident unit;
- ``mean``: the average unit logit.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.errors import HeadError
from transferlab.models.activations import get_activation
from transferlab.registry import Registry

POOLINGS = ["logsumexp", "max", "mean"]


def unit_groups(num_units: int, num_classes: int) -> list[list[int]]:
    """The output units each class owns (see the module docstring)."""
    if num_units < num_classes:
        raise HeadError(f"head.num_units={num_units} is fewer than the {num_classes} classes: "
                        "every class needs at least one output unit")
    base, extra = divmod(num_units, num_classes)
    groups, start = [], 0
    for c in range(num_classes):
        size = base + (1 if c < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def _hidden_stack(in_features: int, hidden: list[int], activations: list[str],
                  dropouts: list[float]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    size = in_features
    for i, h in enumerate(hidden):
        act = activations[i] if len(activations) == len(hidden) else activations[0]
        layers += [nn.Linear(size, h), get_activation(act)]
        if dropouts[i] > 0:
            layers.append(nn.Dropout(dropouts[i]))
        size = h
    return nn.Sequential(*layers), size


class Head(nn.Module):
    """Hidden stack, then ``out`` (a Linear with ``num_units`` outputs),
    then pooling of units into classes."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: list[int], activations: list[str],
                 dropouts: list[float], num_units: int, pooling: str = "logsumexp", binary: bool = False) -> None:
        super().__init__()
        self.hidden, size = _hidden_stack(in_features, hidden, activations, dropouts)
        self.out = nn.Linear(size, num_units)
        self.binary = binary
        self.num_classes = num_classes
        self.pooling = pooling
        self.groups = unit_groups(num_units, num_classes) if not binary else [[0]]
        # Pooling gathers every group at once through a padded [classes, width]
        # index (pads masked out), so the forward makes no host-to-device copy.
        width = max(len(g) for g in self.groups)
        index = torch.tensor([g + [g[0]] * (width - len(g)) for g in self.groups], dtype=torch.long)
        mask = torch.tensor([[True] * len(g) + [False] * (width - len(g)) for g in self.groups])
        self.register_buffer("group_index", index, persistent=False)
        self.register_buffer("group_mask", mask, persistent=False)
        self.overcomplete = not binary and num_units > num_classes

    def unit_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.pool(self.unit_logits(features))

    def pool(self, units: torch.Tensor) -> torch.Tensor:
        if not self.overcomplete:
            return units
        grouped = units[:, self.group_index]  # [N, classes, width]
        if self.pooling == "mean":
            return (grouped * self.group_mask).sum(dim=2) / self.group_mask.sum(dim=1)
        grouped = grouped.masked_fill(~self.group_mask, float("-inf"))
        if self.pooling == "logsumexp":
            return grouped.logsumexp(dim=2)
        return grouped.amax(dim=2)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        if self.binary:
            y = target.float()
            if label_smoothing:
                y = y * (1 - label_smoothing) + 0.5 * label_smoothing
            return F.binary_cross_entropy_with_logits(logits.squeeze(1), y)
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, num_classes]``."""
        if self.binary:
            p = torch.sigmoid(logits.squeeze(1).float())
            return torch.stack([1 - p, p], dim=1)
        return logits.float().softmax(dim=1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return (logits.squeeze(1) > 0).long()
        return logits.argmax(dim=1)


HeadBuilder = Callable[..., Head]
HEADS: Registry[HeadBuilder] = Registry("head.name", what="head", error=HeadError)
register_head = HEADS.register


def list_heads() -> list[str]:
    return HEADS.names()


def create_head(name: str, *, in_features: int, num_classes: int, hidden: list[int] | None = None,
                activations: list[str] | None = None, dropouts: list[float] | None = None,
                num_units: int | None = None, pooling: str = "logsumexp") -> Head:
    hidden = list(hidden or [])
    dropouts = list(dropouts) if dropouts is not None else [0.0] * len(hidden)
    return HEADS[name].build(in_features=in_features, num_classes=num_classes, hidden=hidden,
                             activations=list(activations or ["relu"]), dropouts=dropouts,
                             num_units=num_units, pooling=pooling)


@register_head("linear")
def _linear(*, in_features: int, num_classes: int, hidden: list[int], **kw: object) -> Head:
    if hidden:
        raise HeadError("the linear head has no hidden layers; use head=mlp")
    return Head(in_features, num_classes, hidden=[], activations=["relu"], dropouts=[], num_units=num_classes)


@register_head("mlp")
def _mlp(*, in_features: int, num_classes: int, hidden: list[int], activations: list[str],
         dropouts: list[float], **_: object) -> Head:
    return Head(in_features, num_classes, hidden=hidden, activations=activations, dropouts=dropouts,
                num_units=num_classes)


@register_head("binary")
def _binary(*, in_features: int, num_classes: int, hidden: list[int], activations: list[str],
            dropouts: list[float], **_: object) -> Head:
    if num_classes != 2:
        raise HeadError(f"the binary head needs a 2-class task, but the data has {num_classes} classes; "
                        "choose 2 classes (data.classes) or one class against the rest (data.positive_class)")
    return Head(in_features, 2, hidden=hidden, activations=activations, dropouts=dropouts,
                num_units=1, binary=True)


@register_head("overcomplete", keys=("num_units", "pooling"))
def _overcomplete(*, in_features: int, num_classes: int, hidden: list[int], activations: list[str],
                  dropouts: list[float], num_units: int | None, pooling: str, **_: object) -> Head:
    units = num_units if num_units is not None else num_classes + (num_classes * 2 + 4) // 5
    return Head(in_features, num_classes, hidden=hidden, activations=activations, dropouts=dropouts,
                num_units=units, pooling=pooling)
