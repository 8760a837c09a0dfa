"""One place that turns a config and the prepared data into everything training needs.

:func:`build_training` decides the model spec, builds the model, loads the initial
backbone weights, plans the freezing, and assembles the parameter groups, the
optimiser, the schedule and the loop's settings. ``pretrain`` (the source task),
``finetune``, the tests and the benchmark all train through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from transferlab.errors import ConfigError
from transferlab.config.schema import (
    DropoutConfig, ExperimentConfig, HeadConfig, RegularisationConfig, TrainerConfig,
)
from transferlab.data import PreparedData
from transferlab.models.assemble import FineTuneModel, ModelSpec, build_backbone, build_model
from transferlab.models.backbones import Backbone, Layer, backbone_layers
from transferlab.models.heads import class_weights
from transferlab.training.augment import create_augment
from transferlab.training.freezing import FreezePlan, apply_freeze, frozen_norm_layers, plan_freeze
from transferlab.training.batches import (
    Batches, StreamedBatches, memory_budget, place_splits, split_bytes,
)
from transferlab.training.distributed import Context, context, device_for, local_batch_size, shard_indices
from transferlab.training.loop import (
    EarlyStopping, EpochCallback, FitResult, Hook, TrainSettings, fit, steps_per_epoch,
)
from transferlab.training.maxnorm import max_norm_weights
from transferlab.training.optim import Schedule, create_optimizer, scaled_lr
from transferlab.training.resume import LastCheckpoint
from transferlab.training.param_groups import param_groups


@dataclass
class Training:
    cfg: ExperimentConfig  # with backbone.input_size decided
    spec: ModelSpec
    model: FineTuneModel
    backbone: Backbone
    plan: FreezePlan
    groups: list[dict[str, Any]]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    settings: TrainSettings
    device: torch.device
    placement: dict[str, str]  # train/val: resident on the device, or streamed to it
    ctx: Context  # torchrun's processes (one without torchrun)
    optimiser_steps: int  # per epoch
    reinitialised: tuple[str, ...] = ()  # backbone layers given fresh weights (backbone.reinit_last_n)

    def batches(self, data: PreparedData, split: str) -> Batches | StreamedBatches:
        """A split of ``data`` for the loop: a uint8 copy resident on the device, or streamed to it; under
        torchrun, only this rank's shard of it."""
        s = data.splits[split]
        images, labels = s.images, s.labels
        total = None
        if self.ctx.enabled:
            shard = shard_indices(len(labels), self.ctx)
            images, labels, total = images[shard], labels[shard], len(labels)
        if self.placement.get(split, "resident") == "stream":
            return StreamedBatches(images, labels, self.device, total=total)
        # A fresh copy even on the CPU: the prepared images may be memory-mapped.
        resident = torch.empty(images.shape, dtype=images.dtype, device=self.device).copy_(images)
        return Batches(resident, labels.to(self.device), total=total)

    def fit(self, train: Batches | StreamedBatches, val: Batches | StreamedBatches, *,
            on_epoch_end: EpochCallback | None = None, desc: str = "train", hooks: list[Hook] | None = None,
            last: LastCheckpoint | None = None, extra: dict[str, Any] | None = None) -> FitResult:
        """Fit; with ``last``, save it after every epoch (with the caller's ``extra``) and continue
        from it when it holds an interrupted fit of this setting."""
        resume = last.load() if last is not None else None
        if resume is not None:
            print(f"{desc}: resuming after epoch {resume['epoch'] + 1} from {last.path}")  # type: ignore[union-attr]
        save = ((lambda state: last.save({**state, "extra": extra or {}}))
                if last is not None and self.ctx.main else None)
        return fit(self.model, self.model.head, train, val, self.optimizer, self.schedule, self.settings,
                   on_epoch_end=on_epoch_end, desc=desc, hooks=hooks, resume=resume, save_last=save)


