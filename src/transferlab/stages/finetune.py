"""Stage ``finetune``: train backbone + new head on the target task.

Reads the prepared target data and the initial backbone weights, applies the
configured freezing, max-norm, dropout and learning rates, trains, keeps the
best checkpoint, and records everything in a new MLflow run.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any


from transferlab.config.params import to_container
from transferlab.cli import stage_main
from transferlab.config.schema import ExperimentConfig
from transferlab.data import PreparedData, load_prepared
from transferlab.models.assemble import SPEC_FILE, save_spec
from transferlab.models.backbones import backbone_layers
from transferlab.models.weights import load_backbone_state, read_weights_file, read_weights_meta
from transferlab.training.augment import augment_warnings
from transferlab.training.build import Training, build_training
from transferlab.training.loop import Batches, FitResult
from transferlab.training.optim import scaled_lr
from transferlab.training.param_groups import describe_groups
from transferlab.training.resume import LastCheckpoint
from transferlab.training.runtime import configure_threads, resolve_device, seed_everything

if TYPE_CHECKING:
    from transferlab.tracking.tracker import Tracker

BEST = "best.pt"


def layer_rows(t: Training) -> list[dict[str, Any]]:
    """One row per backbone layer and per head module: the per-layer table."""
    lr_of = {name: g["lr"] for g in t.groups for name in g["param_names"]}
    tensors = dict(t.model.named_parameters())
    named = [(f"backbone.{layer.name}", layer.kind, [f"backbone.{p}" for p in layer.params])
             for layer in backbone_layers(t.backbone)]
    named += [(n, type(m).__name__, [f"{n}.{p}" for p, _ in m.named_parameters()]) for n, m in t.model.named_modules()
              if n.startswith(("head.", "aux_head")) and any(True for _ in m.parameters(recurse=False))]
    rows = []
    for name, kind, names in named:
        params = [(p, tensors[p]) for p in names]
        count = sum(x.numel() for _, x in params)
        frozen = [p for p, _ in params if p in t.plan.frozen]
        lrs = sorted({lr_of[p] for p, _ in params if p in lr_of})
        rows.append({"layer": name, "type": kind, "params": count,
                     "trainable": "no" if len(frozen) == len(params) else ("partly" if frozen else "yes"),
                     "lr": "/".join(f"{x:.3g}" for x in lrs) if lrs else "-"})
    return rows


def _placement(t: Training) -> str:
    return " ".join(f"{split}={how}" for split, how in t.placement.items())


def _file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run(cfg: ExperimentConfig, *, tags: dict[str, str] | None = None) -> tuple[str, FitResult]:
    """Train and log; return the MLflow run id and the fit result."""
    from transferlab.tracking.run import lineage_tags, open_run

    for warning in augment_warnings(cfg):
        print(f"finetune: warning: {warning}")
    seed_everything(cfg.seed)
    configure_threads(cfg.trainer.num_threads)
    data = load_prepared(Path(cfg.paths.prepared) / "target")
    weights_meta = read_weights_meta(cfg.paths.weights)
    t = build_training(cfg, data, device=resolve_device(cfg.trainer.device), weights_meta=weights_meta,
                       backbone_state=read_weights_file(cfg.paths.weights), weights_source=cfg.paths.weights,
                       checkpoint=Path(cfg.paths.model) / BEST)
    cfg_in, cfg = cfg, t.cfg
    train, val = t.batches(data, "train"), t.batches(data, "val")
    weights_hash = _file_hash(cfg.paths.weights)
    # An interrupted run of this very setting continues, in its own MLflow run.
    last = LastCheckpoint(cfg.paths.model, {"config": to_container(cfg), "data": data.meta.get("data_hash"),
                                            "weights": weights_hash})
    if not t.ctx.main:  # under torchrun, rank 0 logs and writes; this rank trains on its shard
        return "", t.fit(train, val, desc="finetune", last=last)
    save_spec(t.spec, cfg.paths.model)
    print(describe_groups(t.groups))
    print(f"finetune: data {_placement(t)} (trainer.memory_budget_mb)")
    if t.cfg.trainer.batch_size != cfg_in.trainer.batch_size:
        print(f"finetune: batch size {t.cfg.trainer.batch_size}, not {cfg_in.trainer.batch_size}: "
              f"{len(data.splits['train'])} training images, trainer.min_steps_per_epoch="
              f"{cfg_in.trainer.min_steps_per_epoch}")
    if t.cfg.trainer.epochs != cfg_in.trainer.epochs:
        print(f"finetune: {t.cfg.trainer.epochs} epochs of {t.optimiser_steps} optimiser steps "
              f"({len(data.splits['train'])} training images): trainer.max_steps={cfg_in.trainer.max_steps} "
              f"comes before trainer.epochs={cfg_in.trainer.epochs}")
    if t.reinitialised:
        print(f"finetune: backbone.reinit_last_n={cfg.backbone.reinit_last_n}: {list(t.reinitialised)} start from "
              "a fresh init, the layers before them from the loaded weights")
    for warning in t.plan.warnings:
        print(f"finetune: warning: {warning}")

    run_tags = {"stage": "finetune", "backbone": cfg.backbone.name, "head": cfg.head.name,
                **lineage_tags(data_hash=data.meta.get("data_hash"), weights_hash=weights_hash), **(tags or {})}
    if t.ctx.enabled:
        run_tags["processes"] = str(t.ctx.world)
    previous = last.load()
    with open_run(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                  run_id=previous["extra"]["run_id"] if previous else None, tags=run_tags) as tracker:
        # Again on a resumed run: the same values, and the model folder's table (DVC empties the folder).
        _log_setup(tracker, t, data, weights_meta)
        if previous is None:
            _check_initial_backbone(tracker, t, data, weights_meta)
        logged = tracker.logged_steps("val_acc") if previous else set()
        if previous is not None:  # epochs the interrupted process finished but had not logged yet
            for epoch, metrics in enumerate(previous["history"]):
                if epoch + 1 not in logged:
                    tracker.log_metrics(metrics, step=epoch + 1)
                    logged.add(epoch + 1)
        result, seconds = _train(tracker, t, train, val, last, logged)
        _log_result(tracker, cfg, result, seconds)
    last.remove()
    print(f"finetune: best {cfg.trainer.monitor}={result.best_value:.4f} at epoch {result.best_epoch + 1}; "
          f"MLflow run {tracker.run_id}")
    return tracker.run_id, result


def _train(tracker: "Tracker", t: Training, train: Batches, val: Batches, last: LastCheckpoint,
           logged: set[int]) -> tuple[FitResult, float]:
    """Fit, logging every epoch not logged already (by an interrupted process of this run), saving the
    last checkpoint after each; an interrupted or failed run still logs its best checkpoint so far."""
    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        if epoch + 1 not in logged:
            tracker.log_metrics(metrics, step=epoch + 1)

    best = Path(t.cfg.paths.model) / BEST
    started = time.perf_counter()
    try:
        result = t.fit(train, val, on_epoch_end=on_epoch_end, desc="finetune", last=last,
                       extra={"run_id": tracker.run_id})
    except BaseException:
        if best.is_file():
            tracker.log_artifact(best, artifact_path="checkpoint")
        raise
    return result, time.perf_counter() - started


def _log_result(tracker: "Tracker", cfg: ExperimentConfig, result: FitResult, seconds: float) -> None:
    """The best epoch's summary (run metrics and metrics/train.json), the history, the checkpoint with
    its model spec, and the hand-off that tells ``evaluate`` which run trained the model."""
    from transferlab.tracking.handoff import CHECKPOINT_TAG, file_sha256, write_handoff

    model_dir = Path(cfg.paths.model)
    best = result.history[result.best_epoch]
    summary = {"best_epoch": result.best_epoch + 1, f"best_{cfg.trainer.monitor}": result.best_value,
               "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"]}
    if result.stopped_epoch is not None:  # early stopping ended the run after this epoch
        summary["stopped_epoch"] = result.stopped_epoch + 1
    # Wall time is a run metric only: in the DVC metric file it would change dvc.lock on every rerun.
    tracker.log_metrics({**{k: float(v) for k, v in summary.items()}, "train_seconds": seconds})
    _write_history(result, Path(cfg.paths.plots) / "history.csv")
    metrics_path = Path(cfg.paths.metrics) / "train.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2))
    tracker.log_artifact(model_dir / BEST, artifact_path="checkpoint")
    tracker.log_artifact(model_dir / SPEC_FILE, artifact_path="checkpoint")
    tracker.log_artifact(Path(cfg.paths.plots) / "history.csv")
    tracker.set_tags({CHECKPOINT_TAG: file_sha256(model_dir / BEST)})
    write_handoff(model_dir, run_id=tracker.run_id, uri=cfg.tracking.uri, checkpoint=model_dir / BEST)


def _log_setup(tracker: "Tracker", t: Training, data: PreparedData, weights_meta: dict[str, Any]) -> None:
    """The resolved config, parameter counts, weights and data metadata, the per-layer table, the
    model summary and (tracking.log_graph) the model graph."""
    from transferlab.tracking.graph import plot_model
    from transferlab.tracking.run import flatten
    from transferlab.tracking.summary import param_counts, summary_text

    cfg = t.cfg
    container = to_container(cfg)
    tracker.log_params(flatten(container))
    counts = {f"model.params_{k}": v for k, v in param_counts(t.model, t.plan.frozen).items()}
    tracker.log_params({**counts, "data.num_classes": data.num_classes, "data.class_names": str(data.class_names),
                        "data.train_size": len(data.splits["train"]), "device": str(t.device),
                        "model.input_size": t.spec.input_size, "model.resize": t.spec.resize,
                        "data.placement": _placement(t),
                        "optimizer.scaled_lr": scaled_lr(cfg.optimizer, cfg.trainer.batch_size
                                                         * cfg.trainer.accumulate_grad_batches),
                        "freeze.frozen_layers": str(list(t.plan.layers))})
    tracker.log_dict(container, "config/config.yaml")
    tracker.log_dict(weights_meta, "config/weights.json")
    tracker.log_dict(data.meta, "config/data.json")
    rows = layer_rows(t)
    model_dir = Path(cfg.paths.model)
    with open(model_dir / "layers.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tracker.log_artifact(model_dir / "layers.csv", artifact_path="model_info")
    example = data.splits["val"].images[:1].to(t.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        text = summary_text(t.model, example, t.plan.frozen) + "\n\nParameter groups\n" + describe_groups(t.groups) + "\n"
        (tmp_dir / "summary.txt").write_text(text)
        tracker.log_artifact(tmp_dir / "summary.txt", artifact_path="model_info")
        if cfg.tracking.log_graph:
            try:
                graph = plot_model(t.model, example, tmp_dir / "model_graph.png")
                tracker.log_artifact(graph, artifact_path="model_info")
                dot = graph.with_suffix(".dot")
                if dot.exists():
                    tracker.log_artifact(dot, artifact_path="model_info")
            except Exception as err:  # drawing must never cost the run
                print(f"finetune: warning: could not draw the model graph: {err}")


def _check_initial_backbone(tracker: "Tracker", t: Training, data: PreparedData, weights_meta: dict[str, Any]) -> None:
    """Log the source task's validation accuracy (``source_val_acc``); with a ``baseline``, compare a linear
    probe on the initial backbone's features with the pixel baseline on the validation split
    (``probe_val_acc``, ``baseline_val_acc``) and warn when the pretrained features lose."""
    from transferlab.baselines import linear_probe, pixel_baseline, weak_backbone_warning

    source_val_acc = weights_meta.get("source_task", {}).get("val_acc")
    if source_val_acc is not None:
        tracker.log_metrics({"source_val_acc": float(source_val_acc)})
    if t.cfg.baseline is None or t.cfg.backbone.weights is None:  # a random init has nothing to probe
        return
    model = t.model
    if t.reinitialised:  # probe the loaded weights, not the fresh top layers the run starts from
        model = copy.deepcopy(t.model)
        load_backbone_state(replace(t.backbone, module=model.backbone), read_weights_file(t.cfg.paths.weights),
                            source=t.cfg.paths.weights)
    probe = linear_probe(model, data, batch_size=t.cfg.trainer.eval_batch_size)
    baseline = pixel_baseline(data, "val")
    tracker.log_metrics({"probe_val_acc": probe, "baseline_val_acc": baseline})
    print(f"finetune: linear probe on the initial backbone val_acc={probe:.4f}, {t.cfg.baseline} regression on "
          f"pixels val_acc={baseline:.4f}")
    warning = weak_backbone_warning(probe, baseline, source_val_acc)
    if warning is not None:
        print(f"finetune: warning: {warning}")


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
