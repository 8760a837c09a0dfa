"""A folder of real photos through the whole pipeline: stored larger than the input, augmented with
random-resized-crop and mixup, evaluated on the centre crop, streamed or resident."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

CLASSES = ("china", "flower", "mixed")


def _photo_folder(root: Path, per_class: int = 24) -> Path:
    """Crops of scikit-learn's two sample photos (427x640) at various sizes and aspect ratios: one
    class per photo, and a third that puts the two side by side."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
            top, left = int(rng.integers(0, 427 - h)), int(rng.integers(0, 640 - w))
            if name == "mixed":
                half = w // 2
                crop = np.concatenate([china[top:top + h, left:left + half],
                                       flower[top:top + h, left + half:left + w]], axis=1)
            else:
                crop = (china if name == "china" else flower)[top:top + h, left:left + w]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{i:02d}.jpg", quality=90)
    return root


def _run(tmp_path: Path, folder: Path, name: str, *extra: str) -> tuple[dict, dict, str]:
    import mlflow

    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.models.assemble import load_spec
    from transferlab.pipeline import run_pipeline, with_output_dir

    overrides = ["~experiment", "data=imagefolder", f"data.path={folder}", "data.image_size=36",
                 "backbone=small_cnn", "backbone.channels=3", "backbone.width=8", "backbone.depth=2",
                 "backbone.input_size=32", "augment=light", "augment.mixup_alpha=0.4", "trainer.epochs=3",
                 "trainer.batch_size=16", "trainer.eval_batch_size=16", "trainer.progress=false",
                 "tracking.log_graph=false", "tracking.log_model=false",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"paths.cache={tmp_path / 'cache'}", *extra]
    cfg = with_output_dir(load_config(compose(overrides, config_dir=REPO / "conf")), tmp_path / name)
    run_pipeline(cfg)
    metrics = {**json.loads((Path(cfg.paths.metrics) / "train.json").read_text()),
               **json.loads((Path(cfg.paths.metrics) / "test.json").read_text())}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id],
                             filter_string=f"params.`paths.model` = '{cfg.paths.model}'")[0]
    return metrics, load_spec(cfg.paths.model).to_dict(), run.data.params["data.placement"]


@pytest.mark.slow
def test_a_photo_folder_trains_with_crops_and_mixup_resident_or_streamed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = _photo_folder(tmp_path / "photos")
    resident, spec, placement = _run(tmp_path, folder, "resident")
    assert placement == "train=resident val=resident"
    # Stored at 36 px, fed at 32: evaluation resizes nothing and takes the centre crop.
    assert (spec["resize"], spec["backbone"]["input_size"], spec["class_names"]) == (36, 32, list(CLASSES))
    assert 0 <= resident["test_acc"] <= 1 and resident["best_epoch"] >= 1
    # 3,888 bytes per image: 0.35 MB holds the read-ahead (4 batches of 16) and val, not train.
    streamed, _, placement = _run(tmp_path, folder, "streamed", "trainer.memory_budget_mb=0.35")
    assert placement == "train=stream val=resident"
    assert streamed == pytest.approx(resident, abs=1e-6)
