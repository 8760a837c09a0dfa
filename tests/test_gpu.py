"""CUDA checks: skipped without a GPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _digits_on(device: torch.device):
    from sklearn.datasets import load_digits

    from transferlab.training.loop import Batches

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return (Batches(images[:1400].to(device), labels[:1400].to(device)),
            Batches(images[1400:].to(device), labels[1400:].to(device)))


def _model(device: torch.device, first_n: int):
    from transferlab.models.assemble import FineTuneModel, Preprocess
    from transferlab.models.backbones import create_backbone
    from transferlab.models.heads import create_head
    from transferlab.training.freezing import apply_freeze, frozen_norm_layers, plan_freeze

    torch.manual_seed(0)
    backbone = create_backbone("small_cnn", channels=1, input_size=16, width=32, depth=3)
    head = create_head("overcomplete", in_features=backbone.out_features, num_classes=10, hidden=[64],
                       dropouts=[0.2], num_units=14)
    model = FineTuneModel(Preprocess(1, 1, 16, [0.3], [0.3]), backbone.module, head, input_dropout=0.1)
    plan = plan_freeze(model, backbone, first_n=first_n)
    apply_freeze(model, plan)
    return model.to(device), plan, frozen_norm_layers(model, plan.frozen)


@pytest.mark.parametrize("amp,channels_last,amp_dtype", [(False, False, "bfloat16"), (True, True, "bfloat16"),
                                                         (True, True, "float16")])
def test_fit_on_cuda_keeps_frozen_layers_and_max_norm(amp: bool, channels_last: bool, amp_dtype: str) -> None:
    from transferlab.config.schema import OptimizerConfig, SchedulerConfig
    from transferlab.training.loop import TrainSettings, fit, steps_per_epoch
    from transferlab.training.maxnorm import constrained_weights, unit_norms
    from transferlab.training.optim import Schedule, create_optimizer
    from transferlab.training.param_groups import param_groups
    from transferlab.training.runtime import resolve_device

    device = resolve_device("auto")
    assert device.type == "cuda"
    train, val = _digits_on(device)
    model, plan, norms = _model(device, first_n=1)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    frozen_before = {n: t.detach().clone() for n, t in model.state_dict().items() if n.startswith("backbone.block1.")}
    groups = param_groups(model, lr=0.1, backbone_lr_mult=1.0, weight_decay=5e-4, exclude=plan.frozen)
    opt = create_optimizer(groups, OptimizerConfig(lr=0.1, nesterov=True))
    schedule = Schedule(opt, SchedulerConfig(name="cosine"), epochs=6, steps_per_epoch=steps_per_epoch(len(train), 64))
    weights = list(constrained_weights(model, ["head.*"]).values())
    settings = TrainSettings(epochs=6, batch_size=64, max_norm=3.0, max_norm_weights=weights, frozen_norms=norms,
                             frozen=plan.frozen, amp=amp, amp_dtype=amp_dtype, channels_last=channels_last,
                             progress=False)
    result = fit(model, model.head, train, val, opt, schedule, settings)
    assert len(result.history) == 6
    assert result.best_value > 0.7
    for name, before in frozen_before.items():
        assert torch.equal(before, model.state_dict()[name]), name
    for w in weights:
        assert unit_norms(w).max().item() <= 3.0 + 1e-6


def test_training_steps_do_not_sync_with_the_host() -> None:
    """Steps must not wait for the GPU: at most a few syncs per epoch (the
    epoch's metrics), never one per step; augmentation included."""
    from transferlab.config.schema import AugmentConfig, OptimizerConfig, SchedulerConfig
    from transferlab.training.augment import create_augment
    from transferlab.training.loop import TrainSettings, fit, steps_per_epoch
    from transferlab.training.maxnorm import constrained_weights
    from transferlab.training.optim import Schedule, create_optimizer
    from transferlab.training.param_groups import param_groups

    device = torch.device("cuda")
    train, val = _digits_on(device)
    model, plan, norms = _model(device, first_n=0)
    opt = create_optimizer(param_groups(model, lr=0.05, backbone_lr_mult=1.0, weight_decay=0.0),
                           OptimizerConfig(lr=0.05))
    steps = steps_per_epoch(len(train), 32)
    schedule = Schedule(opt, SchedulerConfig(name="onecycle"), epochs=2, steps_per_epoch=steps)
    settings = TrainSettings(epochs=2, batch_size=32, max_norm=3.0,
                             max_norm_weights=list(constrained_weights(model, ["head.*"]).values()),
                             progress=False, augment=create_augment(
                                 AugmentConfig(name="standard", mixup_alpha=0.2, cutmix_alpha=1.0), size=8, num_classes=10))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, model.head, train, val, opt, schedule, settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"{len(syncs)} host-device syncs in {2 * steps} steps")
    assert len(syncs) < steps, f"{len(syncs)} syncs for {2 * steps} steps: a step waits for the GPU"


def test_flip_on_cuda_is_seeded_and_per_sample() -> None:
    from transferlab.config.schema import AugmentConfig
    from transferlab.training.augment import create_augment

    train, _ = _digits_on(torch.device("cuda"))
    x = train.images[:256]
    y = train.labels[:256]
    flip = create_augment(AugmentConfig(name="flip", p=0.5), size=8, num_classes=10)
    assert flip is not None
    first, _ = flip(x, y, torch.Generator("cuda").manual_seed(0))
    assert first.device == x.device and first.dtype == torch.uint8
    assert torch.equal(first, flip(x, y, torch.Generator("cuda").manual_seed(0))[0])
    flipped = int((first != x).flatten(1).any(dim=1).sum())
    assert 64 < flipped < 192
