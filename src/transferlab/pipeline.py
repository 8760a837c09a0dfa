"""The whole pipeline in one process: prepare -> pretrain -> finetune -> evaluate.

The same stage functions that DVC runs one by one, called in a row for one
composed config; this is what ``python -m transferlab`` (and each job of a
Hydra multirun) does. Each run writes under its own output folder; prepared
data and source-task pretrained weights are cached under ``paths.cache`` by
the settings they depend on, so a sweep prepares and pretrains once per
distinct setting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.config.schema import ExperimentConfig, PathsConfig

if TYPE_CHECKING:
    from transferlab.training.distributed import Context


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepared_key(cfg: ExperimentConfig) -> str:
    """Everything the prepare stage's output depends on, the listing of the files it reads included."""
    from transferlab.data.sources import folder_fingerprint

    return _digest({"data": {**asdict(cfg.data), "split_seed": cfg.split_seed},
                    "pretrain": [cfg.pretrain.classes, cfg.pretrain.max_per_class],
                    "inputs": folder_fingerprint(cfg.data.inputs)})


# Trainer settings that do not change the trained numbers: the display; the memory budget (resident and
# streamed data give the same batches and results); CPU threads (null shares the CPUs among the running
# jobs, so the count changes with the load anyway, and only the summation order of float reductions
# depends on it). Every other trainer setting the source task keeps is part of the key: the device type
# (CPU and CUDA kernels differ), amp, channels_last and compile (other kernels), eval_batch_size,
# aux_loss_weight, and any setting added later, until it is shown not to matter.
NUMERICALLY_NEUTRAL_TRAINER_KEYS = ("progress", "memory_budget_mb", "num_threads")


def pretrained_key(cfg: ExperimentConfig) -> str:
    """Everything source-task pretraining's output depends on: the prepared data (its key) and the source
    task's experiment (:func:`~transferlab.training.build.source_task_config`: seed, the ``backbone`` and
    ``pretrain`` groups, the trainer's numerically relevant settings with the device as the type actually
    used). The fine-tuning settings (head, regularisation, optimizer, scheduler, augment, the trainer's
    epochs and controls) are replaced there by the source task's own, so jobs that vary only those share
    one key; tracking and paths do not change the weights."""
    from transferlab.training.build import source_task_config
    from transferlab.training.runtime import resolve_device

    source = asdict(source_task_config(cfg))
    for name in ("tracking", "paths", "composition", "optimized_metric"):
        del source[name]
    for name in NUMERICALLY_NEUTRAL_TRAINER_KEYS:
        del source["trainer"][name]
    source["trainer"]["device"] = resolve_device(cfg.trainer.device).type
    return _digest({"prepared": prepared_key(cfg), "source_task": source})


def with_output_dir(cfg: ExperimentConfig, output_dir: str | Path) -> ExperimentConfig:
    """``cfg`` with every path under ``output_dir`` (prepared data under ``paths.cache``; source-task
    weights there too, linked into the run's folder by :func:`pretrain_shared`)."""
    out = Path(output_dir)
    paths = PathsConfig(prepared=str(Path(cfg.paths.cache) / "prepared" / prepared_key(cfg)), cache=cfg.paths.cache,
                        weights=str(out / "weights" / "backbone.safetensors"), model=str(out / "models"),
                        metrics=str(out / "metrics"), plots=str(out / "plots"))
    return replace(cfg, paths=paths)


# The validation metrics a run reports, any of which a sweep may optimise (config key ``optimized_metric``):
# the validation accuracy and loss at the best epoch (the checkpoint kept), as the finetune stage logs them.


def run_pipeline(cfg: ExperimentConfig, *, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run every stage; return the MLflow run id, the validation metrics and the test accuracy.

    Under torchrun every process runs this: the data is prepared once (the others wait on its lock), the
    source task and fine-tuning train data-parallel, and rank 0 alone writes, logs and evaluates (the
    others return without a run id or a test accuracy)."""
    from transferlab.stages import evaluate, finetune
    from transferlab.training.distributed import context
    from transferlab.training.runtime import resolve_device

    ctx = context(resolve_device(cfg.trainer.device))
    prepare_shared(cfg)
    pretrain_shared(cfg, ctx)
    run_id, result = finetune.run(cfg, tags=tags)
    best = result.history[result.best_epoch]
    summary = {"run_id": run_id, "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"]}
    if not ctx.main:
        return summary
    return {**summary, "test_acc": evaluate.run(cfg)["test_acc"]}


def prepare_shared(cfg: ExperimentConfig) -> None:
    """Prepare the data into the shared cache unless it is there; runs that need the same key at once
    take turns (an exclusive file lock around the check and the preparation), so one prepares and the
    others reuse it."""
    from filelock import FileLock

    from transferlab.stages import prepare

    prepared = Path(cfg.paths.prepared)
    prepared.mkdir(parents=True, exist_ok=True)
    with FileLock(prepared / ".lock"):  # the key's folder holds target/, source/ and this lock
        if not (prepared / "target" / "meta.json").is_file() or (
                cfg.pretrain.classes is not None and not (prepared / "source" / "meta.json").is_file()):
            prepare.run(cfg)


def pretrain_shared(cfg: ExperimentConfig, ctx: "Context | None" = None) -> None:
    """Write the run's ``paths.weights`` (and sidecar); for ``backbone.weights=source``, train the source
    task into ``paths.cache/weights/<pretrained_key>/`` unless it is there, then link the run's files to it.

    Runs with the same key take turns under an exclusive file lock, so one trains and the others reuse its
    weights. ``save_weights`` replaces the weights file, then the sidecar, each atomically: a complete
    sidecar means complete weights, and a job killed before it leaves nothing a later job would reuse. Other
    weight sources are not cached: loading given weights costs about what reading them from a cache would.
    Under torchrun (``ctx``) rank 0 takes the lock and decides; every rank trains; rank 0 writes.
    """
    from filelock import FileLock

    from transferlab.models.weights import kind_of, weights_meta_path
    from transferlab.stages import pretrain
    from transferlab.training.distributed import SINGLE, barrier, broadcast

    ctx = ctx or SINGLE
    if kind_of(cfg.backbone.weights) != "source":
        pretrain.run(cfg)
        barrier(ctx)  # the others read what rank 0 wrote
        return
    shared = Path(cfg.paths.cache) / "weights" / pretrained_key(cfg) / "backbone.safetensors"
    shared.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(shared.parent / ".lock") if ctx.main else contextlib.nullcontext():
        if broadcast(shared.is_file() and weights_meta_path(shared).is_file(), ctx):
            print(f"pretrain: reusing {shared} (same pretraining setting)")
        else:
            pretrain.run(replace(cfg, paths=replace(cfg.paths, weights=str(shared))))
        if ctx.main:
            for source, target in ((shared, Path(cfg.paths.weights)),
                                   (weights_meta_path(shared), weights_meta_path(cfg.paths.weights))):
                _link(source, target)
    barrier(ctx)


def _link(source: Path, target: Path) -> None:
    """``target`` becomes a hard link to ``source`` (a copy where the two are on different file systems),
    atomically: the run's folder keeps its own weights at no cost in space, and the cached file is only
    ever replaced, never written in place, so the link never changes under the run."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