def build_training(cfg: ExperimentConfig, data: PreparedData, *, device: torch.device | str = "cpu",
                   weights_meta: Mapping[str, Any] | None = None,
                   backbone_state: Mapping[str, torch.Tensor] | None = None, weights_source: str = "weights",
                   checkpoint: Path | None = None) -> Training:
    """Everything ``cfg`` trains on ``data`` with. Every check that depends on the data (head
    size, layer count) fails here, before any training.

    ``weights_meta``: the initial weights' metadata (input size, normalisation);
    ``backbone_state``: their tensors, loaded into the backbone (named ``weights_source`` in errors).
    Under torchrun each process builds the same (:mod:`transferlab.training.distributed`); rank 0 alone
    writes ``checkpoint``.
    """
    from transferlab.models.weights import load_backbone_state, reinit_choice, reinit_last_layers

    ctx = context(torch.device(device))
    device = device_for(torch.device(device), ctx)
    n_train = len(data.splits["train"])
    batch_size = batch_size_for(cfg.trainer, n_train)
    optimiser_steps = math.ceil(steps_per_epoch(n_train, batch_size, ctx) / cfg.trainer.accumulate_grad_batches)
    cfg = replace(cfg, trainer=replace(cfg.trainer, batch_size=batch_size,
                                       epochs=epochs_for(cfg.trainer, optimiser_steps)))
    placement = plan_placement(cfg, data, device)
    spec = ModelSpec.decide(cfg, class_names=data.class_names, data_channels=data.channels,
                            data_size=max(data.image_size), data_mean=data.mean, data_std=data.std,
                            weights_meta=dict(weights_meta or {}))
    cfg = replace(cfg, backbone=spec.backbone)
    model, backbone = build_model(spec)
    if cfg.trainer.sync_batchnorm and ctx.enabled:
        if device.type != "cuda":
            raise ConfigError("trainer.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only; this torchrun "
                              f"job trains on {device.type}")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the top module
    f = cfg.regularisation.freeze
    plan = plan_freeze(model, backbone, first_n=f.first_n, patterns=list(f.patterns), whole_backbone=f.backbone,
                       method=f.method, pretrained=cfg.backbone.weights is not None)
    reinit: list[Layer] = []
    if backbone_state is not None:
        load_backbone_state(backbone, backbone_state, source=weights_source)
        reinit = reinit_choice(backbone, cfg.backbone.reinit_last_n, plan.frozen)
        if reinit:
            with torch.random.fork_rng(devices=[]):  # the same draws for every process, the run's own untouched
                torch.manual_seed(cfg.seed)
                fresh = build_backbone(spec.backbone)
            reinit_last_layers(backbone, reinit, fresh)
    apply_freeze(model, plan)
    o, t = cfg.optimizer, cfg.trainer
    groups = param_groups(model, lr=scaled_lr(o, t.batch_size * t.accumulate_grad_batches),
                          backbone_lr_mult=o.backbone_lr_mult, weight_decay=o.weight_decay,
                          zero_lr=plan.frozen if plan.method == "zero_lr" else frozenset(),
                          exclude=plan.frozen if plan.method == "requires_grad" else frozenset(),
                          layers=[[f"backbone.{p}" for p in layer.params] for layer in backbone_layers(backbone)],
                          layer_decay=o.layer_decay)
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(groups, cfg.optimizer)
    local_batch = local_batch_size(t.batch_size, ctx)
    schedule = Schedule(optimizer, cfg.scheduler, epochs=t.epochs, steps_per_epoch=optimiser_steps)
    mn, es = cfg.regularisation.max_norm, t.early_stopping
    settings = TrainSettings(
        epochs=t.epochs, batch_size=local_batch, ctx=ctx, eval_batch_size=t.eval_batch_size, monitor=t.monitor,
        label_smoothing=cfg.regularisation.label_smoothing, aux_loss_weight=t.aux_loss_weight,
        max_norm=mn.value if mn.enabled else None,
        max_norm_weights=max_norm_weights(model, list(mn.layers)) if mn.enabled else [],
        frozen_norms=frozen_norm_layers(model, plan.frozen), frozen=plan.frozen,
        head_only_epochs=f.head_only_epochs, amp=t.amp, amp_dtype=t.amp_dtype, channels_last=t.channels_last, compile=t.compile,
        progress=t.progress, seed=cfg.seed, checkpoint=checkpoint if ctx.main else None,
        augment=create_augment(cfg.augment, size=spec.input_size, num_classes=spec.num_classes),
        class_weight=class_weights(data.splits["train"].labels.to(device), spec.num_classes, t.class_weight),
        accumulate=t.accumulate_grad_batches, clip_norm=t.gradient_clip_val,
        early_stopping=EarlyStopping(monitor=es.monitor or t.monitor, patience=es.patience,
                                     min_delta=es.min_delta) if es.enabled else None,
        ema_decay=t.ema.decay if t.ema.enabled else None, ema_start_epoch=t.ema.start_epoch)
    return Training(cfg, spec, model, backbone, plan, groups, optimizer, schedule, settings, device, placement,
                    ctx, optimiser_steps, tuple(layer.name for layer in reinit))


