"""The default recipe's mechanisms: a budget in optimiser steps, the pixel baseline beside the model, the
source backbone's checks, and freezing that protects only pretrained weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, digit_batches, prepared_from
from transferlab.config.schema import (
    BackboneConfig, DropoutConfig, ExperimentConfig, FreezeConfig, RegularisationConfig, TrainerConfig,
)
from transferlab.errors import ConfigError
from transferlab.training.build import build_training
from transferlab.training.loop import Hook

TINY = ["trainer.epochs=2", "pretrain.epochs=1", "backbone.width=8", "trainer.progress=false",
        "tracking.log_model=false", "tracking.log_graph=false"]


def _cfg(*, weights: str | None = None, freeze: FreezeConfig | None = None, **trainer: object) -> ExperimentConfig:
    return ExperimentConfig(
        backbone=BackboneConfig(name="small_cnn", channels=1, width=8, depth=2, weights=weights),
        regularisation=RegularisationConfig(dropout=DropoutConfig(input=0.0, hidden=0.0),
                                            freeze=freeze or FreezeConfig()),
        trainer=TrainerConfig(**{"batch_size": 32, "progress": False, **trainer}))  # type: ignore[arg-type]


class _CountSteps(Hook):
    def __init__(self) -> None:
        self.steps = 0

    def after_step(self) -> None:
        self.steps += 1


# --------------------------------------------------------------------------- budget in optimiser steps


@pytest.mark.parametrize(("trainer", "epochs", "steps_per_epoch"), [
    ({"epochs": 100, "max_steps": 20}, 5, 4),      # 100 images, batches of 32: 4 steps an epoch; ceil(20 / 4)
    ({"epochs": 3, "max_steps": 20}, 3, 4),        # epochs come first
    ({"epochs": 100, "max_steps": 18}, 5, 4),      # rounded up to whole epochs
    ({"epochs": 100, "max_steps": 20, "accumulate_grad_batches": 2}, 10, 2),  # optimiser steps, not batches
    ({"epochs": 100, "max_steps": 20, "min_steps_per_epoch": 10}, 2, 10),     # batches of 10 first
    ({"epochs": 7}, 7, 4),                         # null: epochs alone
])
def test_max_steps_sets_the_epochs_from_the_size_of_the_training_split(trainer, epochs, steps_per_epoch) -> None:
    data = prepared_from(*digit_batches(100, 40))
    t = build_training(_cfg(**trainer), data)
    assert (t.cfg.trainer.epochs, t.optimiser_steps) == (epochs, steps_per_epoch)
    assert t.settings.epochs == epochs and t.schedule.epochs == epochs


def test_max_steps_trains_that_many_optimiser_steps_on_any_split_size() -> None:
    for n_train in (40, 160):  # 2 and 5 steps an epoch
        data = prepared_from(*digit_batches(n_train, 40))
        torch.manual_seed(0)
        t = build_training(_cfg(epochs=1000, max_steps=10), data)
        counter = _CountSteps()
        result = t.fit(*(t.batches(data, s) for s in ("train", "val")), hooks=[counter])
        assert counter.steps == 10 and len(result.history) == 10 // t.optimiser_steps


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.max_steps=0", r"^trainer.max_steps: must be >= 1"),
    ("baseline=linear", r"^baseline: Unknown baseline 'linear'; expected one of \['logistic'\]"),
])
def test_bad_budget_and_baseline_are_refused(override: str, message: str) -> None:
    from transferlab.compose import compose
    from transferlab.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(compose([override], config_dir=REPO / "conf"))


# --------------------------------------------------------------------------- freezing a random init


def test_freezing_a_random_init_backbone_is_skipped_with_a_warning() -> None:
    data = prepared_from(*digit_batches(64, 32))
    freeze = FreezeConfig(first_n=1, patterns=["head.*"])
    scratch = build_training(_cfg(weights=None, freeze=freeze, epochs=1), data)
    assert len(scratch.plan.warnings) == 1 and "backbone.weights=null" in scratch.plan.warnings[0]
    params = dict(scratch.model.named_parameters())
    assert all(p.requires_grad for n, p in params.items() if n.startswith("backbone."))
    assert scratch.plan.frozen and all(n.startswith("head.") for n in scratch.plan.frozen)  # the head still
    pretrained = build_training(_cfg(weights="source", freeze=freeze, epochs=1), data)
    assert pretrained.plan.warnings == () and pretrained.plan.layers == ("block1",)
    assert not any(p.requires_grad for n, p in pretrained.model.named_parameters() if n.startswith("backbone.block1."))


# --------------------------------------------------------------------------- the weak-source warning


def test_weak_backbone_warning_compares_the_probe_with_the_pixel_baseline() -> None:
    from transferlab.baselines import weak_backbone_warning

    warning = weak_backbone_warning(0.69, 0.79, 0.95)
    assert warning is not None and "0.690" in warning and "0.790" in warning and "0.950" in warning
    assert "reached" not in (weak_backbone_warning(0.69, 0.79) or "reached")
    assert weak_backbone_warning(0.79, 0.79) is None and weak_backbone_warning(0.9, 0.79, 0.5) is None


# --------------------------------------------------------------------------- the baseline in a run


def test_the_pixel_baseline_is_logged_beside_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.data import load_prepared
    from transferlab.pipeline import run_pipeline, with_output_dir

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [*TINY, f"tracking.uri={uri}", f"paths.cache={tmp_path / 'cache'}", "data.max_per_class=20"]
    cfg = with_output_dir(load_config(compose([*base, "baseline=logistic"], config_dir=REPO / "conf")),
                          tmp_path / "with")
    result = run_pipeline(cfg)
    out = capsys.readouterr().out

    # The same training images and test split, fitted here independently.
    data = load_prepared(Path(cfg.paths.prepared) / "target")
    (x, y), (xt, yt) = ((s.images.reshape(len(s.labels), -1).numpy() / 255.0, s.labels.numpy())
                        for s in (data.splits["train"], data.splits["test"]))
    assert len(y) == 5 * 20 and len(yt) > 100  # the cap applies to the training split only
    expected = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y).score(xt, yt)
    written = json.loads((Path(cfg.paths.metrics) / "test.json").read_text())
    assert written["baseline_test_acc"] == pytest.approx(expected)
    metrics = mlflow.MlflowClient(uri).get_run(result["run_id"]).data.metrics
    assert metrics["baseline_test_acc"] == pytest.approx(expected)
    assert metrics["test_acc"] == pytest.approx(written["test_acc"])
    sidecar = json.loads(Path(cfg.paths.weights).with_suffix(".json").read_text())
    assert metrics["source_val_acc"] == pytest.approx(sidecar["source_task"]["val_acc"])
    assert 0 <= metrics["probe_val_acc"] <= 1 and 0 <= metrics["baseline_val_acc"] <= 1
    # The preset re-initialises the last layer; the probe still scores the loaded weights, exactly.
    from dataclasses import replace

    from transferlab.baselines import linear_probe
    from transferlab.models.weights import read_weights_file

    assert cfg.backbone.reinit_last_n == 1 and "finetune: backbone.reinit_last_n=1: ['block3'] start from" in out
    loaded = build_training(replace(cfg, backbone=replace(cfg.backbone, reinit_last_n=0)), data,
                            weights_meta=sidecar, backbone_state=read_weights_file(cfg.paths.weights))
    assert metrics["probe_val_acc"] == pytest.approx(
        linear_probe(loaded.model, data, batch_size=cfg.trainer.eval_batch_size), abs=1e-12)
    assert f"logistic regression on pixels: {expected:.4f}" in out
    assert ("finetune: warning: the initial backbone looks weak" in out) == (
        metrics["probe_val_acc"] < metrics["baseline_val_acc"])

    off = with_output_dir(load_config(compose([*base, "baseline=null"], config_dir=REPO / "conf")),
                          tmp_path / "without")
    run_id = run_pipeline(off)["run_id"]
    assert "baseline_test_acc" not in json.loads((Path(off.paths.metrics) / "test.json").read_text())
    logged = mlflow.MlflowClient(uri).get_run(run_id).data.metrics
    assert "baseline_test_acc" not in logged and "probe_val_acc" not in logged and "source_val_acc" in logged
