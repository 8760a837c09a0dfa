"""Augmentation (config group ``augment``): every preset on real images (seeded, per sample, on the
device's batch), mixup/cutmix and their soft targets, the loss with soft targets and class weights, the
checks of the settings, and how the training loop applies an augmentation (training batches only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from conftest import REPO, build_model_for, digit_batches
from transferlab.compose import compose
from transferlab.config.schema import AugmentConfig, BackboneConfig, ExperimentConfig, OptimizerConfig, SchedulerConfig
from transferlab.config.validate import ConfigError, load_config
from transferlab.models.heads import class_weights, create_head, targets_to_labels
from transferlab.training.augment import _AutoAugment, _Beta, _Draw, _warp, augment_warnings, create_augment
from transferlab.training.loop import Batches, TrainSettings, fit, steps_per_epoch
from transferlab.training.optim import Schedule, create_optimizer
from transferlab.training.param_groups import param_groups


@pytest.fixture(scope="module")
def digits() -> tuple[Batches, Batches]:
    """200 training and 60 validation images of the real 8x8 digits, uint8 like the prepared data."""
    return digit_batches(200, 60)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """48 RGB 40x40 patches of scikit-learn's two bundled photos (uint8 [48, 3, 40, 40])."""
    from sklearn.datasets import load_sample_images

    patches = [torch.from_numpy(np.ascontiguousarray(image[r:r + 40, c:c + 40])).permute(2, 0, 1)
               for image in load_sample_images().images for r in range(0, 240, 60) for c in range(0, 360, 60)]
    return torch.stack(patches)


def _augment(name: str, *, size: int = 8, num_classes: int = 10, **keys: object):  # type: ignore[no-untyped-def]
    augment = create_augment(AugmentConfig(name=name, **keys), size=size, num_classes=num_classes)  # type: ignore[arg-type]
    assert augment is not None
    return augment


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- flip ----------------------------------------------------------------------------------------------

