"""The logged model in every MLflow flavour: ``mlflow.pytorch`` and ``mlflow.pyfunc`` on images of any
size and channel count, ``mlflow models serve`` over REST, and the pyfunc without transferlab installed."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.timeout(300)

TINY = ["trainer.epochs=1", "pretrain.epochs=1", "trainer.progress=false", "backbone.width=8",
        "tracking.log_graph=false", "tracking.log_model=true"]
COLUMNS = ["predicted", "probability", *(f"prob_{c}" for c in "56789")]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One tiny run of the default experiment (digits, 1 channel, 8 px) that logs its model, with what
    MLflow warned while logging it (its input-example check through our pyfunc included)."""
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.data import load_prepared
    from transferlab.pipeline import run_pipeline, with_output_dir

    tmp = tmp_path_factory.mktemp("serving")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    records = _Records()
    logging.getLogger("mlflow").addHandler(records)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp)
            cfg = with_output_dir(load_config(compose([*TINY, f"tracking.uri={store}", f"paths.cache={tmp / 'cache'}"],
                                                      config_dir=REPO / "conf")), tmp / "run")
            run_id = run_pipeline(cfg)["run_id"]
    finally:
        logging.getLogger("mlflow").removeHandler(records)
    with open(Path(cfg.paths.plots) / "confusion.csv", newline="") as fh:
        evaluated = [row["predicted"] for row in csv.DictReader(fh)]
    test = load_prepared(Path(cfg.paths.prepared) / "target").splits["test"].images
    return tmp, store, f"runs:/{run_id}/model", test, evaluated, records.messages


def _other_inputs(images: torch.Tensor) -> dict[str, np.ndarray]:
    """The test images at two other sizes (one not square) and in the other channel count."""
    x = images.float()
    resized = {size: F.interpolate(x, size=size, mode="bilinear", antialias=True).round().clamp(0, 255)
               .to(torch.uint8).numpy() for size in ((13, 13), (20, 11))}
    return {"13x13": resized[(13, 13)], "20x11": resized[(20, 11)],
            "rgb": images.expand(-1, 3, -1, -1).contiguous().numpy()}


