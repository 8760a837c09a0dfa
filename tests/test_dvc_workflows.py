"""DVC workflows with real dvc in a temporary git repo: dvc.lock is byte-stable, queued experiments land in
the project's MLflow store (the prepared data's DVC tests are in test_dvc_prepare.py)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import copy_project, run

pytestmark = pytest.mark.slow

TINY = ["trainer.epochs=1", "pretrain.epochs=1", "backbone.width=8", "tracking.log_graph=false",
        "tracking.log_model=false"]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy with TINY composed, the whole pipeline run once (``dvc repro``) and committed, its
    outputs in the DVC cache: the shared first run of the tests below, which work on copies of it."""
    project = copy_project(tmp_path_factory.mktemp("reproduced") / "project")
    run(["python", "-m", "transferlab.compose", *TINY], project)
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "reproduced"], project)
    return project


def _copy_of(reproduced: Path, dest: Path) -> Path:
    shutil.copytree(reproduced, dest, symlinks=True)
    return dest


def _images(folder: Path, cls: str, start: int, n: int) -> None:
    (folder / cls).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(folder / cls / f"{i:03d}.png")


def _prepared_count(prepared: Path) -> int:
    meta = json.loads((prepared / "target" / "meta.json").read_text())["meta"]
    return sum(meta["counts"].values())


def test_dvc_lock_is_byte_stable_across_identical_reruns(reproduced: Path, tmp_path: Path) -> None:
    """No run id in a cached output and no timing in a DVC metric: identical reruns, identical lock.
    The first run is the fixture's ``dvc repro``; the rerun forces every stage again, in a copy."""
    project = _copy_of(reproduced, tmp_path / "project")
    first = (reproduced / "dvc.lock").read_bytes()
    assert "up to date" in run(["dvc", "status"], project).stdout  # the copy is the committed first run
    repro = run(["dvc", "repro", "-f"], project)
    for stage in ("prepare", "pretrain", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in repro.stdout, repro.stdout
    assert (project / "dvc.lock").read_bytes() == first, run(["git", "diff", "dvc.lock"], project).stdout


def _runs(project: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, max_results=1000) if exp_ids else []
    return [(r, client) for r in runs]


def _wait_for_queue(project: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            assert "Failed" not in status, status
            return
        time.sleep(2)
    raise AssertionError(f"queue not done after {timeout} s:\n{status}")


def _exp_args(dropout: float) -> list[str]:
    return ["-S", f"regularisation.dropout.hidden={dropout}", *[a for t in TINY for a in ("-S", t)]]


def test_queued_experiments_land_in_the_project_store(reproduced: Path, tmp_path: Path) -> None:
    """DVC runs queued experiments in copies under .dvc/tmp/exps; their runs still reach the project's store.
    The baseline's prepare and pretrain outputs are in the cache, so each experiment runs finetune and
    evaluate (the stages that record runs); the project starts without a store, as a clone does."""
    project = _copy_of(reproduced, tmp_path / "project")
    for name in ("mlflow.db", "mlflow.db.lock", "mlruns", ".transferlab"):
        path = project / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for dropout in (0.1, 0.3):  # two workers, one experiment each, at the same time
        run(["dvc", "exp", "run", "--queue", *_exp_args(dropout)], project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    _wait_for_queue(project, timeout=600)
    runs = _runs(project)
    assert sorted(r.data.params["regularisation.dropout.hidden"] for r, _ in runs) == ["0.1", "0.3"]
    for r, client in runs:
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")] == [1]
        assert "test_acc" in r.data.metrics
    # Each experiment recomposed params.yaml from its -S overrides, and `dvc exp show` holds its metrics.
    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout))
    assert "test_acc" in shown and '"hidden": 0.1' in shown and '"hidden": 0.3' in shown, shown[:3000]
