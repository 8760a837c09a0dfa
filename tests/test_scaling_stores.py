"""Scaling out, continued (a file of its own so that the suite's workers share the long tests): eight parallel
runs into the SQLite default, and a DVC remote round trip."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import copy_project, run
from test_scaling import TINY, _eight_parallel, _lost_records, _runs, _sweep_family, project  # noqa: F401

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow
def test_parallel_runs_into_the_sqlite_default(project: Path) -> None:
    """The same load on the default store: one SQLite file that every process writes. Each run's records go
    through its spool (tracking/tracker.py), which retries whatever the store refuses (a locked database),
    so nothing is lost here either; measured outcome on 2 cores: 8 FINISHED runs, complete histories (the
    test runs 4 at once, to keep the suite's time)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    folders = _eight_parallel(project, "parallel-sqlite", jobs=4)
    parent, children = _sweep_family(_runs(uri, "parallel-sqlite"))
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert _lost_records(MlflowClient(uri), children, folders) == []


# --- a DVC remote --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_push_then_a_fresh_clone_pulls_and_is_up_to_date(tmp_path: Path) -> None:
    origin = copy_project(tmp_path / "origin")
    remote = tmp_path / "remote"
    run([sys.executable, "-m", "transferlab.compose", *TINY], origin)
    run(["dvc", "repro"], origin)
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-q", "-m", "tiny pipeline, its lock and a local remote"], origin)
    pushed = run(["dvc", "push"], origin).stdout
    assert re.search(r"\d+ files? pushed", pushed), pushed

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    for out in ("data/prepared/target/meta.json", "weights/backbone.safetensors", "models/best.pt",
                "models/model_spec.json", "metrics/per_class.json"):
        assert (clone / out).read_bytes() == (origin / out).read_bytes(), out
    status = run(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
    again = run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in again and "up to date" in again, again
    assert not (clone / "mlflow.db").exists()  # no stage ran, so no run was logged
    assert run(["git", "status", "--porcelain"], clone).stdout == ""
