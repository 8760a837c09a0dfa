"""MLflow runs: one run per pipeline execution.

``finetune`` opens the run and records the config, lineage, the model's
picture and per-epoch metrics; it leaves the run id in
``<paths.model>/run.json``. ``evaluate`` reopens that run for the test
metrics and the logged model. A stage that DVC skips logs nothing, so an
unchanged pipeline never makes a duplicate run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay whole (``[1, 2]``)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def lineage_tags(*, data_hash: str | None = None, weights_hash: str | None = None) -> dict[str, str]:
    """Git commit, dirty flag and data hash: enough to reproduce the run."""
    tags: dict[str, str] = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        # A failed `git status` (None) says nothing about the tree: no tag
        # rather than a false "clean".
        if dirty is not None:
            tags["git_dirty"] = "true" if dirty else "false"
    if data_hash:
        tags["data_hash"] = data_hash
    if weights_hash:
        tags["weights_hash"] = weights_hash
    return tags


def set_store(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri``; make the experiment if needed; return its id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(experiment)
    return exp.experiment_id


@contextlib.contextmanager
def open_run(*, uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
             tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) a run; it ends FAILED if the block raises
    and KILLED on Ctrl-C, never left RUNNING."""
    import mlflow
    from mlflow.entities import RunStatus

    set_store(uri, experiment)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=dict(tags or {}))
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run()


def write_run_file(model_dir: str | Path, *, run_id: str, uri: str, experiment_id: str) -> None:
    path = Path(model_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id}, indent=2))


def read_run_file(model_dir: str | Path) -> dict[str, str]:
    path = Path(model_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the finetune stage first (dvc repro finetune)")
    return json.loads(path.read_text())