def _flipped_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per sample: True where ``out`` is ``x`` mirrored left-right; every row must be one or the other."""
    same = (out == x).flatten(1).all(dim=1)
    mirrored = (out == x.flip(-1)).flatten(1).all(dim=1)
    assert bool((same | mirrored).all())
    return mirrored & ~same


def test_flip_decides_per_sample(digits: tuple[Batches, Batches]) -> None:
    x, y = digits[0].images, digits[0].labels
    symmetric = (x == x.flip(-1)).flatten(1).all(dim=1)
    assert not symmetric.any()  # every digit differs from its mirror image, so each decision shows
    out, targets = _augment("flip", p=0.5)(x, y, _seeded(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape and targets is y
    flipped = int(_flipped_rows(x, out).sum())
    assert 60 < flipped < 140  # about half of the 200, not all or nothing for the whole batch


@pytest.mark.parametrize("p,expected", [(0.0, 0), (1.0, 200)])
def test_flip_probability_bounds(p: float, expected: int, digits: tuple[Batches, Batches]) -> None:
    x, y = digits[0].images, digits[0].labels
    out, _ = _augment("flip", p=p)(x, y, _seeded(0))
    assert int(_flipped_rows(x, out).sum()) == expected
    if p == 0.0:
        assert torch.equal(out, x)


def test_none_builds_no_augmentation() -> None:
    assert create_augment(AugmentConfig(name="none"), size=8, num_classes=10) is None


# --- every preset: seeded, per sample, shapes ------------------------------------------------------------

PRESETS = [
    ("flip", {}),
    ("light", {}),
    ("standard", {}),
    ("standard", {"policy": "rand"}),
    ("digits", {}),
    ("light", {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}),
    ("digits", {"mixup_alpha": 0.4}),
]


@pytest.mark.parametrize("name,keys", PRESETS)
def test_each_preset_is_seeded_per_sample_and_shaped(name: str, keys: dict, photos: torch.Tensor) -> None:
    x, y = photos, torch.arange(photos.shape[0]) % 5
    augment = _augment(name, size=32, num_classes=5, **keys)
    out, targets = augment(x, y, _seeded(1))
    crops = name in ("light", "standard")
    assert out.dtype == torch.uint8 and out.shape == (48, 3, *((32, 32) if crops else (40, 40)))
    mixes = "mixup_alpha" in keys or "cutmix_alpha" in keys
    if mixes:
        assert targets.dtype == torch.float32 and targets.shape == (48, 5)
        assert torch.allclose(targets.sum(dim=1), torch.ones(48))
    else:
        assert torch.equal(targets, y)
    again, again_targets = augment(x, y, _seeded(1))
    assert torch.equal(out, again) and torch.equal(targets, again_targets)
    assert not torch.equal(out, augment(x, y, _seeded(2))[0])
    # The same image 48 times: each sample draws its own parameters, so the copies come out different
    # (a flip has only two outcomes).
    same = x[:1].expand_as(x).contiguous()
    copies, _ = augment(same, torch.zeros(48, dtype=torch.long), _seeded(3))
    distinct = {bytes(c.numpy().tobytes()) for c in copies}
    assert len(distinct) == 2 if name == "flip" and not mixes else len(distinct) > 10


def test_the_augment_stream_is_the_generator_s_alone(photos: torch.Tensor) -> None:
    """The global RNG neither feeds nor is consumed by an augmentation."""
    augment = _augment("standard", size=32, num_classes=5, cutmix_alpha=1.0, mixup_alpha=0.2)
    y = torch.arange(48) % 5
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, _ = augment(photos, y, _seeded(7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(first, augment(photos, y, _seeded(7))[0])


# --- the geometry: crop, flip, rotation, shift -----------------------------------------------------------

def test_a_whole_image_crop_is_the_image_or_its_mirror(photos: torch.Tensor) -> None:
    y = torch.zeros(48, dtype=torch.long)
    whole = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}
    kept, _ = _augment("light", size=40, p=0.0, **whole)(photos, y, _seeded(0))
    mirrored, _ = _augment("light", size=40, p=1.0, **whole)(photos, y, _seeded(0))
    assert torch.equal(kept, photos)
    assert torch.equal(mirrored, photos.flip(-1))


def test_a_crop_at_its_own_size_is_a_window_of_the_image(photos: torch.Tensor) -> None:
    """A quarter-area square crop shown at its own size (10 x 10 of 20 x 20) copies a window exactly,
    and each sample draws its own window."""
    x = photos[:, :, :20, :20].contiguous()
    out, _ = _augment("light", size=10, p=0.0, scale=[0.25, 0.25], ratio=[1.0, 1.0])(
        x, torch.zeros(48, dtype=torch.long), _seeded(0))
    windows = x.unfold(2, 10, 1).unfold(3, 10, 1)  # [N, C, 11, 11, 10, 10]
    found = set()
    for i in range(48):
        match = (windows[i] == out[i][:, None, None]).flatten(3).all(-1).all(0).nonzero()
        assert len(match) >= 1, i
        found.add(tuple(match[0].tolist()))
    assert len(found) > 10


def test_digits_preset_keeps_the_size_and_never_mirrors(digits: tuple[Batches, Batches]) -> None:
    x, y = digits[0].images, digits[0].labels
    still, _ = _augment("digits", degrees=0.0, translate=0.0)(x, y, _seeded(0))
    assert torch.equal(still, x)
    out, _ = _augment("digits")(x, y, _seeded(0))
    assert out.shape == x.shape
    # Small moves keep a digit closer to itself than to its mirror image.
    own = (out.float() - x.float()).abs().flatten(1).mean(1)
    mirror = (out.float() - x.flip(-1).float()).abs().flatten(1).mean(1)
    assert bool((own < mirror).float().mean() > 0.9)
    assert not torch.equal(out, x)


# --- TrivialAugment / RandAugment ops against torchvision's kernels --------------------------------------

def _ops_on(x: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """``name`` with ``magnitude`` on every sample, as one round of the standard preset applies it."""
    ops = _AutoAugment("trivial", size=x.shape[-1], num_ops=1, magnitude=0)
    op = torch.full((x.shape[0],), ops.names.index(name))
    m = torch.full((x.shape[0],), float(magnitude))
    draw = _Draw(op, m, ops._geometry(op, m))
    identity = ops._geometry(torch.zeros_like(op), torch.zeros_like(m))
    return ops.colour(_warp(x, identity, x.shape[-2], x.shape[-1], inner=draw.geometry), draw)


@pytest.mark.parametrize("name,magnitude,reference,tolerance", [
    ("Identity", 0, lambda x: x, 0),
    ("Brightness", 0.5, lambda x: TF.adjust_brightness(x, 1.5), 1),
    ("Brightness", -0.7, lambda x: TF.adjust_brightness(x, 0.3), 1),
    ("Color", 0.6, lambda x: TF.adjust_saturation(x, 1.6), 1),
    ("Contrast", -0.5, lambda x: TF.adjust_contrast(x, 0.5), 1),
    ("Sharpness", 0.8, lambda x: TF.adjust_sharpness(x, 1.8), 1),
    ("Posterize", 3, lambda x: TF.posterize(x, 3), 0),
    ("Solarize", 0.4, lambda x: TF.solarize(x, 0.4 * 255), 0),
    ("AutoContrast", 0, TF.autocontrast, 0),
    ("Equalize", 0, TF.equalize, 0),
    ("TranslateX", 5.7, lambda x: TF.affine(x, angle=0.0, translate=[5, 0], scale=1.0, shear=[0.0, 0.0]), 0),
    ("TranslateY", -3.2, lambda x: TF.affine(x, angle=0.0, translate=[0, -3], scale=1.0, shear=[0.0, 0.0]), 0),
])
def test_auto_augment_ops_match_torchvision(name: str, magnitude: float, reference, tolerance: int,  # type: ignore[no-untyped-def]
                                            photos: torch.Tensor) -> None:
    """Same results as v2's kernels; blends round where v2 truncates (one grey level at most)."""
    out = _ops_on(photos, name, magnitude)
    assert int((out.int() - reference(photos).int()).abs().max()) <= tolerance


