"""The real commands on bad configs: they stop early, say which key is wrong
and what is allowed, and leave nothing behind (no run folder, no MLflow run)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import params_file

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
        ("backbone.name=resnet1000", ["error: backbone.name: Unknown backbone 'resnet1000'; expected one of "
                                      "['inception_v3', 'mlp', 'small_cnn'], or any torchvision", "Did you mean 'resnet101'"]),
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
    return params_file(tmp_path, {f"{section}.{key}": v for section, values in edit.items() for key, v in values.items()})


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


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-sc", "install=bash"], "hydra_bash_completion()"),
        (["--cfg", "job", "--package", "trainer", "trainer.epochs=3"], "epochs: 3"),
        (["-c", "job", "--resolve", "seed=7"], "seed: 7"),
        (["--info", "defaults"], "Defaults List"),
        (["--help"], "== Config =="),
        (["--hydra-help"], "Hydra ("),
    ],
    ids=["sc-install", "cfg-package", "cfg-resolve", "info", "help", "hydra-help"],
)
def test_hydra_flags_and_modes_pass_the_prechecks(args: list[str], expected: str) -> None:
    absent = _absent_in_root()
    proc, _ = _run(["-m", "transferlab", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert expected in proc.stdout, proc.stdout[-2000:]
    assert "error:" not in proc.stderr
    assert _absent_in_root() >= absent


def test_shell_completion_completes_config_keys() -> None:
    import os

    # The line bash hands over when completing the project's console script, `transferlab`.
    env = {**os.environ, "COMP_LINE": "transferlab regularisation.drop"}
    proc = subprocess.run([sys.executable, "-m", "transferlab", "-sc", "query=bash"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "regularisation.dropout." in proc.stdout.split(), proc.stdout


def test_run_and_sweep_folders_are_sortable_and_unique_within_a_second() -> None:
    import re

    folders = []
    for _ in range(2):
        proc, _ = _run(["-m", "transferlab", "--cfg", "hydra", "--resolve", "-p", "hydra"])
        assert proc.returncode == 0, proc.stderr
        hydra = yaml.safe_load(proc.stdout.split("\n", 1)[1])  # after the "# @package hydra" line
        run_dir, sweep_dir = Path(hydra["run"]["dir"]), Path(hydra["sweep"]["dir"])
        for folder in (run_dir, sweep_dir):
            assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-[0-9a-f]{6}", folder.name), folder
        assert run_dir.parent == Path("outputs/runs") and sweep_dir.parent == Path("outputs/sweeps")
        folders.append(run_dir.name)
    assert folders[0] != folders[1]
    # The id follows the time, so names sort by when the run started.
    assert [name[:19] for name in sorted(folders)] == sorted(name[:19] for name in folders)


PROBE = '''
import json
from pathlib import Path
from hydra.experimental.callback import Callback

class Probe(Callback):
    """Records what each job returned to the sweeper."""
    def on_job_end(self, config, job_return, **kwargs):
        with open(Path(config.hydra.sweep.dir) / "returns.jsonl", "a") as fh:
            fh.write(json.dumps({"job": config.hydra.job.num, "value": job_return.return_value}) + "\\n")
'''


@pytest.mark.slow
def test_sweep_objective_is_the_configured_validation_metric_and_epochs_are_logged(tmp_path: Path) -> None:
    import json
    import os

    import mlflow

    (tmp_path / "probe.py").write_text(PROBE)
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "transferlab", "-m", "optimized_metric=best_val_acc,best_val_loss",
         "trainer.epochs=2", "pretrain.epochs=1", "backbone.width=8", "tracking.log_graph=false",
         "tracking.log_model=false", "+hydra.callbacks.probe._target_=probe.Probe", f"hydra.sweep.dir={sweep}",
         f"paths.cache={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    returns = {r["job"]: r["value"] for r in map(json.loads, (sweep / "returns.jsonl").read_text().splitlines())}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.sweep_job != ''")
    assert len(runs) == 2
    for run in runs:
        job = int(run.data.tags["sweep_job"])
        metric = run.data.params["optimized_metric"]
        assert metric == ("best_val_acc", "best_val_loss")[job]
        assert returns[job] == pytest.approx(run.data.metrics[metric])
    # Not on a terminal: one line per epoch, on stdout and in the Hydra log of each job that trained: both
    # fine-tuned; the first pretrained, the second reused its weights (the same pretraining setting).
    for stage, epochs, jobs in (("pretrain (source task)", 1, (0,)), ("finetune", 2, (0, 1))):
        for epoch in range(1, epochs + 1):
            line = f"{stage} epoch {epoch}/{epochs} train_loss="
            assert proc.stdout.count(line) == len(jobs), proc.stdout[-3000:]
            for job in jobs:
                assert line in (sweep / str(job) / "__main__.log").read_text()


def test_a_dvc_stage_prints_one_line_per_epoch_outside_a_terminal(tmp_path: Path) -> None:
    path = params_file(tmp_path, {"pretrain.epochs": 2, "backbone.width": 8})
    for stage in ("prepare", "pretrain"):
        proc, _ = _run(["-m", f"transferlab.stages.{stage}", "--params", str(path)])
        assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " epoch " in line]
    assert [line.split(" train_loss=")[0] for line in lines] == [
        "pretrain (source task) epoch 1/2", "pretrain (source task) epoch 2/2"], proc.stdout
    assert all(key in lines[0] for key in ("train_acc=", "val_loss=", "val_acc=")), lines[0]
