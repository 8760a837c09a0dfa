"""Training-time augmentation (config group ``augment``).

An entry builds an :data:`Augment`: a callable that the training step applies
to each uint8 batch ``[N, C, H, W]`` on the device, before the model's own
preprocessing, drawing its randomness per sample from the ``generator`` it
is given. The training loop owns that generator (seeded, on the batch's
device), so a run with augmentation is reproducible. Evaluation never
augments, and ``pretrain`` does not either.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torchvision.transforms.v2 import functional as TF

from transferlab.config.schema import AugmentConfig
from transferlab.registry import Registry

# (uint8 batch [N, C, H, W], generator on its device) -> uint8 batch of the same shape
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
AugmentBuilder = Callable[[AugmentConfig], Optional[Augment]]
AUGMENTATIONS: Registry[AugmentBuilder] = Registry("augment.name", what="augmentation")
register_augmentation = AUGMENTATIONS.register


def list_augmentations() -> list[str]:
    return AUGMENTATIONS.names()


def create_augment(cfg: AugmentConfig) -> Augment | None:
    """The configured augmentation; None when it does nothing (the loop then skips it)."""
    return AUGMENTATIONS[cfg.name].build(cfg)


@register_augmentation("none")
def _none(cfg: AugmentConfig) -> None:
    return None


@register_augmentation("flip", keys=("p",))
def _flip(cfg: AugmentConfig) -> Augment:
    p = cfg.p

    # torchvision.transforms.v2.RandomHorizontalFlip draws one decision per call (the whole batch)
    # from the global RNG; here each sample draws its own from the loop's generator, and only the
    # flip itself is torchvision's kernel. torch.where keeps it free of host syncs.
    def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        chosen = torch.rand(x.shape[0], device=x.device, generator=generator) < p
        return torch.where(chosen.view(-1, 1, 1, 1), TF.horizontal_flip(x), x)

    return flip
