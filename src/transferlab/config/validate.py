"""Turn a composed config into a checked :class:`ExperimentConfig`.

Errors name the key's full path and what is allowed, and are raised before
any data is read or any tensor is built.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from transferlab.config.schema import AMP_DTYPES, BASELINES, VALIDATION_METRICS, ExperimentConfig
from transferlab.errors import ConfigError

__all__ = ["ConfigError", "check_override_keys", "load_config", "option_keys", "validate"]


def option_registries() -> dict[str, Any]:
    """The config groups whose choices (``<group>.name``) take keys of their own."""
    from transferlab.models.backbones import BACKBONES
    from transferlab.models.heads import HEADS
    from transferlab.training.augment import AUGMENTATIONS
    from transferlab.training.optim import OPTIMIZERS, SCHEDULERS

    return {"backbone": BACKBONES, "head": HEADS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
            "augment": AUGMENTATIONS, "pretrain.optimizer": OPTIMIZERS, "pretrain.scheduler": SCHEDULERS,
            "pretrain.augment": AUGMENTATIONS}


def _child_schema(node: Any, name: str) -> Any:
    """The dataclass of field ``name`` of schema dataclass ``node`` (None when it is not one)."""
    child = typing.get_type_hints(node).get(name)
    return child if is_dataclass(child) else None


def _schema_at(path: str) -> Any:
    """The schema dataclass of the config node at dotted ``path``."""
    node: Any = ExperimentConfig
    for part in filter(None, path.split(".")):
        node = _child_schema(node, part)
    return node


def option_keys(group: str, name: str) -> list[str] | None:
    """The keys group ``group`` takes when ``name`` is chosen (None: any choice, or unknown)."""
    registry = option_registries().get(group)
    if registry is None or name not in registry:
        return None
    common = [f.name for f in fields(_schema_at(group)) if f.name not in registry.option_keys()]
    return sorted([*common, *registry[name].keys])


def check_option_keys(cfg: DictConfig) -> None:
    """Each choice takes only its own keys: ``optimizer=sgd optimizer.betas=...`` is refused
    rather than silently ignored."""
    for group in option_registries():
        node = OmegaConf.select(cfg, group, default=None)
        if not isinstance(node, DictConfig) or not isinstance(node.get("name"), str):
            continue
        allowed = option_keys(group, node.name)
        extra = sorted(set(node.keys()) - set(allowed)) if allowed is not None else []
        if extra:
            what = option_registries()[group].what
            raise ConfigError(f"{group}.{extra[0]}: {what} '{node.name}' takes no '{extra[0]}'"
                              f"{f' (nor {extra[1:]})' if extra[1:] else ''}; its keys are {allowed}")


def load_config(cfg: DictConfig | Mapping[str, Any]) -> ExperimentConfig:
    """Merge ``cfg`` into the schema, then check ranges and names."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    check_option_keys(cfg)
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        typed: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(err)) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None
    validate(typed)
    return typed


def _unknown_key_message(err: ConfigKeyError) -> str:
    full_key = getattr(err, "full_key", None) or str(err)
    parent_path, _, key = full_key.rpartition(".")
    node = _schema_at(parent_path)
    allowed = sorted(f.name for f in fields(node)) if is_dataclass(node) else []
    hint = difflib.get_close_matches(key, allowed, n=1)
    maybe = f" Did you mean '{hint[0]}'?" if hint else ""
    return f"Unknown key '{full_key}'.{maybe} Allowed keys under '{parent_path or '<root>'}': {allowed}"


def check_override_keys(overrides: Iterable[str], groups: Iterable[str]) -> None:
    """Reject ``key=value`` command-line overrides whose key is not in the schema.

    Hydra itself would refuse them too, but without listing what is allowed.
    Group choices (``backbone=resnet18``), ``+``/``~`` edits and ``hydra.*``
    are left to Hydra.
    """
    groups = set(groups)
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or key[:1] in "+~" or key.startswith(("hydra.", "hydra/")) or key in groups:
            continue
        node: Any = ExperimentConfig
        path: list[str] = []
        for part in key.split("."):
            names = {f.name: f for f in fields(node)}
            if part not in names:
                hint = difflib.get_close_matches(part, list(names), n=1)
                maybe = f" Did you mean '{'.'.join([*path, hint[0]])}'?" if hint else ""
                where = ".".join(path) or "<root>"
                raise ConfigError(
                    f"Unknown key '{key}'.{maybe} Allowed keys under '{where}': {sorted(names)}"
                )
            path.append(part)
            node = _child_schema(node, part)
            if node is None:
                break