@pytest.mark.parametrize("name,magnitude,reference", [
    ("Rotate", 30.0, lambda x: TF.rotate(x, 30.0, interpolation=TF.InterpolationMode.BILINEAR)),
    ("ShearX", 0.5, lambda x: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                                        shear=[math.degrees(math.atan(0.5)), 0.0],
                                        interpolation=TF.InterpolationMode.BILINEAR)),
])
def test_auto_augment_rotation_and_shear_match_torchvision_inside(name: str, magnitude: float, reference,  # type: ignore[no-untyped-def]
                                                                  photos: torch.Tensor) -> None:
    """Bilinear like v2's ``affine``; only the edge where the black fill blends in differs."""
    diff = (_ops_on(photos, name, magnitude).int() - reference(photos).int()).abs()
    assert float((diff > 2).float().mean()) < 0.06


def test_random_erasing_fills_one_box_with_the_image_s_mean(photos: torch.Tensor) -> None:
    y = torch.zeros(48, dtype=torch.long)
    plain = {"policy": "none", "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "p": 0.0}
    kept, _ = _augment("standard", size=40, erase_p=0.0, **plain)(photos, y, _seeded(0))
    assert torch.equal(kept, photos)
    erased, _ = _augment("standard", size=40, erase_p=1.0, **plain)(photos, y, _seeded(0))
    mean = photos.float().mean(dim=(2, 3)).round().to(torch.uint8)
    for i in range(48):
        changed = (erased[i] != photos[i]).any(0).nonzero()
        rows, cols = changed[:, 0], changed[:, 1]
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.02 * 1600 * 0.5 < int(area) <= 0.33 * 1600 + 40  # one box of 2-33% (rounded sides)
        box = erased[i][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert torch.equal(box, mean[i].view(3, 1, 1).expand_as(box))


# --- mixup / cutmix --------------------------------------------------------------------------------------

def test_mixup_blends_each_sample_with_the_next_by_its_own_lambda(photos: torch.Tensor) -> None:
    y = torch.arange(48) % 6  # neighbours in the batch differ in class, so lambda shows in the targets
    out, targets = _augment("flip", size=40, num_classes=6, p=0.0, mixup_alpha=0.4)(photos, y, _seeded(0))
    assert torch.allclose(targets.sum(1), torch.ones(48))
    lam = targets[torch.arange(48), y]
    assert torch.allclose(targets[torch.arange(48), y.roll(1)], 1 - lam)
    assert len(set(lam.tolist())) == 48  # a lambda per sample
    partner = photos.roll(1, dims=0)
    expected = (lam.view(-1, 1, 1, 1) * photos + (1 - lam.view(-1, 1, 1, 1)) * partner).round()
    # uint8: rounded from the float blend (within float32's rounding of .5 cases)
    assert int((out.float() - expected).abs().max()) <= 1
    assert float((out.float() != expected).float().mean()) < 1e-3
    assert torch.equal(targets_to_labels(targets), torch.where(lam >= 0.5, y, y.roll(1)))


def test_cutmix_pastes_a_box_whose_area_sets_lambda() -> None:
    x = (torch.arange(16, dtype=torch.uint8) * 15).view(16, 1, 1, 1).expand(16, 3, 24, 32).contiguous()
    y = torch.arange(16) % 4
    out, targets = _augment("flip", size=24, num_classes=4, p=0.0, cutmix_alpha=1.0)(x, y, _seeded(5))
    partner = x.roll(1, dims=0)
    from_partner = (out == partner).all(1)
    assert bool(((out == x).all(1) | from_partner).all())
    pasted = from_partner.flatten(1).float().mean(1)
    lam = targets[torch.arange(16), y]
    assert torch.allclose(lam, 1 - pasted)
    assert torch.allclose(targets[torch.arange(16), y.roll(1)], pasted)
    assert (pasted > 0).sum() > 8


def test_mix_prob_zero_mixes_nothing(photos: torch.Tensor) -> None:
    y = torch.arange(48) % 5
    out, targets = _augment("flip", size=40, num_classes=5, p=0.0, mixup_alpha=1.0, cutmix_alpha=1.0,
                            mix_prob=0.0)(photos, y, _seeded(0))
    assert torch.equal(out, photos) and torch.equal(targets, F.one_hot(y, 5).float())


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_lambda_follows_beta_alpha_alpha(alpha: float) -> None:
    lam = _Beta(alpha)(40000, _seeded(0), torch.device("cpu"))
    variance = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2
    assert abs(float(lam.mean()) - 0.5) < 0.01
    assert abs(float(lam.var()) - variance) < 0.05 * variance
    assert float(lam.min()) >= 0 and float(lam.max()) <= 1


# --- the loss: soft targets, class weights ---------------------------------------------------------------

def _logits_and_targets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _seeded(0)
    logits = torch.randn(12, 4, generator=g)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    soft = torch.rand(12, 4, generator=g)
    return logits, y, soft / soft.sum(1, keepdim=True)


@pytest.mark.parametrize("head_name", ["linear", "overcomplete"])
def test_the_loss_takes_soft_targets(head_name: str) -> None:
    head = create_head(head_name, in_features=5, num_classes=4, num_units=7 if head_name == "overcomplete" else None)
    features = torch.randn(12, 5, generator=_seeded(1))
    logits = head(features)  # class logits: the over-complete head pools its units first
    _, y, soft = _logits_and_targets()
    by_hand = -(soft * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(head.loss(logits, soft), by_hand)
    smoothed = soft * 0.9 + 0.1 / 4
    assert torch.allclose(head.loss(logits, soft, 0.1), -(smoothed * logits.log_softmax(1)).sum(1).mean())
    # one-hot probabilities are the class indices
    assert torch.allclose(head.loss(logits, F.one_hot(y, 4).float(), 0.1), head.loss(logits, y, 0.1))


def test_balanced_class_weights_are_scikit_learn_s() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    _, y, _ = _logits_and_targets()
    weights = class_weights(y, 4, "balanced")
    assert weights is not None
    expected = compute_class_weight("balanced", classes=np.arange(4), y=y.numpy())
    assert np.allclose(weights.numpy(), expected)  # 12 / (4 * [6, 3, 2, 1])
    assert class_weights(y, 4, None) is None


def test_class_weights_make_the_loss_a_weighted_mean() -> None:
    head = create_head("linear", in_features=4, num_classes=4)
    logits, y, soft = _logits_and_targets()
    weights = class_weights(y, 4, "balanced")
    assert weights is not None
    nll = -logits.log_softmax(1)
    per_sample = nll[torch.arange(12), y]
    by_hand = (weights[y] * per_sample).sum() / weights[y].sum()
    loss = head.loss(logits, y, weight=weights)
    assert torch.allclose(loss, by_hand)
    assert not torch.allclose(loss, head.loss(logits, y))  # the rare classes now count more
    # Soft targets: the same weighted mean, each sample weighted by its targets' class weights.
    soft_by_hand = (soft * weights * nll).sum() / (soft @ weights).sum()
    assert torch.allclose(head.loss(logits, soft, weight=weights), soft_by_hand)
    one_hot = F.one_hot(y, 4).float()
    assert torch.allclose(head.loss(logits, one_hot, 0.1, weight=weights), head.loss(logits, y, 0.1, weight=weights))


def test_the_binary_head_takes_soft_targets_and_weights() -> None:
    head = create_head("binary", in_features=3, num_classes=2)
    logit = torch.randn(10, 1, generator=_seeded(2))
    y = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 0])
    p = torch.rand(10, generator=_seeded(3))
    soft = torch.stack([1 - p, p], dim=1)
    log_s, log_not_s = F.logsigmoid(logit[:, 0]), F.logsigmoid(-logit[:, 0])
    assert torch.allclose(head.loss(logit, soft), -(p * log_s + (1 - p) * log_not_s).mean())
    weights = class_weights(y, 2, "balanced")
    assert weights is not None and torch.allclose(weights, torch.tensor([10 / 16, 10 / 4]))
    t = y.float()
    by_hand = -(weights[1] * t * log_s + weights[0] * (1 - t) * log_not_s).sum() / weights[y].sum()
    assert torch.allclose(head.loss(logit, y, weight=weights), by_hand)
    assert torch.allclose(head.loss(logit, F.one_hot(y, 2).float(), weight=weights), by_hand)


def test_hits_count_soft_targets_against_their_dominant_class() -> None:
    head = create_head("linear", in_features=4, num_classes=3)
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0], [0.0, 0.45, 0.55]])
    assert int(head.hits(logits, soft)) == 2
    assert int(head.hits(logits, torch.tensor([0, 1, 1]))) == 2


