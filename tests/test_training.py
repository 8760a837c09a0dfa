"""Freezing, parameter groups, max-norm, schedules and the training loop, on real models and the sklearn digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import build_model_for, digit_batches, prepared_from
from transferlab.config.schema import (
    BackboneConfig,
    ExperimentConfig,
    HeadConfig,
    MomentumScheduleConfig,
    OptimizerConfig,
    SchedulerConfig,
)
from transferlab.models.assemble import FineTuneModel
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.training.freezing import (
    FreezeError,
    FreezePlan,
    apply_freeze,
    frozen_norm_layers,
    plan_freeze,
    set_backbone_trainable,
)
from transferlab.training.loop import Batches, FitResult, TrainSettings, fit, steps_per_epoch
from transferlab.training.maxnorm import apply_max_norm, constrained_weights, unit_norms
from transferlab.training.optim import Schedule, create_optimizer, list_optimizers, list_schedulers
from transferlab.training.param_groups import describe_groups, param_groups

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def digits() -> tuple[Batches, Batches]:
    """240 training and 80 validation images of the real 8x8 digits, as uint8 like the prepared data."""
    return digit_batches(240, 80)


def _model(*, first_n: int = 0, whole: bool = False, patterns: list[str] | None = None,
           method: str = "requires_grad", head: HeadConfig | None = None, seed: int = 0,
           ) -> tuple[FineTuneModel, Backbone, FreezePlan]:
    """small_cnn (3 Conv-BN-ReLU blocks) + head, frozen like the finetune stage does it."""
    torch.manual_seed(seed)
    cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", input_size=8, channels=1, width=8, depth=3),
                           head=head or HeadConfig(name="linear"))
    model, backbone = build_model_for(cfg, num_classes=10, data_channels=1, mean=[0.3], std=[0.4])
    plan = plan_freeze(model, backbone, first_n=first_n, patterns=patterns, whole_backbone=whole, method=method)
    apply_freeze(model, plan)
    return model, backbone, plan


def _groups(model: nn.Module, plan: FreezePlan, opt: OptimizerConfig) -> list[dict]:
    return param_groups(model, lr=opt.lr, backbone_lr_mult=opt.backbone_lr_mult, weight_decay=opt.weight_decay,
                        zero_lr=plan.frozen if plan.method == "zero_lr" else frozenset(),
                        exclude=plan.frozen if plan.method == "requires_grad" else frozenset())


def _fit(model: FineTuneModel, plan: FreezePlan, data: tuple[Batches, Batches], *, opt: OptimizerConfig,
         epochs: int = 2, batch_size: int = 32, sched: SchedulerConfig | None = None,
         max_norm: float | None = None, max_norm_layers: list[str] | None = None, head_only_epochs: int = 0,
         checkpoint: Path | None = None, monitor: str = "val_acc",
         on_epoch_end=None) -> tuple[FitResult, torch.optim.Optimizer]:  # type: ignore[no-untyped-def]
    """The finetune stage's wiring of `fit`, minus MLflow."""
    train, val = data
    optimizer = create_optimizer(_groups(model, plan, opt), opt)
    schedule = Schedule(optimizer, sched or SchedulerConfig(), epochs=epochs,
                        steps_per_epoch=steps_per_epoch(len(train), batch_size))
    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, eval_batch_size=64, monitor=monitor, max_norm=max_norm,
        max_norm_weights=list(constrained_weights(model, max_norm_layers or []).values()),
        frozen_norms=frozen_norm_layers(model, plan.frozen), frozen=plan.frozen,
        head_only_epochs=head_only_epochs, progress=False, checkpoint=checkpoint)
    return fit(model, model.head, train, val, optimizer, schedule, settings, on_epoch_end=on_epoch_end), optimizer


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bn_modes(model: nn.Module) -> dict[str, list[bool]]:
    """Record, per BatchNorm module, its `training` flag at every forward call made with gradients on
    (i.e. every training step; evaluation runs under no_grad)."""
    seen: dict[str, list[bool]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            seen[name] = []

            def hook(mod: nn.Module, _inputs: object, name: str = name) -> None:
                if torch.is_grad_enabled():
                    seen[name].append(mod.training)

            module.register_forward_pre_hook(hook)
    return seen


# --------------------------------------------------------------------------- freezing keeps things fixed


@pytest.mark.parametrize("scope", ["first_n=1", "backbone"])
def test_frozen_params_and_bn_stats_bitwise_unchanged(scope: str, digits: tuple[Batches, Batches]) -> None:
    model, _, plan = _model(first_n=1) if scope == "first_n=1" else _model(whole=True)
    frozen_blocks = ["block1"] if scope == "first_n=1" else ["block1", "block2", "block3"]
    assert plan.frozen == {f"backbone.{b}.{p}" for b in frozen_blocks for p in ("0.weight", "1.weight", "1.bias")}
    before = _snapshot(model)
    modes = _bn_modes(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not set(trainable) & plan.frozen

    def check(epoch: int, metrics: dict[str, float]) -> None:
        state = model.state_dict()
        for name in plan.frozen:
            assert torch.equal(state[name], before[name]), f"{name} moved in epoch {epoch}"
        for block in frozen_blocks:
            for buf in BN_BUFFERS:
                key = f"backbone.{block}.1.{buf}"
                assert torch.equal(state[key], before[key]), f"{key} moved in epoch {epoch}"

    opt = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.01)
    result, _ = _fit(model, plan, digits, opt=opt, epochs=3, on_epoch_end=check)
    assert len(result.history) == 3
    check(-1, {})  # and after loading the best state back

    after = model.state_dict()
    for name in trainable:
        assert not torch.equal(after[name], before[name]), f"trainable {name} did not change"
    for block in frozen_blocks:
        assert modes[f"backbone.{block}.1"] and not any(modes[f"backbone.{block}.1"])  # eval in every step
    if scope == "first_n=1":
        # the trained blocks' BatchNorm did train: the test would see a moving frozen one
        assert all(modes["backbone.block2.1"])
        assert not torch.equal(after["backbone.block2.1.running_mean"], before["backbone.block2.1.running_mean"])
        assert after["backbone.block2.1.num_batches_tracked"].item() > 0


@pytest.mark.parametrize("optimizer", ["adam", "adadelta"])
def test_zero_lr_keeps_frozen_layers_fixed(optimizer: str, digits: tuple[Batches, Batches]) -> None:
    model, _, plan = _model(first_n=2, method="zero_lr")
    assert plan.method == "zero_lr" and plan.layers == ("block1", "block2")
    # the zero_lr method keeps the parameters in the optimiser: they still get gradients
    assert all(p.requires_grad for p in model.parameters())
    before = _snapshot(model)
    modes = _bn_modes(model)
    grads_seen: set[str] = set()

    def check(epoch: int, metrics: dict[str, float]) -> None:
        grads_seen.update(n for n, p in model.named_parameters() if n in plan.frozen and p.grad is not None
                          and p.grad.abs().sum() > 0)

    opt = OptimizerConfig(name=optimizer, lr=0.01 if optimizer == "adam" else 1.0, weight_decay=0.01)
    result, optim = _fit(model, plan, digits, opt=opt, epochs=2, on_epoch_end=check)

    zero = [g for g in optim.param_groups if g["name"] == "frozen_zero_lr"]
    assert len(zero) == 1 and zero[0]["lr"] == 0.0 and zero[0]["weight_decay"] == 0.0
    assert set(zero[0]["param_names"]) == plan.frozen
    assert grads_seen == plan.frozen  # the optimiser really saw gradients for them
    after = model.state_dict()
    for name in plan.frozen:
        assert torch.equal(after[name], before[name]), name
    for block in ("block1", "block2"):
        for buf in BN_BUFFERS:
            key = f"backbone.{block}.1.{buf}"
            assert torch.equal(after[key], before[key]), key
        assert not any(modes[f"backbone.{block}.1"])
    assert all(modes["backbone.block3.1"])
    assert not torch.equal(after["backbone.block3.0.weight"], before["backbone.block3.0.weight"])
    assert not torch.equal(after["head.out.weight"], before["head.out.weight"])


def test_staged_unfreeze_trains_the_head_alone_first(digits: tuple[Batches, Batches]) -> None:
    model, _, plan = _model(first_n=1)
    initial = _snapshot(model)
    snaps: list[dict[str, torch.Tensor]] = []
    modes = _bn_modes(model)

    def snap(epoch: int, metrics: dict[str, float]) -> None:
        snaps.append(_snapshot(model))

    opt = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)
    _fit(model, plan, digits, opt=opt, epochs=4, head_only_epochs=2, on_epoch_end=snap)
    assert len(snaps) == 4
    backbone_keys = [k for k in initial if k.startswith("backbone.")]
    for epoch in (0, 1):  # head only: the whole backbone, BatchNorm statistics included, stays put
        for key in backbone_keys:
            assert torch.equal(snaps[epoch][key], initial[key]), f"{key} moved in head-only epoch {epoch}"
        assert not torch.equal(snaps[epoch]["head.out.weight"], initial["head.out.weight"])
    for epoch in (2, 3):  # then the configured freezing: block2/3 train, block1 stays frozen
        for key in ("backbone.block2.0.weight", "backbone.block3.1.bias", "backbone.block3.1.running_mean"):
            assert not torch.equal(snaps[epoch][key], snaps[epoch - 1][key]), f"{key} fixed in epoch {epoch}"
        for key in [k for k in backbone_keys if k.startswith("backbone.block1.")]:
            assert torch.equal(snaps[epoch][key], initial[key])
    # the permanently frozen layer stays off, the rest is back on
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == plan.frozen
    steps = steps_per_epoch(240, 32)
    assert modes["backbone.block2.1"] == [False] * (2 * steps) + [True] * (2 * steps)
    assert modes["backbone.block1.1"] == [False] * (4 * steps)


