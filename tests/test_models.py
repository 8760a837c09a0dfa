"""The model zoo, the heads and the assembled model, on real tensors and real models (CPU, tiny sizes)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from conftest import build_model_for
from transferlab.config.schema import BackboneConfig, ExperimentConfig, HeadConfig, OptimizerConfig, SchedulerConfig
from transferlab.models.activations import get_activation, list_activations
from transferlab.models.assemble import FineTuneModel, Preprocess
from transferlab.models.backbones import (
    INCEPTION_AUX_MIN_SIZE,
    backbone_layers,
    create_backbone,
    list_backbones,
)
from transferlab.models.heads import Head, HeadError, create_head, list_heads, unit_groups
from transferlab.training.loop import Batches, TrainSettings, fit
from transferlab.training.optim import Schedule, create_optimizer
from transferlab.training.param_groups import param_groups

GRAY = {"mean": [0.5], "std": [0.25]}


BUILTIN = ("small_cnn", "mlp")


def _experiment(name: str, *, input_size: int, head: HeadConfig | None = None) -> ExperimentConfig:
    channels = 1 if name in BUILTIN else 3
    return ExperimentConfig(
        backbone=BackboneConfig(name=name, input_size=input_size, channels=channels, width=8, depth=3, hidden=[16]),
        head=head or HeadConfig(name="linear"),
    )


def _norm(channels: int) -> dict[str, list[float]]:
    return {"mean": [0.5] * channels, "std": [0.25] * channels}


def _raw_batch(n: int, *, seed: int, num_classes: int = 3, size: int = 8) -> Batches:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return Batches(images, labels)


def _one_step(model: FineTuneModel, *, train: Batches, val: Batches, lr: float = 1e-3):
    """One real optimiser step through the training loop. Adam: with batch 2 and 1x1 feature maps, BatchNorm
    divides by a tiny batch variance and plain SGD's step explodes (a test-size effect, not a bug)."""
    groups = param_groups(model, lr=lr, backbone_lr_mult=1.0, weight_decay=0.0)
    optimizer = create_optimizer(groups, OptimizerConfig(name="adam", lr=lr))
    schedule = Schedule(optimizer, SchedulerConfig(name="none"), epochs=1, steps_per_epoch=1)
    settings = TrainSettings(epochs=1, batch_size=len(train), eval_batch_size=len(val), progress=False)
    return fit(model, model.head, train, val, optimizer, schedule, settings)


# --------------------------------------------------------------------------- the zoo

