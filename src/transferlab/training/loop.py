"""The training loop.

Data lives on the device as uint8 tensors for the whole run, batches being
index slices of it, or streams there from host memory when it does not fit
(:mod:`transferlab.training.batches`). Losses and hits accumulate on the
device and reach the host once per epoch, so no step waits for a host-device
sync.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from transferlab.models.heads import Head
from transferlab.training.augment import Augment
from transferlab.training.batches import Batches, StreamedBatches
from transferlab.training.distributed import SINGLE, Context, all_sum, local_order, wrap
from transferlab.training.freezing import set_backbone_trainable, set_train_mode
from transferlab.training.maxnorm import apply_max_norm
from transferlab.training.optim import Schedule
from transferlab.training.resume import rng_state, set_rng_state
from transferlab.training.runtime import share_threads

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    eval_batch_size: int = 1024
    monitor: str = "val_acc"
    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.4
    max_norm: float | None = None
    max_norm_weights: list[torch.Tensor] = field(default_factory=list)
    frozen_norms: list[nn.Module] = field(default_factory=list)
    frozen: frozenset[str] = frozenset()
    head_only_epochs: int = 0
    amp: bool = False  # autocast on CUDA
    amp_dtype: str = "bfloat16"  # or float16, which trains with a gradient scaler (on any device)
    channels_last: bool = False
    compile: bool = False
    progress: bool = True
    seed: int = 0
    augment: Augment | None = None  # applied to each training batch (uint8, on the device)
    class_weight: torch.Tensor | None = None  # per-class weights of the training loss (on the device)
    accumulate: int = 1  # batches per optimiser step
    clip_norm: float | None = None  # clip the gradients' global L2 norm
    early_stopping: EarlyStopping | None = None
    ema_decay: float | None = None  # evaluate and keep an exponential moving average of the weights
    ema_start_epoch: int = 0
    checkpoint: Path | None = None  # the best state dict goes here
    ctx: Context = SINGLE  # torchrun's processes (batch_size is then this rank's share of the global batch)


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not beaten its best by more than ``min_delta`` for ``patience``
    epochs (Keras' and Lightning's EarlyStopping); the best checkpoint is restored either way."""

    monitor: str = "val_acc"
    patience: int = 5
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        self.maximise = self.monitor.endswith("acc")
        self.best, self.waited = (-math.inf if self.maximise else math.inf), 0

    def should_stop(self, value: float) -> bool:
        improved = value > self.best + self.min_delta if self.maximise else value < self.best - self.min_delta
        if improved:
            self.best, self.waited = value, 0
        else:
            self.waited += 1
        return self.waited >= self.patience


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_value: float
    stopped_epoch: int | None = None  # the last epoch (0-based) when early stopping ended the run


EpochCallback = Callable[[int, dict[str, float]], None]
AUGMENT_SEED_OFFSET = 0x5EED  # the augmentation's generator: seed + this


def _autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16") -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def grad_scaler(s: "TrainSettings", device: torch.device) -> torch.amp.GradScaler:
    """torch's loss scaler for float16 training (``amp_dtype=float16``); a pass-through otherwise.
    Enabled, its ``step`` reads back whether the gradients overflowed: one host sync per optimiser
    step, the price of float16 (bf16 needs none)."""
    return torch.amp.GradScaler(device.type, enabled=s.amp and s.amp_dtype == "float16")