def test_set_backbone_trainable_keeps_frozen() -> None:
    model, _, plan = _model(first_n=1)
    set_backbone_trainable(model, False, keep_frozen=plan.frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("head."))
    set_backbone_trainable(model, True, keep_frozen=plan.frozen)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == plan.frozen


# --------------------------------------------------------------------------- plan_freeze


def test_plan_freeze_first_n_and_patterns() -> None:
    model, _, plan = _model(first_n=2)
    assert plan.layers == ("block1", "block2") and plan.method == "requires_grad"
    assert plan.frozen == {f"backbone.block{i}.{p}" for i in (1, 2) for p in ("0.weight", "1.weight", "1.bias")}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == plan.frozen
    assert [m for m in frozen_norm_layers(model, plan.frozen)] == [model.backbone.block1[1], model.backbone.block2[1]]

    model, _, plan = _model(patterns=["backbone.block3.*", "head.out.bias"])
    assert plan.layers == ()
    assert plan.frozen == {"backbone.block3.0.weight", "backbone.block3.1.weight", "backbone.block3.1.bias",
                           "head.out.bias"}
    # a BatchNorm counts as frozen only when all its parameters are
    model, _, plan = _model(patterns=["backbone.block3.1.weight"])
    assert frozen_norm_layers(model, plan.frozen) == []


