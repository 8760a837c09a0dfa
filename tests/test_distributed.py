"""Data-parallel training under torchrun: real ``torchrun`` processes on the CPU (gloo)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env
from transferlab.errors import ConfigError
from transferlab.training.distributed import Context, local_batch_size, local_order, shard_indices
from transferlab.training.loop import steps_per_epoch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_each_rank_takes_its_shard_in_the_epochs_global_order() -> None:
    n, world = 11, 3
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    covered = []
    for rank in range(world):
        ctx = Context(rank=rank, world=world)
        shard = torch.arange(n)[shard_indices(n, ctx)]  # the images this rank holds
        mine = local_order(order, ctx)  # indices into its shard
        assert sorted(mine.tolist()) == list(range(len(shard)))
        members = shard[mine]
        assert members.tolist() == [i for i in order.tolist() if i % world == rank]
        covered += members.tolist()
    assert sorted(covered) == list(range(n))
    # Every rank takes the same number of steps (shards differ by one image at most).
    assert {steps_per_epoch(n, 6, Context(rank=r, world=world)) for r in range(world)} == {1}
    assert steps_per_epoch(1000, 64, Context(rank=0, world=2)) == steps_per_epoch(500, 32)


def test_a_global_batch_the_processes_cannot_share_evenly_is_refused() -> None:
    assert local_batch_size(64, Context(rank=1, world=2)) == 32
    with pytest.raises(ConfigError, match=r"^trainer.batch_size: 63 is the global batch of 2 processes"):
        local_batch_size(63, Context(rank=0, world=2))


# One rank's script: 64 digit images, a global batch of 64 (32 a rank), no dropout and no BatchNorm, so a step
# of the two processes is the step of one process on all 64 images; rank 0 saves what it trained.
_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import digit_batches, prepared_from
from transferlab.config.schema import (BackboneConfig, DropoutConfig, ExperimentConfig, OptimizerConfig,
                                       RegularisationConfig, SchedulerConfig, TrainerConfig)
from transferlab.training.build import build_training

train, val = digit_batches(64, 40)
torch.manual_seed(0)
cfg = ExperimentConfig(
    backbone=BackboneConfig(name="mlp", channels=1, hidden=[32]),
    regularisation=RegularisationConfig(dropout=DropoutConfig(input=0.0, hidden=0.0)),
    optimizer=OptimizerConfig(name="sgd", lr=0.5, momentum=0.9), scheduler=SchedulerConfig(name="none"),
    trainer=TrainerConfig(epochs=3, batch_size=64, progress=False, num_threads=1))
data = prepared_from(train, val)
t = build_training(cfg, data)
result = t.fit(t.batches(data, "train"), t.batches(data, "val"))
if t.ctx.main:
    torch.save(t.model.state_dict(), sys.argv[1])
    json.dump(result.history, open(sys.argv[1] + ".json", "w"))
"""


def test_two_processes_train_as_one_on_the_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT.format(tests=str(REPO / "tests")))
    out = tmp_path / "ddp.pt"
    proc = subprocess.run([*TORCHRUN, str(script), str(out)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = tmp_path / "one.pt"
    proc = subprocess.run([sys.executable, str(script), str(one)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, single = torch.load(out, weights_only=True), torch.load(one, weights_only=True)
    for key, value in single.items():  # three steps of averaged gradients: the same weights
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6)
    h_ddp, h_one = json.loads(Path(f"{out}.json").read_text()), json.loads(Path(f"{one}.json").read_text())
    for a, b in zip(h_ddp, h_one, strict=True):  # metrics reduced over both shards
        assert a["val_acc"] == b["val_acc"] and a["train_acc"] == b["train_acc"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_runs_the_default_experiment_as_one_run_close_to_one_process(tmp_path: Path) -> None:
    """The app under torchrun (2 processes, the same global batch): one MLflow run with every epoch, outputs
    written once by rank 0 into its run folder, and the test accuracy of one process within two of the 179
    test images (the second run reuses the source-task weights the first trained, so only fine-tuning
    differs: another batch order and other dropout masks move a run by an image or two)."""
    from mlflow import MlflowClient

    shutil.copytree(REPO / "conf", tmp_path / "conf")
    settings = ["tracking.log_graph=false", "tracking.log_model=false", "trainer.max_steps=90"]
    proc = subprocess.run([*TORCHRUN, "-m", "transferlab", *settings, "hydra.run.dir=ddp"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "transferlab", *settings, "hydra.run.dir=one"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrain: reusing" in proc.stdout
    acc = {name: json.loads((tmp_path / name / "metrics" / "test.json").read_text())["test_acc"]
           for name in ("ddp", "one")}
    assert round(abs(acc["ddp"] - acc["one"]) * 179) <= 2, acc  # the default target's test split: 179 images
    assert sorted(p.name for p in tmp_path.iterdir()) == [".transferlab", "conf", "ddp", "mlflow.db",
                                                          "mlflow.db.lock", "mlruns", "one", "outputs"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    (ddp,) = [r for r in runs if r.data.tags.get("processes") == "2"]
    epochs = ddp.data.params["trainer.epochs"]
    assert [m.step for m in client.get_metric_history(ddp.info.run_id, "val_acc")] == \
        list(range(1, int(epochs) + 1))
    assert ddp.data.params["trainer.batch_size"] == "64"  # the global batch, 32 a process