def _split_output(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


Data = Batches | StreamedBatches


@torch.no_grad()
def evaluate(model: nn.Module, head: Head, data: Data, *, batch_size: int, amp: bool = False,
             amp_dtype: str = "bfloat16", channels_last: bool = False,
             ctx: Context = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy as 0-d device tensors (over every rank's shard). Never augments."""
    # Restore each module's own mode afterwards: frozen BatchNorm must stay in eval.
    modes = [m.training for m in model.modules()]
    model.eval()
    device = data.device
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    for x, y in data.eval_batches(batch_size):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += head.loss(logits, y) * y.shape[0]
        hits += (head.predict(logits) == y).sum()
    for module, mode in zip(model.modules(), modes):
        module.training = mode
    loss_sum, hits, n = all_sum([loss_sum, hits, torch.tensor(float(len(data)), device=device)], ctx)
    n = n.clamp(min=1)
    return loss_sum / n, hits.double() / n


def save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def steps_per_epoch(n: int, batch_size: int, ctx: Context = SINGLE) -> int:
    """Batches per epoch over a split of ``n`` at a global ``batch_size``; under torchrun, what every rank
    takes from its shard (at least ``n // world`` images, ``batch_size // world`` at a time)."""
    n, batch_size = n // ctx.world, batch_size // ctx.world
    steps = math.ceil(n / batch_size)
    if n % batch_size == 1 and steps > 1:
        steps -= 1  # a last batch of one breaks BatchNorm in training mode
    return steps


class Hook:
    """A small extension of the training step, as in torchvision's reference ``train.py``: the loop
    calls every hook at these points and never reads a device value from one inside an epoch."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the epoch's first step."""

    def on_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch (uint8 images, labels) before the forward pass."""
        return x, y

    def after_step(self) -> None:
        """After the optimiser's (and a per-batch schedule's) step."""

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        """Device scalars to report for the epoch (read once, at its end)."""
        return {}


class AugmentHook(Hook):
    """Training-time augmentation, with its own seeded generator on the data's device."""

    def __init__(self, augment: Augment, *, seed: int, device: torch.device) -> None:
        self.augment = augment
        self.generator = torch.Generator(device).manual_seed(seed + AUGMENT_SEED_OFFSET)  # seed: + rank

    def on_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(x, y, self.generator)


class MaxNormHook(Hook):
    """Max-norm after every step on the constrained weights that train this epoch; reports the largest
    unit norm met. Frozen weights are never touched, max-norm included (as in Keras, where a constraint
    is part of the update that a non-trainable layer does not get)."""

    def __init__(self, weights: list[torch.Tensor], value: float, *, frozen_ids: set[int],
                 device: torch.device) -> None:
        self.weights, self.value, self.frozen_ids, self.device = weights, value, frozen_ids, device
        self.constrained: list[torch.Tensor] = []
        self.largest = torch.zeros((), device=device)

    def on_epoch_start(self, epoch: int) -> None:
        self.constrained = [w for w in self.weights if w.requires_grad and id(w) not in self.frozen_ids]
        self.largest = torch.zeros((), device=self.device)

    def after_step(self) -> None:
        if self.constrained:
            self.largest = torch.maximum(self.largest, apply_max_norm(self.constrained, self.value))

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        return {"max_unit_norm": self.largest} if self.weights else {}


class EmaHook(Hook):
    """An exponential moving average of the weights and float buffers, updated after every optimiser
    step; before ``start_epoch`` it follows the weights. Hand-written on ``torch._foreach_lerp_`` (as
    timm's ModelEmaV3): ``torch.optim.swa_utils.AveragedModel.update_parameters`` reads its device
    counter on the host at every update, a sync per step."""

    def __init__(self, model: nn.Module, decay: float, start_epoch: int) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.start_epoch, self.averaging = decay, start_epoch, start_epoch <= 0
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()]))
        self.floats = ([e for e, _ in pairs if e.is_floating_point()], [m for e, m in pairs if e.is_floating_point()])
        self.others = ([e for e, _ in pairs if not e.is_floating_point()],
                       [m for e, m in pairs if not e.is_floating_point()])

    def on_epoch_start(self, epoch: int) -> None:
        self.averaging = epoch >= self.start_epoch

    @torch.no_grad()
    def after_step(self) -> None:
        if self.averaging:
            torch._foreach_lerp_(self.floats[0], self.floats[1], 1.0 - self.decay)
        else:
            torch._foreach_copy_(self.floats[0], self.floats[1])
        if self.others[0]:
            torch._foreach_copy_(self.others[0], self.others[1])