def test_plan_freeze_whole_backbone_and_zero_lr_method() -> None:
    model, _, plan = _model(whole=True, method="zero_lr")
    assert plan.frozen == {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    assert all(p.requires_grad for p in model.parameters())  # zero_lr leaves requires_grad alone
    assert len(frozen_norm_layers(model, plan.frozen)) == 3


def test_plan_freeze_first_n_too_large_gives_the_count() -> None:
    model, backbone, _ = _model()
    with pytest.raises(FreezeError, match=r"regularisation\.freeze\.first_n=4, but the backbone has only 3 layers: "
                                          r"\['block1', 'block2', 'block3'\]"):
        plan_freeze(model, backbone, first_n=4)
    plan = plan_freeze(model, backbone, first_n=3)  # exactly the count is fine
    assert plan.layers == ("block1", "block2", "block3")


def test_plan_freeze_pattern_matching_nothing_raises() -> None:
    model, backbone, _ = _model()
    with pytest.raises(FreezeError, match=r"regularisation\.freeze\.patterns: 'backbone\.layer1\.\*' matches no "
                                          r"parameter; names look like \['backbone\.block1\.0\.weight'"):
        plan_freeze(model, backbone, patterns=["backbone.layer1.*"])


def test_plan_freeze_layer_prefix_does_not_leak_to_later_layers() -> None:
    # mobilenet's layers are features.0 .. features.12: freezing features.1 must not freeze features.10-12
    backbone = create_backbone("mobilenet_v3_small", channels=3, input_size=32)
    model = nn.Module()
    model.backbone = backbone.module
    plan = plan_freeze(model, backbone, first_n=2)
    assert plan.layers == ("features.0", "features.1")
    expected = {n for n, _ in model.named_parameters() if n.startswith(("backbone.features.0.",
                                                                         "backbone.features.1."))}
    assert plan.frozen == expected and len(expected) > 0
    assert not any(n.startswith("backbone.features.1") and not n.startswith("backbone.features.1.")
                   for n in plan.frozen)


# --------------------------------------------------------------------------- param_groups


def test_param_groups_exact() -> None:
    model, _, _ = _model(head=HeadConfig(name="mlp", hidden=[16]))
    groups = param_groups(model, lr=0.5, backbone_lr_mult=0.25, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    assert by_name["backbone"]["param_names"] == [f"backbone.block{i}.0.weight" for i in (1, 2, 3)]
    assert by_name["backbone_no_decay"]["param_names"] == [f"backbone.block{i}.1.{p}" for i in (1, 2, 3)
                                                           for p in ("weight", "bias")]
    assert by_name["head"]["param_names"] == ["head.hidden.0.weight", "head.out.weight"]
    assert by_name["head_no_decay"]["param_names"] == ["head.hidden.0.bias", "head.out.bias"]
    assert [(g["lr"], g["lr_scale"], g["weight_decay"]) for g in groups] == [
        (0.125, 0.25, 0.01), (0.125, 0.25, 0.0), (0.5, 1.0, 0.01), (0.5, 1.0, 0.0)]
    for g in groups:  # the tensors are the named ones, and only decayed ones have >= 2 dims
        params = dict(model.named_parameters())
        assert all(p is params[n] for p, n in zip(g["params"], g["param_names"]))
        assert all((p.ndim >= 2) == (g["weight_decay"] > 0) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    # the optimiser keeps the per-group values
    optimizer = create_optimizer(groups, OptimizerConfig(name="adamw", lr=0.5, weight_decay=0.01))
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.125, 0.01), (0.125, 0.0), (0.5, 0.01), (0.5, 0.0)]
    lines = describe_groups(groups).splitlines()
    assert len(lines) == 4 and lines[0].startswith("backbone ") and "lr=0.125 weight_decay=0.01" in lines[0]


def test_param_groups_exclude_and_zero_lr() -> None:
    model, _, plan = _model(first_n=1)
    groups = _groups(model, plan, OptimizerConfig(lr=0.5, backbone_lr_mult=0.25, weight_decay=0.01))
    names = [n for g in groups for n in g["param_names"]]
    assert not set(names) & plan.frozen and len(names) == len(set(names))
    assert set(names) == {n for n, _ in model.named_parameters()} - plan.frozen
    assert "frozen_zero_lr" not in [g["name"] for g in groups]

    model, _, plan = _model(first_n=1, method="zero_lr")
    groups = _groups(model, plan, OptimizerConfig(lr=0.5, backbone_lr_mult=0.25, weight_decay=0.01))
    zero = [g for g in groups if g["name"] == "frozen_zero_lr"]
    assert len(zero) == 1
    assert zero[0]["param_names"] == ["backbone.block1.0.weight", "backbone.block1.1.weight", "backbone.block1.1.bias"]
    assert (zero[0]["lr"], zero[0]["lr_scale"], zero[0]["weight_decay"]) == (0.0, 0.0, 0.0)
    assert {n for g in groups for n in g["param_names"]} == {n for n, _ in model.named_parameters()}
    assert next(g for g in groups if g["name"] == "backbone")["param_names"] == [
        "backbone.block2.0.weight", "backbone.block3.0.weight"]


def test_optimizers_by_name() -> None:
    assert list_optimizers() == ["adadelta", "adam", "adamw", "sgd"]
    model, _, plan = _model()
    groups = _groups(model, plan, OptimizerConfig(lr=0.1))
    sgd = create_optimizer(groups, OptimizerConfig(name="sgd", lr=0.1, momentum=0.8, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    assert sgd.param_groups[0]["nesterov"] is True
    adam = create_optimizer(groups, OptimizerConfig(name="adam", lr=0.1, betas=[0.8, 0.99], eps=1e-6))
    assert adam.param_groups[0]["betas"] == (0.8, 0.99) and adam.param_groups[0]["eps"] == 1e-6
    ada = create_optimizer(groups, OptimizerConfig(name="adadelta", lr=1.0, rho=0.95))
    assert isinstance(ada, torch.optim.Adadelta) and ada.param_groups[0]["rho"] == 0.95
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adma'; expected one of \['adadelta', 'adam'"):
        create_optimizer(groups, OptimizerConfig(name="adma"))


# --------------------------------------------------------------------------- max-norm


def test_apply_max_norm_linear_rows_exact() -> None:
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, -2.0]])
    before = w.clone()
    largest = apply_max_norm([w], 2.0)
    assert largest.item() == 5.0  # the largest norm before clipping
    torch.testing.assert_close(w[0], torch.tensor([1.2, 1.6]))  # same direction, norm 2
    assert torch.equal(w[1], before[1])  # within the limit: untouched
    assert w[2].norm().item() <= 2.0 + 1e-6  # exactly at the limit: kept at (or a hair under) it
    torch.testing.assert_close(w[2], before[2])