def test_both_flavours_predict_the_same_classes_on_any_size_and_channels(logged) -> None:
    import mlflow.pyfunc
    import mlflow.pytorch

    tmp, store, uri, test, evaluated, warnings = logged
    assert not [m for m in warnings if "Got error" in m or "Failed to validate" in m], warnings
    mlflow.set_tracking_uri(store)
    module = mlflow.pytorch.load_model(uri)
    pyfunc = mlflow.pyfunc.load_model(uri)

    stored = pyfunc.predict(test.numpy())
    assert list(stored.columns) == COLUMNS
    assert list(stored["predicted"]) == evaluated  # as evaluate scored the test split
    probs = stored[COLUMNS[2:]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(stored["probability"].to_numpy(), probs.max(axis=1))

    for name, images in _other_inputs(test).items():
        frame = pyfunc.predict(images)
        with torch.no_grad():
            out = module(torch.from_numpy(images))
        assert out.shape == (len(images), 5), name
        assert list(frame["predicted"]) == [str(5 + i) for i in out.argmax(dim=1).tolist()], name
        assert np.allclose(frame[COLUMNS[2:]].to_numpy(), out.numpy(), atol=1e-6), name
    # Grey repeated to RGB is the same image: the model's luma weighting gives back the grey.
    rgb = pyfunc.predict(_other_inputs(test)["rgb"])
    assert list(rgb["predicted"]) == evaluated
    assert np.allclose(rgb[COLUMNS[2:]].to_numpy(), probs, atol=1e-5)

    with pytest.raises(Exception, match="uint8"):
        pyfunc.predict(test.numpy().astype(np.float32))


def test_the_pyfunc_loads_and_predicts_without_transferlab(logged, tmp_path: Path) -> None:
    """A fresh interpreter that cannot import transferlab (nor this checkout's sources) loads the
    downloaded model: its loader comes from the model's code/ folder."""
    from mlflow.artifacts import download_artifacts

    tmp, store, uri, test, evaluated, _ = logged
    local = download_artifacts(artifact_uri=uri, dst_path=str(tmp_path), tracking_uri=store)
    np.save(tmp_path / "images.npy", test.numpy())
    script = (
        "import sys; sys.modules['transferlab'] = None\n"
        "import numpy as np, mlflow.pyfunc\n"
        f"model = mlflow.pyfunc.load_model({local!r}, model_config={{'device': 'cpu'}})\n"
        f"print(list(model.predict(np.load({str(tmp_path / 'images.npy')!r}))['predicted']))\n"
        "print(sys.modules['transferlab_serving'].__file__)\n")
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted, loader = proc.stdout.strip().splitlines()[-2:]
    assert eval(predicted) == evaluated
    assert Path(loader).is_relative_to(Path(local) / "code")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_with_class_names(logged) -> None:
    import mlflow.pyfunc

    tmp, store, uri, test, evaluated, _ = logged
    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp, env=subprocess_env(MLFLOW_TRACKING_URI=store), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 120 s"
                time.sleep(0.5)
        images = _other_inputs(test[:6])["20x11"]
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()})
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the session it leads
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    rows = answer["predictions"]
    assert [list(r) for r in rows] == [COLUMNS] * len(images)
    mlflow.set_tracking_uri(store)
    expected = mlflow.pyfunc.load_model(uri).predict(images)
    assert [r["predicted"] for r in rows] == list(expected["predicted"])
    assert np.allclose([[r[c] for c in COLUMNS[2:]] for r in rows], expected[COLUMNS[2:]].to_numpy(), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_pyfunc_predicts_as_on_the_cpu(logged) -> None:
    import mlflow.pyfunc

    tmp, store, uri, test, evaluated, warnings = logged
    mlflow.set_tracking_uri(store)
    on_cuda = mlflow.pyfunc.load_model(uri)  # CUDA by default where there is one
    on_cpu = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    assert next(on_cuda.get_raw_model().parameters()).device.type == "cuda"
    for images in [test.numpy(), *_other_inputs(test).values()]:
        gpu, cpu = on_cuda.predict(images), on_cpu.predict(images)
        assert list(gpu["predicted"]) == list(cpu["predicted"])
        assert np.allclose(gpu[COLUMNS[2:]].to_numpy(), cpu[COLUMNS[2:]].to_numpy(), atol=1e-4)


@pytest.mark.parametrize("data_channels, channels, stored, size", [(1, 1, 8, 8), (1, 3, 20, 12), (3, 1, 9, 12),
                                                                  (3, 3, 16, 16)])
def test_serving_preprocessing_is_trainings_on_the_stored_images(data_channels: int, channels: int, stored: int,
                                                                  size: int) -> None:
    """Bit for bit, whether training resizes and crops (20 -> 14 -> 12), upsamples (9 -> 12) or passes the
    images as they are; the exported program, all its dimensions dynamic, too."""
    from transferlab.config.schema import BackboneConfig, ExperimentConfig, HeadConfig
    from transferlab.models.assemble import ModelSpec, build_model, export_serving

    cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", channels=channels, input_size=size, width=8),
                           head=HeadConfig(name="linear"))
    spec = ModelSpec.decide(cfg, class_names=["a", "b", "c"], data_channels=data_channels, data_size=stored,
                            data_mean=[0.4] * data_channels, data_std=[0.3] * data_channels)
    torch.manual_seed(0)
    model, _ = build_model(spec)
    model.eval()
    images = torch.randint(0, 256, (5, data_channels, stored, stored), dtype=torch.uint8)
    assert torch.equal(model.preprocess.serve(images), model.preprocess(images))
    served = export_serving(model, side=stored).module()
    with torch.no_grad():
        assert torch.equal(served(images), model.head.probabilities(model(images)))
        other = torch.randint(0, 256, (1, 4 - data_channels, 7, 31), dtype=torch.uint8)
        assert served(other).shape == (1, 3)


class _DataDependent(torch.nn.Module):
    """A backbone whose control flow depends on the pixels: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


def test_a_model_torch_export_cannot_trace_is_logged_as_a_pickle(logged, monkeypatch) -> None:
    """It still predicts probabilities through the same loader (with pickles allowed, and this package).
    (A new run in the fixture's store: creating a store costs seconds.)"""
    import mlflow

    from transferlab.models.assemble import FineTuneModel, Preprocess, ServingModel
    from transferlab.models.heads import create_head
    from transferlab.tracking.models import load_logged_model, log_model

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    head = create_head("linear", in_features=64, num_classes=2, hidden=[], activations=[], dropouts=[])
    model = FineTuneModel(Preprocess(1, 1, 8, [0.4], [0.3]), _DataDependent(), head).eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    store = logged[1]
    mlflow.set_tracking_uri(store)
    with mlflow.start_run() as run, pytest.warns(UserWarning, match="torch.export failed"):
        assert log_model(model, images, {"class_names": ["a", "b"], "stored_size": 8}) == "pickle"
    module, spec = load_logged_model(f"runs:/{run.info.run_id}/model", uri=store, device=torch.device("cpu"))
    assert spec["class_names"] == ["a", "b"]
    with torch.no_grad():
        assert torch.equal(module(images), ServingModel(model)(images))
