"""The real pipeline end to end: real DVC in a fresh git repo, a real SQLite
MLflow store, real digits, on the CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import run

pytestmark = pytest.mark.slow


def _client(project: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _runs(project: Path) -> list:
    client = _client(project)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exp_ids, max_results=1000) if exp_ids else []


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def _test_split(project: Path):
    from transferlab.data import load_prepared

    return load_prepared(project / "data" / "prepared" / "target").splits["test"]


def _model_accuracy(client, run_id: str, project: Path) -> float:
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model", map_location="cpu")
    test = _test_split(project)
    with torch.no_grad():
        logits = model(test.images)
    predicted = logits.argmax(dim=1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
    return float((predicted == test.labels).double().mean())


def test_dvc_repro_then_up_to_date(project: Path) -> None:
    started = time.perf_counter()
    run(["dvc", "repro"], project)
    first = time.perf_counter() - started
    metrics = json.loads((project / "metrics" / "test.json").read_text())
    print(f"\ndvc repro (default experiment): {first:.1f} s, test_acc={metrics['test_acc']:.4f}")
    assert metrics["test_acc"] >= 0.97

    for path in ["dvc.lock", "weights/backbone.safetensors", "weights/backbone.json", "models/best.pt",
                 "plots/history.csv", "plots/confusion.csv", "plots/confusion.png", "metrics/train.json"]:
        assert (project / path).is_file(), path
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert any(o["path"] == "weights" for o in lock["stages"]["pretrain"]["outs"])

    runs = _runs(project)
    assert len(runs) == 1
    r = runs[0]
    params = yaml.safe_load((project / "params.yaml").read_text())
    # The epochs the step budget gives (trainer.max_steps before trainer.epochs), as the run records them.
    epochs = int(r.data.params["trainer.epochs"])
    assert 1 <= epochs <= params["trainer"]["epochs"]
    client = _client(project)
    assert r.info.status == "FINISHED"
    assert r.data.params["regularisation.dropout.hidden"] == str(params["regularisation"]["dropout"]["hidden"])
    assert r.data.params["backbone.weights"] == "source"
    for key in ("val_acc", "train_loss", "val_loss", "train_acc"):
        history = client.get_metric_history(r.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
    assert r.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    for tag in ("git_commit", "git_dirty", "data_hash", "stage", "weights_hash"):
        assert tag in r.data.tags, tag
    files = _artifacts(client, r.info.run_id)
    for expected in ("model_info/model_graph.png", "model_info/summary.txt", "model_info/layers.csv",
                     "config/config.yaml", "checkpoint/best.pt", "evaluation/confusion.png"):
        assert expected in files, (expected, sorted(files))
    summary = Path(client.download_artifacts(r.info.run_id, "model_info/summary.txt")).read_text()
    assert "Frozen params" in summary
    import mlflow.models

    info = mlflow.models.get_model_info(f"runs:/{r.info.run_id}/model")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert _model_accuracy(client, r.info.run_id, project) == pytest.approx(metrics["test_acc"])

    started = time.perf_counter()
    second = run(["dvc", "repro"], project)
    elapsed = time.perf_counter() - started
    print(f"second dvc repro: {elapsed:.1f} s")
    assert "Data and pipelines are up to date" in second.stdout
    assert elapsed <= 5.0 * 3  # the budget is 5 s; allow a loaded CI machine some slack
    assert len(_runs(project)) == 1, "an unchanged pipeline must not log a duplicate run"
    # `dvc exp run -S` and `dvc exp show`: tests/test_dvc_workflows.py (queued experiments).


def test_hydra_multirun_sweep(project: Path) -> None:
    proc = run(["python", "-m", "transferlab", "-m", "regularisation.dropout.hidden=0.1,0.3,0.5",
                "trainer.epochs=3", "pretrain.epochs=2", "backbone.width=8", "trainer.progress=false"], project)
    everything = _runs(project)
    (parent,) = [r for r in everything if r.data.tags.get("stage") == "sweep"]
    runs = [r for r in everything if r is not parent]
    assert len(runs) == 3, proc.stdout[-2000:]
    # One parent run per sweep, each job nested under it.
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.data.tags["sweep"] == runs[0].data.tags["sweep"]
    assert parent.data.metrics["jobs"] == 3
    best = max(runs, key=lambda r: r.data.metrics["best_val_acc"])  # chosen on validation, not test
    assert parent.data.metrics["best_val_acc"] == best.data.metrics["best_val_acc"]
    assert parent.data.metrics["test_acc_of_best_val"] == best.data.metrics["test_acc"]
    assert "best_test_acc" not in parent.data.metrics
    assert {r.data.params["regularisation.dropout.hidden"] for r in runs} == {"0.1", "0.3", "0.5"}
    assert len({r.data.tags["sweep"] for r in runs}) == 1
    assert sorted(r.data.tags["sweep_job"] for r in runs) == ["0", "1", "2"]
    client = _client(project)
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "val_acc")) == 3
        assert "model_info/model_graph.png" in _artifacts(client, r.info.run_id, "model_info")
    # The sweep's prepared data is cached under outputs/cache; point the check at it.
    cache = next((project / "outputs" / "cache" / "prepared").iterdir())
    (project / "data" / "prepared").mkdir(parents=True)
    (project / "data" / "prepared" / "target").symlink_to(cache / "target")
    r = runs[0]
    assert _model_accuracy(client, r.info.run_id, project) == pytest.approx(r.data.metrics["test_acc"])


def test_a_bad_value_in_a_sweep_fails_before_any_job(project: Path) -> None:
    proc = run(["python", "-m", "transferlab", "-m", "regularisation.dropout.hidden=0.1,1.5",
                "backbone=small_cnn,resnet18"], project, check=False)
    assert proc.returncode == 2
    assert "regularisation.dropout.hidden: must be a probability in [0, 1), got 1.5" in proc.stderr
    assert not (project / "outputs").exists() and not (project / "mlflow.db").exists()