def test_apply_max_norm_conv_per_output_channel() -> None:
    w = torch.empty(3, 2, 2, 2)
    w[0] = 3.0  # norm sqrt(8 * 9) = 8.485
    w[1] = 0.5  # norm sqrt(8 * 0.25) = 1.414
    w[2] = -1.0  # norm sqrt(8) = 2.828
    lin = torch.tensor([[6.0, 8.0]])
    before = w.clone()
    largest = apply_max_norm([w, lin], 2.0)
    assert largest.item() == pytest.approx(10.0)  # the largest over all weights, from the Linear
    norms = unit_norms(w)
    assert (norms <= 2.0 + 1e-6).all() and norms[0].item() == pytest.approx(2.0, rel=1e-6)
    assert norms[2].item() == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(w[1], before[1])  # a whole-tensor clip would have shrunk this channel too
    torch.testing.assert_close(w[0], torch.full((2, 2, 2), 2.0 / math.sqrt(8)))
    assert unit_norms(lin).item() == pytest.approx(2.0, rel=1e-6)
    assert apply_max_norm([], 2.0).item() == 0.0


def test_constrained_weights_by_module_pattern() -> None:
    model, _, _ = _model(head=HeadConfig(name="mlp", hidden=[16]))
    assert list(constrained_weights(model, ["head.*"])) == ["head.hidden.0.weight", "head.out.weight"]
    got = constrained_weights(model, ["backbone.block2.*", "head.out"])
    assert list(got) == ["backbone.block2.0.weight", "head.out.weight"]
    assert got["head.out.weight"] is model.head.out.weight
    assert constrained_weights(model, ["nothing.*"]) == {}


