"""What a finished sweep's runs recorded, read back for `transferlab report`, and the report logged to the
sweep's parent run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from transferlab.tracking.store import tracking_uri

CURVES = ("train_loss", "val_loss", "train_acc", "val_acc")


@dataclass
class RunRecord:
    run_id: str
    status: str
    experiment_id: str
    parent_run_id: str | None
    metrics: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict)  # per-epoch values, epoch 1 first


def read_runs(uri: str, run_ids: Iterable[str]) -> dict[str, RunRecord]:
    """Each run's status, final metrics and per-epoch curves (:data:`CURVES`)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    out = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        curves = {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
                  for key in CURVES if key in run.data.metrics}
        out[run_id] = RunRecord(run_id, run.info.status, run.info.experiment_id,
                                run.data.tags.get("mlflow.parentRunId"), dict(run.data.metrics), curves)
    return out


def children_of(uri: str, parent_run_id: str) -> list[str]:
    """The ids of the parent's child runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000)
    return [r.info.run_id for r in runs]


def log_report(uri: str, parent_run_id: str, files: Iterable[Path], tags: dict[str, str]) -> None:
    """The report's files as artifacts of the sweep's parent run (under ``report/``), with ``tags``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    for path in files:
        client.log_artifact(parent_run_id, str(path), artifact_path="report")
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
