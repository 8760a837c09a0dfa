"""The finetune -> evaluate hand-off: which run trained the model in ``paths.model``.

It lives outside every DVC output (``.transferlab/handoff/`` under the project
root, git-ignored), so the cached ``models`` output holds only the model and an
identical rerun leaves ``dvc.lock`` unchanged. The file is keyed by the model
folder's absolute path (parallel jobs and queued experiments each have their
own) and records the checkpoint's hash: a model folder that DVC restored from
its cache is matched to its run by that hash instead (the ``checkpoint_sha256``
run tag).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transferlab.errors import TrackingError
from transferlab.project import state_dir
from transferlab.tracking.store import tracking_uri

CHECKPOINT_TAG = "checkpoint_sha256"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def handoff_path(model_dir: str | Path) -> Path:
    key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]
    return state_dir("handoff") / f"{key}.json"


def write_handoff(model_dir: str | Path, *, run_id: str, uri: str, checkpoint: str | Path) -> None:
    path = handoff_path(model_dir)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri(uri), "model_dir":
                               str(Path(model_dir).resolve()), CHECKPOINT_TAG: file_sha256(checkpoint)}, indent=2))
    os.replace(tmp, path)


def run_of_model(model_dir: str | Path, *, uri: str, experiment: str, checkpoint: str | Path) -> str:
    """The id of the run that trained ``checkpoint`` (in ``model_dir``)."""
    digest = file_sha256(checkpoint)
    path = handoff_path(model_dir)
    if path.is_file():
        info = json.loads(path.read_text())
        if info.get(CHECKPOINT_TAG) == digest:
            return info["run_id"]
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.{CHECKPOINT_TAG} = '{digest}'", max_results=1,
        order_by=["attributes.start_time DESC"])
    if not runs:
        raise TrackingError(f"no MLflow run in {uri} (experiment '{experiment}') trained {checkpoint}: run the "
                            "finetune stage first (dvc repro finetune)")
    return runs[0].info.run_id