def standard_hooks(model: nn.Module, s: TrainSettings, device: torch.device) -> list[Hook]:
    """The hooks that ``settings`` asks for, in the order they run."""
    hooks: list[Hook] = []
    if s.augment is not None:
        hooks.append(AugmentHook(s.augment, seed=s.seed + s.ctx.rank, device=device))
    if s.max_norm is not None:
        frozen_ids = {id(p) for name, p in model.named_parameters() if name in s.frozen}
        hooks.append(MaxNormHook(s.max_norm_weights, s.max_norm, frozen_ids=frozen_ids, device=device))
    if s.ema_decay is not None:  # last: it averages the constrained weights
        hooks.append(EmaHook(model, s.ema_decay, s.ema_start_epoch))
    return hooks


def train_one_epoch(model: nn.Module, head: Head, forward: Callable[[torch.Tensor], object], data: Data,
                    optimizer: torch.optim.Optimizer, schedule: Schedule, s: TrainSettings, *,
                    order: torch.Tensor, hooks: list[Hook], progress: "_NoProgress",
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, torch.Tensor]:
    """One pass over ``data`` in ``order`` (a CPU permutation); the epoch's training loss, accuracy and
    hook metrics, as device scalars (nothing here waits for the device)."""
    device = data.device
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    largest_grad = torch.zeros((), device=device)
    seen = 0
    steps = steps_per_epoch(data.split_len, s.batch_size * s.ctx.world, s.ctx)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = scaler if scaler is not None else grad_scaler(s, device)
    for step, (x, y) in enumerate(data.train_batches(order, s.batch_size, steps)):
        for hook in hooks:
            x, y = hook.on_batch(x, y)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, s.amp, s.amp_dtype):
            logits, aux = _split_output(forward(x))
            logits = logits.float()
            loss = head.loss(logits, y, s.label_smoothing, weight=s.class_weight)
            if aux is not None:
                loss = loss + s.aux_loss_weight * head.loss(aux.float(), y, s.label_smoothing, weight=s.class_weight)
        if step % s.accumulate == 0:
            optimizer.zero_grad(set_to_none=True)
        # Accumulation: each batch's loss counts 1/k of the step's (the last step of an epoch may have fewer).
        scaler.scale(loss / s.accumulate if s.accumulate > 1 else loss).backward()
        if (step + 1) % s.accumulate == 0 or step + 1 == steps:
            if s.clip_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
                norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], s.clip_norm,
                                                      foreach=True)
                largest_grad = torch.maximum(largest_grad, norm.detach())
            scaler.step(optimizer)  # skipped when a scaled gradient overflowed
            scaler.update()
            schedule.step_batch()
            for hook in hooks:
                hook.after_step()
        loss_sum += loss.detach() * y.shape[0]
        hits += head.hits(logits.detach(), y)  # soft (mixed) targets count against their dominant class
        seen += y.shape[0]
        progress.update(1)
    loss_sum, hits, seen = all_sum([loss_sum, hits, torch.tensor(float(seen), device=device)], s.ctx)
    metrics = {"train_loss": loss_sum / seen, "train_acc": hits.double() / seen}
    if s.clip_norm is not None:
        metrics["grad_norm"] = largest_grad  # the largest before clipping
    for hook in hooks:
        metrics.update(hook.epoch_metrics())
    return metrics


