"""Adding a backbone, a head or an augmentation is one registry entry plus one YAML file.

This file alone registers a toy entry of each kind, writes their YAML into a copy of conf/, composes a
config with Hydra that picks them, and runs the whole pipeline in-process (one training step) through the
normal config path: composition, validation, the stages, MLflow (a SQLite store under tmp_path).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO
from transferlab.models.backbones import BACKBONES, Backbone
from transferlab.models.heads import HEADS, Head
from transferlab.training.augment import AUGMENTATIONS

TOY_YAML = {
    "backbone": "name: toy\nweights: null\ninput_size: null\nchannels: 1\nwidth: 4\n",
    "head": "name: toy\nhidden: []\nactivations: [relu]\ninit: default\n",
    "augment": "name: toy\n",
}


class ToyBackbone(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.toy_conv = nn.Conv2d(channels, width, 3, padding=1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.toy_conv(x)))


class ToyHead(Head):
    """A linear head whose logits pass through a learnt temperature."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes, hidden=[], activations=["relu"], dropouts=[],
                         num_units=num_classes)
        self.toy_temperature = nn.Parameter(torch.ones(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features) / self.toy_temperature


class ToyAugment:
    """Inverts the images and records every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches.append((x.dtype, tuple(x.shape)))
        return 255 - x, y


@pytest.fixture
def toys():  # type: ignore[no-untyped-def]
    """The three toy entries, registered for the test only."""
    built: dict[str, list] = {"backbone": [], "head": [], "augment": []}

    @BACKBONES.register("toy", keys=("width",))
    def _toy_backbone(*, channels: int, width: int, **_: object) -> Backbone:
        built["backbone"].append(width)
        return Backbone(ToyBackbone(channels, width), width, "builtin")

    @HEADS.register("toy")
    def _toy_head(*, in_features: int, num_classes: int, **_: object) -> Head:
        built["head"].append(num_classes)
        return ToyHead(in_features, num_classes)

    @AUGMENTATIONS.register("toy")
    def _toy_augment(cfg: object, *, size: int, num_classes: int) -> ToyAugment:
        built["augment"].append(ToyAugment())
        return built["augment"][-1]

    try:
        yield built
    finally:
        for registry in (BACKBONES, HEADS, AUGMENTATIONS):
            registry.unregister("toy")


def test_toy_entries_train_through_the_normal_config_path(toys, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.pipeline import run_pipeline, with_output_dir

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    for group, text in TOY_YAML.items():
        (conf / group / "toy.yaml").write_text(text)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The default preset (source task on digits 0-4, then 5-9) with the toys chosen; tiny data:
    # 10 images per class, so the 5-class target task's training split is one batch. The toy backbone has
    # one layer, which the preset freezes, so nothing is re-initialised.
    params = compose(["backbone=toy", "head=toy", "augment=toy", "backbone.reinit_last_n=0", "data.max_per_class=10",
                      "pretrain.max_per_class=10", "pretrain.epochs=1", "trainer.epochs=1", "trainer.batch_size=64",
                      "trainer.progress=false", "tracking.log_graph=false", "tracking.log_model=false",
                      f"tracking.uri={store}", f"paths.cache={tmp_path / 'cache'}"], config_dir=conf)
    cfg = with_output_dir(load_config(params), tmp_path / "out")
    monkeypatch.chdir(tmp_path)

    result = run_pipeline(cfg)

    # The toy augmentation ran on exactly the one training step of finetune: uint8 batches, never on
    # pretrain's batches nor on any evaluation.
    (augment,) = toys["augment"]
    assert len(augment.batches) == 1
    dtype, shape = augment.batches[0]
    assert dtype == torch.uint8 and shape[1:] == (1, 8, 8) and shape[0] <= 64
    # The toy backbone (with the YAML's width) was built for pretrain, finetune and evaluate; the toy head
    # for the 5 target classes (pretrain's source task keeps its plain linear head).
    assert toys["backbone"] and set(toys["backbone"]) == {4}
    assert toys["head"] and set(toys["head"]) == {5}
    best = torch.load(Path(cfg.paths.model) / "best.pt", weights_only=True)
    assert best["backbone.toy_conv.weight"].shape == (4, 1, 3, 3)
    assert "head.toy_temperature" in best
    assert 0.0 <= result["test_acc"] <= 1.0
    run = mlflow.MlflowClient(tracking_uri=store).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert {k: run.data.params[k] for k in ("backbone.name", "head.name", "augment.name")} == {
        "backbone.name": "toy", "head.name": "toy", "augment.name": "toy"}
