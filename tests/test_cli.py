"""The real commands on bad configs: they stop early, say which key is wrong
and what is allowed, and leave nothing behind (no run folder, no MLflow run)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = sorted(p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml"))
# What a command could create in the project root if it ignored the paths it is given.
ROOT_OUTPUTS = ["outputs", "multirun", "mlruns", "mlflow.db", "models", "metrics", "plots", "weights", ".hydra"]


def _run(args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def _absent_in_root() -> set[str]:
    return {name for name in ROOT_OUTPUTS if not (ROOT / name).exists()}


def _runs_in(store: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("backbone=resnet1000", ["Could not find 'backbone/resnet1000'", "Available options in 'backbone'",
                                 *BACKBONES]),
        ("backbone.name=resnet1000", ["error: backbone.name: Unknown backbone 'resnet1000'", str(BACKBONES)]),
        ("regularisation.dropout.hidden=1.5", ["error: regularisation.dropout.hidden:", "[0, 1)"]),
        ("trainer.epochs=0", ["error: trainer.epochs: must be >= 1, got 0"]),
        ("regularisation.dropot=0.3", ["error: Unknown key 'regularisation.dropot'",
                                       "Did you mean 'regularisation.dropout'?",
                                       "['dropout', 'freeze', 'label_smoothing', 'max_norm']"]),
    ],
)
def test_bad_override_fails_fast_and_leaves_nothing(override: str, expected: list[str], tmp_path: Path) -> None:
    absent = _absent_in_root()
    run_dir, store = tmp_path / "run", tmp_path / "mlflow.db"
    proc, seconds = _run(["-m", "transferlab", override, f"hydra.run.dir={run_dir}",
                          f"tracking.uri=sqlite:///{store}"])
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert seconds < 30, f"took {seconds:.1f}s"
    for text in expected:
        assert text in output, output
    assert "Traceback" not in output
    # Nothing written: no Hydra run folder, no MLflow store (or at least no run in it), nothing in the repo.
    assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))
    if store.exists():
        assert _runs_in(store) == []
    assert _absent_in_root() >= absent


def _bad_params(tmp_path: Path, edit: dict[str, dict[str, object]]) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Every path under tmp_path, so that even a stage that wrongly went on would not touch the repo.
    params["paths"] = {k: str(tmp_path / "out" / k) for k in params["paths"]}
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for section, values in edit.items():
        for key, value in values.items():
            node = params[section]
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("stage", "edit", "expected"),
    [
        ("prepare", {"regularisation": {"dropout.hidden": 1.5}}, "error: regularisation.dropout.hidden: "
                                                                 "must be a probability in [0, 1), got 1.5"),
        ("pretrain", {"trainer": {"epochs": 0}}, "error: trainer.epochs: must be >= 1, got 0"),
        ("finetune", {"backbone": {"name": "resnet1000"}}, "error: backbone.name: Unknown backbone 'resnet1000'"),
        ("evaluate", {"regularisation": {"dropot": 0.3}}, "error: Unknown key 'regularisation.dropot'. "
                                                          "Did you mean 'dropout'?"),
    ],
)
def test_stage_with_a_bad_value_exits_2_with_one_line(stage: str, edit: dict, expected: str, tmp_path: Path) -> None:
    params = _bad_params(tmp_path, edit)
    proc, seconds = _run(["-m", f"transferlab.stages.{stage}", "--params", str(params)])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(expected), lines[0]
    assert seconds < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found"),
        ("trainer: [1\n", "is not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
    ],
    ids=["missing", "syntax", "not-a-mapping"],
)
def test_stage_with_an_unreadable_params_file(content: str | None, expected: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    if content is not None:
        params.write_text(content)
    proc, _ = _run(["-m", "transferlab.stages.prepare", "--params", str(params)])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {params}") and expected in lines[0], proc.stderr
