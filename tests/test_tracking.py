"""MLflow tracking: the pure helpers exactly, run statuses on a real SQLite
store, everything one tiny pipeline records, and the same pipeline against a
real ``mlflow server`` over HTTP (loopback only)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, run, subprocess_env

# Bounds every test, fixture setup and teardown included (pytest-timeout).
pytestmark = pytest.mark.timeout(300)

TINY = ["trainer.epochs=2", "pretrain.epochs=1", "trainer.progress=false"]
# The default experiment: 5 target classes ('5'..'9'), an over-complete head
# with 7 units, the first backbone block frozen, max-norm 5 on the head.
CLASSES = ["5", "6", "7", "8", "9"]
UNIT_GROUPS = [[0, 1], [2, 3], [4], [5], [6]]  # 7 // 5 = 1 each, the first 7 % 5 = 2 classes one more
MAX_NORM = 5.0
PER_EPOCH = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "max_unit_norm"]
MLFLOW_ENV = ["MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"]


def _isolate_mlflow(mp: pytest.MonkeyPatch, cwd: Path) -> None:
    """MLflow keeps the tracking URI and the active experiment in module globals
    and copies them into os.environ for subprocesses; start each test without
    them and put them back afterwards. The cwd matters too: a SQLite store puts
    its artifacts under ./mlruns, and MLflow's default URI is ./mlflow.db."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    for var in MLFLOW_ENV:
        mp.delenv(var, raising=False)
    mp.setattr(utils, "_tracking_uri", None)
    mp.setattr(fluent, "_active_experiment_id", None)
    mp.chdir(cwd)


def _end_active_runs() -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(autouse=True)
def _mlflow_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    _isolate_mlflow(monkeypatch, tmp_path)
    yield
    _end_active_runs()


def _sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def _git_repo(path: Path) -> Path:
    """A repo with one committed file, ``tracked.txt``."""
    path.mkdir(parents=True)
    (path / "tracked.txt").write_text("one\n")
    run(["git", "init", "-q", "-b", "main"], path)
    run(["git", "add", "tracked.txt"], path)
    run(["git", "commit", "-q", "-m", "init"], path)
    return path


def _tiny_config(tmp: Path, uri: str):
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.pipeline import with_output_dir

    cfg = load_config(compose([*TINY, f"tracking.uri={uri}", f"paths.cache={tmp / 'cache'}"],
                              config_dir=REPO / "conf"))
    return with_output_dir(cfg, tmp / "out")


def _all_runs(client) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=100) if ids else []


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --- flatten --------------------------------------------------------------------------------------------------


def test_flatten_exact() -> None:
    from transferlab.tracking.run import flatten

    tree = {
        "seed": 0,
        "optimizer": {"name": "sgd", "lr": 0.05, "betas": [0.9, 0.999], "nesterov": True},
        "head": {"hidden": [128], "num_units": None, "mix": [None, "a"], "deep": {"deeper": {"x": None}}},
        "empty": [],
    }
    flat = flatten(tree)
    assert flat == {
        "seed": "0",
        "optimizer.name": "sgd",
        "optimizer.lr": "0.05",
        "optimizer.betas": "[0.9, 0.999]",
        "optimizer.nesterov": "True",
        "head.hidden": "[128]",
        "head.num_units": "null",
        "head.mix": "[None, 'a']",  # lists stay whole, as Python writes them
        "head.deep.deeper.x": "null",
        "empty": "[]",
    }
    assert list(flat) == ["seed", "optimizer.name", "optimizer.lr", "optimizer.betas", "optimizer.nesterov",
                          "head.hidden", "head.num_units", "head.mix", "head.deep.deeper.x", "empty"]
    assert flatten({"a": {"b": None}}, prefix="cfg.") == {"cfg.a.b": "null"}


# --- lineage_tags ---------------------------------------------------------------------------------------------


