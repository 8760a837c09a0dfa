"""``transferlab predict``: a trained model's predictions for image files, as the pipeline scored them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, subprocess_env
from test_photo_folder import _photo_folder


def _predict(args: list[str], cwd: Path, module: str = "transferlab") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *(["predict"] if module == "transferlab" else []), *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_predictions_on_the_test_images_score_the_runs_test_accuracy(tmp_path: Path, monkeypatch) -> None:
    """Photos stored at 48 px, resized to 37 and cropped to 32 by the model: the test split written back
    as PNG files (plus one corrupt file) is predicted image for image as ``evaluate`` predicted it, from
    the model folder and from the logged model alike."""
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.data import load_prepared
    from transferlab.pipeline import run_pipeline, with_output_dir
    from transferlab.stages.evaluate import load_trained, predict

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["~experiment", "data=imagefolder", f"data.path={_photo_folder(tmp_path / 'photos')}",
                 "data.image_size=48", "backbone=small_cnn", "backbone.channels=3", "backbone.width=8",
                 "backbone.depth=2", "backbone.input_size=32", "trainer.epochs=2", "trainer.batch_size=16",
                 "trainer.progress=false", "tracking.log_graph=false", "tracking.log_model=true",
                 f"tracking.uri={store}", f"paths.cache={tmp_path / 'cache'}"]
    cfg = with_output_dir(load_config(compose(overrides, config_dir=REPO / "conf")), tmp_path / "run")
    run_id = run_pipeline(cfg)["run_id"]
    test_acc = json.loads((Path(cfg.paths.metrics) / "test.json").read_text())["test_acc"]
    with open(Path(cfg.paths.plots) / "confusion.csv", newline="") as fh:
        evaluated = [row["predicted"] for row in csv.DictReader(fh)]

    data = load_prepared(Path(cfg.paths.prepared) / "target")
    test = data.splits["test"]
    _, expected = predict(load_trained(cfg.paths.model), test.images, batch_size=64)
    assert test.images.shape[1:] == (3, 48, 48)
    folder = tmp_path / "new"
    names = []
    for i, (image, label) in enumerate(zip(test.images.numpy(), test.labels.tolist())):
        names.append(f"{data.class_names[label]}/{i:03d}.png")
        (folder / names[-1]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(folder / names[-1])
    (folder / data.class_names[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "notes.txt").write_text("not an image")

    for model, module in ((cfg.paths.model, "transferlab"), (f"runs:/{run_id}/model", "transferlab.predict")):
        out = tmp_path / f"{module}.csv"
        proc = _predict([model, str(folder), "--out", str(out), "--batch-size", "5", "--device", "cpu",
                         "--tracking-uri", store], tmp_path, module)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = _rows(out)
        assert list(rows[0]) == ["path", "predicted", *(f"prob_{c}" for c in data.class_names), "error"]
        broken = [r for r in rows if r["error"]]
        assert [Path(r["path"]).name for r in broken] == ["broken.jpg"] and broken[0]["predicted"] == ""
        assert "broken.jpg" in proc.stderr and "1 skipped" in proc.stdout
        scored = sorted((r for r in rows if not r["error"]), key=lambda r: Path(r["path"]).name)
        assert [Path(r["path"]).relative_to(folder).as_posix() for r in scored] == names
        assert [r["predicted"] for r in scored] == evaluated
        truth = [Path(r["path"]).parent.name for r in scored]
        accuracy = sum(r["predicted"] == t for r, t in zip(scored, truth)) / len(scored)
        assert accuracy == test_acc
        probs = np.array([[float(r[f"prob_{c}"]) for c in data.class_names] for r in scored])
        assert np.allclose(probs, expected, atol=2e-6)  # the very pixels the test split holds


@pytest.mark.parametrize("args, message", [
    (["{tmp}", "{tmp}/missing.png"], "no such file or folder: {tmp}/missing.png"),
    (["{tmp}", "{tmp}/empty"], "no image files in {tmp}/empty"),
    (["{tmp}/nothing", "{tmp}/a.png"], "MODEL '{tmp}/nothing' is neither a model folder"),
    (["{tmp}", "{tmp}/a.png"], "'{tmp}' is not an MLflow model (no MLmodel file in {tmp})"),
    (["runs:/0123/model", "{tmp}/a.png", "--tracking-uri", "sqlite:///{tmp}/none.db"],
     "'runs:/0123/model': there is no MLflow store at {tmp}/none.db"),
    (["{tmp}", "{tmp}/a.png", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
])
def test_bad_input_is_one_error_line_before_any_work(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    from transferlab.predict import main

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "p.csv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(tmp=tmp_path)}") and err.count("\n") == 1
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "none.db").exists()
