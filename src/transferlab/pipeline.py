"""The whole pipeline in one process: prepare -> pretrain -> finetune -> evaluate.

The same stage functions that DVC runs one by one, called in a row for one
composed config; this is what ``python -m transferlab`` (and each job of a
Hydra multirun) does. Each run writes under its own output folder; prepared
data is cached by the settings it depends on, so a sweep prepares it once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from transferlab.config.schema import ExperimentConfig, PathsConfig


def prepared_key(cfg: ExperimentConfig) -> str:
    """Everything the prepare stage's output depends on, the listing of the files it reads included."""
    from transferlab.data.sources import folder_fingerprint

    key = {"data": asdict(cfg.data), "seed": cfg.seed,
           "pretrain": [cfg.pretrain.classes, cfg.pretrain.max_per_class],
           "inputs": folder_fingerprint(cfg.data.inputs)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def with_output_dir(cfg: ExperimentConfig, output_dir: str | Path) -> ExperimentConfig:
    """``cfg`` with every path under ``output_dir`` (prepared data under ``paths.cache``)."""
    out = Path(output_dir)
    paths = PathsConfig(prepared=str(Path(cfg.paths.cache) / "prepared" / prepared_key(cfg)), cache=cfg.paths.cache,
                        weights=str(out / "weights" / "backbone.safetensors"), model=str(out / "models"),
                        metrics=str(out / "metrics"), plots=str(out / "plots"))
    return replace(cfg, paths=paths)


# The validation metrics a run reports, any of which a sweep may optimise (config key ``optimized_metric``):
# the validation accuracy and loss at the best epoch (the checkpoint kept), as the finetune stage logs them.


def run_pipeline(cfg: ExperimentConfig, *, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run every stage; return the MLflow run id, the validation metrics and the test accuracy."""
    from transferlab.stages import evaluate, finetune, pretrain

    prepare_shared(cfg)
    pretrain.run(cfg)
    run_id, result = finetune.run(cfg, tags=tags)
    best = result.history[result.best_epoch]
    metrics = evaluate.run(cfg)
    return {"run_id": run_id, "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
            "test_acc": metrics["test_acc"]}


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
