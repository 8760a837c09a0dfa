"""Long runs resume: a killed run, run again with the same command and output folder, continues from its
last completed epoch in the same MLflow run, and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env
from transferlab.training.resume import LastCheckpoint

pytestmark = pytest.mark.timeout(300)

# The source task's epoch lines come after the epoch ends, before its checkpoint is saved: killed at epoch 2's,
# it has epoch 1's, and epochs 3-5 stand between the kill and the finished weights (under load, the reader
# can see a line late; with the last epoch's line the weights were sometimes written before the kill).
RUN = ["trainer.epochs=4", "pretrain.epochs=5", "backbone.width=8", "tracking.log_graph=false",
       "tracking.log_model=false", "hydra.run.dir=out"]


def _workdir(path: Path) -> Path:
    path.mkdir()
    shutil.copytree(REPO / "conf", path / "conf")
    return path


def _app(cwd: Path, *, kill_at: str | None = None, sig: int = signal.SIGKILL) -> str:
    """``python -m transferlab`` in ``cwd``; with ``kill_at``, killed by ``sig`` once that text is printed."""
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", *RUN], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if kill_at is not None and kill_at in line:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=240)
    text = "".join(out) + rest
    if kill_at is None:
        assert proc.returncode == 0, text[-3000:]
    else:
        assert proc.returncode != 0, text[-3000:]
    return text


def _result(cwd: Path) -> dict:
    from mlflow import MlflowClient

    out = cwd / "out"
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
    histories = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(runs[0].info.run_id, key),
                                                          key=lambda m: m.step)]
                 for key in ("train_loss", "val_acc", "lr")}
    return {"runs": [(r.info.status, r.data.tags.get("stage")) for r in runs], "histories": histories,
            "best": torch.load(out / "models" / "best.pt", weights_only=True),
            "weights": (out / "weights" / "backbone.safetensors").read_bytes(),
            "metrics": {name: json.loads((out / "metrics" / name).read_text()) for name in ("train.json", "test.json")},
            "history.csv": (out / "plots" / "history.csv").read_text()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cwd = _workdir(tmp_path_factory.mktemp("resume") / "straight")
    _app(cwd)
    return _result(cwd)


def _same(resumed: dict, straight: dict) -> None:
    assert resumed["runs"] == straight["runs"] == [("FINISHED", "finetune")]  # one run, finished
    assert resumed["histories"] == straight["histories"]  # every epoch once, the same numbers
    assert [step for step, _ in resumed["histories"]["val_acc"]] == [1, 2, 3, 4]
    assert resumed["best"].keys() == straight["best"].keys()
    assert all(torch.equal(resumed["best"][k], straight["best"][k]) for k in straight["best"])
    assert resumed["weights"] == straight["weights"]
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["history.csv"] == straight["history.csv"]


@pytest.mark.slow
def test_a_run_killed_again_and_again_resumes_each_time_and_ends_as_an_uninterrupted_one(
        tmp_path: Path, uninterrupted: dict) -> None:
    """SIGKILL in the source task, SIGKILL in fine-tuning, SIGTERM in fine-tuning: each rerun of the same
    command continues after the last completed epoch (a line for epoch k means epoch k-1 was saved)."""
    cwd = _workdir(tmp_path / "killed")
    _app(cwd, kill_at="pretrain (source task) epoch 2/5", sig=signal.SIGKILL)
    again = _app(cwd, kill_at="finetune epoch 3/4", sig=signal.SIGKILL)
    assert "pretrain (source task): resuming after epoch" in again
    again = _app(cwd, kill_at="finetune epoch 4/4", sig=signal.SIGTERM)
    assert "finetune: resuming after epoch" in again
    again = _app(cwd)
    assert "finetune: resuming after epoch" in again
    _same(_result(cwd), uninterrupted)
    assert not list((cwd / ".transferlab" / "resume").rglob("last.pt"))  # removed once the stages ended


def test_a_checkpoint_of_another_setting_is_not_resumed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    last = LastCheckpoint(tmp_path / "models", {"lr": 0.1})
    last.save({"epoch": 3})
    assert LastCheckpoint(tmp_path / "models", {"lr": 0.1}).load()["epoch"] == 3
    assert LastCheckpoint(tmp_path / "models", {"lr": 0.2}).load() is None
    assert LastCheckpoint(tmp_path / "other", {"lr": 0.1}).load() is None
    last.remove()
    assert LastCheckpoint(tmp_path / "models", {"lr": 0.1}).load() is None