# What `regularisation.freeze.first_n` counts, per backbone (at the sizes built below).
EXPECTED_LAYERS = {
    "convnext_tiny": [f"features.{i}" for i in range(8)] + ["classifier.0"],
    "efficientnet_b0": [f"features.{i}" for i in range(9)],
    "inception_v3": ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"],
    "mlp": ["fc1"],
    "mobilenet_v3_large": [f"features.{i}" for i in range(17)] + ["classifier.0"],
    "mobilenet_v3_small": [f"features.{i}" for i in range(13)] + ["classifier.0"],
    "resnet18": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"],
    "small_cnn": ["block1", "block2", "block3"],
    # 13 convolutions, then the 2 linear layers left after cutting classifier.6
    "vgg16": [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    + ["classifier.0", "classifier.3"],
}


def test_registry_lists_the_zoo() -> None:
    assert list_backbones() == ["inception_v3", "mlp", "small_cnn"]  # the rest: the torchvision and timm families


def test_unknown_backbone_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet19'; expected one of \['inception_v3', 'mlp', "
                                         r"'small_cnn'\], or any torchvision.*Did you mean 'resnet18'"):
        create_backbone("resnet19", channels=3, input_size=32)


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_every_backbone_builds_and_trains_one_step(name: str) -> None:
    torch.manual_seed(0)
    size = 75 if name == "inception_v3" else 32
    cfg = _experiment(name, input_size=size)
    channels = cfg.backbone.channels
    if name == "inception_v3":
        with pytest.warns(UserWarning, match=r"inception_v3 at 75 px: the auxiliary logits need >= 299 px"):
            model, backbone = build_model_for(cfg, num_classes=3, data_channels=1, **_norm(channels))
        assert backbone.aux_features is None and model.aux_head is None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no other backbone warns
            model, backbone = build_model_for(cfg, num_classes=3, data_channels=1, **_norm(channels))

    # fresh weights: the torchvision classifier is cut, the features have the documented width
    with torch.no_grad():
        features = model.eval().features(_raw_batch(2, seed=1).images)
    assert features.shape == (2, backbone.out_features)
    assert model.head.out.in_features == backbone.out_features
    assert backbone.family == ("builtin" if name in BUILTIN else "torchvision")

    layers = backbone_layers(backbone)
    assert [layer.name for layer in layers] == EXPECTED_LAYERS[name]
    if name == "vgg16":
        assert [layer.kind for layer in layers] == ["Conv2d"] * 13 + ["Linear"] * 2
    first = f"backbone.{layers[0].name}."
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = _one_step(model, train=_raw_batch(2, seed=2), val=_raw_batch(2, seed=3))

    assert len(result.history) == 1
    assert math.isfinite(result.history[0]["train_loss"]) and math.isfinite(result.history[0]["val_loss"])
    after = dict(model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "head.out.weight" in changed
    # the gradient reached the first layer of the backbone
    assert any(k.startswith(first) for k in changed), f"no parameter of {first} changed"


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_backbone_layers_small_cnn(depth: int) -> None:
    backbone = create_backbone("small_cnn", channels=1, input_size=8, width=4, depth=depth)
    assert [layer.name for layer in backbone_layers(backbone)] == [f"block{i}" for i in range(1, depth + 1)]
    # widths double per block, capped at 8x
    assert backbone.out_features == 4 * 2 ** min(depth - 1, 3)


def test_backbone_layers_mlp() -> None:
    backbone = create_backbone("mlp", channels=1, input_size=8, hidden=[32, 16], activation="tanh")
    assert [layer.name for layer in backbone_layers(backbone)] == ["fc1", "fc2"]
    assert backbone.out_features == 16
    assert isinstance(backbone.module.fc2[1], nn.Tanh)
    # without hidden layers the flattened pixels pass through: the Keras example's 784 inputs
    flat = create_backbone("mlp", channels=1, input_size=28)
    assert flat.out_features == 784 and backbone_layers(flat) == []


def test_inception_299_training_returns_aux_logits_and_the_loop_adds_aux_loss() -> None:
    torch.manual_seed(0)
    assert INCEPTION_AUX_MIN_SIZE == 299
    cfg = _experiment("inception_v3", input_size=INCEPTION_AUX_MIN_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at 299 px nothing is switched off
        model, backbone = build_model_for(cfg, num_classes=3, data_channels=1, **_norm(3))
    assert backbone.aux_features == 768
    assert backbone.replaced_keys == ("fc.", "AuxLogits.fc.")
    assert backbone.module.transform_input is False  # preprocessing already normalised the input
    assert [layer.name for layer in backbone_layers(backbone)] == EXPECTED_LAYERS["inception_v3"]  # AuxLogits: no layer
    assert isinstance(model.aux_head, nn.Linear) and model.aux_head.out_features == 3

    train = _raw_batch(2, seed=4)
    model.train()
    out = model(train.images)
    assert isinstance(out, tuple) and len(out) == 2
    logits, aux = out
    assert logits.shape == (2, 3) and aux.shape == (2, 3)
    model.eval()
    with torch.no_grad():  # one image: a 299 px forward pass is the cost of this test
        assert model(train.images[:1]).shape == (1, 3)  # eval: plain logits

    aux_before = model.aux_head.weight.detach().clone()
    aux_branch_before = model.backbone.AuxLogits.conv0.conv.weight.detach().clone()
    result = _one_step(model, train=train, val=_raw_batch(1, seed=5))
    assert math.isfinite(result.history[0]["train_loss"])
    # Only the auxiliary loss reaches the aux head and the aux branch: they moved, so the loop added it.
    assert not torch.equal(aux_before, model.aux_head.weight)
    assert not torch.equal(aux_branch_before, model.backbone.AuxLogits.conv0.conv.weight)


# --------------------------------------------------------------------------- heads


def test_list_heads() -> None:
    assert list_heads() == ["binary", "linear", "mlp", "overcomplete"]
    with pytest.raises(HeadError, match=r"Unknown head 'mpl'; expected one of \['binary', 'linear', 'mlp', "
                                        r"'overcomplete'\]. Did you mean 'mlp'\?"):
        create_head("mpl", in_features=4, num_classes=2)


def test_unit_groups_14_units_for_10_classes() -> None:
    assert unit_groups(14, 10) == [[0, 1], [2, 3], [4, 5], [6, 7], [8], [9], [10], [11], [12], [13]]


def test_unit_groups_even_and_identity() -> None:
    assert unit_groups(10, 10) == [[i] for i in range(10)]
    assert unit_groups(6, 3) == [[0, 1], [2, 3], [4, 5]]
    assert unit_groups(7, 2) == [[0, 1, 2, 3], [4, 5, 6]]


def test_unit_groups_fewer_units_than_classes() -> None:
    with pytest.raises(HeadError, match=r"head.num_units=8 is fewer than the 10 classes: every class needs at "
                                        r"least one output unit"):
        unit_groups(8, 10)
    with pytest.raises(HeadError, match="fewer than the 10 classes"):
        create_head("overcomplete", in_features=4, num_classes=10, num_units=9)


def test_overcomplete_default_units_for_digits() -> None:
    head = create_head("overcomplete", in_features=4, num_classes=10)
    assert head.out.out_features == 14 and head.overcomplete
    owner = [c for c, g in enumerate(head.groups) for _ in g]
    assert owner == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9]
    # The padded gather index used for pooling: each row holds its class's units, pads masked out.
    picked = head.group_index[head.group_mask].tolist()
    assert picked == list(range(14))


def _overcomplete(pooling: str) -> tuple[Head, torch.Tensor]:
    torch.manual_seed(0)
    head = create_head("overcomplete", in_features=6, num_classes=10, num_units=14, pooling=pooling)
    units = torch.randn(5, 14, dtype=torch.float64) * 3
    return head, units


def test_logsumexp_pooling_sums_unit_probabilities_per_class() -> None:
    head, units = _overcomplete("logsumexp")
    class_probs = head.pool(units).softmax(dim=1)
    unit_probs = units.softmax(dim=1)
    expected = torch.stack([unit_probs[:, g].sum(dim=1) for g in unit_groups(14, 10)], dim=1)
    torch.testing.assert_close(class_probs, expected, rtol=1e-12, atol=1e-12)
    # class 0 owns units 0 and 1
    torch.testing.assert_close(class_probs[:, 0], unit_probs[:, 0] + unit_probs[:, 1], rtol=1e-12, atol=1e-12)


def test_max_and_mean_pooling() -> None:
    head, units = _overcomplete("max")
    pooled = head.pool(units)
    assert pooled.shape == (5, 10)
    assert torch.equal(pooled[:, 0], torch.maximum(units[:, 0], units[:, 1]))
    assert torch.equal(pooled[:, 3], torch.maximum(units[:, 6], units[:, 7]))
    assert torch.equal(pooled[:, 4:], units[:, 8:])
    head, units = _overcomplete("mean")
    pooled = head.pool(units)
    torch.testing.assert_close(pooled[:, 1], (units[:, 2] + units[:, 3]) / 2, rtol=0, atol=1e-15)
    assert torch.equal(pooled[:, 9], units[:, 13])


def test_overcomplete_forward_pools_units_into_class_logits() -> None:
    head, _ = _overcomplete("logsumexp")
    features = torch.randn(3, 6)
    units = head.unit_logits(features)
    assert units.shape == (3, 14)
    torch.testing.assert_close(head(features)[:, 2], units[:, 4:6].logsumexp(dim=1))
    assert head(features).shape == (3, 10)


def test_linear_head_passes_units_through() -> None:
    head = create_head("linear", in_features=6, num_classes=4)
    assert not head.overcomplete and head.out.out_features == 4 and len(head.hidden) == 0
    features = torch.randn(2, 6)
    assert torch.equal(head(features), head.out(features))


def test_linear_head_with_hidden_raises() -> None:
    with pytest.raises(HeadError, match="the linear head has no hidden layers; use head=mlp"):
        create_head("linear", in_features=6, num_classes=4, hidden=[8])


def test_mlp_head_layers() -> None:
    head = create_head("mlp", in_features=6, num_classes=4, hidden=[8, 5], activations=["relu", "tanh"],
                       dropouts=[0.5, 0.0])
    assert [type(m) for m in head.hidden] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.Tanh]
    assert head.hidden[2].p == 0.5
    assert head.out.in_features == 5 and head.out.out_features == 4
    one_act = create_head("mlp", in_features=6, num_classes=4, hidden=[8, 5], activations=["gelu"])
    assert [type(m) for m in one_act.hidden] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU]


