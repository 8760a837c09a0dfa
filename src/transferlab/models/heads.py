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

    def loss(self, logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` against ``target``: class indices (int64 ``[N]``) or class
        probabilities (float ``[N, num_classes]``, e.g. mixup's soft targets).

        ``weight`` (``[num_classes]``, see :func:`class_weights`) weights each class's terms, and the
        mean is the weighted one: ``sum_n sum_c w_c t_nc l_nc / sum_n sum_c w_c t_nc`` with ``t`` the
        target as probabilities (one-hot for indices) before label smoothing, ``l_nc = -log p_nc`` and
        the smoothed target in the numerator. For indices this is exactly ``F.cross_entropy(...,
        weight=w)``; for probabilities PyTorch would divide by N instead, so one-hot probabilities
        and their indices give the same loss here. The binary head reads probabilities as the
        positive class's (``target[:, 1]``)."""
        if self.binary:
            return _binary_loss(logits.squeeze(1), target, label_smoothing, weight)
        if not target.is_floating_point():
            return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)
        total = F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing, reduction="sum")
        return total / (target.sum() if weight is None else (target @ weight).sum())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return class_probabilities(logits, binary=self.binary)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return predicted_classes(logits, binary=self.binary)

    def hits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """How many predictions match ``target`` (a 0-d device tensor). Soft targets count against
        their dominant class (:func:`targets_to_labels`): train accuracy under mixup/cutmix is
        measured against the label that holds most of each mixed image."""
        return (self.predict(logits) == targets_to_labels(target)).sum()


def class_probabilities(logits: torch.Tensor, *, binary: bool) -> torch.Tensor:
    """Class probabilities ``[N, num_classes]`` from a head's output (``binary``: its one sigmoid logit)."""
    if binary:
        p = torch.sigmoid(logits.squeeze(1).float())
        return torch.stack([1 - p, p], dim=1)
    return logits.float().softmax(dim=1)


def predicted_classes(logits: torch.Tensor, *, binary: bool) -> torch.Tensor:
    """The predicted class index ``[N]`` from a head's output (``binary``: its one sigmoid logit)."""
    if binary:
        return (logits.squeeze(1) > 0).long()
    return logits.argmax(dim=1)


def targets_to_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices of ``target``: itself for indices, the most probable class of soft targets."""
    return target.argmax(dim=1) if target.is_floating_point() else target


def _binary_loss(logit: torch.Tensor, target: torch.Tensor, label_smoothing: float,
                 weight: torch.Tensor | None) -> torch.Tensor:
    """:meth:`Head.loss` for one logit per sample: the same weighted mean, over the two classes."""
    p = target[:, 1] if target.is_floating_point() else target.float()
    smoothed = p * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else p
    if weight is None:
        return F.binary_cross_entropy_with_logits(logit, smoothed)
    # w1 * t * -log(s) + w0 * (1 - t) * -log(1 - s) = w0 * BCE with pos_weight w1 / w0
    total = F.binary_cross_entropy_with_logits(logit, smoothed, weight=weight[0].expand_as(logit),
                                               pos_weight=weight[1] / weight[0], reduction="sum")
    return total / (weight[1] * p + weight[0] * (1 - p)).sum()


CLASS_WEIGHTS = ["balanced"]  # trainer.class_weight, besides null


def class_weights(labels: torch.Tensor, num_classes: int, mode: str | None) -> torch.Tensor | None:
    """Per-class loss weights for ``trainer.class_weight`` from the training labels (int64 ``[N]``),
    on their device; None for ``mode=None`` (every class weighs 1).

    ``balanced`` is scikit-learn's: ``n_samples / (n_classes * count_c)``, so each class contributes
    as much to the loss as it would in a balanced training set. A class with no training image
    (it never is a training target, so its weight has no effect) is counted once, to stay finite.
    """
    if mode is None:
        return None
    if mode != "balanced":
        raise ValueError(f"unknown class weighting {mode!r}; expected one of {CLASS_WEIGHTS} or None")
    counts = torch.zeros(num_classes, device=labels.device).index_add_(
        0, labels, torch.ones_like(labels, dtype=torch.float32))
    return labels.shape[0] / (num_classes * counts.clamp(min=1))


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
