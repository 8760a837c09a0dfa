"""Optimisers and learning-rate / momentum schedules by name."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from transferlab.config.schema import OptimizerConfig, SchedulerConfig

OptimizerBuilder = Callable[[list[dict[str, Any]], OptimizerConfig], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps),
    "adadelta": lambda groups, c: torch.optim.Adadelta(groups, lr=c.lr, rho=c.rho, eps=c.eps),
}
SCHEDULERS = ["none", "step", "exponential", "cosine", "onecycle", "plateau"]


def list_optimizers() -> list[str]:
    return sorted(OPTIMIZERS)


def list_schedulers() -> list[str]:
    return list(SCHEDULERS)


def create_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer '{cfg.name}'; expected one of {list_optimizers()}")
    return OPTIMIZERS[cfg.name](groups, cfg)


class Schedule:
    """Steps the learning rate (per batch for one-cycle, else per epoch)
    and, optionally, a linear momentum ramp per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, *, epochs: int,
                 steps_per_epoch: int) -> None:
        self.optimizer, self.cfg, self.epochs = optimizer, cfg, epochs
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        name = cfg.name
        self.per_batch = name == "onecycle"
        self.plateau = name == "plateau"
        sched = torch.optim.lr_scheduler
        self.inner: Any = {
            "none": lambda: None,
            "step": lambda: sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma),
            "exponential": lambda: sched.ExponentialLR(optimizer, gamma=cfg.gamma),
            "cosine": lambda: sched.LambdaLR(optimizer, lambda e: cfg.min_lr_mult + (1 - cfg.min_lr_mult)
                                             * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))),
            "onecycle": lambda: sched.OneCycleLR(optimizer, max_lr=max_lrs, epochs=epochs,
                                                 steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start,
                                                 cycle_momentum=False),
            "plateau": lambda: sched.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor,
                                                       patience=cfg.patience),
        }[name]()
        self.set_momentum(0)

    def step_batch(self) -> None:
        if self.per_batch:
            self.inner.step()

    def step_epoch(self, epoch: int, val_loss: float) -> None:
        """Call after epoch ``epoch`` (0-based) with its validation loss."""
        if self.plateau:
            self.inner.step(val_loss)
        elif self.inner is not None and not self.per_batch:
            self.inner.step()
        self.set_momentum(epoch + 1)

    def set_momentum(self, epoch: int) -> None:
        m = self.cfg.momentum
        if not m.enabled:
            return
        frac = min(epoch, self.epochs - 1) / max(self.epochs - 1, 1)
        value = m.start + (m.end - m.start) * frac
        for g in self.optimizer.param_groups:
            if "betas" in g:
                g["betas"] = (value, g["betas"][1])
            else:
                g["momentum"] = value

    def momentum(self) -> float | None:
        g = self.optimizer.param_groups[0]
        if "betas" in g:
            return float(g["betas"][0])
        return float(g["momentum"]) if "momentum" in g else None
