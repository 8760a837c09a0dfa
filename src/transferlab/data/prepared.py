"""The prepared dataset: fixed train/val/test tensors plus what training needs to know.

``prepare_dataset`` turns a RawDataset into splits; ``save_prepared``/``load_prepared``
move it through the DVC-tracked directory (one ``.safetensors`` per split + ``meta.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .sources import DataError, RawDataset
from .split import SPLITS, cap_per_class, select_classes, stratified_split

__all__ = [
    "PreparedData",
    "Split",
    "data_hash",
    "load_prepared",
    "prepare_dataset",
    "save_prepared",
]

META_FILE = "meta.json"
FORMAT_VERSION = 1
MIN_STD = 1e-3  # a constant channel (blank MNIST border crops, tiny subsets) must not divide by 0


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class PreparedData:
    splits: dict[str, Split]  # 'train', 'val', 'test'
    class_names: list[str]
    mean: list[float]  # per channel, [0, 1] scale, train split only
    std: list[float]
    meta: dict[str, Any] = field(default_factory=dict)
    # Per split, the indices into the RawDataset it was prepared from (not saved):
    # what keeps one task's held-out images out of another task.
    raw_indices: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.splits["train"].images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        height, width = self.splits["train"].images.shape[2:]
        return int(height), int(width)


def _channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean/std on [0, 1], in float64 chunks so big datasets need no float copy."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    return mean.tolist(), [max(float(s), MIN_STD) for s in std]


def prepare_dataset(
    raw: RawDataset,
    *,
    classes: list[int | str] | None,
    max_per_class: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> PreparedData:
    """Select classes, cap them, split stratified, and compute train-split normalisation."""
    kept, labels, class_names = select_classes(raw.labels, raw.class_names, classes)
    if len(class_names) < 2:
        raise DataError(
            f"Need at least 2 classes to train a classifier; got {class_names} "
            f"from classes={classes!r}"
        )
    capped = cap_per_class(labels, max_per_class, seed)
    kept, labels = kept[capped], labels[capped]
    parts = stratified_split(
        labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        class_names=class_names,
    )

    splits = {
        name: Split(
            images=torch.from_numpy(np.ascontiguousarray(raw.images[kept[idx]])),
            labels=torch.from_numpy(np.ascontiguousarray(labels[idx], dtype=np.int64)),
        )
        for name, idx in parts.items()
    }
    mean, std = _channel_stats(splits["train"].images)
    height, width = raw.images.shape[2:]
    data = PreparedData(
        splits=splits,
        class_names=class_names,
        mean=mean,
        std=std,
        raw_indices={name: kept[idx] for name, idx in parts.items()},
        meta={
            "source": raw.source,
            "image_size": [int(height), int(width)],
            "channels": int(raw.images.shape[1]),
            "num_classes": len(class_names),
            "counts": {name: len(split) for name, split in splits.items()},
            "class_counts": {
                name: np.bincount(split.labels.numpy(), minlength=len(class_names)).tolist()
                for name, split in splits.items()
            },
            "classes": None if classes is None else list(classes),
            "max_per_class": max_per_class,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "seed": seed,
        },
    )
    data.meta["data_hash"] = data_hash(data)
    return data


def data_hash(data: PreparedData) -> str:
    """sha256 over split tensors, labels and class names: same data -> same hex, any run."""
    digest = hashlib.sha256()
    for name in SPLITS:
        split = data.splits[name]
        images = split.images.contiguous().numpy()
        # Shapes and an explicit little-endian label layout keep the hash platform-stable
        # and tell [N, 1, 8, 8] from [N, 8, 8, 1] with the same bytes.
        digest.update(f"{name}:{list(images.shape)}:{images.dtype}\n".encode())
        digest.update(images.tobytes())
        digest.update(split.labels.numpy().astype("<i8").tobytes())
    digest.update(json.dumps(list(data.class_names)).encode())
    return digest.hexdigest()


def save_prepared(data: PreparedData, directory: Path) -> None:
    """Write ``<split>.safetensors`` + ``meta.json`` into ``directory``, all or nothing."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build the new directory beside the target, then swap it in with renames, so an
    # interrupted run leaves either the old complete directory or none, never half of one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for name in SPLITS:
            split = data.splits[name]
            save_file(
                {"images": split.images.contiguous(), "labels": split.labels.contiguous()},
                str(tmp / f"{name}.safetensors"),
            )
        payload = {
            "format_version": FORMAT_VERSION,
            "class_names": list(data.class_names),
            "mean": [float(m) for m in data.mean],
            "std": [float(s) for s in data.std],
            "meta": data.meta,
        }
        (tmp / META_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_prepared_meta(directory: Path) -> dict:
    """The ``meta`` of a prepared directory, without reading its tensors."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: run the prepare stage first (dvc repro prepare)")
    return json.loads(meta_path.read_text())["meta"]


def load_prepared(directory: Path) -> PreparedData:
    """Read what ``save_prepared`` wrote; DataError naming the directory if missing or corrupt."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"No prepared data in {directory}: {META_FILE} is missing (run the prepare stage first)"
        )
    try:
        payload = json.loads(meta_path.read_text())
        class_names = [str(n) for n in payload["class_names"]]
        mean = [float(m) for m in payload["mean"]]
        std = [float(s) for s in payload["std"]]
        meta = dict(payload["meta"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"Prepared data in {directory} is corrupt: cannot read {meta_path}: {exc}"
        ) from exc

    splits: dict[str, Split] = {}
    for name in SPLITS:
        path = directory / f"{name}.safetensors"
        try:
            tensors = load_file(str(path))
            split = Split(images=tensors["images"], labels=tensors["labels"])
        except Exception as exc:  # missing file, bad header, truncated buffer, missing key
            raise DataError(
                f"Prepared data in {directory} is corrupt: cannot read {path}: {exc}"
            ) from exc
        ok = (
            split.images.dtype == torch.uint8
            and split.images.ndim == 4
            and split.labels.dtype == torch.int64
            and split.labels.shape == (split.images.shape[0],)
        )
        if not ok:
            raise DataError(
                f"Prepared data in {directory} is corrupt: {path} has images "
                f"{split.images.dtype}{list(split.images.shape)} and labels "
                f"{split.labels.dtype}{list(split.labels.shape)}; "
                "expected uint8 [N, C, H, W] and int64 [N]"
            )
        splits[name] = split

    data = PreparedData(splits=splits, class_names=class_names, mean=mean, std=std, meta=meta)
    expected = meta.get("data_hash")
    actual = data_hash(data) if expected is not None else None
    if actual != expected:
        raise DataError(
            f"Prepared data in {directory} is corrupt: its tensors hash to {actual}, "
            f"but {META_FILE} records {expected}"
        )
    return data