def test_lineage_tags_in_git_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferlab.tracking.run import lineage_tags

    repo = _git_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert len(head) == 40

    assert lineage_tags(data_hash="d4t4", weights_hash="w31ght") == {
        "git_commit": head, "mlflow.source.git.commit": head, "git_dirty": "false",
        "data_hash": "d4t4", "weights_hash": "w31ght"}

    (repo / "new.txt").write_text("untracked\n")
    assert lineage_tags()["git_dirty"] == "false", "untracked files do not make the tree dirty"

    (repo / "tracked.txt").write_text("two\n")
    assert lineage_tags() == {"git_commit": head, "mlflow.source.git.commit": head, "git_dirty": "true"}

    # A broken index: HEAD still resolves but `git status` fails, so whether
    # the tree is clean is unknown and must not be reported as clean.
    (repo / ".git" / "index").write_text("garbage\n")
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True).returncode != 0
    assert lineage_tags() == {"git_commit": head, "mlflow.source.git.commit": head}


@pytest.mark.parametrize("where", ["plain folder", "repo without commits", "no git on PATH"])
def test_lineage_tags_without_git(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferlab.tracking.run import lineage_tags

    for var in ("GIT_DIR", "GIT_WORK_TREE"):
        monkeypatch.delenv(var, raising=False)
    # Never find a repository above tmp_path (the tests may run inside one).
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    folder = tmp_path / "work"
    folder.mkdir()
    if where == "repo without commits":
        run(["git", "init", "-q"], folder)
    elif where == "no git on PATH":
        _git_repo(folder / "repo")
        folder = folder / "repo"
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.chdir(folder)
    assert lineage_tags(data_hash="d4t4") == {"data_hash": "d4t4"}
    assert lineage_tags() == {}


# --- open_run -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raised", "status"), [(None, "FINISHED"), (ValueError, "FAILED"),
                                                (KeyboardInterrupt, "KILLED")])
def test_open_run_final_status(raised: type[BaseException] | None, status: str, tmp_path: Path) -> None:
    import mlflow

    from transferlab.tracking.run import open_run

    uri = _sqlite(tmp_path / "runs.db")
    run_id = None

    def block() -> None:
        nonlocal run_id
        with open_run(uri=uri, experiment="statuses", run_name="r", tags={"stage": "test"}) as tracker:
            run_id = tracker.run_id
            tracker.log_metrics({"m": 1.0}, step=1)
            if raised is not None:
                raise raised("stop")

    if raised is None:
        block()
    else:
        with pytest.raises(raised, match="stop"):
            block()

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = _all_runs(client)
    assert [r.info.run_id for r in runs] == [run_id]
    r = runs[0]
    assert r.info.status == status
    assert r.info.end_time is not None
    assert r.info.run_name == "r" and r.data.tags["stage"] == "test"
    assert r.data.tags["transferlab.pid"] == str(os.getpid())
    assert client.get_experiment(r.info.experiment_id).name == "statuses"
    assert r.data.metrics["m"] == 1.0
    assert not (tmp_path / ".transferlab" / "spool" / run_id).exists(), "everything sent: no spool left"


def test_open_run_resumes_the_same_run(tmp_path: Path) -> None:
    import mlflow

    from transferlab.tracking.run import open_run

    uri = _sqlite(tmp_path / "runs.db")
    with open_run(uri=uri, experiment="resume", run_name="first", tags={"stage": "finetune"}) as first:
        first.log_params({"a": 1})
        first.log_metrics({"m": 0.1}, step=1)
    with open_run(uri=uri, experiment="resume", run_id=first.run_id, tags={"resumed": "yes"}) as again:
        assert again.run_id == first.run_id
        again.log_params({"b": 2})
        again.log_metrics({"m": 0.2}, step=2)

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = _all_runs(client)
    assert len(runs) == 1, "resuming must not make a second run"
    r = runs[0]
    assert r.info.run_id == first.run_id
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "first", "resuming keeps the run's name"
    assert r.data.params == {"a": "1", "b": "2"}
    assert _steps(client, r.info.run_id, "m") == [1, 2]
    assert r.data.tags["stage"] == "finetune" and r.data.tags["resumed"] == "yes"

    with pytest.raises(ValueError):
        with open_run(uri=uri, experiment="resume", run_id=first.run_id):
            raise ValueError("evaluate failed")
    assert [r.info.status for r in _all_runs(client)] == ["FAILED"]


