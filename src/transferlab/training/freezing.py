"""Which parameters stay fixed, and keeping frozen BatchNorm fixed too.

Three scopes, combinable: the first N backbone layers (see
:func:`transferlab.models.backbones.backbone_layers` for what a layer is),
parameter-name patterns, the whole backbone. Two methods: remove them from
training (``requires_grad``), or keep them in the optimiser with a learning
rate of zero (``zero_lr``, the note's alternative for adaptive optimisers).
Either way BatchNorm layers whose parameters are all frozen stay in eval
mode, so their running statistics do not move.

Freezing protects pretrained weights: a backbone with ``backbone.weights=null`` has none, so its
parameters are left to train (the head's still freeze as asked) and the plan carries a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from transferlab.errors import FreezeError
from transferlab.models.backbones import Backbone, backbone_layers


@dataclass(frozen=True)
class FreezePlan:
    frozen: frozenset[str]  # parameter names, as in model.named_parameters()
    method: str  # requires_grad | zero_lr
    layers: tuple[str, ...]  # frozen backbone layers (first_n scope), for the log
    warnings: tuple[str, ...] = ()  # freezing asked for but not applied, and why


def plan_freeze(model: nn.Module, backbone: Backbone, *, first_n: int = 0, patterns: list[str] | None = None,
                whole_backbone: bool = False, method: str = "requires_grad",
                backbone_prefix: str = "backbone.", pretrained: bool = True) -> FreezePlan:
    """What to freeze. ``pretrained=False`` (a random init): the scopes are checked as usual, but backbone
    parameters stay trainable, with a warning in the plan, since freezing them would fix random weights."""
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    layers = backbone_layers(backbone)
    if first_n > len(layers):
        raise FreezeError(f"regularisation.freeze.first_n={first_n}, but the backbone has only {len(layers)} "
                          f"layers: {[layer.name for layer in layers]}")
    for layer in layers[:first_n]:
        frozen.update(backbone_prefix + p for p in layer.params)
    chosen = [layer.name for layer in layers[:first_n]]
    for pattern in patterns or []:
        hits = [n for n in names if fnmatchcase(n, pattern)]
        if not hits:
            raise FreezeError(f"regularisation.freeze.patterns: '{pattern}' matches no parameter; names look "
                              f"like {names[:3]} ... {names[-2:]}")
        frozen.update(hits)
    if whole_backbone:
        frozen.update(n for n in names if n.startswith(backbone_prefix))
    random_init = sorted(n for n in frozen if n.startswith(backbone_prefix)) if not pretrained else []
    if random_init:
        frozen.difference_update(random_init)
        warning = (f"regularisation.freeze: backbone.weights=null leaves nothing pretrained to protect; "
                   f"{len(random_init)} backbone parameter tensors it would freeze ({random_init[0]}, ...) train "
                   f"from their random init instead")
        return FreezePlan(frozenset(frozen), method, (), (warning,))
    return FreezePlan(frozenset(frozen), method, tuple(chosen))


def apply_freeze(model: nn.Module, plan: FreezePlan) -> None:
    """Switch gradients off for the frozen parameters (``requires_grad`` method)."""
    if plan.method != "requires_grad":
        return
    for name, param in model.named_parameters():
        if name in plan.frozen:
            param.requires_grad_(False)


def frozen_norm_layers(model: nn.Module, frozen: frozenset[str] | set[str]) -> list[nn.Module]:
    """BatchNorm modules all of whose parameters are frozen."""
    out = []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if own and all(p in frozen for p in own):
                out.append(module)
    return out


def set_train_mode(model: nn.Module, frozen_norms: list[nn.Module]) -> None:
    """``model.train()``, but frozen BatchNorm stays in eval mode."""
    model.train()
    for module in frozen_norms:
        module.eval()


def set_backbone_trainable(model: nn.Module, trainable: bool, *, keep_frozen: frozenset[str] | set[str],
                           backbone_prefix: str = "backbone.") -> None:
    """For a staged unfreeze: switch the backbone's gradients on or off,
    leaving the permanently frozen parameters off."""
    for name, param in model.named_parameters():
        if name.startswith(backbone_prefix) and name not in keep_frozen:
            param.requires_grad_(trainable)
