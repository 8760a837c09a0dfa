"""Optimisers and learning-rate / momentum schedules by name."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from transferlab.config.schema import OptimizerConfig, SchedulerConfig
from transferlab.registry import Registry

OptimizerBuilder = Callable[[list[dict[str, Any]], OptimizerConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer.name", what="optimizer")
# momentum=True: a momentum schedule can drive it (SGD momentum, Adam beta1).
OPTIMIZERS.register("sgd", keys=("momentum", "nesterov"), momentum=True)(
    lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov))
OPTIMIZERS.register("adam", keys=("betas", "eps"), momentum=True)(
    lambda groups, c: torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps))
OPTIMIZERS.register("adamw", keys=("betas", "eps"), momentum=True)(
    lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps))
OPTIMIZERS.register("adadelta", keys=("rho", "eps"))(
    lambda groups, c: torch.optim.Adadelta(groups, lr=c.lr, rho=c.rho, eps=c.eps))

SchedulerBuilder = Callable[..., Any]
SCHEDULERS: Registry[SchedulerBuilder] = Registry("scheduler.name", what="scheduler", ordered=True)
_lr = torch.optim.lr_scheduler
SCHEDULERS.register("none")(lambda optimizer, cfg, **_: None)
SCHEDULERS.register("step", keys=("step_size", "gamma"))(
    lambda optimizer, cfg, **_: _lr.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma))
SCHEDULERS.register("exponential", keys=("gamma",))(
    lambda optimizer, cfg, **_: _lr.ExponentialLR(optimizer, gamma=cfg.gamma))
SCHEDULERS.register("cosine", keys=("min_lr_mult",))(
    lambda optimizer, cfg, *, epochs, **_: _lr.LambdaLR(
        optimizer, lambda e: cfg.min_lr_mult + (1 - cfg.min_lr_mult) * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))))
SCHEDULERS.register("onecycle", keys=("pct_start",), per_batch=True)(
    lambda optimizer, cfg, *, epochs, steps_per_epoch, **_: _lr.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], epochs=epochs,
        steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start, cycle_momentum=False))
SCHEDULERS.register("plateau", keys=("factor", "patience"), on_val_loss=True)(
    lambda optimizer, cfg, **_: _lr.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor,
                                                      patience=cfg.patience))


def list_optimizers() -> list[str]:
    return OPTIMIZERS.names()


def list_schedulers() -> list[str]:
    return SCHEDULERS.names()


def create_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name].build(groups, cfg)


def scaled_lr(cfg: OptimizerConfig, effective_batch: int) -> float:
    """``optimizer.lr``, or with ``lr_base_size`` set, timm's rule: the lr given for a batch of
    ``lr_base_size`` scaled to ``effective_batch`` linearly (``lr_base_scale=linear``) or by its sqrt."""
    if cfg.lr_base_size is None:
        return cfg.lr
    ratio = effective_batch / cfg.lr_base_size
    return cfg.lr * (math.sqrt(ratio) if cfg.lr_base_scale == "sqrt" else ratio)


class Schedule:
    """Steps the learning rate (per batch for one-cycle, else per epoch), after an optional linear
    warm-up per optimiser step, and, optionally, a linear momentum ramp per epoch.

    Warm-up multiplies whatever the schedule sets by ``warmup_start_factor + (1 - warmup_start_factor)
    * i / T`` at optimiser step ``i`` (0-based) of the first ``T``; the schedule itself runs unchanged
    underneath (as timm's warm-up does, the schedule's clock is not shifted)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, *, epochs: int,
                 steps_per_epoch: int) -> None:
        self.optimizer, self.cfg, self.epochs = optimizer, cfg, epochs
        entry = SCHEDULERS[cfg.name]
        self.per_batch = bool(entry.info.get("per_batch"))
        self.plateau = bool(entry.info.get("on_val_loss"))
        self.inner: Any = entry.build(optimizer, cfg, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.warmup = cfg.warmup_steps or cfg.warmup_epochs * steps_per_epoch
        self.steps = 0
        self.scheduled = [g["lr"] for g in optimizer.param_groups]  # what the schedule set, before warm-up
        self._warm()
        self.set_momentum(0)

    def _warm(self) -> None:
        if not self.warmup:
            return
        done = min(self.steps, self.warmup) / self.warmup
        factor = self.cfg.warmup_start_factor + (1 - self.cfg.warmup_start_factor) * done
        for group, lr in zip(self.optimizer.param_groups, self.scheduled):
            group["lr"] = lr * factor

    def _step_inner(self, *args: float) -> None:
        if self.warmup:  # the schedule steps from its own value, not the warmed one
            for group, lr in zip(self.optimizer.param_groups, self.scheduled):
                group["lr"] = lr
        self.inner.step(*args)
        self.scheduled = [g["lr"] for g in self.optimizer.param_groups]

    def step_batch(self) -> None:
        """Call after each optimiser step."""
        self.steps += 1
        if self.per_batch:
            self._step_inner()
        self._warm()

    def step_epoch(self, epoch: int, val_loss: float) -> None:
        """Call after epoch ``epoch`` (0-based) with its validation loss."""
        if self.plateau:
            self._step_inner(val_loss)
        elif self.inner is not None and not self.per_batch:
            self._step_inner()
        self._warm()
        self.set_momentum(epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict() if self.inner is not None else None, "steps": self.steps,
                "scheduled": list(self.scheduled)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state["inner"])
        self.steps, self.scheduled = state["steps"], list(state["scheduled"])

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