def test_handoff_round_trip_and_missing(tmp_path: Path) -> None:
    """The hand-off names the run of the checkpoint in the folder; a checkpoint it
    does not describe is looked up by its hash tag, and one no run made is refused."""
    from transferlab.tracking.handoff import CHECKPOINT_TAG, file_sha256, handoff_path, run_of_model, write_handoff
    from transferlab.tracking.preflight import TrackingError
    from transferlab.tracking.run import open_run

    uri = _sqlite(tmp_path / "runs.db")
    models = tmp_path / "models"
    models.mkdir()
    best = models / "best.pt"
    best.write_bytes(b"first")
    kw = {"uri": uri, "experiment": "handoff", "checkpoint": best}
    with pytest.raises(TrackingError, match="dvc repro finetune"):
        run_of_model(models, **kw)
    write_handoff(models, run_id="abc", uri=uri, checkpoint=best)
    assert handoff_path(models).is_file() and not any(models.glob("*.json")), "nothing inside the DVC output"
    assert handoff_path(models).parent == tmp_path / ".transferlab" / "handoff"
    assert run_of_model(models, **kw) == "abc"

    with open_run(uri=uri, experiment="handoff") as tracker:
        best.write_bytes(b"second")
        tracker.set_tags({CHECKPOINT_TAG: file_sha256(best)})
    assert run_of_model(models, **kw) == tracker.run_id, "a checkpoint restored from DVC's cache finds its run"
    best.write_bytes(b"third")
    with pytest.raises(TrackingError, match="no MLflow run"):
        run_of_model(models, **kw)


# --- one tiny pipeline against a SQLite store -----------------------------------------------------------------