# --- settings: checked before any work, warnings -----------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["augment=flip", "augment.p=1.5"], "augment.p: must be a probability in [0, 1], got 1.5"),
    (["augment=flip", "augment.p=-0.1"], "augment.p: must be a probability in [0, 1], got -0.1"),
    (["augment=standard", "augment.erase_p=1.2"], "augment.erase_p: must be a probability in [0, 1], got 1.2"),
    (["augment=light", "augment.mix_prob=-0.5"], "augment.mix_prob: must be a probability in [0, 1], got -0.5"),
    (["augment=digits", "augment.switch_prob=2"], "augment.switch_prob: must be a probability in [0, 1], got 2.0"),
    (["augment=light", "augment.mixup_alpha=-1"], "augment.mixup_alpha: must be >= 0 (0: off), got -1.0"),
    (["augment=light", "augment.scale=[0.5,0.2]"],
     "augment.scale: must be [min, max] with 0 < min <= max <= 1 (of the image's area), got [0.5, 0.2]"),
    (["augment=standard", "augment.policy=auto"],
     "augment.policy: Unknown augmentation policy 'auto'; expected one of ['trivial', 'rand', 'none']"),
    (["augment=standard", "augment.magnitude=31"], "augment.magnitude: must be a magnitude bin in [0, 30], got 31"),
    (["augment=digits", "augment.translate=1.0"],
     "augment.translate: must be in [0, 1) (of the image's side), got 1.0"),
    (["augment=none", "augment.p=0.3"], "augment.p: augmentation 'none' takes no 'p'; its keys are ['name']"),
    (["augment=none", "augment.mixup_alpha=0.3"], "augment.mixup_alpha: augmentation 'none' takes no 'mixup_alpha'"),
    (["augment=digits", "augment.p=0.3"], "augment.p: augmentation 'digits' takes no 'p'"),
    (["augment=flip", "augment.policy=rand"], "augment.policy: augmentation 'flip' takes no 'policy'"),
    (["trainer.class_weight=inverse"], "trainer.class_weight: must be null or one of ['balanced'], got 'inverse'"),
    # The source task's own augmentation (pretrain.augment), checked as the target's is, under its own key:
    (["pretrain.augment.name=digits", "+pretrain.augment.translate=1.0"],
     "pretrain.augment.translate: must be in [0, 1) (of the image's side), got 1.0"),
    (["pretrain.augment.name=bogus"], "pretrain.augment.name: Unknown augmentation 'bogus'"),
    (["+pretrain.augment.p=0.3"], "pretrain.augment.p: augmentation 'none' takes no 'p'"),
])
def test_bad_augment_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(compose(overrides, config_dir=REPO / "conf"))
    assert str(caught.value).startswith(message)


