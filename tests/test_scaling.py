"""Scaling out on Hydra's launchers and sweepers, a shared MLflow server on PostgreSQL, a DVC remote.

The sweeps run the real app (``python -m transferlab -m``) in a git copy of the project, with the
launchers and sweeper of the ``sweep`` extra: parallel jobs in joblib's worker processes nest under one
parent run and carry the same lineage as jobs run in the sweeping process; an Optuna study stopped by
SIGTERM resumes from its SQLite storage. Eight parallel jobs log into an ``mlflow server`` backed by a
throwaway PostgreSQL cluster, and into the SQLite default, and every record of each is checked against
what the job computed. The prepared data, weights and models go to a local DVC remote and come back in
a fresh clone, where ``dvc repro`` has nothing to do.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import copy_project, run, subprocess_env
from test_tracking import _free_port, _stop, _wait_healthy

pytestmark = pytest.mark.timeout(600)

TINY = ["trainer.epochs=1", "pretrain.epochs=1", "backbone.width=8", "tracking.log_graph=false",
        "tracking.log_model=false", "trainer.progress=false"]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _app(project: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "transferlab", *args], project, timeout=timeout)


def _runs(uri: str, experiment: str = "transferlab") -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _sweep_family(runs: list) -> tuple:
    """The one sweep parent run among ``runs`` and its children."""
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    assert len(parents) == 1, [r.data.tags for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1, "every run of the sweep nests under its parent"
    return parents[0], children


# --- which GPU a parallel job takes (no GPU needed) ----------------------------------------------------------


def test_parallel_jobs_claim_distinct_gpus_and_wait_for_a_free_one(tmp_path: Path) -> None:
    from transferlab.devices import claim

    ids = ["GPU-aaaa", "GPU-bbbb"]
    with claim(1, ids, tmp_path) as second:
        with claim(0, ids, tmp_path) as first:
            assert (first, second) == (0, 1)  # job number modulo the device count
            got: list[int] = []
            third = threading.Thread(target=lambda: got.append(_claim_briefly(2, ids, tmp_path)))
            third.start()
            time.sleep(0.5)
            assert got == [], "a job must wait while every GPU is taken"
        third.join(timeout=10)
        assert got == [0]  # device 0, freed while device 1 is still held
    with claim(2, ids, tmp_path) as busy:
        # Job 4 (4 % 2 = 0) finds device 0 held by job 2 and takes the free one instead of sharing.
        with claim(4, ids, tmp_path) as other:
            assert (busy, other) == (0, 1)
    with claim(3, ids, tmp_path) as alone:
        assert alone == 1


def _claim_briefly(job: int, ids: list[str], locks: Path) -> int:
    from transferlab.devices import claim

    with claim(job, ids, locks, poll_s=0.1) as index:
        return index


def test_an_explicit_device_or_no_cuda_is_never_claimed(tmp_path: Path) -> None:
    import torch

    from transferlab.devices import job_device

    with job_device("cpu", 3) as device:
        assert device == "cpu"
    if not torch.cuda.is_available():
        with job_device("auto", 3) as device:
            assert device == "auto"  # resolved as usual (MPS or the CPU)


# --- launcher presets compose --------------------------------------------------------------------------------


def test_the_slurm_and_parallel_presets_compose(tmp_path: Path) -> None:
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", tmp_path / "conf")
    shown = run([sys.executable, "-m", "transferlab", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                 "hydra.launcher.array_parallelism=4", "--cfg", "hydra"], tmp_path)
    launcher = yaml.safe_load(shown.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["array_parallelism"]) == ("gpu", 1, 4)
    assert launcher["timeout_min"] > 0 and launcher["submitit_folder"].startswith("${hydra.sweep.dir}")
    shown = run([sys.executable, "-m", "transferlab", "hydra/launcher=parallel", "--cfg", "hydra"], tmp_path)
    hydra = yaml.safe_load(shown.stdout)["hydra"]
    assert hydra["launcher"]["_target_"].endswith("JoblibLauncher") and hydra["launcher"]["backend"] == "loky"
    assert hydra["sweep"]["subdir"] == "${hydra.job.num}"  # a folder per job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # composed, nothing run


# --- sweeps in a project copy --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tmp_path_factory.mktemp("scaling") / "project")


@pytest.fixture(scope="module")
def joblib_sweep(project: Path) -> dict:
    """4 jobs, 2 at a time, in joblib's worker processes."""
    started = time.time()
    proc = _app(project, "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                "regularisation.dropout.hidden=0.1,0.2,0.3,0.4", "hydra.sweep.dir=outputs/sweeps/joblib", *TINY)
    return {"stdout": proc.stdout, "seconds": time.time() - started,
            "runs": _runs(f"sqlite:///{project / 'mlflow.db'}")}


LINEAGE = ("git_commit", "git_dirty", "data_hash", "weights_hash")


@pytest.mark.slow
def test_a_parallel_sweep_nests_its_jobs_under_one_parent(project: Path, joblib_sweep: dict) -> None:
    parent, children = _sweep_family([r for r in joblib_sweep["runs"] if r.data.tags.get("sweep") == "joblib"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs"] == 4
    assert sorted(int(r.data.tags["sweep_job"]) for r in children) == [0, 1, 2, 3]
    assert {r.info.status for r in children} == {"FINISHED"}
    # Each in a worker process, not the sweeping one, two of them at a time.
    pids = {r.data.tags["transferlab.pid"] for r in children}
    assert parent.data.tags["transferlab.pid"] not in pids and len(pids) >= 2
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"no two jobs overlapped: {spans}"
    # Own folders, own checkpoints.
    folders = [project / "outputs" / "sweeps" / "joblib" / str(job) for job in range(4)]
    assert len({(f / "models" / "best.pt").read_bytes() for f in folders}) == 4
    # The lineage is the project's, as a job in the sweeping process records it (the Optuna test checks that).
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    meta = json.loads((project / children[0].data.params["paths.prepared"] / "target" / "meta.json").read_text())
    for r in children:
        assert (r.data.tags["git_commit"], r.data.tags["git_dirty"]) == (head, "false")
        assert r.data.tags["data_hash"] == meta["meta"]["data_hash"]
    assert len({r.data.tags["weights_hash"] for r in children}) == 1  # pretrained once, shared
    print(f"joblib sweep, 4 jobs, 2 at a time: {joblib_sweep['seconds']:.0f} s")


def _optuna(project: Path, n_trials: int, *, stop_at_job: int | None = None) -> str:
    args = [sys.executable, "-m", "transferlab", "-m", "hparams_search=dropout",
            f"hydra.sweeper.n_trials={n_trials}", *TINY]
    proc = subprocess.Popen(args, cwd=project, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stop_at_job is not None and re.search(rf"#{stop_at_job} : ", line):
            proc.send_signal(signal.SIGTERM)  # as `kill` or SLURM stop it: mid-trial
            break
    rest, _ = proc.communicate(timeout=300)
    text = "".join(lines) + rest
    assert (proc.returncode == 0) == (stop_at_job is None), text[-3000:]
    return text


@pytest.mark.slow
def test_an_optuna_study_stopped_by_sigterm_resumes_to_its_trial_count(project: Path, joblib_sweep: dict) -> None:
    import optuna

    _optuna(project, 6, stop_at_job=4)  # trials 0-3 finish, trial 4 is stopped
    sweep = project / "outputs" / "sweeps" / "dropout"
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep / 'optuna.db'}",
                                         engine_kwargs={"isolation_level": "AUTOCOMMIT"})
    stopped = optuna.load_study(study_name="dropout", storage=storage).trials[4]
    assert stopped.state.name == "RUNNING" and stopped.params
    again = _optuna(project, 2)
    assert "sweep: resuming" in again and "Using an existing study with name 'dropout'" in again
    assert "sweep: Optuna trial 4 was stopped mid-run; it runs again first" in again

    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name="dropout", storage=storage).trials
    states = [t.state.name for t in trials]
    assert summary.study_name == "dropout" and summary.direction.name == "MAXIMIZE"
    # The stopped trial 4 ran again with the parameters it had drawn: 6 trials, all complete, none RUNNING.
    assert states == ["COMPLETE"] * 6, states
    assert trials[4].params == stopped.params
    for t in trials:  # the log-scale ranges of the preset
        assert 0.01 <= t.params["regularisation.dropout.input"] <= 0.5
        assert 0.02 <= t.params["regularisation.dropout.hidden"] <= 0.8

    parent, children = _sweep_family([r for r in _runs(f"sqlite:///{project / 'mlflow.db'}")
                                      if r.data.tags.get("sweep") == "dropout"])
    assert parent.info.status == "FINISHED"
    finished = [r for r in children if r.info.status == "FINISHED"]
    # The stopped trial's run, if it had started one yet, ended KILLED (never left RUNNING).
    assert len(finished) == 6 and [r.info.status for r in children if r not in finished] in ([], ["KILLED"])
    # Each finished trial's value in the study is its run's validation metric (never a test one).
    values = sorted(t.value for t in trials if t.state.name == "COMPLETE")
    assert values == pytest.approx(sorted(r.data.metrics["best_val_acc"] for r in finished))
    for r in finished:
        folder = Path(r.data.params["paths.model"]).parent
        assert folder.parent.parent == sweep and (folder / "job_result.json").is_file()
    assert len({Path(r.data.params["paths.model"]) for r in children}) == len(children)  # never a shared folder
    # Jobs in the sweeping process record the same lineage as joblib's worker processes.
    local = {tuple(r.data.tags[k] for k in LINEAGE) for r in finished}
    workers = {tuple(r.data.tags[k] for k in LINEAGE) for r in joblib_sweep["runs"]
               if r.data.tags.get("sweep") == "joblib" and r.data.tags.get("stage") != "sweep"}
    assert local == workers and len(local) == 1


# --- eight parallel runs into a shared store -----------------------------------------------------------------


def _as_postgres() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user where this is root."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's postgresql 15), its database URI."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL is not installed ({PG_BIN}/initdb missing: apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="the server extra (psycopg2-binary) is not installed")
    as_pg = _as_postgres()
    home = Path(tempfile.mkdtemp(prefix="transferlab-pg-"))
    home.chmod(0o755)
    data = home / "data"
    if as_pg:
        shutil.chown(home, "postgres")
    port = _free_port()
    pg = lambda *cmd: subprocess.run([*as_pg, *cmd], check=True, capture_output=True, text=True, timeout=120)
    try:
        pg(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-t", "60", "start", "-o",
           f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off -c max_connections=200")
        pg(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        # The driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, the server extra has psycopg2.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def server_on_postgres(postgres: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`mlflow server` on that database, serving artifacts (clients need no shared file system)."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    cmd = ["mlflow", "server", "--backend-store-uri", postgres, "--serve-artifacts",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        _wait_healthy(url, proc, log, timeout=180)
        yield url
    finally:
        _stop(proc)


EPOCHS = 3


def _eight_parallel(project: Path, experiment: str, *tracking: str, jobs: int = 8) -> list[Path]:
    """``jobs`` jobs at once (joblib, a worker each), 3 epochs each; their output folders."""
    sweep = project / "outputs" / "sweeps" / experiment
    _app(project, "-m", "hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={sweep}",
         "regularisation.dropout.hidden=" + ",".join(f"0.{i}" for i in range(1, jobs + 1)), *TINY,
         f"trainer.epochs={EPOCHS}", f"tracking.experiment={experiment}", *tracking)
    return [sweep / str(job) for job in range(jobs)]


def _lost_records(client, runs: list, folders: list[Path]) -> list[str]:
    """Every record a job computed (its history.csv, train.json and test.json) that its run lacks."""
    lost = []
    by_folder = {Path(r.data.params["paths.model"]).parent: r for r in runs}
    for folder in folders:
        r = by_folder.get(folder)
        if r is None:
            lost.append(f"{folder.name}: no run")
            continue
        if r.info.status != "FINISHED":
            lost.append(f"{folder.name}: {r.info.status}")
        with open(folder / "plots" / "history.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == EPOCHS
        for key in rows[0]:
            if key == "epoch":
                continue
            # Steps 1..EPOCHS are the epochs (best_val_acc also has its final value at step 0).
            history = {m.step: m.value for m in client.get_metric_history(r.info.run_id, key) if m.step >= 1}
            expected = {int(row["epoch"]): float(row[key]) for row in rows}
            if history != pytest.approx(expected):
                lost.append(f"{folder.name}: {key} {history} != {expected}")
        test = json.loads((folder / "metrics" / "test.json").read_text())
        if r.data.metrics.get("test_acc") != pytest.approx(test["test_acc"]):
            lost.append(f"{folder.name}: test_acc")
    return lost


@pytest.mark.slow
def test_eight_parallel_runs_lose_nothing_on_a_postgresql_server(project: Path, server_on_postgres: str) -> None:
    from mlflow import MlflowClient

    url = server_on_postgres
    folders = _eight_parallel(project, "parallel-postgres", "tracking=server", f"tracking.uri={url}")
    runs = _runs(url, "parallel-postgres")
    parent, children = _sweep_family(runs)
    assert parent.info.status == "FINISHED" and len(children) == 8
    assert _lost_records(MlflowClient(url), children, folders) == []
    assert {r.info.artifact_uri.split(":")[0] for r in children} == {"mlflow-artifacts"}  # served, not a path
