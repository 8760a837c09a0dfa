"""A usable model out: ONNX export checked against PyTorch through onnxruntime, and the best model of a run
or a sweep registered in the MLflow model registry under an alias that ``backbone.weights`` loads back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env
from transferlab.errors import ConfigError, ExportError

pytestmark = pytest.mark.timeout(300)

TINY = ["trainer.epochs=1", "pretrain.epochs=1", "trainer.progress=false", "backbone.width=8",
        "tracking.log_graph=false"]
MODEL_NAME = "digits"


def _config(tmp: Path, out: str, overrides: list[str]):  # type: ignore[no-untyped-def]
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.pipeline import with_output_dir

    cfg = load_config(compose([*TINY, f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"paths.cache={tmp / 'cache'}",
                               *overrides], config_dir=REPO / "conf"))
    return with_output_dir(cfg, tmp / out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One tiny pipeline run that logs its model and registers it as ``digits`` (alias champion)."""
    from transferlab.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        cfg = _config(tmp, "first", ["tracking.log_model=true", f"tracking.register={MODEL_NAME}"])
        result = run_pipeline(cfg)
    return tmp, cfg, result


def _export(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transferlab", "export", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_export_matches_pytorch_on_the_test_split_and_carries_the_class_names(trained) -> None:
    import onnxruntime

    tmp, cfg, _ = trained
    target = Path(cfg.paths.prepared) / "target"
    out = tmp / "onnx" / "model.onnx"
    proc = _export([cfg.paths.model, "--out", str(out), "--check", str(target)], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if "max |probability difference|" in x)
    diff = float(line.split("= ")[1].split()[0])
    assert diff <= 1e-4

    meta = _metadata(out)
    assert json.loads(meta["class_names"]) == ["5", "6", "7", "8", "9"]
    assert json.loads(meta["model_spec"])["class_names"] == ["5", "6", "7", "8", "9"]
    # Any batch size; the probabilities predict the classes evaluate found.
    from transferlab.data import load_prepared
    from transferlab.stages.evaluate import load_trained, predict

    images = load_prepared(target).splits["test"].images
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        probs = session.run(["probabilities"], {"images": images[:n].numpy()})[0]
        assert probs.shape == (n, 5) and abs(float(probs.sum()) - n) < 1e-4
    probs = session.run(["probabilities"], {"images": images.numpy()})[0]
    expected, _ = predict(load_trained(cfg.paths.model), images, batch_size=64)
    assert (probs.argmax(axis=1) == expected).all()


def test_a_failed_check_writes_nothing(trained) -> None:
    """Data of other classes is refused before the export: no file, one error line, exit 2."""
    tmp, cfg, _ = trained
    out = tmp / "refused.onnx"
    proc = _export([cfg.paths.model, "--out", str(out), "--check", str(Path(cfg.paths.prepared) / "source")], tmp)
    assert proc.returncode == 2 and "--check" in proc.stderr and "classes" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_export_of_a_runs_uri(trained) -> None:
    tmp, cfg, result = trained
    out = tmp / "from_run.onnx"
    proc = _export([f"runs:/{result['run_id']}/model", "--tracking-uri", cfg.tracking.uri, "--out", str(out),
                    "--check", str(Path(cfg.paths.prepared) / "target")], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(_metadata(out)["model_spec"]) == json.loads((Path(cfg.paths.model) / "model_spec.json").read_text())
    missing = _export(["runs:/0123456789abcdef/model", "--tracking-uri", cfg.tracking.uri, "--out", str(out)], tmp)
    assert missing.returncode == 2 and "0123456789abcdef" in missing.stderr


@pytest.mark.parametrize("head, classes", [("overcomplete", ["a", "b", "c"]), ("binary", ["no", "yes"])])
def test_preprocessing_that_resizes_and_crops_exports_within_tolerance(tmp_path: Path, head: str,
                                                                       classes: list[str]) -> None:
    """Grey images stored at 20 px, resized (antialiased) to 14, centre-cropped to 12, fed to an RGB backbone;
    a binary head's single logit comes out as the two classes' probabilities. Images of other sizes and
    channel counts go through the ONNX model as through PyTorch."""
    from transferlab.config.schema import BackboneConfig, ExperimentConfig, HeadConfig
    from transferlab.export import TOLERANCE, export_onnx, max_difference
    from transferlab.models.assemble import ModelSpec, build_model

    cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", channels=3, input_size=12, width=8),
                           head=HeadConfig(name=head))
    spec = replace(ModelSpec.decide(cfg, class_names=classes, data_channels=1, data_size=20,
                                    data_mean=[0.4], data_std=[0.3]), resize=14)
    torch.manual_seed(0)
    model, _ = build_model(spec)
    model.eval()
    assert model.head.binary == (head == "binary")
    export_onnx(model, spec, tmp_path / "m.onnx")
    for shape in ((9, 1, 20, 20), (1, 1, 20, 20), (2, 3, 20, 20), (3, 1, 31, 9), (2, 3, 8, 8)):
        images = torch.randint(0, 256, shape, dtype=torch.uint8)
        assert max_difference(model, tmp_path / "m.onnx", images) <= TOLERANCE, shape
    import onnxruntime

    probs = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(["probabilities"], {"images": images.numpy()})[0]
    assert probs.shape == (2, len(classes))


def test_a_missing_exporter_names_the_extra() -> None:
    from transferlab.export import require

    with pytest.raises(ExportError, match=r"pip install 'transferlab\[export\]'"):
        require("onnx", "transferlab_no_such_exporter")


def test_the_registration_keys_are_checked_before_any_work() -> None:
    from transferlab.compose import compose
    from transferlab.config import load_config

    def load(*overrides: str):  # type: ignore[no-untyped-def]
        return load_config(compose(list(overrides), config_dir=REPO / "conf"))

    assert load("tracking.register=digits").tracking.register_alias == "champion"
    with pytest.raises(ConfigError, match="tracking.register: .*log_model"):
        load("tracking.register=digits", "tracking.log_model=false")
    with pytest.raises(ConfigError, match="tracking.register:"):
        load("tracking.register=a@b")
    for alias in ("latest", "v2", "the best"):
        with pytest.raises(ConfigError, match="tracking.register_alias"):
            load("tracking.register=digits", f"tracking.register_alias={alias}")


def test_the_registered_champion_loads_back_as_backbone_weights(trained) -> None:
    """models:/digits@champion names the first run; a new run's pretrain takes its backbone from it."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from transferlab.pipeline import run_pipeline

    tmp, cfg, result = trained
    client = MlflowClient(cfg.tracking.uri)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.run_id == result["run_id"]

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        again = _config(tmp, "second", ["tracking.log_model=false", f"backbone.weights=models:/{MODEL_NAME}@champion"])
        run_pipeline(again)
    loaded = load_file(again.paths.weights)
    trained_state = torch.load(Path(cfg.paths.model) / "best.pt", map_location="cpu", weights_only=True)
    backbone = {k[len("backbone."):]: v for k, v in trained_state.items() if k.startswith("backbone.")}
    assert loaded.keys() == backbone.keys() and loaded
    assert all(torch.equal(loaded[k], backbone[k]) for k in backbone)
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 1  # the second run registered nothing


@pytest.mark.slow
def test_a_sweep_registers_the_job_with_the_best_validation_accuracy(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cwd = tmp_path / "work"
    cwd.mkdir()
    shutil.copytree(REPO / "conf", cwd / "conf")
    args = [sys.executable, "-m", "transferlab", "-m", "trainer.epochs=3,1", *TINY[1:], "tracking.register=best",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("stage") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    accuracies = {r.data.tags["sweep_job"]: r.data.metrics["best_val_acc"] for r in children}
    assert len(set(accuracies.values())) == 2, accuracies  # one best job (the first: not merely the last one run)
    versions = client.search_model_versions("name = 'best'")
    assert len(versions) == 1  # the jobs registered nothing themselves
    champion = client.get_model_version_by_alias("best", "champion")
    chosen = next(r for r in children if r.info.run_id == champion.run_id)
    assert chosen.data.metrics["best_val_acc"] == max(r.data.metrics["best_val_acc"] for r in children)
    assert parent.data.tags["registered_job"] == chosen.data.tags["sweep_job"]