def _max_norm_run(constrain: bool, digits: tuple[Batches, Batches], c: float, steps: int = 12) -> list[float]:
    """A few large-lr SGD steps, clipping after every `optimizer.step()` like the loop does; returns the
    largest unit norm after each step (after clipping when constrained)."""
    model, _, plan = _model(head=HeadConfig(name="mlp", hidden=[32]), seed=1)
    weights = constrained_weights(model, ["head.*", "backbone.block3.0"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    train, _ = digits
    model.train()
    largest_after: list[float] = []
    for step in range(steps):
        idx = slice(step * 16 % 240, step * 16 % 240 + 16)
        loss = model.head.loss(model(train.images[idx]), train.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if constrain:
            pre = {n: w.detach().clone() for n, w in weights.items()}
            pre_norms = {n: unit_norms(w) for n, w in pre.items()}
            largest = apply_max_norm(list(weights.values()), c)
            assert largest.item() == max(v.max().item() for v in pre_norms.values())
            for name, w in weights.items():
                norms = unit_norms(w)
                assert (norms <= c + 1e-6).all(), f"{name} exceeds {c} after step {step}: {norms.max()}"
                over = pre_norms[name] > c
                # units over the limit are scaled down to it, keeping their direction; the others are untouched
                assert torch.equal(w[~over], pre[name][~over])
                if over.any():
                    torch.testing.assert_close(norms[over], torch.full_like(norms[over], c))
                    scale = (w[over].flatten(1) / pre[name][over].flatten(1))
                    torch.testing.assert_close(scale, scale[:, :1].expand_as(scale))
        largest_after.append(max(unit_norms(w).max().item() for w in weights.values()))
    return largest_after


def test_max_norm_holds_after_every_step(digits: tuple[Batches, Batches]) -> None:
    c = 1.0
    unconstrained = _max_norm_run(False, digits, c)
    assert max(unconstrained) > 1.5 * c  # large steps do violate the limit, so the check below can fail
    constrained = _max_norm_run(True, digits, c)
    assert max(constrained) <= c + 1e-6


def test_fit_applies_max_norm(digits: tuple[Batches, Batches]) -> None:
    c = 0.8
    model, _, plan = _model(head=HeadConfig(name="mlp", hidden=[32]), seed=1)
    weights = constrained_weights(model, ["head.*"])
    assert max(unit_norms(w).max().item() for w in weights.values()) < c  # the initial weights fit

    def check(epoch: int, metrics: dict[str, float]) -> None:
        for name, w in weights.items():
            assert unit_norms(w).max().item() <= c + 1e-6, f"{name} in epoch {epoch}"

    opt = OptimizerConfig(name="sgd", lr=1.0, momentum=0.9)
    result, _ = _fit(model, plan, digits, opt=opt, epochs=2, max_norm=c, max_norm_layers=["head.*"],
                     on_epoch_end=check)
    # the metric is the largest norm before clipping: the steps did push past c
    assert max(h["max_unit_norm"] for h in result.history) > c
    check(-1, {})


def test_max_norm_leaves_frozen_layers_alone(digits: tuple[Batches, Batches]) -> None:
    """Freezing wins over max-norm (as in Keras, where a non-trainable layer is not updated, so its
    constraint is not applied): constraining a frozen layer must not rescale it."""
    model, _, plan = _model(first_n=1)
    c = 0.3
    block1 = model.backbone.block1[0].weight
    assert unit_norms(block1).max().item() > c  # the clip would change it
    before = _snapshot(model)
    opt = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9)
    _fit(model, plan, digits, opt=opt, epochs=1, max_norm=c, max_norm_layers=["backbone.*"])
    assert torch.equal(model.backbone.block1[0].weight, before["backbone.block1.0.weight"])
    assert unit_norms(model.backbone.block2[0].weight).max().item() <= c + 1e-6  # trained layers are constrained

    # staged unfreeze: in the head-only epochs the backbone is not clipped either
    model, _, plan = _model()
    before = _snapshot(model)
    snaps: list[dict[str, torch.Tensor]] = []
    _fit(model, plan, digits, opt=opt, epochs=2, head_only_epochs=1, max_norm=c, max_norm_layers=["backbone.*"],
         on_epoch_end=lambda e, m: snaps.append(_snapshot(model)))
    assert torch.equal(snaps[0]["backbone.block1.0.weight"], before["backbone.block1.0.weight"])
    assert unit_norms(snaps[1]["backbone.block1.0.weight"]).max().item() <= c + 1e-6  # then it is


# --------------------------------------------------------------------------- schedules


def _lr_trace(name: str, *, epochs: int = 4, steps: int = 3, val_losses: list[float] | None = None,
              **kw: object) -> tuple[list[list[float]], torch.optim.Optimizer, Schedule]:
    """Per epoch, the lr of both groups at each batch; ends with the lrs after the last epoch."""
    p1, p2 = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 0.01}], lr=0.1, momentum=0.9)
    schedule = Schedule(optimizer, SchedulerConfig(name=name, **kw), epochs=epochs, steps_per_epoch=steps)
    trace = []
    for epoch in range(epochs):
        for _ in range(steps):
            trace.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            schedule.step_batch()
        schedule.step_epoch(epoch, val_losses[epoch] if val_losses else 1.0)
    trace.append([g["lr"] for g in optimizer.param_groups])
    return trace, optimizer, schedule


def _per_epoch(trace: list[list[float]], steps: int = 3) -> list[float]:
    epochs = trace[:-1]
    assert all(epochs[i] == epochs[i - i % steps] for i in range(len(epochs))), "lr changed within an epoch"
    return [lrs[0] for lrs in epochs[::steps]] + [trace[-1][0]]


def test_schedulers_listed() -> None:
    assert list_schedulers() == ["none", "step", "exponential", "cosine", "onecycle", "plateau"]


def test_schedule_none() -> None:
    trace, _, _ = _lr_trace("none")
    assert all(lrs == [0.1, 0.01] for lrs in trace)


def test_schedule_step_halves_after_step_size() -> None:
    trace, _, _ = _lr_trace("step", epochs=5, step_size=2, gamma=0.5)
    assert _per_epoch(trace) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-12)
    assert trace[-1][1] == pytest.approx(0.0025, rel=1e-12)  # every group keeps its own base lr


def test_schedule_exponential() -> None:
    trace, _, _ = _lr_trace("exponential", gamma=0.5)
    assert _per_epoch(trace) == pytest.approx([0.1, 0.05, 0.025, 0.0125, 0.00625], rel=1e-12)


def test_schedule_cosine_ends_at_min_lr() -> None:
    trace, _, _ = _lr_trace("cosine", epochs=4, min_lr_mult=0.1)
    expected = [0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * e / 4))) for e in range(5)]
    assert _per_epoch(trace) == pytest.approx(expected, rel=1e-12)
    assert trace[-1] == pytest.approx([0.1 * 0.1, 0.01 * 0.1], rel=1e-12)
    assert _per_epoch(trace)[2] == pytest.approx(0.1 * 0.55, rel=1e-12)  # half way: the mean of max and min


def test_schedule_onecycle_steps_per_batch() -> None:
    trace, _, _ = _lr_trace("onecycle", epochs=4, steps=3, pct_start=0.25)
    head = [lrs[0] for lrs in trace]
    assert head[0] == pytest.approx(0.1 / 25, rel=1e-9)  # torch's div_factor
    assert max(head) == pytest.approx(0.1, rel=1e-9) and head.index(max(head)) == 2  # peak after 25% of 12 steps
    # the last of the 12 batches runs at the minimum (final_div_factor); the 12th `step_batch` then moves
    # past the end of the cycle, but no step uses that lr
    assert head[11] == pytest.approx(0.1 / 25 / 1e4, rel=1e-6) and head[11] == min(head)
    assert head[1] != head[0] and head[4] != head[3]  # it moves within an epoch
    assert all(b == pytest.approx(a / 10, rel=1e-9) for a, b in trace)  # the backbone group keeps its ratio


