"""A Hydra multirun is one MLflow parent run; each job is a child run.

:class:`SweepRuns` is a Hydra callback (``hydra.callbacks`` in
``conf/config.yaml``). When a sweep starts it opens a parent run named after
the sweep and leaves its id in ``<sweep dir>/mlflow_sweep.json``; each job's
run carries ``mlflow.parentRunId``, so the MLflow UI shows the jobs nested
under their sweep. When the sweep ends, the parent gets the number of jobs
and the best test accuracy, and is closed FINISHED, or FAILED when a job
failed and stopped the sweep.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SWEEP_FILE = "mlflow_sweep.json"
_open: dict[str, str] = {}  # the parent run this process opened and has not closed yet


def parent_run_id(sweep_dir: str | Path) -> str | None:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


class SweepRuns(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow import MlflowClient

        from transferlab.tracking.run import set_store

        sweep_dir = Path(config.hydra.sweep.dir)
        experiment_id = set_store(config.tracking.uri, config.tracking.experiment)
        overrides = " ".join(config.hydra.overrides.task)
        run = MlflowClient(config.tracking.uri).create_run(
            experiment_id, run_name=f"sweep-{sweep_dir.name}",
            tags={"sweep": sweep_dir.name, "sweep_dir": str(sweep_dir), "overrides": overrides,
                  "launcher": "hydra", "stage": "sweep"})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": config.tracking.uri}))
        _open.update(run_id=run.info.run_id, uri=config.tracking.uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_sweep("FINISHED")


def close_sweep(status: str) -> None:
    """Summarise and end the parent run this process opened, if any."""
    if not _open:
        return
    from mlflow import MlflowClient

    run_id, uri = _open.pop("run_id"), _open.pop("uri")
    client = MlflowClient(uri)
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    client.log_metric(run_id, "jobs", len(children))
    scores = [r.data.metrics["test_acc"] for r in children if "test_acc" in r.data.metrics]
    if scores:
        client.log_metric(run_id, "best_test_acc", max(scores))
    client.set_terminated(run_id, status)
