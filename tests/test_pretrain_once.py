"""Source-task pretraining runs once per distinct pretraining setting: sweep jobs and runs started together
that share the setting reuse the weights the first one trained (``pipeline.pretrain_shared``)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

# Progress stays on: outside a terminal it is one log line per epoch, which shows the source task training.
TINY = ["trainer.epochs=1", "pretrain.epochs=1", "backbone.width=8", "tracking.log_graph=false",
        "tracking.log_model=false"]
REUSE = "pretrain: reusing "
TRAINED = "pretrain: wrote "


def _cfg(tmp_path: Path, *overrides: str):
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.pipeline import with_output_dir

    overrides = [*TINY, "trainer.progress=false", f"paths.cache={tmp_path / 'cache'}", *overrides]
    cfg = load_config(compose(overrides, config_dir=REPO / "conf"))
    return with_output_dir(cfg, tmp_path / "out")


def _runs(store: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'finetune'")


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_the_key_follows_the_pretraining_setting_only(tmp_path: Path) -> None:
    from transferlab.pipeline import pretrained_key

    base = pretrained_key(_cfg(tmp_path))
    # Fine-tuning settings, tracking and the numerically neutral trainer settings share the key ...
    for same in (["regularisation.dropout.hidden=0.3"], ["optimizer.lr=0.01"], ["head.hidden=[64]"],
                 ["trainer.epochs=3"], ["augment=flip"], ["trainer.ema.enabled=true"], ["trainer.num_threads=1"],
                 ["trainer.memory_budget_mb=1"], ["tracking.experiment=other"], ["trainer.device=cpu"]):
        assert pretrained_key(_cfg(tmp_path, *same)) == base, same
    # ... the data, seed, backbone, pretrain recipe and the trainer's kernels do not.
    for other in (["seed=1"], ["pretrain.epochs=2"], ["pretrain.optimizer.lr=0.1"], ["pretrain.batch_size=32"],
                  ["pretrain.input_dropout=0.0"], ["backbone.width=16"], ["data.max_per_class=20"], ["pretrain.max_per_class=20"],
                  ["trainer.amp=true"], ["trainer.channels_last=true"], ["trainer.compile=true"]):
        assert pretrained_key(_cfg(tmp_path, *other)) != base, other


def test_weights_without_their_sidecar_are_not_reused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What a job killed between the weights file and its sidecar leaves is trained again, not reused."""
    from transferlab.models.weights import weights_meta_path
    from transferlab.pipeline import prepare_shared, pretrain_shared, pretrained_key

    cfg = _cfg(tmp_path)
    prepare_shared(cfg)
    pretrain_shared(cfg)
    shared = tmp_path / "cache" / "weights" / pretrained_key(cfg) / "backbone.safetensors"
    assert _sha16(Path(cfg.paths.weights)) == _sha16(shared)
    second = replace(cfg, paths=replace(cfg.paths, weights=str(tmp_path / "second" / "backbone.safetensors")))
    pretrain_shared(second)
    assert capsys.readouterr().out.count(REUSE) == 1
    assert _sha16(Path(second.paths.weights)) == _sha16(shared)

    weights_meta_path(shared).unlink()
    pretrain_shared(second)
    out = capsys.readouterr().out
    assert REUSE not in out and f"{TRAINED}{shared}" in out
    assert weights_meta_path(shared).is_file() and weights_meta_path(second.paths.weights).is_file()


@pytest.mark.slow
def test_a_sweep_pretrains_once_per_pretraining_setting(tmp_path: Path) -> None:
    """Six jobs, two pretraining settings: two source tasks trained, four reused, every job FINISHED with
    the weights of its setting."""
    store = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "transferlab", "-m", "regularisation.dropout.hidden=0.1,0.2,0.3", "pretrain.epochs=1,2",
         *(o for o in TINY if not o.startswith("pretrain.epochs")), f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"paths.cache={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{store}"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    # The source task trained once per setting (its epoch lines), and the other jobs say they reuse it.
    for epochs in (1, 2):
        for epoch in range(1, epochs + 1):
            assert log.count(f"pretrain (source task) epoch {epoch}/{epochs} train_loss=") == 1, log[-3000:]
    assert log.count(TRAINED) == 2, log[-3000:]
    assert log.count(REUSE) == 4 and log.count("(same pretraining setting)") == 4, log[-3000:]
    assert len(list((tmp_path / "cache" / "weights").glob("*/backbone.safetensors"))) == 2

    runs = _runs(store)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    by_setting: dict[str, set[str]] = {}
    for run in runs:
        by_setting.setdefault(run.data.params["pretrain.epochs"], set()).add(run.data.tags["weights_hash"])
        # Lineage: the tag is the hash of the weights file the job fine-tuned from, in its own folder.
        job = tmp_path / "sweep" / run.data.tags["sweep_job"]
        assert run.data.tags["weights_hash"] == _sha16(job / "weights" / "backbone.safetensors")
    assert set(by_setting) == {"1", "2"} and all(len(hashes) == 1 for hashes in by_setting.values())
    assert by_setting["1"] != by_setting["2"]


@pytest.mark.slow
def test_runs_started_together_pretrain_once(tmp_path: Path) -> None:
    """Two runs with the same setting at once: one trains the source task under the lock, the other waits
    and reuses it; both finish."""
    store = tmp_path / "mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-m", "transferlab", *TINY, f"regularisation.dropout.hidden={p}",
                               f"hydra.run.dir={tmp_path / f'run{i}'}", f"paths.cache={tmp_path / 'cache'}",
                               f"tracking.uri=sqlite:///{store}"],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i, p in enumerate((0.1, 0.2))]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    assert sum(out.count("pretrain (source task) epoch 1/1 train_loss=") for out in outputs) == 1, outputs
    assert sum(out.count(TRAINED) for out in outputs) == 1, outputs
    assert sum(out.count(REUSE) for out in outputs) == 1, outputs
    runs = _runs(store)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["weights_hash"] for r in runs}) == 1