def batch_size_for(t: TrainerConfig, n_train: int) -> int:
    """``trainer.batch_size``, smaller where ``trainer.min_steps_per_epoch`` asks for more optimiser steps
    per epoch than it gives on ``n_train`` images."""
    if t.min_steps_per_epoch is None:
        return t.batch_size
    steps = t.min_steps_per_epoch * t.accumulate_grad_batches
    return max(1, min(t.batch_size, n_train // steps))


def epochs_for(t: TrainerConfig, optimiser_steps: int) -> int:
    """``trainer.epochs``, or fewer where ``trainer.max_steps`` comes first at ``optimiser_steps`` per epoch
    (Lightning's max_steps, rounded up to whole epochs: every epoch sees the whole training split)."""
    if t.max_steps is None:
        return t.epochs
    return min(t.epochs, math.ceil(t.max_steps / optimiser_steps))


def plan_placement(cfg: ExperimentConfig, data: PreparedData, device: torch.device) -> dict[str, str]:
    """Which of the training and validation splits fit in ``trainer.memory_budget_mb`` (resident)
    and which stream; refused before any work when not even streaming fits."""
    train = data.splits["train"].images
    per_image = split_bytes(train[:1]) if len(train) else 0
    sizes = {name: split_bytes(data.splits[name].images) for name in ("train", "val")}
    batch_bytes = per_image * max(cfg.trainer.batch_size, cfg.trainer.eval_batch_size)
    return place_splits(sizes, batch_bytes, memory_budget(cfg.trainer.memory_budget_mb, device))


def source_task_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The source task's experiment: the same backbone with a plain linear head, no regularisation but
    ``pretrain.input_dropout`` (no freezing, no max-norm), no class weights, accumulation, clipping,
    early stopping or EMA, trained with ``pretrain``'s own recipe (optimizer, scheduler, augmentation,
    epochs, batch size); the trainer's device settings (amp, channels-last, compile) carry over."""
    p = cfg.pretrain
    plain = TrainerConfig()  # the fine-tuning controls (accumulation, clipping, EMA, ...) stay with finetune
    trainer = replace(cfg.trainer, epochs=p.epochs, batch_size=p.batch_size, monitor="val_acc", max_steps=None,
                      class_weight=None, accumulate_grad_batches=1, gradient_clip_val=None,
                      early_stopping=plain.early_stopping, ema=plain.ema)
    regularisation = RegularisationConfig(dropout=DropoutConfig(input=p.input_dropout))
    return replace(cfg, head=HeadConfig(name="linear"), regularisation=regularisation,
                   optimizer=p.optimizer, scheduler=p.scheduler, augment=p.augment, trainer=trainer)