def test_binary_head_on_three_classes_raises() -> None:
    with pytest.raises(HeadError, match="the binary head needs a 2-class task, but the data has 3 classes"):
        create_head("binary", in_features=6, num_classes=3)


def test_binary_head_loss_predict_probabilities() -> None:
    head = create_head("binary", in_features=6, num_classes=2)
    assert head.out.out_features == 1 and head.binary and not head.overcomplete
    logits = torch.tensor([[2.0], [-1.0], [0.0]])
    target = torch.tensor([1, 0, 1])
    assert head.predict(logits).tolist() == [1, 0, 0]
    probs = head.probabilities(logits)
    p = torch.sigmoid(torch.tensor([2.0, -1.0, 0.0]))
    assert torch.equal(probs, torch.stack([1 - p, p], dim=1))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    expected = -(math.log(torch.sigmoid(torch.tensor(2.0)).item()) + math.log(1 - torch.sigmoid(
        torch.tensor(-1.0)).item()) + math.log(0.5)) / 3
    assert head.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # label smoothing moves the targets towards 0.5
    smoothed = head.loss(torch.tensor([[0.0]]), torch.tensor([1]), label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(math.log(2), rel=1e-6)  # at logit 0 the BCE is log 2 for any target
    y = 1 * 0.8 + 0.1
    big = head.loss(torch.tensor([[3.0]]), torch.tensor([1]), label_smoothing=0.2).item()
    s = 1 / (1 + math.exp(-3.0))
    assert big == pytest.approx(-(y * math.log(s) + (1 - y) * math.log(1 - s)), rel=1e-6)


def test_multiclass_loss_and_probabilities() -> None:
    head = create_head("linear", in_features=2, num_classes=3)
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    assert head.predict(logits).tolist() == [1]
    torch.testing.assert_close(head.probabilities(logits), logits.softmax(dim=1))
    assert head.loss(logits, torch.tensor([1])).item() == pytest.approx(
        -math.log(math.exp(2) / (math.exp(1) + math.exp(2) + math.exp(0.5))), rel=1e-6)


def test_activations_by_name() -> None:
    assert "relu" in list_activations() and "tanh" in list_activations()
    assert isinstance(get_activation("tanh"), nn.Tanh)
    with pytest.raises(ValueError, match=r"Unknown activation 'tahn'; expected one of \["):
        get_activation("tahn")


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_gray_to_three_channels_and_normalise() -> None:
    pre = Preprocess(1, 3, 2, mean=[0.5, 0.4, 0.2], std=[0.5, 0.2, 0.1])
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # 0, 1, 0.2, 0.4
    out = pre(x)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    scaled = torch.tensor([[0.0, 1.0], [0.2, 0.4]])
    torch.testing.assert_close(out[0, 0], (scaled - 0.5) / 0.5)
    torch.testing.assert_close(out[0, 1], (scaled - 0.4) / 0.2)
    torch.testing.assert_close(out[0, 2], (scaled - 0.2) / 0.1)
    torch.testing.assert_close(out[0, 0], torch.tensor([[-1.0, 1.0], [-0.6, -0.2]]))
    torch.testing.assert_close(out[0, 2], torch.tensor([[-2.0, 8.0], [0.0, 2.0]]))


def test_preprocess_resizes_bilinear_to_input_size() -> None:
    pre = Preprocess(1, 1, 4, mean=[0.0], std=[1.0])
    x = torch.tensor([[[[0, 255], [0, 255]]]], dtype=torch.uint8)
    out = pre(x)
    assert out.shape == (1, 1, 4, 4)
    # align_corners=False: source positions -0.25, 0.25, 0.75, 1.25 -> clamp -> 0, 1/4, 3/4, 1
    for row in out[0, 0]:
        torch.testing.assert_close(row, torch.tensor([0.0, 0.25, 0.75, 1.0]))
    # floats in 0..255 are accepted too, and a matching size is not resampled
    same = Preprocess(1, 1, 2, mean=[0.0], std=[1.0])(x.float())
    torch.testing.assert_close(same, x.float() / 255)


def test_preprocess_rgb_to_gray_uses_luma() -> None:
    pre = Preprocess(3, 1, 1, mean=[0.0], std=[1.0])
    x = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(pre(x).flatten(), torch.tensor([0.299]))
    x = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    torch.testing.assert_close(pre(x).flatten(), torch.tensor([1.0]))


def test_preprocess_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"channels must be 1 or 3, got 2 -> 3"):
        Preprocess(2, 3, 8, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ValueError, match="normalisation needs 3 means and stds"):
        Preprocess(1, 3, 8, mean=[0.5], std=[0.5])


