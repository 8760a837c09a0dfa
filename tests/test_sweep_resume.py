"""An interrupted Hydra sweep, run again with the same command and sweep folder, skips its finished jobs,
resumes the interrupted one and ends with one child run per job under its one parent run."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.timeout(300)


def _sweep(cwd: Path, sweep: Path, *, kill_in_job: int | None = None) -> str:
    args = [sys.executable, "-m", "transferlab", "-m", "regularisation.dropout.hidden=0.1,0.2,0.3,0.4",
            "trainer.epochs=3", "backbone.weights=null", "pretrain.classes=null", "backbone.width=8",
            "tracking.log_graph=false", "tracking.log_model=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    lines, job = [], None
    for line in proc.stdout:
        lines.append(line)
        launched = re.search(r"#(\d+) : ", line)
        if launched:
            job = int(launched.group(1))
        # A line for epoch 2 means epoch 1's last checkpoint is saved.
        if kill_in_job is not None and job == kill_in_job and "finetune epoch 2/3" in line:
            proc.send_signal(signal.SIGKILL)
            break
    rest, _ = proc.communicate(timeout=240)
    text = "".join(lines) + rest
    assert (proc.returncode == 0) == (kill_in_job is None), text[-3000:]
    return text


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_under_its_parent_without_retraining_finished_jobs(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cwd = tmp_path / "work"
    cwd.mkdir()
    shutil.copytree(REPO / "conf", cwd / "conf")
    sweep = tmp_path / "sweep"
    _sweep(cwd, sweep, kill_in_job=2)
    again = _sweep(cwd, sweep)
    assert "sweep: resuming" in again
    assert "sweep job 0: finished earlier" in again and "sweep job 1: finished earlier" in again
    # Killed at the line of epoch 2: epoch 1 is saved, and under load epoch 2 may be too.
    assert re.search(r"finetune: resuming after epoch [12]\b", again), again[-3000:]
    assert again.count("finetune epoch 1/3") == 1  # only job 3 trains from its first epoch

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    assert [p.info.status for p in parents] == ["FINISHED"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags["sweep_job"]) for r in children) == [0, 1, 2, 3]
    assert {r.info.status for r in children} == {"FINISHED"} and len(runs) == 5
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == [1, 2, 3], (child.data.tags["sweep_job"], steps)
    assert parents[0].data.metrics["jobs"] == 4