def test_schedule_plateau_reduces_after_patience() -> None:
    trace, _, _ = _lr_trace("plateau", epochs=6, steps=1, val_losses=[1.0] * 6, factor=0.5, patience=1)
    # epoch 0 sets the best loss; after 2 epochs without improvement (> patience) the lr halves
    assert _per_epoch(trace, steps=1) == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-12)
    trace, _, _ = _lr_trace("plateau", epochs=6, steps=1, val_losses=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5], patience=1)
    assert _per_epoch(trace, steps=1) == [0.1] * 7


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_momentum_schedule_linear_over_epochs(optimizer: str) -> None:
    model, _, plan = _model()
    groups = _groups(model, plan, OptimizerConfig(lr=0.1))
    optim = create_optimizer(groups, OptimizerConfig(name=optimizer, lr=0.1, momentum=0.9, betas=[0.9, 0.999]))
    cfg = SchedulerConfig(name="step", step_size=1, gamma=0.5,
                          momentum=MomentumScheduleConfig(enabled=True, start=0.5, end=0.9))
    schedule = Schedule(optim, cfg, epochs=5, steps_per_epoch=2)
    seen = []
    for epoch in range(5):
        values = [g["betas"][0] if optimizer == "adam" else g["momentum"] for g in optim.param_groups]
        assert len(set(values)) == 1  # every group
        seen.append(values[0])
        assert schedule.momentum() == values[0]
        optim.step()
        schedule.step_epoch(epoch, 1.0)
    assert seen == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9], abs=1e-12)
    if optimizer == "adam":
        assert all(g["betas"][1] == 0.999 for g in optim.param_groups)
    assert schedule.momentum() == pytest.approx(0.9)  # stays at the end value


def test_momentum_schedule_off_leaves_momentum() -> None:
    model, _, plan = _model()
    optim = create_optimizer(_groups(model, plan, OptimizerConfig(lr=0.1)), OptimizerConfig(momentum=0.7))
    schedule = Schedule(optim, SchedulerConfig(), epochs=3, steps_per_epoch=1)
    schedule.step_epoch(0, 1.0)
    assert [g["momentum"] for g in optim.param_groups] == [0.7] * len(optim.param_groups)
    assert schedule.momentum() == 0.7


def test_fit_logs_scheduled_lr_and_momentum(digits: tuple[Batches, Batches]) -> None:
    model, _, plan = _model()
    sched = SchedulerConfig(name="step", step_size=1, gamma=0.5,
                            momentum=MomentumScheduleConfig(enabled=True, start=0.5, end=0.9))
    opt = OptimizerConfig(name="sgd", lr=0.08, backbone_lr_mult=0.5)
    result, _ = _fit(model, plan, digits, opt=opt, epochs=3, sched=sched)
    assert [h["lr_head"] for h in result.history] == pytest.approx([0.08, 0.04, 0.02], rel=1e-12)
    assert [h["lr_backbone"] for h in result.history] == pytest.approx([0.04, 0.02, 0.01], rel=1e-12)
    assert [h["momentum"] for h in result.history] == pytest.approx([0.5, 0.7, 0.9], abs=1e-12)


# --------------------------------------------------------------------------- fit


def test_steps_per_epoch_drops_a_last_batch_of_one() -> None:
    assert steps_per_epoch(10, 3) == 3  # 3+3+3(+1 dropped)
    assert steps_per_epoch(9, 3) == 3
    assert steps_per_epoch(11, 3) == 4
    assert steps_per_epoch(2, 4) == 1


@pytest.mark.parametrize("monitor", ["val_acc", "val_loss"])
def test_fit_history_and_best_checkpoint(monitor: str, digits: tuple[Batches, Batches], tmp_path: Path) -> None:
    model, _, plan = _model()
    snaps: list[dict[str, torch.Tensor]] = []
    checkpoint = tmp_path / "models" / "best.pt"
    opt = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)
    result, _ = _fit(model, plan, digits, opt=opt, epochs=4, checkpoint=checkpoint, monitor=monitor,
                     on_epoch_end=lambda e, m: snaps.append(_snapshot(model)))
    assert len(result.history) == 4
    for h in result.history:
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", f"best_{monitor}"} <= set(h)
        assert 0.0 <= h["train_acc"] <= 1.0 and 0.0 <= h["val_acc"] <= 1.0
        assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
        assert h["val_acc"] * 80 == pytest.approx(round(h["val_acc"] * 80))  # a fraction of the 80 images
    values = [h[monitor] for h in result.history]
    best = values.index(max(values) if monitor == "val_acc" else min(values))
    assert result.best_epoch == best and result.best_value == values[best]
    running = [max(values[:i + 1]) if monitor == "val_acc" else min(values[:i + 1]) for i in range(4)]
    assert [h[f"best_{monitor}"] for h in result.history] == running
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]  # it learns the digits

    saved = torch.load(checkpoint, weights_only=True)
    assert set(saved) == set(snaps[best])
    for key, value in saved.items():
        assert torch.equal(value, snaps[best][key]), key
    final = model.state_dict()  # the best state is loaded back
    for key, value in saved.items():
        assert torch.equal(final[key], value), key
    assert not checkpoint.with_name("best.pt.tmp").exists()


