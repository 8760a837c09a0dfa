"""Stage ``pretrain``: write the backbone's initial weights to one file.

Whatever ``backbone.weights`` names (see :mod:`transferlab.models.weights`),
the result is ``paths.weights`` (safetensors) plus a JSON sidecar with the
source, the load report and the preprocessing the weights expect. For
``source`` this stage trains the backbone on the source task first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from transferlab.cli import stage_main
from transferlab.config.schema import ExperimentConfig, SchedulerConfig, OptimizerConfig
from transferlab.data import load_prepared
from transferlab.models.assemble import Normalisation, build_backbone, build_model
from transferlab.models.weights import (
    kind_of, load_backbone_state, mlflow_state_dict, read_weights_file, save_weights, torchvision_state_dict,
)
from transferlab.training.loop import Batches, steps_per_epoch, TrainSettings, fit
from transferlab.training.optim import Schedule, create_optimizer
from transferlab.training.param_groups import param_groups
from transferlab.training.runtime import configure_threads, resolve_device, seed_everything


def train_source_task(cfg: ExperimentConfig, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """Train backbone + linear head on the source classes; keep the backbone."""
    data = load_prepared(Path(cfg.paths.prepared) / "source")
    norm = Normalisation(*_normalisation(data.mean, data.std, cfg.backbone.channels))
    source_cfg = _source_task_config(cfg)
    model, backbone = build_model(source_cfg, num_classes=data.num_classes, data_channels=data.channels,
                                  normalisation=norm)
    model.to(device)
    p = cfg.pretrain
    opt_cfg = OptimizerConfig(name="sgd", lr=p.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    optimizer = create_optimizer(param_groups(model, lr=p.lr, backbone_lr_mult=1.0, weight_decay=5e-4), opt_cfg)
    train, val = (Batches(data.splits[k].images.to(device), data.splits[k].labels.to(device)) for k in ("train", "val"))
    steps = steps_per_epoch(len(train), p.batch_size)
    schedule = Schedule(optimizer, SchedulerConfig(name="onecycle"), epochs=p.epochs, steps_per_epoch=steps)
    settings = TrainSettings(epochs=p.epochs, batch_size=p.batch_size, eval_batch_size=cfg.trainer.eval_batch_size,
                             progress=cfg.trainer.progress, seed=cfg.seed, amp=cfg.trainer.amp,
                             channels_last=cfg.trainer.channels_last)
    result = fit(model, model.head, train, val, optimizer, schedule, settings, desc="pretrain (source task)")
    meta = {"mean": norm.mean, "std": norm.std, "input_size": cfg.backbone.input_size,
            "source_task": {"classes": data.class_names, "epochs": p.epochs,
                            "val_acc": result.history[result.best_epoch]["val_acc"],
                            "history": result.history, "data_hash": data.meta.get("data_hash")}}
    return backbone, meta


def _source_task_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same backbone with a plain linear head and no regularisation."""
    from dataclasses import replace

    from transferlab.config.schema import HeadConfig, RegularisationConfig

    return replace(cfg, head=HeadConfig(name="linear"), regularisation=RegularisationConfig())


def _normalisation(mean: list[float], std: list[float], channels: int) -> tuple[list[float], list[float]]:
    """Data statistics for the channels the backbone sees (grey data repeated to RGB)."""
    if len(mean) == channels:
        return list(mean), list(std)
    if len(mean) == 1:
        return mean * channels, std * channels
    return [sum(mean) / len(mean)], [sum(std) / len(std)]


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    seed_everything(cfg.seed)
    configure_threads(cfg.trainer.num_threads)
    spec = cfg.backbone.weights
    kind = kind_of(spec)
    backbone = build_backbone(cfg.backbone)
    meta: dict[str, Any] = {"weights": spec, "kind": kind, "backbone": cfg.backbone.name}
    if kind == "source":
        backbone, extra = train_source_task(cfg, resolve_device(cfg.trainer.device))
        meta.update(extra)
    elif kind != "none":
        if kind == "torchvision":
            state, extra = torchvision_state_dict(cfg.backbone.name, spec)  # type: ignore[arg-type]
        elif kind == "mlflow":
            import mlflow

            mlflow.set_tracking_uri(cfg.tracking.uri)
            state, extra = mlflow_state_dict(spec)  # type: ignore[arg-type]
        else:
            state, extra = read_weights_file(spec), {}  # type: ignore[arg-type]
        report = load_backbone_state(backbone, state, source=str(spec))
        meta.update(extra)
        meta["load_report"] = report.as_dict()
        print(f"pretrain: loaded {spec}: {len(report.missing)} missing, {len(report.unexpected)} unexpected, "
              f"{len(report.ignored)} replaced-head keys ignored")
        for label, keys in (("missing", report.missing), ("unexpected", report.unexpected)):
            if keys:
                print(f"pretrain: {label} keys: {keys[:10]}{' ...' if len(keys) > 10 else ''}")
    if "input_size" in meta and meta["input_size"] != cfg.backbone.input_size:
        print(f"pretrain: note: the weights were trained at {meta['input_size']} px; "
              f"backbone.input_size is {cfg.backbone.input_size}")
    save_weights(cfg.paths.weights, backbone, meta)
    print(f"pretrain: wrote {cfg.paths.weights} ({kind})")
    return meta


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