def test_class_weight_balanced_is_accepted() -> None:
    cfg = load_config(compose(["trainer.class_weight=balanced", "augment=standard", "augment.cutmix_alpha=1.0"],
                              config_dir=REPO / "conf"))
    assert cfg.trainer.class_weight == "balanced" and cfg.augment.cutmix_alpha == 1.0


@pytest.mark.parametrize("overrides,warned", [
    (["augment=flip"], True),
    (["augment=light", "augment.p=0.0"], False),
    (["augment=standard", "data=mnist"], True),
    (["augment=digits"], False),
    (["augment=light", "data=cifar10"], False),
])
def test_flipping_digits_is_warned_about(overrides: list[str], warned: bool) -> None:
    warnings = augment_warnings(load_config(compose(overrides, config_dir=REPO / "conf")))
    assert len(warnings) == int(warned)
    if warned:
        assert "flipped digits change meaning" in warnings[0]


# --- in the training loop ------------------------------------------------------------------------------------

def _train(data: tuple[Batches, Batches], augment, *, epochs: int = 2, batch_size: int = 32):  # type: ignore[no-untyped-def]
    """small_cnn + linear head fitted as the finetune stage does it, minus MLflow; returns its state."""
    torch.manual_seed(0)
    cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", input_size=8, channels=1, width=8, depth=2))
    model, _ = build_model_for(cfg, num_classes=10, data_channels=1, mean=[0.3], std=[0.4])
    opt = OptimizerConfig(name="sgd", lr=0.05)
    optimizer = create_optimizer(param_groups(model, lr=opt.lr, backbone_lr_mult=1.0, weight_decay=0.0), opt)
    train, val = data
    schedule = Schedule(optimizer, SchedulerConfig(), epochs=epochs,
                        steps_per_epoch=steps_per_epoch(len(train), batch_size))
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, eval_batch_size=16, progress=False,
                             augment=augment)
    result = fit(model, model.head, train, val, optimizer, schedule, settings)
    return {k: v.clone() for k, v in model.state_dict().items()}, result