@dataclass
class Finished:
    cfg: Any
    uri: str
    run_id: str
    test_acc: float
    repo: Path
    tmp: Path

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri)

    def download(self, path: str) -> Path:
        dst = self.tmp / "downloads"
        dst.mkdir(exist_ok=True)
        return Path(self.client().download_artifacts(self.run_id, path, dst_path=str(dst)))


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """prepare -> pretrain -> finetune -> evaluate, in-process, 2 epochs, run
    from a clean git repo so the lineage tags are real."""
    from transferlab.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("sqlite_run")
    repo = _git_repo(tmp / "repo")
    uri = _sqlite(tmp / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_mlflow(mp, repo)
        cfg = _tiny_config(tmp, uri)
        try:
            result = run_pipeline(cfg, tags={"sweep": "t"})
        finally:
            _end_active_runs()
    return Finished(cfg, uri, result["run_id"], result["test_acc"], repo, tmp)


def test_pipeline_makes_one_finished_run_with_lineage(sqlite_run: Finished) -> None:
    from transferlab.data import data_hash, load_prepared
    from transferlab.stages.finetune import _file_hash
    from transferlab.tracking.handoff import run_of_model

    client = sqlite_run.client()
    runs = _all_runs(client)
    assert [r.info.run_id for r in runs] == [sqlite_run.run_id]
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert client.get_experiment(r.info.experiment_id).name == sqlite_run.cfg.tracking.experiment

    head = run(["git", "rev-parse", "HEAD"], sqlite_run.repo).stdout.strip()
    target = load_prepared(Path(sqlite_run.cfg.paths.prepared) / "target")
    tags = r.data.tags
    assert tags["git_commit"] == head and tags["mlflow.source.git.commit"] == head
    assert tags["git_dirty"] == "false"
    assert tags["data_hash"] == data_hash(target) == target.meta["data_hash"]
    assert tags["weights_hash"] == _file_hash(sqlite_run.cfg.paths.weights)
    assert tags["sweep"] == "t"
    assert (tags["stage"], tags["backbone"], tags["head"]) == ("finetune", "small_cnn", "overcomplete")

    model_dir = Path(sqlite_run.cfg.paths.model)
    assert sorted(p.name for p in model_dir.iterdir()) == ["best.pt", "layers.csv", "model_spec.json"], "no run id in the model output"
    assert run_of_model(model_dir, uri=sqlite_run.uri, experiment=sqlite_run.cfg.tracking.experiment,
                        checkpoint=model_dir / "best.pt") == sqlite_run.run_id


def _resolved(cfg):
    """The config as the run logs it: backbone.input_size decided (null -> 8 px digits)."""
    from dataclasses import replace

    assert cfg.backbone.input_size is None
    return replace(cfg, backbone=replace(cfg.backbone, input_size=8))


def test_pipeline_params_are_the_flattened_config(sqlite_run: Finished) -> None:
    from transferlab.config.params import to_container
    from transferlab.tracking.run import flatten

    params = sqlite_run.client().get_run(sqlite_run.run_id).data.params
    assert params["regularisation.dropout.hidden"] == "0.5"
    assert params["optimizer.lr"] == "0.05"
    assert params["regularisation.max_norm.value"] == str(MAX_NORM)
    assert params["regularisation.max_norm.layers"] == "['head.*']"
    assert params["head.num_units"] == "null"
    assert params["trainer.epochs"] == "2"
    flat = flatten(to_container(_resolved(sqlite_run.cfg)))
    assert {k: params.get(k) for k in flat} == flat, "every config key is a param, with its value"
    assert params["backbone.input_size"] == params["model.input_size"] == "8"  # null resolved to the data's size

    frozen, trainable = int(params["model.params_frozen"]), int(params["model.params_trainable"])
    assert frozen > 0 and trainable > 0, "the default experiment freezes the first backbone block"
    assert frozen + trainable == int(params["model.params_total"])
    assert params["data.num_classes"] == "5"
    assert "block1" in params["freeze.frozen_layers"]


def test_pipeline_metrics_per_epoch(sqlite_run: Finished) -> None:
    import torch

    from transferlab.training.maxnorm import unit_norms

    client = sqlite_run.client()
    r = client.get_run(sqlite_run.run_id)
    for key in PER_EPOCH:
        assert _steps(client, sqlite_run.run_id, key) == [1, 2], key
    norms = {m.step: m.value for m in client.get_metric_history(sqlite_run.run_id, "max_unit_norm")}
    assert all(0 < v < float("inf") for v in norms.values()), norms
    assert r.data.metrics["test_acc"] == pytest.approx(sqlite_run.test_acc)
    best_epoch = int(r.data.metrics["best_epoch"])
    assert best_epoch in (1, 2)
    assert r.data.metrics["best_val_acc"] == pytest.approx(
        {m.step: m.value for m in client.get_metric_history(sqlite_run.run_id, "val_acc")}[best_epoch])

    # The logged checkpoint holds the best epoch's weights, after max-norm: every
    # head unit within the bound, and within the largest norm seen that epoch.
    state = torch.load(sqlite_run.download("checkpoint/best.pt"), map_location="cpu", weights_only=True)
    head_weights = [k for k in state if k.startswith("head.") and k.endswith(".weight")]
    assert sorted(head_weights) == ["head.hidden.0.weight", "head.out.weight"]
    largest = max(float(unit_norms(state[k]).max()) for k in head_weights)
    assert largest <= MAX_NORM + 1e-4
    assert largest <= norms[best_epoch] + 1e-4


def test_pipeline_artifacts(sqlite_run: Finished) -> None:
    from transferlab.config.params import to_container

    client = sqlite_run.client()
    files = _artifacts(client, sqlite_run.run_id)
    for expected in ("model_info/model_graph.png", "model_info/layers.csv", "model_info/summary.txt",
                     "config/config.yaml", "checkpoint/best.pt", "checkpoint/model_spec.json", "history.csv",
                     "evaluation/confusion.png", "evaluation/confusion.csv", "evaluation/test_metrics.json"):
        assert expected in files, (expected, sorted(files))

    _assert_png(sqlite_run.download("model_info/model_graph.png"))
    _assert_png(sqlite_run.download("evaluation/confusion.png"))

    with open(sqlite_run.download("model_info/layers.csv"), newline="") as fh:
        reader = csv.DictReader(fh)
        rows = {row["layer"]: row for row in reader}
        assert reader.fieldnames == ["layer", "type", "params", "trainable", "lr"]
    assert rows["backbone.block1"]["trainable"] == "no" and rows["backbone.block1"]["lr"] == "-"
    assert rows["head.out"]["trainable"] == "yes"
    params = client.get_run(sqlite_run.run_id).data.params
    assert sum(int(row["params"]) for row in rows.values() if row["trainable"] == "no") == int(
        params["model.params_frozen"])

    logged = yaml.safe_load(sqlite_run.download("config/config.yaml").read_text())
    assert logged == to_container(_resolved(sqlite_run.cfg))

    checkpoint = sqlite_run.download("checkpoint/best.pt").read_bytes()
    assert checkpoint == (Path(sqlite_run.cfg.paths.model) / "best.pt").read_bytes()

    metrics = json.loads(sqlite_run.download("evaluation/test_metrics.json").read_text())
    assert metrics["test_acc"] == pytest.approx(sqlite_run.test_acc)
    mass = metrics["unit_mass"]
    assert list(mass) == CLASSES, "one entry per class"
    assert [mass[c]["units"] for c in CLASSES] == UNIT_GROUPS
    for c in CLASSES:
        entry = mass[c]
        assert len(entry["mass"]) == len(entry["units"])
        assert 0.0 <= entry["in_class"] <= 1.0
        assert entry["in_class"] == pytest.approx(sum(entry["mass"]), abs=1e-3)


def test_pipeline_logged_model_has_signature(sqlite_run: Finished) -> None:
    import mlflow
    import mlflow.models
    import numpy as np

    mlflow.set_tracking_uri(sqlite_run.uri)
    info = mlflow.models.get_model_info(f"runs:/{sqlite_run.run_id}/model")
    assert info.signature is not None
    (x,) = info.signature.inputs.inputs
    assert (x.type, x.shape) == (np.dtype("uint8"), (-1, -1, -1, -1))  # any batch, channels (1 or 3) and size
    assert info.signature.outputs.input_names() == ["predicted", "probability", *(f"prob_{c}" for c in CLASSES)]
    assert info.saved_input_example_info is not None
    assert info.flavors["python_function"]["loader_module"] == "transferlab_serving"
    tags = sqlite_run.client().get_run(sqlite_run.run_id).data.tags
    assert tags["model_format"] == "pt2"
    spec = info.metadata["model_spec"]  # how to feed it, read back from the model alone
    assert spec["class_names"] == CLASSES and spec["backbone"]["input_size"] == 8 and spec["data_channels"] == 1
    assert len(spec["mean"]) == len(spec["std"]) == 1 and spec["resize"] == 8


# --- a real tracking server -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited {proc.returncode}\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer {url}/health within {timeout:.0f} s\n{_log_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    """The server forks (uvicorn workers): end its whole process group."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    # Anything of the group that outlived the leader.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Server:
    url: str
    artifacts: Path


@pytest.fixture
def tracking_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """``mlflow server`` on a free loopback port: SQLite backend, artifacts
    proxied through the server (``mlflow-artifacts:/``) into a tmp folder."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    home = tmp_path / "server"
    home.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts = home / "artifacts"
    log = home / "server.log"
    cmd = ["mlflow", "server", "--backend-store-uri", _sqlite(home / "srv.db"),
           "--serve-artifacts", "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # No background job runner (huey consumers): not needed, slower to start and stop.
    env = subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(url, proc, log)
        yield Server(url, artifacts)
    finally:
        _stop(proc)


@pytest.mark.slow
def test_pipeline_against_tracking_server(tracking_server: Server, tmp_path: Path) -> None:
    import mlflow
    import mlflow.models

    from transferlab.pipeline import run_pipeline

    url = tracking_server.url
    cfg = _tiny_config(tmp_path, url)
    result = run_pipeline(cfg, tags={"sweep": "server"})

    client = mlflow.MlflowClient(tracking_uri=url)
    runs = _all_runs(client)
    assert [r.info.run_id for r in runs] == [result["run_id"]]
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.tags["sweep"] == "server"
    assert r.data.params["regularisation.dropout.hidden"] == "0.5"
    assert _steps(client, r.info.run_id, "val_acc") == [1, 2]
    assert r.data.metrics["test_acc"] == pytest.approx(result["test_acc"])

    # Artifacts went over HTTP through the server, not straight onto a local path.
    assert r.info.artifact_uri.startswith("mlflow-artifacts:/"), r.info.artifact_uri
    assert "model_info/model_graph.png" in _artifacts(client, r.info.run_id, "model_info")
    graph = Path(client.download_artifacts(r.info.run_id, "model_info/model_graph.png",
                                           dst_path=str(tmp_path)))
    _assert_png(graph)
    stored = list(tracking_server.artifacts.rglob("model_graph.png"))
    assert len(stored) == 1 and stored[0].read_bytes() == graph.read_bytes()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()

    mlflow.set_tracking_uri(url)
    assert mlflow.models.get_model_info(f"runs:/{r.info.run_id}/model").signature is not None
