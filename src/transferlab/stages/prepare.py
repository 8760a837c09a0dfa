"""Stage ``prepare``: decode the images once into compact tensors.

An image folder's files are decoded in parallel (every CPU of the process's affinity),
only those a task keeps, straight into the prepared arrays: the peak memory stays close
to the size of what is written.

Writes ``<paths.prepared>/target`` (the fine-tuning task) and, when
``pretrain.classes`` names a source task, ``<paths.prepared>/source`` (what
``backbone.weights=source`` pretrains on; which weights a run uses is not
this stage's concern, so switching them never re-prepares the data):
uint8 images, labels, class names and normalisation statistics per split.
Later stages never decode an image file again.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from transferlab.cli import stage_main
from transferlab.config.schema import ExperimentConfig
from transferlab.data import (
    DataError, PreparedData, RawDataset, load_source, one_vs_rest, prepare_dataset, save_prepared,
)


def subset(raw: RawDataset, keep: np.ndarray) -> tuple[RawDataset, np.ndarray]:
    """The images at boolean mask ``keep`` (an image folder's stay undecoded), and their indices in ``raw``."""
    return raw.take(keep), np.flatnonzero(keep)


def build_task(raw: RawDataset, cfg: ExperimentConfig, *, classes: list[str] | None,
               max_per_class: int | None, positive: str | None, key: str) -> PreparedData:
    """The prepared task, its ``raw_indices`` pointing into ``raw``; errors name the config
    key (``key``) that chose the classes."""
    try:
        return _build_task(raw, cfg, classes=classes, max_per_class=max_per_class, positive=positive)
    except DataError as err:
        raise DataError(f"{key}={list(classes) if classes is not None else None}: {err}") from None


def _build_task(raw: RawDataset, cfg: ExperimentConfig, *, classes: list[str] | None,
                max_per_class: int | None, positive: str | None) -> PreparedData:
    index = np.arange(len(raw))
    if positive is not None:
        if classes is not None:
            raw, index = subset(raw, np.isin(raw.labels, [raw.class_names.index(c) for c in classes
                                                            if c in raw.class_names]))
        raw = one_vs_rest(raw, positive)
        classes = None
    data = prepare_dataset(raw, classes=classes, max_per_class=max_per_class,
                           val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                           seed=cfg.split_seed)
    data.raw_indices = {name: index[idx] for name, idx in (data.raw_indices or {}).items()}
    return data


def _target_class_names(raw: RawDataset, d) -> set[str]:
    """The raw classes the target task draws images from (all of them for one-vs-rest)."""
    if d.classes is None:
        return set(raw.class_names)
    return {raw.class_names[c] if isinstance(c, int) and c < len(raw.class_names) else str(c) for c in d.classes}


def build_source_task(raw: RawDataset, cfg: ExperimentConfig, target: PreparedData) -> PreparedData:
    """The pretraining task, from ``raw`` less the target's validation and test images:
    pretraining must never see what the fine-tuned model is selected and scored on."""
    held_out = np.concatenate([target.raw_indices["val"], target.raw_indices["test"]])
    source_classes = (set(raw.class_names) if cfg.pretrain.classes is None else
                      {raw.class_names[c] if isinstance(c, int) and c < len(raw.class_names) else str(c)
                       for c in cfg.pretrain.classes})
    shared = sorted(source_classes & _target_class_names(raw, cfg.data))
    if shared:
        print(f"warning: pretrain.classes and the target task share classes {shared}: pretraining uses "
              f"their target training images only, never the target's {len(held_out)} validation and "
              "test images", file=sys.stderr)
    keep = np.ones(len(raw), dtype=bool)
    keep[held_out] = False
    return build_task(subset(raw, keep)[0], cfg, classes=cfg.pretrain.classes,
                      max_per_class=cfg.pretrain.max_per_class, positive=None, key="pretrain.classes")


def run(cfg: ExperimentConfig) -> dict[str, PreparedData]:
    try:
        return _run(cfg)
    except (MemoryError, torch.OutOfMemoryError) as err:
        reason = str(err).splitlines()[0] if str(err) else "an allocation failed"
        raise DataError(f"prepare: out of memory: {reason}; lower data.image_size, or prepare fewer images "
                        "(data.classes) on a machine with more memory") from None


def _run(cfg: ExperimentConfig) -> dict[str, PreparedData]:
    d = cfg.data
    raw = load_source(d.source, root=d.root, path=d.path, image_size=d.image_size, channels=d.channels,
                      download=d.download)
    tasks = {"target": build_task(raw, cfg, classes=d.classes, max_per_class=d.max_per_class,
                                  positive=d.positive_class, key="data.classes")}
    if cfg.pretrain.classes is not None:
        tasks["source"] = build_source_task(raw, cfg, tasks["target"])
    out = Path(cfg.paths.prepared)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in tasks.items():
        save_prepared(data, out / name)
        counts = {k: len(v) for k, v in data.splits.items()}
        print(f"prepare: {name}: {data.num_classes} classes {data.class_names}, {counts}, "
              f"{data.channels}x{data.image_size[0]}x{data.image_size[1]}")
    if "source" not in tasks and (out / "source").exists():
        shutil.rmtree(out / "source")  # a stale source task must not outlive its config
    return tasks


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