def test_fit_rejects_a_diverging_loss(digits: tuple[Batches, Batches]) -> None:
    model, _, plan = _model()
    with torch.no_grad():
        model.head.out.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan in epoch 1"):
        _fit(model, plan, digits, opt=OptimizerConfig(lr=0.1), epochs=1)


# --------------------------------------------------------------------------- build_training


def test_build_training_assembles_the_configured_recipe(digits: tuple[Batches, Batches]) -> None:
    from transferlab.config.schema import MaxNormConfig, RegularisationConfig, FreezeConfig, TrainerConfig
    from transferlab.training.build import build_training

    cfg = ExperimentConfig(
        # Pretrained weights (not loaded here): freezing protects only those (a random init trains).
        backbone=BackboneConfig(name="small_cnn", channels=1, width=8, depth=3, weights="source"),
        regularisation=RegularisationConfig(freeze=FreezeConfig(first_n=1),
                                            max_norm=MaxNormConfig(enabled=True, value=2.0)),
        optimizer=OptimizerConfig(name="adamw", lr=0.01, backbone_lr_mult=0.5, weight_decay=0.01),
        scheduler=SchedulerConfig(name="onecycle"), trainer=TrainerConfig(epochs=1, batch_size=32, progress=False))
    t = build_training(cfg, prepared_from(*digits))
    assert isinstance(t.optimizer, torch.optim.AdamW)
    assert t.cfg.backbone.input_size == t.spec.input_size == 8  # decided once, from the data
    assert t.plan.layers == ("block1",) and all(n.startswith("backbone.block1.") for n in t.plan.frozen)
    assert all(not p.requires_grad for n, p in t.model.named_parameters() if n in t.plan.frozen)
    lrs = {g["name"]: g["max_lr"] for g in t.optimizer.param_groups}  # one-cycle peaks at the configured lr
    assert any(k.startswith("head") and v == 0.01 for k, v in lrs.items())
    assert any(k.startswith("backbone") and v == 0.005 for k, v in lrs.items())
    assert t.schedule.per_batch and t.settings.max_norm == 2.0 and t.settings.max_norm_weights
    result = t.fit(*digits)
    assert len(result.history) == 1 and result.history[0]["max_unit_norm"] <= 2.0 + 1e-5


def test_the_source_task_trains_with_pretrain_s_own_recipe(digits: tuple[Batches, Batches]) -> None:
    from transferlab.config.schema import AugmentConfig, DropoutConfig, PretrainConfig, RegularisationConfig
    from transferlab.training.build import build_training, source_task_config

    cfg = ExperimentConfig(
        backbone=BackboneConfig(name="small_cnn", channels=1, width=8, depth=2),
        head=HeadConfig(name="mlp", hidden=[16]), augment=AugmentConfig(name="flip"),
        regularisation=RegularisationConfig(dropout=DropoutConfig(input=0.3, hidden=0.5)),
        optimizer=OptimizerConfig(name="sgd", lr=0.1),
        pretrain=PretrainConfig(epochs=2, batch_size=16, optimizer=OptimizerConfig(name="adam", lr=0.003),
                                scheduler=SchedulerConfig(name="cosine")))
    t = build_training(source_task_config(cfg), prepared_from(*digits))
    assert isinstance(t.optimizer, torch.optim.Adam) and t.optimizer.param_groups[0]["lr"] == 0.003
    assert isinstance(t.schedule.inner, torch.optim.lr_scheduler.LambdaLR)  # cosine
    # Not the target task's augmentation (flip): the source task's own, none by default.
    assert (t.settings.epochs, t.settings.batch_size, t.settings.augment) == (2, 16, None)
    # pretrain.input_dropout (0.2 by default), not the target task's regularisation (input dropout 0.3, mlp head):
    assert t.spec.head.name == "linear" and t.spec.dropout == DropoutConfig(input=0.2)
    assert [m.p for m in t.model.modules() if isinstance(m, nn.Dropout)] == [0.2]
    cfg.pretrain.input_dropout = 0.0
    assert not [m for m in build_training(source_task_config(cfg), prepared_from(*digits)).model.modules()
                if isinstance(m, nn.Dropout)]

    cfg.pretrain.augment = AugmentConfig(name="digits", degrees=5.0)
    source = source_task_config(cfg)
    assert source.augment == AugmentConfig(name="digits", degrees=5.0)
    assert build_training(source, prepared_from(*digits)).settings.augment is not None