def _check_augment(a: Any, key: str) -> None:
    """An augmentation's choice and keys (``augment``, ``pretrain.augment``)."""
    from transferlab.training.augment import MAGNITUDE_BINS, list_augmentations
    from transferlab.training.augment import POLICIES as AUGMENT_POLICIES

    _one_of(a.name, list_augmentations(), f"{key}.name", "augmentation")
    for name in ("p", "erase_p", "mix_prob", "switch_prob"):
        value = getattr(a, name)
        _check(0.0 <= value <= 1.0, f"{key}.{name}", f"must be a probability in [0, 1], got {value}")
    _check(len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1, f"{key}.scale",
           f"must be [min, max] with 0 < min <= max <= 1 (of the image's area), got {list(a.scale)}")
    _check(len(a.ratio) == 2 and 0 < a.ratio[0] <= a.ratio[1], f"{key}.ratio",
           f"must be [min, max] with 0 < min <= max (width / height), got {list(a.ratio)}")
    _one_of(a.policy, AUGMENT_POLICIES, f"{key}.policy", "augmentation policy")
    _check(a.num_ops >= 1, f"{key}.num_ops", f"must be >= 1, got {a.num_ops}")
    _check(0 <= a.magnitude < MAGNITUDE_BINS, f"{key}.magnitude",
           f"must be a magnitude bin in [0, {MAGNITUDE_BINS - 1}], got {a.magnitude}")
    _check(0.0 <= a.degrees <= 180.0, f"{key}.degrees", f"must be in [0, 180], got {a.degrees}")
    _check(0.0 <= a.translate < 1.0, f"{key}.translate", f"must be in [0, 1) (of the image's side), got {a.translate}")
    for name in ("mixup_alpha", "cutmix_alpha"):
        value = getattr(a, name)
        _check(value >= 0, f"{key}.{name}", f"must be >= 0 (0: off), got {value}")


