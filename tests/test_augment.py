"""Augmentation (config group ``augment``): the ``flip`` preset on real digits, and how the training
loop applies an augmentation (training batches only, seeded, on the data's device)."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, build_model_for, digit_batches
from transferlab.compose import compose
from transferlab.config.schema import AugmentConfig, BackboneConfig, ExperimentConfig, OptimizerConfig, SchedulerConfig
from transferlab.config.validate import ConfigError, load_config
from transferlab.training.augment import create_augment
from transferlab.training.loop import Batches, TrainSettings, fit, steps_per_epoch
from transferlab.training.optim import Schedule, create_optimizer
from transferlab.training.param_groups import param_groups


@pytest.fixture(scope="module")
def digits() -> tuple[Batches, Batches]:
    """200 training and 60 validation images of the real 8x8 digits, uint8 like the prepared data."""
    return digit_batches(200, 60)


def _flip(p: float):  # type: ignore[no-untyped-def]
    augment = create_augment(AugmentConfig(name="flip", p=p))
    assert augment is not None
    return augment


def _flipped_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per sample: True where ``out`` is ``x`` mirrored left-right; every row must be one or the other."""
    same = (out == x).flatten(1).all(dim=1)
    mirrored = (out == x.flip(-1)).flatten(1).all(dim=1)
    assert bool((same | mirrored).all())
    return mirrored & ~same


def test_flip_decides_per_sample(digits: tuple[Batches, Batches]) -> None:
    x = digits[0].images
    symmetric = (x == x.flip(-1)).flatten(1).all(dim=1)
    assert not symmetric.any()  # every digit differs from its mirror image, so each decision shows
    out = _flip(0.5)(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    flipped = int(_flipped_rows(x, out).sum())
    assert 60 < flipped < 140  # about half of the 200, not all or nothing for the whole batch


def test_flip_is_seeded(digits: tuple[Batches, Batches]) -> None:
    x = digits[0].images
    flip = _flip(0.5)
    first = flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(first, flip(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, flip(x, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("p,expected", [(0.0, 0), (1.0, 200)])
def test_flip_probability_bounds(p: float, expected: int, digits: tuple[Batches, Batches]) -> None:
    x = digits[0].images
    out = _flip(p)(x, torch.Generator().manual_seed(0))
    assert int(_flipped_rows(x, out).sum()) == expected
    if p == 0.0:
        assert torch.equal(out, x)


def test_none_builds_no_augmentation() -> None:
    assert create_augment(AugmentConfig(name="none")) is None


@pytest.mark.parametrize("overrides,message", [
    (["augment=flip", "augment.p=1.5"], "augment.p: must be a probability in [0, 1], got 1.5"),
    (["augment=flip", "augment.p=-0.1"], "augment.p: must be a probability in [0, 1], got -0.1"),
    (["augment=none", "augment.p=0.3"], "augment.p: augmentation 'none' takes no 'p'; its keys are ['name']"),
])
def test_bad_augment_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(compose(overrides, config_dir=REPO / "conf"))
    assert str(caught.value) == message


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

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        assert x.dtype == torch.uint8 and generator.device == x.device
        self.sizes.append(x.shape[0])
        self.generators.append(generator)
        return self.inner(x, generator)


def test_only_training_batches_are_augmented(digits: tuple[Batches, Batches]) -> None:
    recorder = Recorder(_flip(0.5))
    _train(digits, recorder, epochs=2, batch_size=32)
    steps = steps_per_epoch(200, 32)
    # Every training step, and nothing else: the 60 validation images (in batches of 16) are never augmented.
    assert recorder.sizes == ([32] * (steps - 1) + [200 - 32 * (steps - 1)]) * 2
    assert len({id(g) for g in recorder.generators}) == 1  # one stream for the run


def test_training_with_flip_is_reproducible_and_differs_from_none(digits: tuple[Batches, Batches]) -> None:
    first, result = _train(digits, _flip(0.5))
    second, again = _train(digits, _flip(0.5))
    plain, _ = _train(digits, None)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert result.history == again.history
    assert any(not torch.equal(first[k], plain[k]) for k in first)
    # p=0 draws but flips nothing: the same training as no augmentation at all.
    unflipped, _ = _train(digits, _flip(0.0))
    assert all(torch.equal(unflipped[k], plain[k]) for k in plain)
