"""Runs started together: each gets its own folder and MLflow run, shared prepared data is made once, and
CPU threads are split among the training processes of a project."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_project, subprocess_env

TINY = ["trainer.epochs=1", "pretrain.epochs=1", "backbone.width=8", "tracking.log_graph=false",
        "tracking.log_model=false", "trainer.progress=false"]


@pytest.mark.slow
def test_four_runs_started_in_the_same_second(tmp_path: Path) -> None:
    """Four first runs at once: one creates the store, all finish with their own folder, seed and weights."""
    import mlflow

    project = copy_project(tmp_path / "project")
    procs = [subprocess.Popen([sys.executable, "-m", "transferlab", f"seed={seed}", *TINY], cwd=project,
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for seed in range(4)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    folders = sorted((project / "outputs" / "runs").iterdir())
    assert len(folders) == 4, [f.name for f in folders]

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 4
    by_checkpoint = {r.data.tags["checkpoint_sha256"]: r for r in runs}
    seen_seeds = set()
    for folder in folders:
        run = by_checkpoint[hashlib.sha256((folder / "models" / "best.pt").read_bytes()).hexdigest()]
        seed = (folder / ".hydra" / "overrides.yaml").read_text().split("seed=")[1].split()[0]
        assert run.info.status == "FINISHED"
        assert run.data.params["seed"] == seed
        assert "test_acc" in run.data.metrics and "best_val_acc" in run.data.metrics
        assert "checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}
        # The weights this run fine-tuned from are the ones its own folder's pretrain wrote.
        weights = hashlib.sha256((folder / "weights" / "backbone.safetensors").read_bytes()).hexdigest()[:16]
        assert run.data.tags["weights_hash"] == weights
        prepared = json.loads((project / run.data.params["paths.prepared"] / "target" / "meta.json").read_text())
        assert run.data.tags["data_hash"] == prepared["meta"]["data_hash"]
        seen_seeds.add(seed)
    assert seen_seeds == {str(s) for s in range(4)}
    assert len({r.data.tags["weights_hash"] for r in runs}) == 4  # each seed pretrained its own backbone


PREPARE_SHARED = """
import sys
from transferlab.compose import compose
from transferlab.config.validate import load_config
from transferlab.pipeline import prepare_shared, with_output_dir

cfg = load_config(compose(["paths.cache=" + sys.argv[1]]))
prepare_shared(with_output_dir(cfg, sys.argv[2]))
"""


def test_parallel_runs_prepare_shared_data_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_SHARED, str(cache), str(tmp_path / f"run{i}")],
                              cwd=Path(__file__).resolve().parents[1], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum(out.count("prepare: target:") for out in outputs) == 1, outputs
    (key,) = (cache / "prepared").glob("*/target/meta.json")
    assert json.loads(key.read_text())["meta"]["num_classes"] == 5


THREADS = """
import os, sys, time
from pathlib import Path
import torch
from transferlab.training.runtime import configure_threads, share_threads

configure_threads(None if sys.argv[1] == "auto" else int(sys.argv[1]))
Path(sys.argv[2], f"ready-{os.getpid()}").touch()
while not Path(sys.argv[2], "go").exists():
    time.sleep(0.05)
share_threads()
print(torch.get_num_threads(), flush=True)
while not Path(sys.argv[2], "done").exists():  # stay alive (registered) until every process has answered
    time.sleep(0.05)
"""


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start(n: int, mode: str, root: Path, signals: Path, omp: str | None = None) -> list[subprocess.Popen]:
    env = subprocess_env(DVC_ROOT=str(root))
    env.pop("OMP_NUM_THREADS", None)
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    return [subprocess.Popen([sys.executable, "-c", THREADS, mode, str(signals)], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def _threads(procs: list[subprocess.Popen], signals: Path) -> list[int]:
    deadline = time.monotonic() + 120
    while len(list(signals.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    (signals / "go").touch()
    threads = [p.stdout.readline() for p in procs]
    (signals / "done").touch()
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    for name in ("go", "done", *(r.name for r in signals.glob("ready-*"))):
        (signals / name).unlink()
    return [int(t) for t in threads]


def test_threads_are_split_among_the_live_training_processes(tmp_path: Path) -> None:
    root, signals = tmp_path / "project", tmp_path / "signals"
    root.mkdir()
    signals.mkdir()
    # A pid file left by a process that was killed does not count.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    jobs = root / ".transferlab" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / dead.stdout.strip()).touch()

    assert _threads(_start(2, "auto", root, signals), signals) == [max(1, _cpus() // 2)] * 2
    assert list(jobs.iterdir()) == []  # each process removed its own file, the dead one's was swept
    assert _threads(_start(1, "auto", root, signals), signals) == [_cpus()]
    # trainer.num_threads set: that many, and the process does not take a share from the others.
    assert _threads(_start(2, "3", root, signals), signals) == [3, 3]
    assert not list(jobs.iterdir())
    # OMP_NUM_THREADS (torch's own setting) is the number of CPUs to share, as a scheduler's cgroup would be.
    assert _threads(_start(1, "auto", root, signals, omp="3"), signals) == [3]
    assert _threads(_start(2, "auto", root, signals, omp="3"), signals) == [1, 1]


def test_a_queued_dvc_experiment_registers_in_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferlab.project import project_root

    project = tmp_path / "project"
    for workspace in (project / ".dvc" / "tmp" / "exps" / "tmpab12cd",  # dvc queue start
                      project / ".dvc" / "tmp" / "exps" / "standalone" / "tmpef34ab",  # dvc exp run --temp
                      project):  # dvc repro
        workspace.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("DVC_ROOT", str(workspace))
        assert project_root() == project.resolve()
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path.resolve()
