"""Checks that need no training, run before any stage does work.

:func:`load_config` checks each value on its own; :func:`preflight` checks
what only the data's classes, the model's architecture or the tracking setup
can tell: unknown class names, a head with fewer units than classes, a
freezing, re-initialisation or max-norm request that does not fit the model, a tracking store
or server that cannot be used. It runs the same code that would fail later
(class selection, model assembly, freeze planning, max-norm selection), on
class names from the source's metadata or folder listing and on a model
skeleton built on the ``meta`` device: no image is decoded, no weight
allocated. ``python -m transferlab`` runs it for the run, or for every job of
a sweep before the first starts; every DVC stage runs it before reading data.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch

from transferlab.config.schema import ExperimentConfig
from transferlab.data import DataError, RawDataset, one_vs_rest, select_classes
from transferlab.data.sources import source_class_names


def preflight(cfg: ExperimentConfig, *, tracking: bool = True) -> None:
    """Raise the error a later stage would raise, naming the key, before any work.

    ``tracking=False`` leaves out the tracking checks, which create the store: a sweep
    checks every job's config first, so that a bad job leaves nothing behind.
    """
    from transferlab.tracking.preflight import check_tracking

    num_classes = target_class_count(cfg)
    check_model(cfg, num_classes)
    if tracking:
        check_tracking(cfg)


def _task_classes(names: list[str], classes: list[str] | None, key: str) -> list[str]:
    try:
        return select_classes(np.empty(0, dtype=np.int64), names, classes)[2]
    except DataError as err:
        raise DataError(f"{key}={list(classes) if classes is not None else None}: {err}") from None


def target_class_count(cfg: ExperimentConfig) -> int:
    """The number of classes the fine-tuning task will have; unknown class names fail here."""
    d = cfg.data
    names = source_class_names(d.source, root=d.root, path=d.path)
    target = _task_classes(names, d.classes, "data.classes")
    if cfg.pretrain.classes is not None:
        _task_classes(names, cfg.pretrain.classes, "pretrain.classes")
    if d.positive_class is not None:
        empty = RawDataset(np.zeros((0, 1, 1, 1), dtype=np.uint8), np.zeros(0, dtype=np.int64), names)
        target = one_vs_rest(empty, d.positive_class).class_names
    return len(target)


def check_model(cfg: ExperimentConfig, num_classes: int) -> None:
    """Assemble the fine-tuning model's skeleton and plan its freezing and max-norm."""
    from transferlab.models.assemble import ModelSpec, build_model
    from transferlab.models.backbones import min_input_size, skeleton
    from transferlab.training.freezing import plan_freeze
    from transferlab.models.weights import kind_of, published_weights, reinit_choice
    from transferlab.training.maxnorm import max_norm_weights

    # The input size decides no layer or parameter name except inception_v3's auxiliary branch (on from
    # 299 px), so the size pretrain would choose, from the weights' metadata or the data, is enough.
    # (It does decide whether a fixed-size model, a ViT, can be built: that fails here too.)
    weights_meta = None
    if kind_of(cfg.backbone.weights) == "published":
        source = published_weights(cfg.backbone.name)
        assert source is not None  # validate() checked it
        weights_meta = source.preprocessing(cfg.backbone.name, cfg.backbone.weights)  # type: ignore[arg-type]
        source.ensure(cfg.backbone.name, cfg.backbone.weights)  # type: ignore[arg-type]
    data_size = cfg.data.image_size or min_input_size(cfg.backbone.name)
    spec = ModelSpec.decide(cfg, class_names=[str(i) for i in range(num_classes)],
                            data_channels=cfg.data.channels or cfg.backbone.channels, data_size=data_size,
                            weights_meta=weights_meta)
    cfg = replace(cfg, backbone=spec.backbone)
    with skeleton(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # build-time notes (inception's aux branch) belong to the real build
        model, backbone = build_model(spec)
    f = cfg.regularisation.freeze
    plan = plan_freeze(model, backbone, first_n=f.first_n, patterns=list(f.patterns), whole_backbone=f.backbone,
                       method=f.method)
    if cfg.backbone.weights is not None:
        reinit_choice(backbone, cfg.backbone.reinit_last_n, plan.frozen)
    if cfg.regularisation.max_norm.enabled:
        max_norm_weights(model, list(cfg.regularisation.max_norm.layers))
