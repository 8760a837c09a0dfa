"""Max-norm weight constraint (Keras ``MaxNorm`` semantics).

Each unit's incoming weight vector (a row of a Linear weight, one output
channel of a Conv weight) is rescaled to norm <= c after every optimiser
step. Biases are not constrained.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

CONSTRAINABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def constrained_weights(model: nn.Module, patterns: list[str]) -> dict[str, nn.Parameter]:
    """Weights of the Linear/Conv modules whose names match any pattern."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, CONSTRAINABLE) and any(fnmatchcase(name, p) for p in patterns):
            out[f"{name}.weight"] = module.weight
    return out


def max_norm_weights(model: nn.Module, patterns: list[str]) -> list[nn.Parameter]:
    """The weights ``regularisation.max_norm.layers`` names; a pattern that matches no Linear/Conv layer fails."""
    from transferlab.training.freezing import FreezeError

    for pattern in patterns:
        if not constrained_weights(model, [pattern]):
            names = [n for n, m in model.named_modules() if isinstance(m, CONSTRAINABLE)]
            raise FreezeError(f"regularisation.max_norm.layers: '{pattern}' matches no Linear/Conv layer; "
                              f"those are {names[:3]} ... {names[-2:]}")
    return list(constrained_weights(model, patterns).values())


def unit_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().flatten(1).norm(dim=1)


@torch.no_grad()
def apply_max_norm(weights: list[torch.Tensor], max_value: float) -> torch.Tensor:
    """Clip every unit's norm to ``max_value``; return the largest norm seen
    before clipping, as a device tensor (no host sync)."""
    largest = torch.zeros((), device=weights[0].device) if weights else torch.zeros(())
    for w in weights:
        largest = torch.maximum(largest, unit_norms(w).max())
        # renorm scales sub-tensors along dim 0 whose norm exceeds maxnorm.
        w.copy_(torch.renorm(w, p=2, dim=0, maxnorm=max_value))
    return largest
