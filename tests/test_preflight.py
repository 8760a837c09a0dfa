"""Checks that need no training fail before any work: from ``python -m transferlab`` (a run, or every job
of a sweep before the first starts) and from every DVC stage, with one ``error:`` line naming the key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from transferlab.compose import compose
from transferlab.config.preflight import preflight
from transferlab.config.validate import load_config
from transferlab.models.heads import HeadError
from transferlab.training.freezing import FreezeError

from conftest import params_file, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str([str(i) for i in range(10)])

LATE_CHECKS = [
    (["regularisation.freeze.first_n=4"],
     "error: regularisation.freeze.first_n=4, but the backbone has only 3 layers: ['block1', 'block2', 'block3']"),
    (["backbone=resnet18", "regularisation.freeze.first_n=7"],
     "error: regularisation.freeze.first_n=7, but the backbone has only 6 layers"),
    (["backbone.reinit_last_n=4"],
     "error: backbone.reinit_last_n=4, but the backbone has only 3 layers: ['block1', 'block2', 'block3']"),
    (["backbone.reinit_last_n=3"],  # the preset freezes the first layer
     "error: backbone.reinit_last_n=3 re-initialises ['block1'], which regularisation.freeze also freezes"),
    (["head=overcomplete", "head.num_units=3"], "error: head.num_units=3 is fewer than the 5 classes"),
    (["regularisation.freeze.patterns=[backbone.layer1.*]"],
     "error: regularisation.freeze.patterns: 'backbone.layer1.*' matches no parameter"),
    (["regularisation.max_norm.enabled=true", "regularisation.max_norm.layers=[head.*,backbone.fc]"],
     "error: regularisation.max_norm.layers: 'backbone.fc' matches no Linear/Conv layer"),
    (["data.classes=[5,6,seven]"], f"error: data.classes=['5', '6', 'seven']: Unknown class 'seven'; expected one of {DIGITS}"),
    (["pretrain.classes=[0,1,ten]"], "error: pretrain.classes=['0', '1', 'ten']: Unknown class 'ten'"),
    (["data.positive_class=cat"], f"error: data.positive_class: Unknown class 'cat'; expected one of {DIGITS}"),
    (["optimized_metric=test_acc"], "error: optimized_metric: Unknown validation metric 'test_acc'; "
                                    "expected one of ['best_val_acc', 'best_val_loss']"),
]


def _transferlab(args: list[str], cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "transferlab", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def _one_error_line(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr


@pytest.mark.parametrize(("overrides", "expected"), LATE_CHECKS, ids=[o[0].split("=")[0] for o, _ in LATE_CHECKS])
def test_a_late_check_fails_before_any_work(overrides: list[str], expected: str, tmp_path: Path) -> None:
    proc, seconds = _transferlab([*overrides, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache={tmp_path / 'cache'}",
                                  f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    _one_error_line(proc, expected)
    assert seconds <= 10, f"took {seconds:.1f}s"
    assert list(tmp_path.iterdir()) == []  # no run folder, no prepared data, no store


def test_a_sweep_with_one_bad_job_runs_no_job(tmp_path: Path) -> None:
    proc, seconds = _transferlab(["-m", "head=overcomplete", "head.num_units=14,3",
                                  f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache={tmp_path / 'cache'}",
                                  f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    _one_error_line(proc, "error: head.num_units=3 is fewer than the 5 classes")
    assert seconds <= 10, f"took {seconds:.1f}s"
    assert list(tmp_path.iterdir()) == []


def _params(tmp_path: Path, **edits: object) -> Path:
    return params_file(tmp_path, {key.replace("__", "."): value for key, value in edits.items()})


@pytest.mark.parametrize("stage", ["prepare", "pretrain", "finetune", "evaluate"])
def test_every_dvc_stage_runs_the_checks_before_reading_data(stage: str, tmp_path: Path) -> None:
    params = _params(tmp_path, regularisation__freeze__first_n=5)
    proc = subprocess.run([sys.executable, "-m", f"transferlab.stages.{stage}", "--params", str(params)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    _one_error_line(proc, "error: regularisation.freeze.first_n=5, but the backbone has only 3 layers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def _image_folder(root: Path, classes: list[str]) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_image_folder_classes_come_from_the_folder_listing(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "images", ["cat", "dog"])
    out = tmp_path / "out"
    proc, seconds = _transferlab(["~experiment", "data=imagefolder", f"data.path={folder}", "data.image_size=16",
                                  "data.classes=[cat,cow]", f"hydra.run.dir={out / 'run'}",
                                  f"paths.cache={out / 'cache'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}"])
    _one_error_line(proc, "error: data.classes=['cat', 'cow']: Unknown class 'cow'; expected one of ['cat', 'dog']")
    assert seconds <= 10
    assert not out.exists()


def _config(*overrides: str):  # noqa: ANN202
    return load_config(compose(list(overrides), config_dir=ROOT / "conf"))


def _preflight(cfg) -> None:  # noqa: ANN001
    """The data and model checks; the tracking checks would create the default store in the working directory."""
    preflight(cfg, tracking=False)


def test_every_preset_passes() -> None:
    for preset in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")):
        if preset.startswith("imagefolder"):
            continue  # needs a folder of the user's
        _preflight(_config(f"experiment={preset}"))


def test_the_same_code_that_builds_the_model_refuses(tmp_path: Path) -> None:
    with pytest.raises(HeadError, match="num_units=4 is fewer than the 5 classes"):
        _preflight(_config("head=overcomplete", "head.num_units=4"))
    _preflight(_config("head=overcomplete", "head.num_units=5"))  # one unit per class is enough
    # An image folder's class count is known only from its listing: 3 folders cannot feed a binary head.
    folder = _image_folder(tmp_path / "images", ["cat", "dog", "fox"])
    base = ["~experiment", "data=imagefolder", f"data.path={folder}", "data.image_size=16", "head=binary"]
    with pytest.raises(HeadError, match="binary head needs a 2-class task, but the data has 3 classes"):
        _preflight(_config(*base))
    _preflight(_config(*base, "data.positive_class=fox"))


def test_layer_counts_come_from_the_architecture() -> None:
    _preflight(_config("backbone=resnet18", "backbone.weights=null", "regularisation.freeze.first_n=6"))
    with pytest.raises(FreezeError, match="only 6 layers"):
        _preflight(_config("backbone=resnet18", "backbone.weights=null", "regularisation.freeze.first_n=7"))
    # vgg16: 13 convolutions and 2 Linear layers left in the classifier.
    _preflight(_config("backbone=vgg16", "backbone.weights=null", "regularisation.freeze.first_n=15"))
    with pytest.raises(FreezeError, match="only 15 layers"):
        _preflight(_config("backbone=vgg16", "backbone.weights=null", "regularisation.freeze.first_n=16"))


def test_inception_auxiliary_branch_follows_the_weights_input_size() -> None:
    # ImageNet weights are 299 px: the auxiliary branch exists and a pattern on it matches.
    _preflight(_config("backbone=inception_v3", "backbone.weights=DEFAULT",
                      "regularisation.freeze.patterns=[backbone.AuxLogits.*]"))
    with pytest.raises(FreezeError, match="'backbone.AuxLogits.\\*' matches no parameter"):
        _preflight(_config("backbone=inception_v3", "backbone.weights=null",
                          "regularisation.freeze.patterns=[backbone.AuxLogits.*]"))