def test_reinit_last_n_gives_the_top_layers_fresh_weights_and_keeps_the_rest(
        digits: tuple[Batches, Batches]) -> None:
    """Exact: the last layer's parameters and BatchNorm buffers are a fresh init under the run's seed (what
    weights=null draws), the earlier layers hold the loaded tensors, and the run's own draws (the head) are
    those of the same run without reinit."""
    from transferlab.config.schema import FreezeConfig, RegularisationConfig
    from transferlab.errors import ConfigError
    from transferlab.models.assemble import build_backbone
    from transferlab.training.build import build_training

    def cfg(reinit: int, **freeze: object) -> ExperimentConfig:
        return ExperimentConfig(seed=3, backbone=BackboneConfig(name="small_cnn", channels=1, width=8, depth=3,
                                                                weights="source", reinit_last_n=reinit),
                                regularisation=RegularisationConfig(freeze=FreezeConfig(**freeze)))

    torch.manual_seed(100)
    loaded = build_backbone(cfg(0).backbone).module
    for name, buf in loaded.named_buffers():  # BatchNorm statistics as a trained backbone's, not the init's
        if buf.is_floating_point():
            buf.copy_(torch.rand_like(buf) + 0.5)
    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    torch.manual_seed(3)
    fresh = build_backbone(cfg(0).backbone).module.state_dict()

    torch.manual_seed(7)
    plain = build_training(cfg(0), prepared_from(*digits), backbone_state=state)
    torch.manual_seed(7)
    t = build_training(cfg(1), prepared_from(*digits), backbone_state=state)
    assert t.reinitialised == ("block3",) and plain.reinitialised == ()
    got = t.backbone.module.state_dict()
    for key, value in got.items():
        expected = fresh[key] if key.startswith("block3.") else state[key]
        assert torch.equal(value, expected), key
    assert any(not torch.equal(fresh[k], state[k]) for k in got if k.startswith("block3."))
    for a, b in zip(plain.model.head.parameters(), t.model.head.parameters()):
        assert torch.equal(a, b)
    # Two layers: block2 too.
    two = build_training(cfg(2), prepared_from(*digits), backbone_state=state)
    assert two.reinitialised == ("block2", "block3")
    assert torch.equal(two.backbone.module.block2[0].weight, fresh["block2.0.weight"])
    assert torch.equal(two.backbone.module.block1[0].weight, state["block1.0.weight"])

    # A re-initialised layer that freezing would keep fixed, more layers than the backbone has: refused.
    with pytest.raises(ConfigError, match=r"^backbone\.reinit_last_n=2 re-initialises \['block2'\], which "
                                          r"regularisation\.freeze also freezes"):
        build_training(cfg(2, first_n=2), prepared_from(*digits), backbone_state=state)
    with pytest.raises(ConfigError, match=r"^backbone\.reinit_last_n=4, but the backbone has only 3 layers"):
        build_training(cfg(4), prepared_from(*digits), backbone_state=state)
    # Without loaded weights (weights=null) every layer is random already: nothing to do.
    scratch = cfg(1)
    scratch.backbone.weights = None
    assert build_training(scratch, prepared_from(*digits)).reinitialised == ()


def test_a_negative_reinit_last_n_is_refused_before_any_work() -> None:
    from conftest import REPO
    from transferlab.compose import compose
    from transferlab.config.validate import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^backbone\.reinit_last_n: must be >= 0, got -1"):
        load_config(compose(["backbone.reinit_last_n=-1"], config_dir=REPO / "conf"))


def test_a_bad_source_input_dropout_is_refused_before_any_work() -> None:
    from conftest import REPO
    from transferlab.compose import compose
    from transferlab.config.validate import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^pretrain\.input_dropout: must be a probability in \[0, 1\), got 1\.0"):
        load_config(compose(["pretrain.input_dropout=1.0"], config_dir=REPO / "conf"))


def test_the_default_source_recipe_is_sgd_nesterov_with_one_cycle() -> None:
    from transferlab.config.schema import PretrainConfig

    p = PretrainConfig()
    assert (p.optimizer.name, p.optimizer.lr, p.optimizer.momentum, p.optimizer.nesterov,
            p.optimizer.weight_decay, p.scheduler.name) == ("sgd", 0.05, 0.9, True, 5e-4, "onecycle")


def test_mixup_and_cutmix_train_through_the_loop(digits: tuple[Batches, Batches]) -> None:
    """Soft targets reach the loss and the train-accuracy count; validation stays on hard labels."""
    from transferlab.config.schema import AugmentConfig, TrainerConfig
    from transferlab.training.build import build_training

    def history(augment: AugmentConfig) -> list[dict[str, float]]:
        torch.manual_seed(0)
        cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", channels=1, width=8, depth=2),
                               augment=augment, trainer=TrainerConfig(epochs=2, batch_size=32, progress=False))
        t = build_training(cfg, prepared_from(*digits))
        return t.fit(*digits).history

    plain = history(AugmentConfig(name="none"))
    mixed = history(AugmentConfig(name="digits", mixup_alpha=0.4, cutmix_alpha=1.0))
    for row in mixed:
        assert math.isfinite(row["train_loss"]) and 0 < row["train_acc"] <= 1 and 0 < row["val_acc"] <= 1
    assert mixed[0]["train_loss"] != plain[0]["train_loss"]
    assert mixed[0]["val_acc"] != plain[0]["val_acc"]


def test_balanced_class_weights_reach_the_training_loss(digits: tuple[Batches, Batches]) -> None:
    from transferlab.config.schema import TrainerConfig
    from transferlab.models.heads import class_weights
    from transferlab.training.build import build_training

    train, val = digits
    keep = (train.labels < 3) | (torch.arange(len(train)) % 4 == 0)  # classes 0-2 over-represented
    skewed = Batches(train.images[keep], train.labels[keep])

    def run(mode: str | None) -> tuple[object, list[dict[str, float]]]:
        torch.manual_seed(0)
        cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", channels=1, width=8, depth=2),
                               trainer=TrainerConfig(epochs=1, batch_size=32, progress=False, class_weight=mode))
        t = build_training(cfg, prepared_from(skewed, val))
        return t.settings.class_weight, t.fit(skewed, val).history

    weight, weighted = run("balanced")
    none, plain = run(None)
    assert none is None
    assert torch.equal(weight, class_weights(skewed.labels, 10, "balanced"))
    assert weight[5] > weight[0]  # rare classes weigh more
    assert weighted[0]["train_loss"] != plain[0]["train_loss"]