def _check_optimizer(o: Any, key: str) -> None:
    from transferlab.training.optim import list_optimizers

    _one_of(o.name, list_optimizers(), f"{key}.name", "optimizer")
    _check(o.lr > 0, f"{key}.lr", f"must be > 0, got {o.lr}")
    _check(o.backbone_lr_mult >= 0, f"{key}.backbone_lr_mult", f"must be >= 0, got {o.backbone_lr_mult}")
    _check(o.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(0 <= o.momentum < 1, f"{key}.momentum", f"must be in [0, 1), got {o.momentum}")
    _check(not o.nesterov or o.momentum > 0, f"{key}.nesterov", f"Nesterov needs {key}.momentum > 0")
    _check(len(o.betas) == 2 and all(0 <= x < 1 for x in o.betas), f"{key}.betas",
           f"must be two values in [0, 1), got {list(o.betas)}")
    _check(0 <= o.rho < 1, f"{key}.rho", f"must be in [0, 1), got {o.rho}")
    _check(o.eps > 0, f"{key}.eps", f"must be > 0, got {o.eps}")
    if o.layer_decay is not None:
        _check(0 < o.layer_decay <= 1, f"{key}.layer_decay", f"must be in (0, 1] (or null: off), got {o.layer_decay}")
    if o.lr_base_size is not None:
        _check(o.lr_base_size >= 1, f"{key}.lr_base_size", f"must be >= 1 (or null), got {o.lr_base_size}")
    _one_of(o.lr_base_scale, ["linear", "sqrt"], f"{key}.lr_base_scale", "lr scaling")


def _check_scheduler(s: Any, o: Any, key: str) -> None:
    from transferlab.training.optim import OPTIMIZERS, list_schedulers

    _one_of(s.name, list_schedulers(), f"{key}.name", "scheduler")
    _check(s.step_size >= 1, f"{key}.step_size", f"must be >= 1, got {s.step_size}")
    _check(0 < s.gamma <= 1, f"{key}.gamma", f"must be in (0, 1], got {s.gamma}")
    _check(0 <= s.min_lr_mult <= 1, f"{key}.min_lr_mult", f"must be in [0, 1], got {s.min_lr_mult}")
    _check(0 < s.pct_start < 1, f"{key}.pct_start", f"must be in (0, 1), got {s.pct_start}")
    _check(0 < s.factor < 1, f"{key}.factor", f"must be in (0, 1), got {s.factor}")
    _check(s.patience >= 0, f"{key}.patience", f"must be >= 0, got {s.patience}")
    _check(s.warmup_epochs >= 0, f"{key}.warmup_epochs", f"must be >= 0, got {s.warmup_epochs}")
    _check(s.warmup_steps >= 0, f"{key}.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    _check(not (s.warmup_epochs and s.warmup_steps), f"{key}.warmup_steps",
           f"give warm-up in epochs or in steps, not both ({key}.warmup_epochs={s.warmup_epochs})")
    _check(0 <= s.warmup_start_factor <= 1, f"{key}.warmup_start_factor",
           f"must be in [0, 1], got {s.warmup_start_factor}")
    for name in ("start", "end"):
        value = getattr(s.momentum, name)
        _check(0 <= value < 1, f"{key}.momentum.{name}", f"must be in [0, 1), got {value}")
    if s.momentum.enabled:
        with_momentum = [n for n in OPTIMIZERS.names() if OPTIMIZERS[n].info.get("momentum")]
        _check(o.name in with_momentum, f"{key}.momentum.enabled",
               f"a momentum schedule needs one of {with_momentum}, not {o.name}")

def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_registration(t: Any) -> None:
    """``tracking.register``/``register_alias`` as the MLflow registry takes them; ``@`` is refused in the
    name too, since ``models:/<name>@<alias>`` could not name it back."""
    if t.register is None:
        return
    _check(bool(t.register.strip()) and not any(c in t.register for c in "/:@"), "tracking.register",
           f"must be null or a model name without '/', ':' or '@', got '{t.register}'")
    _check(t.log_model, "tracking.register", "registers the logged model: needs tracking.log_model=true")
    alias = t.register_alias
    _check(bool(re.fullmatch(r"[\w-]+", alias)) and alias.lower() != "latest" and not re.fullmatch(r"[vV]\d+", alias),
           "tracking.register_alias", "must be letters, digits, '_' or '-', neither 'latest' nor a version "
           f"alias like v3, got '{alias}'")


def _probability(value: float, key: str) -> None:
    _check(0.0 <= value < 1.0, key, f"must be a probability in [0, 1), got {value}")


def _one_of(value: str, allowed: Iterable[str], key: str, what: str) -> None:
    allowed = list(allowed)
    _check(value in allowed, key, f"Unknown {what} '{value}'; expected one of {allowed}")


def validate(cfg: ExperimentConfig) -> None:
    """Range and name checks that a type system cannot express."""
    # Imported here: they pull in torch, which schema-only users do not need.
    from transferlab.data import list_sources
    from transferlab.models.backbones import BACKBONES
    from transferlab.models.heads import CLASS_WEIGHTS, POOLINGS, list_heads
    from transferlab.models.activations import list_activations
    from transferlab.models.weights import check_weights_spec

    d = cfg.data
    _one_of(d.source, list_sources(), "data.source", "data source")
    if d.source == "imagefolder":
        _check(bool(d.path), "data.path", "imagefolder needs data.path: a folder with one subfolder per class")
        _check(d.image_size is not None, "data.image_size", "imagefolder needs an image size, e.g. 64")
    if d.image_size is not None:
        _check(d.image_size >= 4, "data.image_size", f"must be >= 4, got {d.image_size}")
    if d.channels is not None:
        _check(d.channels in (1, 3), "data.channels", f"must be 1 or 3 (or null), got {d.channels}")
    if d.max_per_class is not None:
        _check(d.max_per_class >= 1, "data.max_per_class",
               f"must be >= 1 (training images per class), got {d.max_per_class}")
    _check(d.split_seed is None or d.split_seed >= 0, "data.split_seed",
           f"must be null or a non-negative integer, got {d.split_seed}")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _check(0.0 < d.test_fraction < 1.0, "data.test_fraction", f"must be in (0, 1), got {d.test_fraction}")
    _check(d.val_fraction + d.test_fraction < 1.0, "data.test_fraction",
           "data.val_fraction + data.test_fraction must leave images to train on (< 1)")
    if d.classes is not None:
        _check(len(d.classes) >= 2, "data.classes", f"needs at least 2 classes, got {list(d.classes)}")

    b = cfg.backbone
    BACKBONES[b.name]  # an unknown name fails with the closest known ones
    if b.input_size is not None:
        _check(b.input_size >= 4, "backbone.input_size", f"must be >= 4 (or null), got {b.input_size}")
        if d.image_size is not None:
            _check(d.image_size >= b.input_size, "data.image_size",
                   f"the stored size {d.image_size} is smaller than backbone.input_size={b.input_size}: images "
                   "would be blown up, not cropped; store at least the input size (about 1.14x leaves room for "
                   f"random-resized-crop, e.g. {round(b.input_size * 8 / 7)})")
    _check(b.channels in (1, 3), "backbone.channels", f"must be 1 or 3, got {b.channels}")
    _check(b.width >= 1, "backbone.width", f"must be >= 1, got {b.width}")
    _check(b.depth >= 1, "backbone.depth", f"must be >= 1, got {b.depth}")
    _check(b.reinit_last_n >= 0, "backbone.reinit_last_n", f"must be >= 0, got {b.reinit_last_n}")
    _check(all(h >= 1 for h in b.hidden), "backbone.hidden", f"sizes must be >= 1, got {list(b.hidden)}")
    _one_of(b.activation, list_activations(), "backbone.activation", "activation")
    check_weights_spec(b.name, b.weights, key="backbone.weights")
    if b.weights == "source":
        _check(cfg.pretrain.classes is not None and len(cfg.pretrain.classes) >= 2, "pretrain.classes",
               "backbone.weights=source trains on a source task: list at least 2 source classes")

    h = cfg.head
    _one_of(h.name, list_heads(), "head.name", "head")
    _check(all(n >= 1 for n in h.hidden), "head.hidden", f"sizes must be >= 1, got {list(h.hidden)}")
    _check(h.name != "linear" or not h.hidden, "head.hidden",
           f"the linear head has no hidden layers, got {list(h.hidden)}; pass head.hidden=[] "
           "or use head=mlp for hidden layers")
    if h.name == "binary" and d.positive_class is None and d.source != "imagefolder":
        _check(d.classes is not None and len(d.classes) == 2, "head.name",
               "the binary head needs a 2-class task: set data.positive_class (one class against the rest) "
               f"or exactly two data.classes (got {list(d.classes) if d.classes else 'all classes'})")
    _check(len(h.activations) in (1, len(h.hidden)) or not h.hidden, "head.activations",
           f"give one activation or one per hidden layer ({len(h.hidden)}), got {list(h.activations)}")
    for act in h.activations:
        _one_of(act, list_activations(), "head.activations", "activation")
    _one_of(h.pooling, POOLINGS, "head.pooling", "pooling")
    _one_of(h.init, ["default", "normal"], "head.init", "init")
    if h.num_units is not None:
        _check(h.num_units >= 1, "head.num_units", f"must be >= 1, got {h.num_units}")

    r = cfg.regularisation
    for name in ("input", "features", "hidden"):
        _probability(getattr(r.dropout, name), f"regularisation.dropout.{name}")
    if r.dropout.per_layer is not None:
        for i, p in enumerate(r.dropout.per_layer):
            _probability(p, f"regularisation.dropout.per_layer[{i}]")
        _check(len(r.dropout.per_layer) == len(h.hidden), "regularisation.dropout.per_layer",
               f"needs one value per head hidden layer ({len(h.hidden)}), got {len(r.dropout.per_layer)}")
    _check(r.max_norm.value > 0, "regularisation.max_norm.value", f"must be > 0, got {r.max_norm.value}")
    _check(r.freeze.first_n >= 0, "regularisation.freeze.first_n", f"must be >= 0, got {r.freeze.first_n}")
    _one_of(r.freeze.method, ["requires_grad", "zero_lr"], "regularisation.freeze.method", "freeze method")
    _check(r.freeze.head_only_epochs >= 0, "regularisation.freeze.head_only_epochs",
           f"must be >= 0, got {r.freeze.head_only_epochs}")
    _check(0.0 <= r.label_smoothing < 1.0, "regularisation.label_smoothing",
           f"must be in [0, 1), got {r.label_smoothing}")

    _check_optimizer(cfg.optimizer, "optimizer")
    _check_scheduler(cfg.scheduler, cfg.optimizer, "scheduler")

    _check_augment(cfg.augment, "augment")

    t = cfg.trainer
    _check(t.epochs >= 1, "trainer.epochs", f"must be >= 1, got {t.epochs}")
    _check(r.freeze.head_only_epochs < t.epochs, "regularisation.freeze.head_only_epochs",
           f"must be < trainer.epochs ({t.epochs}), got {r.freeze.head_only_epochs}")
    _check(t.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.eval_batch_size >= 1, "trainer.eval_batch_size", f"must be >= 1, got {t.eval_batch_size}")
    _check(t.device in ("auto", "cpu", "mps") or t.device.startswith("cuda"), "trainer.device",
           f"must be auto, cpu, cuda, cuda:N or mps, got '{t.device}'")
    if t.device.startswith("cuda"):
        import torch

        _check(torch.cuda.is_available(), "trainer.device",
               f"'{t.device}', but CUDA is not available here; use auto (CUDA when present) or cpu")
    _one_of(t.amp_dtype, AMP_DTYPES, "trainer.amp_dtype", "amp dtype")
    if t.amp and t.amp_dtype == "bfloat16" and t.device != "cpu":
        import torch

        _check(not torch.cuda.is_available() or torch.cuda.is_bf16_supported(), "trainer.amp_dtype",
               "bfloat16, but this GPU has no bf16; use float16 (with a gradient scaler)")
    if t.device == "mps":
        import torch

        _check(torch.backends.mps.is_available(), "trainer.device",
               "'mps', but MPS (Apple silicon) is not available here; use auto or cpu")
    _one_of(t.monitor, ["val_acc", "val_loss"], "trainer.monitor", "monitor")
    _check(t.aux_loss_weight >= 0, "trainer.aux_loss_weight", f"must be >= 0, got {t.aux_loss_weight}")
    if t.num_threads is not None:
        _check(t.num_threads >= 1, "trainer.num_threads", f"must be >= 1, got {t.num_threads}")
    _check(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
           f"must be >= 1, got {t.accumulate_grad_batches}")
    if t.min_steps_per_epoch is not None:
        _check(t.min_steps_per_epoch >= 1, "trainer.min_steps_per_epoch", f"must be >= 1, got {t.min_steps_per_epoch}")
    if t.max_steps is not None:
        _check(t.max_steps >= 1, "trainer.max_steps", f"must be >= 1 (optimiser steps, or null), got {t.max_steps}")
    if t.gradient_clip_val is not None:
        _check(t.gradient_clip_val > 0, "trainer.gradient_clip_val", f"must be > 0 (or null), got {t.gradient_clip_val}")
    es = t.early_stopping
    if es.monitor is not None:
        _one_of(es.monitor, ["val_acc", "val_loss"], "trainer.early_stopping.monitor", "monitor")
    _check(es.patience >= 1, "trainer.early_stopping.patience", f"must be >= 1, got {es.patience}")
    _check(es.min_delta >= 0, "trainer.early_stopping.min_delta", f"must be >= 0, got {es.min_delta}")
    _check(0 < t.ema.decay < 1, "trainer.ema.decay", f"must be in (0, 1), got {t.ema.decay}")
    _check(0 <= t.ema.start_epoch < t.epochs, "trainer.ema.start_epoch",
           f"must be in [0, trainer.epochs={t.epochs}), got {t.ema.start_epoch}")
    if t.memory_budget_mb is not None:
        _check(t.memory_budget_mb > 0, "trainer.memory_budget_mb", f"must be > 0 (MB), got {t.memory_budget_mb}")
    _check(t.class_weight is None or t.class_weight in CLASS_WEIGHTS, "trainer.class_weight",
           f"must be null or one of {CLASS_WEIGHTS}, got '{t.class_weight}'")

    p = cfg.pretrain
    _check(p.epochs >= 1, "pretrain.epochs", f"must be >= 1, got {p.epochs}")
    _check_optimizer(p.optimizer, "pretrain.optimizer")
    _check_scheduler(p.scheduler, p.optimizer, "pretrain.scheduler")
    _check_augment(p.augment, "pretrain.augment")
    _probability(p.input_dropout, "pretrain.input_dropout")
    _check(p.batch_size >= 1, "pretrain.batch_size", f"must be >= 1, got {p.batch_size}")


    _one_of(cfg.optimized_metric, VALIDATION_METRICS, "optimized_metric", "validation metric")
    if cfg.baseline is not None:
        _one_of(cfg.baseline, BASELINES, "baseline", "baseline")

    _check(bool(cfg.tracking.uri), "tracking.uri", "must be a tracking URI such as sqlite:///mlflow.db")
    _check(bool(cfg.tracking.experiment), "tracking.experiment", "must be a non-empty name")
    _check_registration(cfg.tracking)
