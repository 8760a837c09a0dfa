"""Stage ``finetune``: train backbone + new head on the target task.

Reads the prepared target data and the initial backbone weights, applies the
configured freezing, max-norm, dropout and learning rates, trains, keeps the
best checkpoint, and records everything in a new MLflow run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from transferlab.config.params import to_container
from transferlab.cli import stage_main
from transferlab.config.schema import ExperimentConfig
from transferlab.data import PreparedData, load_prepared
from transferlab.models.assemble import FineTuneModel, Normalisation, build_model, resolve_input_size
from transferlab.models.backbones import Backbone, backbone_layers
from transferlab.models.weights import load_backbone_state, read_weights_file, read_weights_meta
from transferlab.training.augment import create_augment
from transferlab.training.freezing import FreezePlan, apply_freeze, frozen_norm_layers, plan_freeze
from transferlab.training.loop import Batches, steps_per_epoch, FitResult, TrainSettings, fit
from transferlab.training.maxnorm import max_norm_weights
from transferlab.training.optim import Schedule, create_optimizer
from transferlab.training.param_groups import describe_groups, param_groups
from transferlab.training.runtime import configure_threads, resolve_device, seed_everything

if TYPE_CHECKING:
    from transferlab.tracking.tracker import Tracker

BEST = "best.pt"


@dataclass
class Assembled:
    cfg: ExperimentConfig  # with backbone.input_size decided
    model: FineTuneModel
    backbone: Backbone
    plan: FreezePlan
    groups: list[dict[str, Any]]
    weights_meta: dict[str, Any]


def assemble(cfg: ExperimentConfig, data: PreparedData) -> Assembled:
    """The model with its initial weights, freezing and parameter groups.
    Every check that depends on the data (head size, layer count) fails here,
    before training."""
    meta = read_weights_meta(cfg.paths.weights)
    cfg = resolve_input_size(cfg, weights_size=meta.get("input_size"), data_size=max(data.image_size))
    if "mean" in meta:
        norm = Normalisation.for_channels(meta["mean"], meta["std"], cfg.backbone.channels)
    else:
        norm = Normalisation.for_channels(data.mean, data.std, cfg.backbone.channels)
    model, backbone = build_model(cfg, num_classes=data.num_classes, data_channels=data.channels, normalisation=norm)
    load_backbone_state(backbone, read_weights_file(cfg.paths.weights), source=cfg.paths.weights)
    f = cfg.regularisation.freeze
    plan = plan_freeze(model, backbone, first_n=f.first_n, patterns=list(f.patterns), whole_backbone=f.backbone,
                       method=f.method)
    apply_freeze(model, plan)
    o = cfg.optimizer
    groups = param_groups(model, lr=o.lr, backbone_lr_mult=o.backbone_lr_mult, weight_decay=o.weight_decay,
                          zero_lr=plan.frozen if plan.method == "zero_lr" else frozenset(),
                          exclude=plan.frozen if plan.method == "requires_grad" else frozenset())
    return Assembled(cfg, model, backbone, plan, groups, meta)


def layer_rows(a: Assembled) -> list[dict[str, Any]]:
    """One row per backbone layer and per head module: the per-layer table."""
    lr_of = {name: g["lr"] for g in a.groups for name in g["param_names"]}
    named = [(f"backbone.{n}", m) for n, m in backbone_layers(a.backbone)]
    named += [(n, m) for n, m in a.model.named_modules()
              if n.startswith(("head.", "aux_head")) and any(True for _ in m.parameters(recurse=False))]
    rows = []
    for name, module in named:
        params = [(f"{name}.{p}", t) for p, t in module.named_parameters()]
        count = sum(t.numel() for _, t in params)
        frozen = [p for p, _ in params if p in a.plan.frozen]
        lrs = sorted({lr_of[p] for p, _ in params if p in lr_of})
        rows.append({"layer": name, "type": type(module).__name__, "params": count,
                     "trainable": "no" if len(frozen) == len(params) else ("partly" if frozen else "yes"),
                     "lr": "/".join(f"{x:.3g}" for x in lrs) if lrs else "-"})
    return rows


def _to_device(data: PreparedData, split: str, device: torch.device) -> Batches:
    s = data.splits[split]
    return Batches(s.images.to(device), s.labels.to(device))


def _file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run(cfg: ExperimentConfig, *, tags: dict[str, str] | None = None) -> tuple[str, FitResult]:
    """Train and log; return the MLflow run id and the fit result."""
    from transferlab.tracking.handoff import CHECKPOINT_TAG, file_sha256, write_handoff
    from transferlab.tracking.run import lineage_tags, open_run

    seed_everything(cfg.seed)
    configure_threads(cfg.trainer.num_threads)
    device = resolve_device(cfg.trainer.device)
    data = load_prepared(Path(cfg.paths.prepared) / "target")
    a = assemble(cfg, data)
    cfg = a.cfg
    model = a.model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(a.groups, cfg.optimizer)
    train, val = _to_device(data, "train", device), _to_device(data, "val", device)
    steps = steps_per_epoch(len(train), cfg.trainer.batch_size)
    schedule = Schedule(optimizer, cfg.scheduler, epochs=cfg.trainer.epochs, steps_per_epoch=steps)
    mn = cfg.regularisation.max_norm
    model_dir = Path(cfg.paths.model)
    model_dir.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings(
        epochs=cfg.trainer.epochs, batch_size=cfg.trainer.batch_size, eval_batch_size=cfg.trainer.eval_batch_size,
        monitor=cfg.trainer.monitor, label_smoothing=cfg.regularisation.label_smoothing,
        aux_loss_weight=cfg.trainer.aux_loss_weight, max_norm=mn.value if mn.enabled else None,
        max_norm_weights=max_norm_weights(model, list(mn.layers)) if mn.enabled else [],
        frozen_norms=frozen_norm_layers(model, a.plan.frozen), frozen=a.plan.frozen,
        head_only_epochs=cfg.regularisation.freeze.head_only_epochs, amp=cfg.trainer.amp,
        channels_last=cfg.trainer.channels_last, compile=cfg.trainer.compile, progress=cfg.trainer.progress,
        seed=cfg.seed, checkpoint=model_dir / BEST, augment=create_augment(cfg.augment))
    print(describe_groups(a.groups))

    run_tags = {"stage": "finetune", "backbone": cfg.backbone.name, "head": cfg.head.name,
                **lineage_tags(data_hash=data.meta.get("data_hash"), weights_hash=_file_hash(cfg.paths.weights)),
                **(tags or {})}
    with open_run(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                  tags=run_tags) as tracker:
        run_id = tracker.run_id
        _log_setup(tracker, cfg, a, data, model_dir, device)

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            tracker.log_metrics(metrics, step=epoch + 1)

        started = time.perf_counter()
        try:
            result = fit(model, model.head, train, val, optimizer, schedule, settings,
                         on_epoch_end=on_epoch_end, desc="finetune")
        except BaseException:
            # Interrupted or failed: the best checkpoint so far still goes to the run.
            if (model_dir / BEST).is_file():
                tracker.log_artifact(model_dir / BEST, artifact_path="checkpoint")
            raise
        seconds = time.perf_counter() - started
        best = result.history[result.best_epoch]
        summary = {"best_epoch": result.best_epoch + 1, f"best_{cfg.trainer.monitor}": result.best_value,
                   "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"]}
        # Wall time is a run metric only: in the DVC metric file it would change dvc.lock on every rerun.
        tracker.log_metrics({**{k: float(v) for k, v in summary.items()}, "train_seconds": seconds})
        _write_history(result, Path(cfg.paths.plots) / "history.csv")
        metrics_path = Path(cfg.paths.metrics) / "train.json"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(summary, indent=2))
        tracker.log_artifact(model_dir / BEST, artifact_path="checkpoint")
        tracker.log_artifact(Path(cfg.paths.plots) / "history.csv")
        tracker.set_tags({CHECKPOINT_TAG: file_sha256(model_dir / BEST)})
        write_handoff(model_dir, run_id=run_id, uri=cfg.tracking.uri, checkpoint=model_dir / BEST)
    print(f"finetune: best {cfg.trainer.monitor}={result.best_value:.4f} at epoch {result.best_epoch + 1}; "
          f"MLflow run {run_id}")
    return run_id, result


def _log_setup(tracker: "Tracker", cfg: ExperimentConfig, a: Assembled, data: PreparedData, model_dir: Path,
               device: torch.device) -> None:
    from transferlab.tracking.graph import plot_model
    from transferlab.tracking.run import flatten
    from transferlab.tracking.summary import param_counts, summary_text

    container = to_container(cfg)
    tracker.log_params(flatten(container))
    counts = {f"model.params_{k}": v for k, v in param_counts(a.model, a.plan.frozen).items()}
    tracker.log_params({**counts, "data.num_classes": data.num_classes, "data.class_names": str(data.class_names),
                        "data.train_size": len(data.splits["train"]), "device": str(device),
                        "model.input_size": cfg.backbone.input_size,
                        "freeze.frozen_layers": str(list(a.plan.layers))})
    tracker.log_dict(container, "config/config.yaml")
    tracker.log_dict(a.weights_meta, "config/weights.json")
    tracker.log_dict(data.meta, "config/data.json")
    rows = layer_rows(a)
    with open(model_dir / "layers.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tracker.log_artifact(model_dir / "layers.csv", artifact_path="model_info")
    example = data.splits["val"].images[:1].to(device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        text = summary_text(a.model, example, a.plan.frozen) + "\n\nParameter groups\n" + describe_groups(a.groups) + "\n"
        (tmp_dir / "summary.txt").write_text(text)
        tracker.log_artifact(tmp_dir / "summary.txt", artifact_path="model_info")
        if cfg.tracking.log_graph:
            try:
                graph = plot_model(a.model, example, tmp_dir / "model_graph.png")
                tracker.log_artifact(graph, artifact_path="model_info")
                dot = graph.with_suffix(".dot")
                if dot.exists():
                    tracker.log_artifact(dot, artifact_path="model_info")
            except Exception as err:  # drawing must never cost the run
                print(f"finetune: warning: could not draw the model graph: {err}")


def _write_history(result: FitResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["epoch", *result.history[0].keys()]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for i, row in enumerate(result.history):
            writer.writerow({"epoch": i + 1, **row})


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
