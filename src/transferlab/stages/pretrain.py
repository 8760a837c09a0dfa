"""Stage ``pretrain``: write the backbone's initial weights to one file.

Whatever ``backbone.weights`` names (see :mod:`transferlab.models.weights`),
the result is ``paths.weights`` (safetensors) plus a JSON sidecar with the
source, the load report and the preprocessing the weights expect. For
``source`` this stage trains the backbone on the source task first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transferlab.cli import stage_main
from transferlab.config.schema import ExperimentConfig, SchedulerConfig, OptimizerConfig
from transferlab.data import load_prepared, read_prepared_meta
from transferlab.models.assemble import Normalisation, build_backbone, build_model, resolve_input_size
from transferlab.models.weights import (
    kind_of, load_backbone_state, read_weights_file, save_weights, torchvision_state_dict,
)
from transferlab.training.loop import Batches, steps_per_epoch, TrainSettings, fit
from transferlab.training.optim import Schedule, create_optimizer
from transferlab.training.param_groups import param_groups
from transferlab.training.runtime import configure_threads, resolve_device, seed_everything


def train_source_task(cfg: ExperimentConfig, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """Train backbone + linear head on the source classes; keep the backbone."""
    data = load_prepared(Path(cfg.paths.prepared) / "source")
    norm = Normalisation.for_channels(data.mean, data.std, cfg.backbone.channels)
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


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    seed_everything(cfg.seed)
    configure_threads(cfg.trainer.num_threads)
    spec = cfg.backbone.weights
    kind = kind_of(spec)
    meta: dict[str, Any] = {"weights": spec, "kind": kind, "backbone": cfg.backbone.name}
    state, extra = None, {}
    if kind == "torchvision":
        state, extra = torchvision_state_dict(cfg.backbone.name, spec)  # type: ignore[arg-type]
    elif kind == "mlflow":
        from transferlab.tracking.models import mlflow_state_dict

        state, extra = mlflow_state_dict(spec, uri=cfg.tracking.uri)  # type: ignore[arg-type]
    elif kind == "file":
        state = read_weights_file(spec)  # type: ignore[arg-type]
    weights_size = extra.get("input_size")
    if weights_size and cfg.backbone.input_size not in (None, weights_size):
        print(f"pretrain: note: these weights were trained at {weights_size} px; backbone.input_size="
              f"{cfg.backbone.input_size} overrides that (null follows the weights)")
    data_size = max(read_prepared_meta(Path(cfg.paths.prepared) / "target")["image_size"])
    cfg = resolve_input_size(cfg, weights_size=weights_size, data_size=data_size)
    if kind == "source":
        backbone, extra = train_source_task(cfg, resolve_device(cfg.trainer.device))
    else:
        backbone = build_backbone(cfg.backbone)
    meta.update(extra)
    if state is not None:
        report = load_backbone_state(backbone, state, source=str(spec))
        meta["load_report"] = report.as_dict()
        print(f"pretrain: loaded {spec}: {len(report.missing)} missing, {len(report.unexpected)} unexpected, "
              f"{len(report.ignored)} replaced-head keys ignored")
        for label, keys in (("missing", report.missing), ("unexpected", report.unexpected)):
            if keys:
                print(f"pretrain: {label} keys: {keys[:10]}{' ...' if len(keys) > 10 else ''}")
    meta["input_size"] = cfg.backbone.input_size
    save_weights(cfg.paths.weights, backbone, meta)
    print(f"pretrain: wrote {cfg.paths.weights} ({kind}, input size {cfg.backbone.input_size} px)")
    return meta


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
