"""Early stopping, weight EMA, gradient accumulation, clipping, warm-up and lr scaling: exact checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, digit_batches, prepared_from
from transferlab.config.schema import (
    BackboneConfig, DropoutConfig, EarlyStoppingConfig, EmaConfig, ExperimentConfig, OptimizerConfig,
    RegularisationConfig, SchedulerConfig, TrainerConfig,
)
from transferlab.errors import ConfigError
from transferlab.training.batches import Batches
from transferlab.training.build import build_training
from transferlab.training.loop import EarlyStopping, EmaHook
from transferlab.training.optim import Schedule, scaled_lr


@pytest.fixture(scope="module")
def digits() -> tuple[Batches, Batches]:
    return digit_batches(256, 96)


def _cfg(*, backbone: str = "small_cnn", optimizer: OptimizerConfig | None = None,
         scheduler: SchedulerConfig | None = None, **trainer: object) -> ExperimentConfig:
    return ExperimentConfig(
        backbone=BackboneConfig(name=backbone, channels=1, width=8, depth=2, hidden=[32]),
        regularisation=RegularisationConfig(dropout=DropoutConfig(input=0.0, hidden=0.0)),
        optimizer=optimizer or OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
        scheduler=scheduler or SchedulerConfig(name="none"),
        trainer=TrainerConfig(**{"epochs": 2, "batch_size": 32, "progress": False, **trainer}))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_counts_epochs_without_an_improvement_beyond_min_delta() -> None:
    stop = EarlyStopping(monitor="val_loss", patience=2, min_delta=0.1)
    assert [stop.should_stop(v) for v in (1.0, 0.95, 0.85, 0.8, 0.79)] == [False, False, False, False, True]
    acc = EarlyStopping(monitor="val_acc", patience=1)
    assert [acc.should_stop(v) for v in (0.5, 0.6, 0.6)] == [False, False, True]


def test_early_stopping_stops_and_restores_the_best_weights(digits, tmp_path: Path) -> None:
    torch.manual_seed(0)
    # min_delta=1: no epoch after the first counts as an improvement, so training stops after 1 + patience.
    cfg = _cfg(epochs=10, early_stopping=EarlyStoppingConfig(enabled=True, monitor="val_loss", patience=2,
                                                             min_delta=1.0))
    t = build_training(cfg, prepared_from(*digits), checkpoint=tmp_path / "best.pt")
    result = t.fit(*digits)
    assert result.stopped_epoch == 2 and len(result.history) == 3
    best = torch.load(tmp_path / "best.pt", weights_only=True)  # the best by trainer.monitor (val_acc)
    assert result.best_epoch == max(range(3), key=lambda e: (result.history[e]["val_acc"], -e))
    assert all(torch.equal(v, best[k]) for k, v in t.model.state_dict().items())


# --------------------------------------------------------------------------- EMA


def test_ema_is_the_hand_computed_average_and_follows_the_weights_before_its_start() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    hook = EmaHook(model, decay=0.9, start_epoch=1)
    hook.on_epoch_start(0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 3
    hook.after_step()  # before start_epoch: a copy
    assert torch.equal(hook.module[0].weight, model[0].weight)
    assert int(hook.module[1].num_batches_tracked) == 3
    expected, expected_mean = model[0].weight.detach().clone(), torch.zeros(2)
    hook.on_epoch_start(1)
    for k in range(3):
        with torch.no_grad():
            model[0].weight.mul_(-0.5).add_(k)
            model[1].running_mean.add_(1.0)
        hook.after_step()
        expected = 0.9 * expected + 0.1 * model[0].weight.detach()
        expected_mean = 0.9 * expected_mean + 0.1 * model[1].running_mean
    torch.testing.assert_close(hook.module[0].weight, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hook.module[1].running_mean, expected_mean, rtol=1e-6, atol=1e-6)
    assert float(expected_mean[0]) == pytest.approx(0.561)  # 0.1 * 1, then 0.9 * 0.1 + 0.1 * 2, ...
    assert not any(p.requires_grad for p in hook.module.parameters())


def test_ema_weights_are_evaluated_and_checkpointed(digits, tmp_path: Path) -> None:
    def run(ema: bool) -> tuple[dict, list]:
        torch.manual_seed(0)
        cfg = _cfg(epochs=3, ema=EmaConfig(enabled=ema, decay=0.9))
        t = build_training(cfg, prepared_from(*digits), checkpoint=tmp_path / f"{ema}.pt")
        result = t.fit(*digits)
        return torch.load(tmp_path / f"{ema}.pt", weights_only=True), result.history

    plain_best, plain = run(False)
    ema_best, averaged = run(True)
    # Same training (the average never feeds back), different weights scored and kept.
    assert [h["train_loss"] for h in averaged] == [h["train_loss"] for h in plain]
    assert [h["val_loss"] for h in averaged] != [h["val_loss"] for h in plain]
    assert any(not torch.equal(ema_best[k], plain_best[k]) for k in plain_best)


# --------------------------------------------------------------------------- accumulation and clipping


def _one_step(digits, n: int, **trainer: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """The weights before and after training on the first ``n`` images (mlp backbone: no BatchNorm)."""
    train, _ = digits
    data = Batches(train.images[:n], train.labels[:n])
    torch.manual_seed(0)
    cfg = _cfg(backbone="mlp", epochs=1, optimizer=OptimizerConfig(name="sgd", lr=0.5, momentum=0.0), **trainer)
    t = build_training(cfg, prepared_from(data, data))
    before = copy.deepcopy(t.model.state_dict())
    history = t.fit(data, data).history
    return before, t.model.state_dict(), history[0]


def test_accumulated_batches_give_the_gradient_of_one_batch_k_times_larger(digits) -> None:
    before, big, _ = _one_step(digits, 64, batch_size=64)
    before_acc, accumulated, _ = _one_step(digits, 64, batch_size=16, accumulate_grad_batches=4)
    assert all(torch.equal(before[k], before_acc[k]) for k in before)
    assert any(not torch.equal(before[k], big[k]) for k in big)
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_gradient_norm(digits) -> None:
    clip = 1e-3
    before, after, metrics = _one_step(digits, 64, batch_size=64, gradient_clip_val=clip)
    step = torch.cat([(after[k] - before[k]).flatten() for k in before if before[k].is_floating_point()])
    assert metrics["grad_norm"] > clip  # the gradient was larger, and was clipped:
    assert float(step.norm()) == pytest.approx(0.5 * clip, rel=1e-3)  # lr x the clipped norm


def test_the_float16_gradient_scaler_changes_no_step_and_clips_the_unscaled_gradients(digits) -> None:
    # amp=true, amp_dtype=float16 trains through torch's GradScaler (autocast itself is CUDA-only, so on the
    # CPU the loss stays fp32): scaling by 2**16 and unscaling are exact, and clipping must see the true
    # gradients, so every weight equals the unscaled run's.
    plain = _one_step(digits, 64, batch_size=16, accumulate_grad_batches=2, gradient_clip_val=0.05)
    scaled = _one_step(digits, 64, batch_size=16, accumulate_grad_batches=2, gradient_clip_val=0.05, amp=True,
                       amp_dtype="float16")
    assert plain[2]["grad_norm"] > 0.05 and scaled[2]["grad_norm"] == plain[2]["grad_norm"]
    for k in plain[1]:
        assert torch.equal(scaled[1][k], plain[1][k]), k


def test_the_gradient_scaler_skips_an_overflowing_step_and_halves_its_scale() -> None:
    from transferlab.training.loop import TrainSettings, grad_scaler

    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = grad_scaler(TrainSettings(epochs=1, batch_size=1, amp=True, amp_dtype="float16"), torch.device("cpu"))
    assert scaler.is_enabled() and not grad_scaler(TrainSettings(epochs=1, batch_size=1, amp=True),
                                                   torch.device("cpu")).is_enabled()
    scale = scaler.get_scale()
    scaler.scale((weight * torch.tensor([1.0, float("inf")])).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(2)) and scaler.get_scale() == scale / 2


# --------------------------------------------------------------------------- warm-up and lr scaling


def _lrs(cfg: SchedulerConfig, steps: int, *, epochs: int = 10, per_epoch: int = 1) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = Schedule(optimizer, cfg, epochs=epochs, steps_per_epoch=per_epoch)
    lrs = []
    for i in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step_batch()
        if (i + 1) % per_epoch == 0:
            schedule.step_epoch(i // per_epoch, 0.0)
    return lrs


def test_warm_up_gives_the_documented_lr_per_step() -> None:
    lrs = _lrs(SchedulerConfig(name="none", warmup_steps=4, warmup_start_factor=0.1), 6)
    assert lrs == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0, 1.0])


def test_warm_up_in_epochs_multiplies_the_schedule_underneath() -> None:
    cosine = SchedulerConfig(name="cosine")
    plain = _lrs(cosine, 8, epochs=4, per_epoch=2)
    warmed = _lrs(SchedulerConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.0), 8, epochs=4,
                  per_epoch=2)
    assert warmed == pytest.approx([plain[0] * 0.0, plain[1] * 0.5, *plain[2:]])


def test_lr_scales_with_the_effective_batch_by_timm_s_rule() -> None:
    assert scaled_lr(OptimizerConfig(lr=0.1), 512) == 0.1
    assert scaled_lr(OptimizerConfig(lr=0.1, lr_base_size=256), 512) == pytest.approx(0.2)
    assert scaled_lr(OptimizerConfig(lr=0.1, lr_base_size=256, lr_base_scale="sqrt"), 1024) == pytest.approx(0.2)


def test_the_effective_batch_includes_accumulation(digits) -> None:
    cfg = _cfg(optimizer=OptimizerConfig(name="sgd", lr=0.1, lr_base_size=64), batch_size=32,
               accumulate_grad_batches=4)
    t = build_training(cfg, prepared_from(*digits))
    assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([0.2] * len(t.optimizer.param_groups))


@pytest.mark.parametrize("override, message", [
    ("trainer.accumulate_grad_batches=0", r"^trainer.accumulate_grad_batches: must be >= 1"),
    ("trainer.gradient_clip_val=0", r"^trainer.gradient_clip_val: must be > 0"),
    ("trainer.early_stopping.patience=0", r"^trainer.early_stopping.patience: must be >= 1"),
    ("trainer.early_stopping.monitor=test_acc", r"^trainer.early_stopping.monitor: .*test_acc"),
    ("trainer.ema.decay=1.0", r"^trainer.ema.decay: must be in \(0, 1\)"),
    ("scheduler.warmup_start_factor=2", r"^scheduler.warmup_start_factor: must be in \[0, 1\]"),
    ("optimizer.lr_base_scale=cubic", r"^optimizer.lr_base_scale: .*cubic"),
    ("trainer.amp_dtype=float8", r"^trainer.amp_dtype: Unknown amp dtype 'float8'"),
])
def test_bad_training_controls_are_refused(override: str, message: str) -> None:
    from transferlab.compose import compose
    from transferlab.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(compose([override], config_dir=REPO / "conf"))


def test_warm_up_in_both_epochs_and_steps_is_refused() -> None:
    from transferlab.compose import compose
    from transferlab.config import load_config

    with pytest.raises(ConfigError, match=r"^scheduler.warmup_steps: give warm-up in epochs or in steps"):
        load_config(compose(["scheduler.warmup_epochs=1", "scheduler.warmup_steps=5"], config_dir=REPO / "conf"))


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is present here")
def test_mps_is_a_device_name_refused_only_where_it_is_missing() -> None:
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.training.runtime import resolve_device

    with pytest.raises(ConfigError, match=r"^trainer.device: 'mps', but MPS \(Apple silicon\) is not available"):
        load_config(compose(["trainer.device=mps"], config_dir=REPO / "conf"))
    with pytest.raises(ConfigError, match=r"^trainer.device: must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"):
        load_config(compose(["trainer.device=tpu"], config_dir=REPO / "conf"))
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