class Recorder:
    """Wraps an augmentation and records what the loop hands it."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.sizes, self.generators = inner, [], []

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8 and y.dtype == torch.long and generator.device == x.device
        self.sizes.append(x.shape[0])
        self.generators.append(generator)
        return self.inner(x, y, generator)


def test_only_training_batches_are_augmented(digits: tuple[Batches, Batches]) -> None:
    recorder = Recorder(_augment("flip", p=0.5))
    _train(digits, recorder, epochs=2, batch_size=32)
    steps = steps_per_epoch(200, 32)
    # Every training step, and nothing else: the 60 validation images (in batches of 16) are never augmented.
    assert recorder.sizes == ([32] * (steps - 1) + [200 - 32 * (steps - 1)]) * 2
    assert len({id(g) for g in recorder.generators}) == 1  # one stream for the run


def test_training_with_flip_is_reproducible_and_differs_from_none(digits: tuple[Batches, Batches]) -> None:
    first, result = _train(digits, _augment("flip", p=0.5))
    second, again = _train(digits, _augment("flip", p=0.5))
    plain, _ = _train(digits, None)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert result.history == again.history
    assert any(not torch.equal(first[k], plain[k]) for k in first)
    # p=0 draws but flips nothing: the same training as no augmentation at all.
    unflipped, _ = _train(digits, _augment("flip", p=0.0))
    assert all(torch.equal(unflipped[k], plain[k]) for k in plain)
