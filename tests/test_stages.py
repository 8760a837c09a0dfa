"""Stage functions in-process on real digits: weight sources end to end, and
data-dependent checks that must fail before training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO

TINY = ["trainer.epochs=2", "pretrain.epochs=1", "trainer.progress=false", "tracking.log_model=false",
        "tracking.log_graph=false"]


def _cfg(tmp_path: Path, *overrides: str, name: str = "out"):
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.pipeline import with_output_dir

    cfg = load_config(compose([*TINY, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                               f"paths.cache={tmp_path / 'cache'}", *overrides], config_dir=REPO / "conf"))
    return with_output_dir(cfg, tmp_path / name)


def _backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    from transferlab.models.weights import read_weights_file

    return read_weights_file(path)


def _runs(tmp_path: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


@pytest.fixture
def first_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """One whole tiny pipeline (backbone.weights=source)."""
    from transferlab.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "tracking.log_model=true")
    result = run_pipeline(cfg)
    return cfg, result


def test_source_weights_come_from_the_source_task(first_run) -> None:
    cfg, _ = first_run
    meta = json.loads(Path(cfg.paths.weights).with_suffix(".json").read_text())
    assert meta["kind"] == "source"
    assert meta["source_task"]["classes"] == ["0", "1", "2", "3", "4"]
    assert len(meta["source_task"]["history"]) == cfg.pretrain.epochs
    # The fine-tuned model's frozen first layer is bitwise the source-task layer.
    best = torch.load(Path(cfg.paths.model) / "best.pt", weights_only=True)
    pretrained = _backbone_state(cfg.paths.weights)
    for key, value in pretrained.items():
        if key.startswith("block1."):
            assert torch.equal(best[f"backbone.{key}"], value), key


def test_weights_from_an_earlier_mlflow_run(first_run, tmp_path: Path) -> None:
    from transferlab.stages import prepare, pretrain

    cfg1, result = first_run
    cfg2 = _cfg(tmp_path, f"backbone.weights=runs:/{result['run_id']}/model", name="second")
    prepare.run(cfg2)
    meta = pretrain.run(cfg2)
    assert meta["input_size"] == 8  # the earlier run's size (its `model.input_size` param)
    assert meta["kind"] == "mlflow" and meta["mlflow_run_id"] == result["run_id"]
    assert meta["load_report"]["missing"] == [] and meta["load_report"]["unexpected"] == []
    best = torch.load(Path(cfg1.paths.model) / "best.pt", weights_only=True)
    loaded = _backbone_state(cfg2.paths.weights)
    assert loaded and all(torch.equal(v, best[f"backbone.{k}"]) for k, v in loaded.items())
    # The normalisation travels with the weights.
    assert meta["mean"] == best["preprocess.mean"].flatten().tolist()


def test_weights_from_a_registered_model(first_run, tmp_path: Path) -> None:
    import mlflow

    from transferlab.stages import prepare, pretrain

    _, result = first_run
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = mlflow.register_model(f"runs:/{result['run_id']}/model", "digits-5-9")
    cfg = _cfg(tmp_path, f"backbone.weights=models:/digits-5-9/{version.version}", name="registered")
    prepare.run(cfg)
    meta = pretrain.run(cfg)
    assert meta["mlflow_run_id"] == result["run_id"]


def test_weights_from_a_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from transferlab.models.assemble import build_backbone
    from transferlab.stages import prepare, pretrain

    cfg = _cfg(tmp_path, "backbone.input_size=8")
    prepare.run(cfg)
    torch.manual_seed(123)
    source = build_backbone(cfg.backbone).module.state_dict()
    path = tmp_path / "my_weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    cfg = replace(cfg, backbone=replace(cfg.backbone, weights=str(path)))
    meta = pretrain.run(cfg)
    assert meta["kind"] == "file"
    loaded = _backbone_state(cfg.paths.weights)
    assert all(torch.equal(loaded[k], v) for k, v in source.items())


def test_pickle_with_code_is_refused_by_the_stage(tmp_path: Path) -> None:
    from transferlab.models.weights import WeightsError
    from transferlab.stages import pretrain

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": Evil()}, path)
    cfg = _cfg(tmp_path)
    cfg = replace(cfg, backbone=replace(cfg.backbone, weights=str(path)))
    with pytest.raises(WeightsError, match="Refused to load"):
        pretrain.run(cfg)
    assert not marker.exists()
    assert not Path(cfg.paths.weights).exists()


def test_torchvision_weights_offline_say_where_the_file_goes(tmp_path: Path, monkeypatch) -> None:
    from transferlab.models.weights import WeightsError
    from transferlab.stages import pretrain

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = _cfg(tmp_path, "backbone=resnet18", "backbone.weights=IMAGENET1K_V1")
    try:
        pretrain.run(cfg)
    except WeightsError as err:
        message = str(err)
    else:
        pytest.skip("the weights downloaded: this machine is online")
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message


@pytest.mark.parametrize("override,match", [
    ("regularisation.freeze.first_n=7", r"first_n=7, but the backbone has only 3 layers"),
    ("head.num_units=3", r"num_units=3 is fewer than the 5 classes"),
])
def test_data_dependent_errors_come_before_training(tmp_path: Path, monkeypatch, override: str,
                                                    match: str) -> None:
    from transferlab.stages import finetune, prepare, pretrain

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, override)
    prepare.run(cfg)
    pretrain.run(cfg)
    with pytest.raises(ValueError, match=match):
        finetune.run(cfg)
    assert _runs(tmp_path) == []  # nothing was logged, nothing left RUNNING
    assert not (Path(cfg.paths.model) / "best.pt").exists()


def test_binary_head_on_five_classes_is_refused(tmp_path: Path) -> None:
    from transferlab.compose import compose
    from transferlab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="binary head needs a 2-class task"):
        load_config(compose(["head=binary", "head.hidden=[]"], config_dir=REPO / "conf"))


def test_keras_mlp_preset_trains(tmp_path: Path, monkeypatch) -> None:
    """The note's Keras example: 784 inputs, binary sigmoid output, max-norm on
    the hidden layers."""
    from transferlab.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "experiment=keras_mlp", "trainer.epochs=15")
    result = run_pipeline(cfg)
    assert result["test_acc"] > 0.9
    best = torch.load(Path(cfg.paths.model) / "best.pt", weights_only=True)
    assert best["head.hidden.0.weight"].shape == (128, 784)
    assert best["head.out.weight"].shape == (1, 128)
    for key in ("head.hidden.0.weight", "head.hidden.3.weight"):
        assert best[key].norm(dim=1).max() <= 5.0 + 1e-6


def test_interrupted_finetune_keeps_its_run_metrics_and_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C in epoch 2: the run ends KILLED, not RUNNING, with epoch 1's
    metrics and the best checkpoint so far."""
    import mlflow

    from transferlab.stages import finetune, prepare, pretrain

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "trainer.epochs=3")
    prepare.run(cfg)
    pretrain.run(cfg)
    from transferlab.tracking.tracker import Tracker

    real_log_metrics = Tracker.log_metrics

    def interrupt_in_epoch_two(self, metrics, step=0):
        real_log_metrics(self, metrics, step=step)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "log_metrics", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    (run,) = _runs(tmp_path)
    assert run.info.status == "KILLED"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/best.pt"]


def test_zero_lr_freezing_counts_the_same_frozen_parameters_everywhere(tmp_path: Path, monkeypatch) -> None:
    """zero_lr keeps frozen weights' gradients on; the logged params and summary.txt still agree."""
    import mlflow

    from transferlab.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "trainer.epochs=1", "regularisation.freeze.method=zero_lr",
               "regularisation.freeze.first_n=2")
    run_id = run_pipeline(cfg)["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = client.get_run(run_id).data.params
    frozen = int(params["model.params_frozen"])
    summary = Path(client.download_artifacts(run_id, "model_info/summary.txt", str(tmp_path))).read_text()
    line = next(x for x in summary.splitlines() if x.startswith("Frozen params:"))
    assert frozen > 0
    assert int(line.split(":")[1].replace(",", "")) == frozen
    total = int(params["model.params_total"])
    assert int(params["model.params_trainable"]) == total - frozen