# --------------------------------------------------------------------------- assembly


def test_build_model_wires_dropouts_and_head() -> None:
    cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", width=4, depth=2, input_size=8),
                           head=HeadConfig(name="mlp", hidden=[16, 8]))
    cfg.regularisation.dropout.input = 0.2
    cfg.regularisation.dropout.features = 0.5
    cfg.regularisation.dropout.hidden = 0.3
    model, backbone = build_model_for(cfg, num_classes=10, data_channels=1, **GRAY)
    assert isinstance(model.input_dropout, nn.Dropout) and model.input_dropout.p == 0.2
    assert isinstance(model.feature_dropout, nn.Dropout) and model.feature_dropout.p == 0.5
    assert [m.p for m in model.head.hidden if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert model.backbone is backbone.module
    cfg.regularisation.dropout.per_layer = [0.1, 0.0]
    model, _ = build_model_for(cfg, num_classes=10, data_channels=1, **GRAY)
    assert [m.p for m in model.head.hidden if isinstance(m, nn.Dropout)] == [0.1]
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    assert model.eval()(x).shape == (3, 10)


def _head_linears(init: str) -> list[nn.Linear]:
    torch.manual_seed(0)
    cfg = ExperimentConfig(backbone=BackboneConfig(name="mlp", input_size=8, channels=1),
                           head=HeadConfig(name="mlp", hidden=[256], init=init))
    model, backbone = build_model_for(cfg, num_classes=10, data_channels=1, **GRAY)
    assert backbone.out_features == 64
    return [m for m in model.head.modules() if isinstance(m, nn.Linear)]


def test_head_init_normal() -> None:
    linears = _head_linears("normal")
    assert [tuple(m.weight.shape) for m in linears] == [(256, 64), (10, 256)]
    for m in linears:
        assert abs(m.weight.std().item() - 0.05) < 0.004
        assert abs(m.weight.mean().item()) < 0.004
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_head_init_default_differs() -> None:
    # PyTorch's default: uniform with std 1/sqrt(3*fan_in) (0.072, 0.036 here) and a non-zero bias
    first, second = _head_linears("default")
    assert first.weight.std().item() > 0.065 and second.weight.std().item() < 0.04
    assert first.bias.abs().sum().item() > 0


@pytest.mark.parametrize("name,configured,weights_size,data_size,expected", [
    ("resnet18", None, 224, 32, 224),     # follows the weights' own crop size
    ("resnet18", None, None, 8, 32),      # no weights: the data's size, at least 32
    ("resnet18", None, None, 64, 64),
    ("inception_v3", None, None, 32, 75),
    ("small_cnn", None, None, 8, 8),      # built-in: any size
    ("resnet18", 96, 224, 32, 96),        # a configured size wins
])
def test_input_size_resolution(name, configured, weights_size, data_size, expected) -> None:
    from transferlab.models.assemble import resolve_input_size

    cfg = ExperimentConfig(backbone=BackboneConfig(name=name, input_size=configured))
    assert resolve_input_size(cfg, weights_size=weights_size, data_size=data_size).backbone.input_size == expected
    assert cfg.backbone.input_size == configured  # the input is left alone


def test_model_time_resize_is_antialiased_like_prepare() -> None:
    """Stripes one pixel in four wide, shrunk 4x, keep their mean brightness (as the prepare-time resize
    gives it); without antialiasing bilinear sampling misses every stripe and returns black."""
    from transferlab.data.sources import resize_images
    from transferlab.models.assemble import Preprocess

    board = ((torch.arange(64) % 4 == 0) * 255).to(torch.uint8).expand(1, 1, 64, 64)
    model_side = Preprocess(1, 1, 16, [0.0], [1.0])(board) * 255
    prepare_side = torch.from_numpy(resize_images(board.numpy().copy(), 16)).float()
    assert abs(model_side.mean() - 255 / 4) < 1.0
    assert (model_side - prepare_side).abs().max() <= 1.0
