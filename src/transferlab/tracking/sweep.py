"""A Hydra multirun is one MLflow parent run; each job is a child run.

:class:`SweepRuns` is a Hydra callback (``hydra.callbacks`` in
``conf/config.yaml``). When a sweep starts it opens a parent run named after
the sweep and leaves its id in ``<sweep dir>/mlflow_sweep.json``; each job's
run carries ``mlflow.parentRunId``, so the MLflow UI shows the jobs nested
under their sweep. Run again with the same sweep folder (``hydra.sweep.dir``),
an interrupted sweep reopens its parent run; each job that finished is
skipped (:func:`finished_job`) and the interrupted one resumes from its last
checkpoint. When the sweep ends, the parent gets the number of jobs
and the best validation accuracy with that job's test accuracy, the job with
the best ``optimized_metric`` has its model registered (``tracking.register``),
and the parent is closed FINISHED; :func:`close_sweep` with
the error that stopped a sweep closes it FAILED, or KILLED for Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from transferlab.tracking.tracker import Tracker, status_of

SWEEP_FILE = "mlflow_sweep.json"
_open: list[Tracker] = []  # the parent run this process opened and has not closed yet


def parent_run_id(sweep_dir: str | Path) -> str | None:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


class SweepRuns(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = " ".join(config.hydra.overrides.task)
        earlier = sweep_dir / SWEEP_FILE
        if earlier.is_file():  # the same sweep folder again: an interrupted sweep goes on under its parent
            info = json.loads(earlier.read_text())
            parent = Tracker.resume(uri=info["tracking_uri"], run_id=info["run_id"])
            print(f"sweep: resuming {sweep_dir} (MLflow parent run {parent.run_id}): finished jobs are skipped, "
                  "an interrupted one continues")
            _open.append(parent)
            _requeue_stopped_trials(config)
            return
        parent = Tracker.start(uri=config.tracking.uri, experiment=config.tracking.experiment,
                               run_name=f"sweep-{sweep_dir.name}",
                               tags={"sweep": sweep_dir.name, "sweep_dir": str(sweep_dir), "overrides": overrides,
                                     "launcher": "hydra", "stage": "sweep"})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"run_id": parent.run_id, "tracking_uri": parent.uri}))
        _open.append(parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_sweep(register=config.tracking.register, alias=config.tracking.register_alias,
                    metric=config.optimized_metric)


def _requeue_stopped_trials(config: DictConfig) -> None:
    """An Optuna sweep (``hparams_search``) resumed in its sweep folder: each trial that the stopped sweep left
    RUNNING goes back to Optuna's queue (WAITING), which the sweeper's ``study.ask()`` takes first, keeping the
    parameters the trial had drawn. So it runs again as one of this invocation's trials, and the study ends with
    the trials asked for, none left RUNNING. The study belongs to this sweep folder (its preset keeps it in
    ``<sweep dir>/optuna.db``): a trial RUNNING there at the sweep's start was stopped, not running elsewhere."""
    sweeper = config.hydra.sweeper
    if "study_name" not in sweeper or not sweeper.get("storage"):
        return
    import optuna
    from hydra.utils import instantiate
    from optuna.trial import TrialState

    storage = sweeper.storage
    storage = instantiate(storage) if isinstance(storage, DictConfig) else optuna.storages.get_storage(storage)
    try:
        study = optuna.load_study(study_name=sweeper.study_name, storage=storage)
    except KeyError:  # no such study yet
        return
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state(trial._trial_id, TrialState.WAITING)  # Optuna's own queue (enqueue_trial's state)
        print(f"sweep: Optuna trial {trial.number} was stopped mid-run; it runs again first, with its parameters")


# Whether a larger value of each validation metric a sweep may optimise (``optimized_metric``) is better.
HIGHER_IS_BETTER = {"best_val_acc": True, "best_val_loss": False}


def close_sweep(error: BaseException | None = None, *, register: str | None = None, alias: str = "champion",
                metric: str = "best_val_acc") -> None:
    """Summarise and end the parent run this process opened, if any: FINISHED without
    ``error``, KILLED for KeyboardInterrupt (Ctrl-C, SIGTERM), else FAILED. A sweep that finished
    registers the model of its job with the best ``metric`` as ``register`` with ``alias``."""
    if not _open:
        return
    parent = _open.pop()
    from functools import partial

    from mlflow import MlflowClient

    from transferlab.tracking.models import register_model
    from transferlab.tracking.store import reachable

    if reachable(parent.uri):
        client = MlflowClient(parent.uri)
        experiment_id = client.get_run(parent.run_id).info.experiment_id
        children = client.search_runs([experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
        summary = {"jobs": len(children)}
        # The best job is chosen on validation accuracy; its test accuracy is reported, never maximised.
        scored = [r.data.metrics for r in children if "best_val_acc" in r.data.metrics]
        if scored:
            best = max(scored, key=lambda m: m["best_val_acc"])
            summary["best_val_acc"] = best["best_val_acc"]
            if "test_acc" in best:
                summary["test_acc_of_best_val"] = best["test_acc"]
        parent.log_metrics(summary)
        ranked = [r for r in children if metric in r.data.metrics]
        if register and error is None and ranked:
            sign = 1 if HIGHER_IS_BETTER[metric] else -1
            best_run = max(ranked, key=lambda r: sign * r.data.metrics[metric])
            parent.set_tags({"registered_job": best_run.data.tags.get("sweep_job", best_run.info.run_id)})
            parent.call_in_run(partial(register_model, best_run.info.run_id, register, alias=alias),
                               "the model registration")
    parent.end(status_of(error))


JOB_RESULT = "job_result.json"


def finished_job(job_dir: str | Path, overrides: list[str]) -> dict[str, Any] | None:
    """The result a job of these ``overrides`` left in ``job_dir`` when it finished, if it did."""
    path = Path(job_dir) / JOB_RESULT
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done["result"] if done.get("overrides") == list(overrides) else None


def record_finished_job(job_dir: str | Path, overrides: list[str], result: dict[str, Any]) -> None:
    path = Path(job_dir) / JOB_RESULT
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"overrides": list(overrides), "result": result}, indent=2))
    tmp.replace(path)
