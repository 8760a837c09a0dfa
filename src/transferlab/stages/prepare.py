"""Stage ``prepare``: decode the images once into compact tensors.

Writes ``<paths.prepared>/target`` (the fine-tuning task) and, when
``backbone.weights=source``, ``<paths.prepared>/source`` (the source task):
uint8 images, labels, class names and normalisation statistics per split.
Later stages never decode an image file again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from transferlab.cli import stage_main
from transferlab.config.schema import ExperimentConfig
from transferlab.data import DataError, PreparedData, RawDataset, load_source, prepare_dataset, save_prepared


def one_vs_rest(raw: RawDataset, positive: str) -> RawDataset:
    """Relabel: 1 for class ``positive``, 0 for every other class."""
    if positive not in raw.class_names:
        raise DataError(f"data.positive_class: Unknown class '{positive}'; expected one of {raw.class_names}")
    pos = raw.class_names.index(positive)
    labels = (raw.labels == pos).astype(np.int64)
    return RawDataset(raw.images, labels, [f"not_{positive}", positive], source=raw.source)


def build_task(raw: RawDataset, cfg: ExperimentConfig, *, classes: list[str] | None,
               max_per_class: int | None, positive: str | None, key: str) -> PreparedData:
    """The prepared task; errors name the config key (``key``) that chose the classes."""
    try:
        return _build_task(raw, cfg, classes=classes, max_per_class=max_per_class, positive=positive)
    except DataError as err:
        raise DataError(f"{key}={list(classes) if classes is not None else None}: {err}") from None


def _build_task(raw: RawDataset, cfg: ExperimentConfig, *, classes: list[str] | None,
                max_per_class: int | None, positive: str | None) -> PreparedData:
    if positive is not None:
        if classes is not None:
            keep = np.isin(raw.labels, [raw.class_names.index(c) for c in classes if c in raw.class_names])
            raw = RawDataset(raw.images[keep], raw.labels[keep], raw.class_names, source=raw.source)
        raw = one_vs_rest(raw, positive)
        classes = None
    return prepare_dataset(raw, classes=classes, max_per_class=max_per_class,
                           val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction, seed=cfg.seed)


def run(cfg: ExperimentConfig) -> dict[str, PreparedData]:
    d = cfg.data
    raw = load_source(d.source, root=d.root, path=d.path, image_size=d.image_size, channels=d.channels,
                      download=d.download)
    tasks = {"target": build_task(raw, cfg, classes=d.classes, max_per_class=d.max_per_class,
                                  positive=d.positive_class, key="data.classes")}
    if cfg.backbone.weights == "source":
        tasks["source"] = build_task(raw, cfg, classes=cfg.pretrain.classes,
                                     max_per_class=cfg.pretrain.max_per_class, positive=None,
                                     key="pretrain.classes")
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
