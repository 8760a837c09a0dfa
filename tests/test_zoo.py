"""The wider zoo: torchvision models by name and timm models, each built through the project's training
path at a small input (CPU, random init), frozen, trained a step and exported; unknown names, layer-wise
learning-rate decay and timm's weights offline."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, prepared_from, subprocess_env
from transferlab.compose import compose
from transferlab.config import ConfigError, load_config
from transferlab.config.schema import (
    BackboneConfig, ExperimentConfig, FreezeConfig, MaxNormConfig, OptimizerConfig, RegularisationConfig,
    TrainerConfig,
)
from transferlab.models.backbones import backbone_layers, create_backbone
from transferlab.training.build import build_training
from transferlab.training.loop import Batches
from transferlab.training.maxnorm import constrained_weights

pytest.importorskip("timm")

SIZE = 32  # px: every model below builds at it (ViT with image_size=32: 2x2 patches of 16)
ZOO = ["vit_b_16", "swin_t", "efficientnet_v2_s", "regnet_y_400mf", "mobilenet_v3_small",
       "timm/resnet18", "timm/vit_tiny_patch16_224", "timm/convnext_atto"]


def _data(n: int, seed: int) -> Batches:
    g = torch.Generator().manual_seed(seed)
    return Batches(torch.randint(0, 256, (n, 1, SIZE, SIZE), generator=g, dtype=torch.uint8), torch.arange(n) % 3)


def _config(name: str, regularisation: RegularisationConfig | None = None) -> ExperimentConfig:
    # Adam: with batch 2 and 1x1 feature maps, plain SGD's first step explodes through BatchNorm.
    # weights="source" marks the backbone as pretrained (freezing leaves a random init alone); the weights
    # themselves are the seeded init, as no state is given to build_training.
    return ExperimentConfig(
        backbone=BackboneConfig(name=name, input_size=SIZE, channels=3, weights="source"),
        regularisation=regularisation or RegularisationConfig(freeze=FreezeConfig(first_n=1)),
        optimizer=OptimizerConfig(name="adam", lr=1e-3),
        trainer=TrainerConfig(epochs=1, batch_size=2, eval_batch_size=2, progress=False))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_builds_freezes_trains_a_step_and_exports(name: str) -> None:
    torch.manual_seed(0)
    train, val = _data(2, seed=1), _data(2, seed=2)
    t = build_training(_config(name), prepared_from(train, val, num_classes=3))

    # first_n=1 freezes exactly the first layer: its modules' parameters and the loose ones it holds
    layers = backbone_layers(t.backbone)
    first = {f"backbone.{p}" for p in layers[0].params}
    frozen = {n for n, p in t.model.named_parameters() if not p.requires_grad}
    assert frozen == first == set(t.plan.frozen)
    if name == "vit_b_16":
        assert first >= {"backbone.class_token", "backbone.encoder.pos_embedding", "backbone.conv_proj.weight"}
    if name == "timm/vit_tiny_patch16_224":
        assert first >= {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight"}
    # every backbone parameter belongs to exactly one layer
    in_layers = [p for layer in layers for p in layer.params]
    assert sorted(in_layers) == sorted(n for n, _ in t.backbone.module.named_parameters())

    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    result = t.fit(train, val)
    assert len(result.history) == 1
    after = dict(t.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert not changed & frozen
    assert "head.out.weight" in changed
    second = {f"backbone.{p}" for p in layers[1].params}
    assert changed & second, f"no parameter of {layers[1].name} changed"

    model = t.model.eval()
    images = _data(3, seed=3).images
    with torch.no_grad():
        expected = model(images)
        program = torch.export.export(model, (images,))
        got = program.module()(images)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_names_list_close_matches() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(compose(["backbone=resnet18", "backbone.name=resnet81"], config_dir=REPO / "conf"))
    message = str(caught.value)
    assert message.startswith("backbone.name: Unknown backbone 'resnet81'; expected one of")
    assert "Did you mean 'resnet18'" in message
    with pytest.raises(ConfigError, match=r"Did you mean 'timm/convnext_atto'"):
        load_config(compose(["backbone=timm", "backbone.name=timm/convnext_ato"], config_dir=REPO / "conf"))
    # the families' names resolve without a file of their own
    cfg = load_config(compose(["backbone=timm", "backbone.name=timm/vit_tiny_patch16_224", "backbone.weights=DEFAULT"],
                              config_dir=REPO / "conf"))
    assert cfg.backbone.name == "timm/vit_tiny_patch16_224"
    with pytest.raises(ConfigError, match=r"Unknown weights 'in1k' for timm/vit_tiny_patch16_224; expected one of "
                                          r"\['DEFAULT', 'augreg_in21k', 'augreg_in21k_ft_in1k'\]"):
        load_config(compose(["backbone=timm", "backbone.name=timm/vit_tiny_patch16_224", "backbone.weights=in1k"],
                            config_dir=REPO / "conf"))


def test_layer_decay_scales_are_exact() -> None:
    """small_cnn, depth 3: 3 layers; layer i of L gets lr * backbone_lr_mult * decay ** (L - i), the head lr."""
    train, val = _data(4, seed=1), _data(2, seed=2)
    cfg = ExperimentConfig(
        backbone=BackboneConfig(name="small_cnn", input_size=SIZE, channels=1, width=4, depth=3),
        optimizer=OptimizerConfig(name="sgd", lr=0.2, backbone_lr_mult=0.5, layer_decay=0.25, weight_decay=1e-4),
        trainer=TrainerConfig(epochs=1, batch_size=4, progress=False))
    t = build_training(cfg, prepared_from(train, val, num_classes=3))
    lr_of = {n: (g["lr"], g["weight_decay"]) for g in t.groups for n in g["param_names"]}
    for i, block in enumerate(["block1", "block2", "block3"]):
        lr = 0.2 * 0.5 * 0.25 ** (3 - i)
        assert lr_of[f"backbone.{block}.0.weight"] == (pytest.approx(lr), 1e-4)  # conv: weight decay
        assert lr_of[f"backbone.{block}.1.weight"] == (pytest.approx(lr), 0.0)  # norm: none
    assert lr_of["head.out.weight"] == (pytest.approx(0.2), 1e-4)
    assert lr_of["head.out.bias"] == (pytest.approx(0.2), 0.0)
    # off (null): the plain backbone / head groups
    plain = build_training(replace(cfg, optimizer=replace(cfg.optimizer, layer_decay=None)),
                           prepared_from(train, val, num_classes=3))
    assert [g["name"] for g in plain.groups] == ["backbone", "backbone_no_decay", "head", "head_no_decay"]


def test_vit_layer_decay_with_freezing_and_max_norm() -> None:
    torch.manual_seed(0)
    train, val = _data(2, seed=1), _data(2, seed=2)
    cfg = _config("timm/vit_tiny_patch16_224",
                  regularisation=RegularisationConfig(
                      freeze=FreezeConfig(first_n=2),
                      max_norm=MaxNormConfig(enabled=True, value=0.5, layers=["backbone.blocks.*.mlp.fc*", "head.*"])))
    cfg = replace(cfg, optimizer=replace(cfg.optimizer, layer_decay=0.75))
    t = build_training(cfg, prepared_from(train, val, num_classes=3))
    layers = backbone_layers(t.backbone)
    assert [layer.name for layer in layers] == ["patch_embed+cls_token+pos_embed", *(f"blocks.{i}" for i in range(12)),
                                                "norm"]
    lr_of = {n: g["lr"] for g in t.groups for n in g["param_names"]}
    # the first two layers are frozen (in no group); the others decay from the head's 1e-3
    assert not any(n.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.blocks.0.")) for n in lr_of)
    assert lr_of["backbone.blocks.1.attn.qkv.weight"] == pytest.approx(1e-3 * 0.75 ** 12)
    assert lr_of["backbone.blocks.11.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.75 ** 2)
    assert lr_of["backbone.norm.weight"] == pytest.approx(1e-3 * 0.75)
    assert lr_of["head.out.weight"] == pytest.approx(1e-3)
    constrained = constrained_weights(t.model, list(cfg.regularisation.max_norm.layers))
    assert len(constrained) == len(t.settings.max_norm_weights) == 12 * 2 + 1
    before = {n: w.detach().clone() for n, w in constrained.items()}
    t.fit(train, val)
    for name, w in constrained.items():
        if name.startswith("backbone.blocks.0."):  # frozen: untouched, max-norm included
            assert torch.equal(w, before[name])
        else:
            assert w.detach().flatten(1).norm(dim=1).max() <= 0.5 + 1e-5, name


def test_torchvision_vit_weights_at_another_size_are_interpolated() -> None:
    from transferlab.models.weights import load_backbone_state

    source = create_backbone("vit_b_32", channels=3, input_size=64)  # a 3x3-patch "published" state
    state = source.module.state_dict()
    target = create_backbone("vit_b_32", channels=3, input_size=SIZE)  # 1x1 patch: 2 positions
    report = load_backbone_state(target, state, source="vit_b_32 at 64 px")
    assert report.missing == [] and report.unexpected == []
    assert target.module.encoder.pos_embedding.shape == (1, 2, 768)
    torch.testing.assert_close(target.module.class_token, state["class_token"])


def _hub_cache_with(tmp_path: Path, repo: str, model: torch.nn.Module) -> Path:
    """A Hugging Face hub cache holding ``model``'s weights as ``repo``'s model.safetensors (hub layout)."""
    from safetensors.torch import save_file

    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    return tmp_path / "hub"


def test_timm_weights_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A published timm checkpoint (here: a freshly initialised one, with its 1000-class head, at 224 px) in the
    hub cache loads into a 1-channel backbone at 32 px: position embeddings resampled, head dropped."""
    import huggingface_hub.constants
    import timm

    from transferlab.models.weights import PUBLISHED, load_backbone_state

    published = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    hub = _hub_cache_with(tmp_path, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", published)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read when a file is looked up
    name = "timm/vit_tiny_patch16_224"
    meta = PUBLISHED["timm"].preprocessing(name, "DEFAULT")
    assert meta == {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": 224, "resize_size": 248,
                    "weights": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"}
    state = PUBLISHED["timm"].state_dict(BackboneConfig(name=name, input_size=SIZE, channels=1), "DEFAULT")
    backbone = create_backbone(name, channels=1, input_size=SIZE)
    report = load_backbone_state(backbone, state, source=name)
    assert report.missing == [] and report.unexpected == []
    assert backbone.module.pos_embed.shape == (1, 1 + 4, 192)
    torch.testing.assert_close(backbone.module.cls_token, published.cls_token)
    # one input channel: timm sums the RGB filters
    torch.testing.assert_close(backbone.module.patch_embed.proj.weight,
                               published.patch_embed.proj.weight.sum(dim=1, keepdim=True))


def test_timm_weights_offline_fail_before_work_naming_the_folder(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(REPO / "conf", tmp_path / "conf")
    hub = tmp_path / "hub"
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "transferlab", "backbone=timm", "backbone.name=timm/resnet18", "backbone.weights=DEFAULT",
         f"hydra.run.dir={run_dir}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
         f"paths.cache={tmp_path / 'cache'}"],
        cwd=tmp_path, env=subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub)),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: Could not get the timm weights timm/resnet18.a1_in1k (Hugging Face repo "
                           "timm/resnet18.a1_in1k, file model.safetensors)")
    assert str(hub) in line and "HF_HUB_CACHE" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # nothing prepared, no run folder, no store


@pytest.mark.parametrize("name,layers", [("timm/vit_tiny_patch16_224", 14), ("regnet_y_400mf", 5), ("vit_b_16", 14)])
def test_preflight_counts_the_layers_of_a_skeleton(name: str, layers: int) -> None:
    """The pre-work check builds the model with its weights on the meta device (regnet computes its widths with
    real tensors while building; timm's models too), then plans the freezing."""
    from transferlab.config.preflight import preflight
    from transferlab.errors import FreezeError

    def cfg(first_n: int) -> ExperimentConfig:
        return load_config(compose(["backbone=timm", f"backbone.name={name}", "backbone.input_size=32",
                                    "backbone.reinit_last_n=0", f"regularisation.freeze.first_n={first_n}"],
                                   config_dir=REPO / "conf"))

    preflight(cfg(layers), tracking=False)
    with pytest.raises(FreezeError, match=rf"first_n={layers + 1}, but the backbone has only {layers} layers"):
        preflight(cfg(layers + 1), tracking=False)
