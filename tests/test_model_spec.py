"""The model spec: decided once, saved beside the checkpoint, and all that evaluation needs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from conftest import REPO
from transferlab.config.schema import BackboneConfig, ExperimentConfig
from transferlab.models.assemble import SPEC_FILE, ModelSpec, Preprocess, build_model, load_spec, save_spec


def _spec(data_size: int, input_size: int | None, meta: dict | None = None, channels: int = 3) -> ModelSpec:
    cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", channels=channels, input_size=input_size))
    return ModelSpec.decide(cfg, class_names=["a", "b"], data_channels=3, data_size=data_size,
                            data_mean=[0.1, 0.2, 0.3], data_std=[0.4, 0.5, 0.6], weights_meta=meta)


@pytest.mark.parametrize("data_size, input_size, meta, resize", [
    (8, 32, None, 32),  # stored smaller: resized up, nothing cropped
    (224, 224, None, 224),
    (256, 224, None, 256),  # torchvision's eval transforms: resize 256, crop 224
    (512, 224, None, 256),  # stored larger still: resized to 256 first
    (240, 224, None, 240),  # never resized past the stored size
    (512, None, {"input_size": 224, "resize_size": 232, "mean": [0.5] * 3, "std": [0.25] * 3}, 232),
])
def test_the_spec_decides_input_size_resize_and_normalisation(data_size, input_size, meta, resize) -> None:
    spec = _spec(data_size, input_size, meta)
    assert spec.input_size == (input_size or meta["input_size"])
    assert spec.resize == resize
    assert (spec.mean, spec.std) == (([0.5] * 3, [0.25] * 3) if meta else ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]))


def test_grey_backbone_gets_the_average_statistics() -> None:
    spec = _spec(8, 8, channels=1)
    assert spec.mean == pytest.approx([0.2]) and spec.std == pytest.approx([0.5])


def test_preprocess_crops_and_resizes_like_torchvision_s_eval_transforms() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    ident = dict(mean=[0.0] * 3, std=[1.0] * 3)
    # Stored at the resize size: only the centre crop.
    out = Preprocess(3, 3, 8, resize=12, **ident)(images)
    assert torch.equal(out, TF.center_crop(images, [8, 8]).float() / 255)
    # Stored larger: resize (antialiased) to 10, then the centre crop.
    out = Preprocess(3, 3, 8, resize=10, **ident)(images)
    expected = TF.center_crop(TF.resize(images.float() / 255, [10, 10], antialias=True), [8, 8])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # A batch already at the input size (random-resized-crop's output) passes untouched.
    crop = images[..., :8, :8]
    assert torch.equal(Preprocess(3, 3, 8, resize=12, **ident)(crop), crop.float() / 255)


def test_the_spec_round_trips_through_its_file(tmp_path: Path) -> None:
    spec = _spec(256, 224)
    save_spec(spec, tmp_path)
    assert json.loads((tmp_path / SPEC_FILE).read_text())["resize"] == 256
    again = load_spec(tmp_path)
    assert again == spec
    torch.manual_seed(0)
    a, _ = build_model(spec)
    b, _ = build_model(again)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_evaluate_rebuilds_the_model_from_its_spec_alone(tmp_path: Path, monkeypatch) -> None:
    """After finetune, evaluate reads the model folder, not the model's config or the initial weights:
    other backbone/head/dropout settings and a missing weights file give the same test metrics."""
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.pipeline import run_pipeline, with_output_dir
    from transferlab.stages import evaluate

    monkeypatch.chdir(tmp_path)
    tiny = ["trainer.epochs=2", "pretrain.epochs=1", "trainer.progress=false", "tracking.log_model=false",
            "tracking.log_graph=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"paths.cache={tmp_path / 'cache'}"]
    cfg = with_output_dir(load_config(compose(tiny, config_dir=REPO / "conf")), tmp_path / "out")
    run_pipeline(cfg)
    test_json = Path(cfg.paths.metrics) / "test.json"
    before = json.loads(test_json.read_text())
    spec = load_spec(cfg.paths.model)
    assert spec.class_names == ["5", "6", "7", "8", "9"] and spec.head.name == "overcomplete"
    other = load_config(compose([*tiny, "backbone.width=4", "head=mlp", "head.hidden=[16]", "regularisation.dropout.input=0.5"],
                                config_dir=REPO / "conf"))
    other = with_output_dir(other, tmp_path / "out")
    other = replace(other, paths=replace(other.paths, weights=str(tmp_path / "missing.safetensors")))
    test_json.unlink()
    again = evaluate.run(other)
    assert json.loads(test_json.read_text()) == before
    assert again["test_acc"] == before["test_acc"] > 0.5