def fit(model: nn.Module, head: Head, train: Data, val: Data, optimizer: torch.optim.Optimizer,
        schedule: Schedule, settings: TrainSettings, *, on_epoch_end: EpochCallback | None = None,
        desc: str = "train", hooks: list[Hook] | None = None, resume: dict[str, Any] | None = None,
        save_last: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Train ``model``; return per-epoch metrics and the best epoch.

    Each epoch is :func:`train_one_epoch` then :func:`evaluate` on ``val``, with the
    ``settings``' hooks (augmentation, max-norm, EMA) plus ``hooks``. The best state dict
    (by ``settings.monitor``) is written to ``settings.checkpoint`` as soon as it is
    reached, and loaded back into ``model`` at the end.

    ``save_last`` gets, after every epoch, the whole state (:mod:`transferlab.training.resume`);
    given back as ``resume``, the fit continues after that epoch exactly as if never stopped.
    """
    s = settings
    device = train.device

    def make_forward() -> Callable[[torch.Tensor], object]:
        net = wrap(model, s.ctx, device)  # DDP under torchrun, over the parameters that train now
        return torch.compile(net) if s.compile else net

    generator = torch.Generator().manual_seed(s.seed)  # the batch order
    all_hooks = [*standard_hooks(model, s, device), *(hooks or [])]
    ema = next((h for h in all_hooks if isinstance(h, EmaHook)), None)
    scored = ema.module if ema is not None else model  # what is evaluated and checkpointed
    stopper = copy.copy(s.early_stopping)  # fresh counters for this run
    stopped_epoch = None
    maximise = s.monitor.endswith("acc")
    best_value, best_epoch = -math.inf if maximise else math.inf, -1
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    progress = _progress(total=s.epochs * steps_per_epoch(train.split_len, s.batch_size * s.ctx.world, s.ctx),
                         desc=desc, enabled=s.progress and s.ctx.main, epochs=s.epochs)
    augment = next((h for h in all_hooks if isinstance(h, AugmentHook)), None)
    scaler = grad_scaler(s, device)
    start = 0
    if resume is not None:
        start = resume["epoch"] + 1
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resume["ema"])
        generator.set_state(resume["rng"]["order"])
        if augment is not None:
            augment.generator.set_state(resume["rng"]["augment"])
        set_rng_state(resume["rng"]["global"])
        best_value, best_epoch, best_state = resume["best_value"], resume["best_epoch"], resume["best_state"]
        history = list(resume["history"])
        if stopper is not None:
            stopper.best, stopper.waited = resume["stopper"]
        if s.checkpoint is not None and best_state is not None:
            save_atomic(best_state, s.checkpoint)  # an output folder emptied since (DVC) gets it back
        progress.update(start * steps_per_epoch(train.split_len, s.batch_size * s.ctx.world, s.ctx))
    staged = s.head_only_epochs > 0
    if staged:
        set_backbone_trainable(model, start >= s.head_only_epochs, keep_frozen=s.frozen)
    forward = make_forward()
    if s.ctx.enabled:  # DDP gave every rank rank 0's weights; dropout now draws apart per rank
        torch.manual_seed(s.seed + s.ctx.rank)
    try:
        for epoch in range(start, s.epochs):
            share_threads()
            if staged and epoch == s.head_only_epochs:
                set_backbone_trainable(model, True, keep_frozen=s.frozen)
                if s.ctx.enabled:  # DDP reduces the gradients of the parameters that trained when it was built
                    forward = make_forward()
            set_train_mode(model, s.frozen_norms)
            if staged and epoch < s.head_only_epochs:
                # The backbone is not trained yet: keep its BatchNorm stats too.
                for module in model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
                            not p.requires_grad for p in module.parameters(recurse=False)):
                        module.eval()
            for hook in all_hooks:
                hook.on_epoch_start(epoch)
            order = local_order(torch.randperm(train.split_len, generator=generator), s.ctx)
            trained = train_one_epoch(model, head, forward, train, optimizer, schedule, s, order=order,
                                      hooks=all_hooks, progress=progress, scaler=scaler)
            val_loss, val_acc = evaluate(scored, head, val, batch_size=s.eval_batch_size, amp=s.amp,
                                         amp_dtype=s.amp_dtype, channels_last=s.channels_last, ctx=s.ctx)
            # The epoch's one host sync.
            metrics = {"train_loss": trained.pop("train_loss").item(), "train_acc": trained.pop("train_acc").item(),
                       "val_loss": val_loss.item(), "val_acc": val_acc.item(), "lr": optimizer.param_groups[0]["lr"]}
            head_lrs = [g["lr"] for g in optimizer.param_groups if str(g.get("name", "")).startswith("head")]
            backbone_lrs = [g["lr"] for g in optimizer.param_groups if str(g.get("name", "")).startswith("backbone")]
            if head_lrs:
                metrics["lr_head"] = head_lrs[0]
            if backbone_lrs:
                metrics["lr_backbone"] = backbone_lrs[0]
            momentum = schedule.momentum()
            if momentum is not None:
                metrics["momentum"] = momentum
            metrics.update({k: v.item() for k, v in trained.items()})
            if not all(math.isfinite(metrics[k]) for k in ("train_loss", "val_loss")):
                raise FloatingPointError(f"loss became {metrics['train_loss']} in epoch {epoch + 1}; lower the "
                                         "learning rate or enable max-norm")
            value = metrics[s.monitor]
            if (value > best_value) if maximise else (value < best_value):
                best_value, best_epoch = value, epoch
                best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
                if s.checkpoint is not None:
                    save_atomic(best_state, s.checkpoint)
            metrics["best_" + s.monitor] = best_value
            history.append(metrics)
            progress.epoch_end(epoch, metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            schedule.step_epoch(epoch, metrics["val_loss"])
            stop = stopper is not None and stopper.should_stop(metrics[stopper.monitor]) and epoch + 1 < s.epochs
            if save_last is not None and not stop and epoch + 1 < s.epochs:
                save_last({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "ema": ema.module.state_dict() if ema else None,
                           "rng": {"order": generator.get_state(), "global": rng_state(),
                                   "augment": augment.generator.get_state() if augment else None},
                           "best_value": best_value, "best_epoch": best_epoch, "best_state": best_state,
                           "history": history, "stopper": (stopper.best, stopper.waited) if stopper else None})
            if stop:
                assert stopper is not None
                stopped_epoch = epoch
                log.warning("%s: early stopping after epoch %d: %s has not improved by more than %g for %d "
                            "epochs; restoring epoch %d", desc, epoch + 1, stopper.monitor, stopper.min_delta,
                            stopper.patience, best_epoch + 1)
                break
    finally:
        progress.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(history, best_epoch, best_value, stopped_epoch)


class _NoProgress:
    def update(self, n: int = 1) -> None: ...
    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class _Bar(_NoProgress):
    """A terminal's progress bar: steps, with the last epoch's numbers beside it."""

    def __init__(self, *, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.bar.set_postfix(epoch=epoch + 1, train_loss=f"{metrics['train_loss']:.3f}",
                             val_acc=f"{metrics['val_acc']:.3f}")

    def close(self) -> None:
        self.bar.close()


class _EpochLines(_NoProgress):
    """Outside a terminal (DVC, CI, SLURM, a log file): one log line per epoch, e.g.
    ``finetune epoch 3/20 train_loss=0.4123 train_acc=0.8750 val_loss=0.3987 val_acc=0.8911``."""

    KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")

    def __init__(self, *, desc: str, epochs: int) -> None:
        self.desc, self.epochs = desc, epochs

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        values = " ".join(f"{k}={metrics[k]:.4f}" for k in self.KEYS)
        log.info("%s epoch %d/%d %s", self.desc, epoch + 1, self.epochs, values)


def _progress(*, total: int, desc: str, enabled: bool, epochs: int) -> _NoProgress:
    if not enabled:
        return _NoProgress()
    if sys.stderr.isatty():  # where tqdm draws
        return _Bar(total=total, desc=desc)
    return _EpochLines(desc=desc, epochs=epochs)
