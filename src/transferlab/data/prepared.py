"""The prepared dataset: fixed train/val/test tensors plus what training needs to know.

``prepare_dataset`` turns a RawDataset into splits; ``save_prepared``/``load_prepared``
move it through the DVC-tracked directory: per split ``<split>.images.npy`` (uint8
``[N, C, H, W]``) and ``<split>.labels.npy`` (int64), plus ``meta.json``. ``load_prepared``
memory-maps the ``.npy`` files, so reading them costs no copy and data larger than memory
can be streamed from the page cache.
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

from .sources import DataError, RawDataset
from .split import SPLITS, cap_per_class, predefined_split, select_classes, stratified_split

__all__ = [
    "PreparedData",
    "Split",
    "data_hash",
    "load_prepared",
    "prepare_dataset",
    "save_prepared",
]

META_FILE = "meta.json"
FORMAT_VERSION = 2  # 1: one .safetensors per split
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


def _channel_stats(images: torch.Tensor, chunk_bytes: int = 32 * 2**20) -> tuple[list[float], list[float]]:
    """Per-channel mean/std on [0, 1], streamed over chunks of about ``chunk_bytes``: the
    per-channel sums of pixel values and of their squares are exact integers (uint64), so the
    result does not depend on the chunking and no float copy of the images is ever made."""
    array = images.numpy()
    channels = array.shape[1]
    per_image = max(1, int(np.prod(array.shape[1:])))
    step = max(1, chunk_bytes // per_image)
    total = np.zeros(channels, dtype=np.uint64)
    total_sq = np.zeros(channels, dtype=np.uint64)
    for start in range(0, array.shape[0], step):
        part = array[start : start + step]
        total += part.sum(axis=(0, 2, 3), dtype=np.uint64)
        total_sq += np.multiply(part, part, dtype=np.uint16).sum(axis=(0, 2, 3), dtype=np.uint64)
    count = max(1, array.shape[0] * array.shape[2] * array.shape[3])
    mean = total.astype(np.float64) / count / 255.0
    std = np.sqrt(np.clip(total_sq.astype(np.float64) / count / 255.0**2 - mean * mean, 0.0, None))
    return mean.tolist(), [max(float(s), MIN_STD) for s in std]


def split_indices(
    labels: np.ndarray,
    splits: np.ndarray | None,
    *,
    max_per_class: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    class_names: list[str],
) -> dict[str, np.ndarray]:
    """Ascending indices per split: the source's own split if it has one (``splits``), else a
    stratified one; then at most ``max_per_class`` training images per class. The cap is on
    the training labels only (low-data fine-tuning): validation and test stay whole, so scores
    with and without a cap are measured on the same images."""
    if splits is None:
        parts = stratified_split(labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                 class_names=class_names)
    else:
        parts = predefined_split(labels, splits, test_fraction=test_fraction, seed=seed, class_names=class_names)
    train = parts["train"]
    parts["train"] = train[cap_per_class(labels[train], max_per_class, seed)]
    return parts


def prepare_dataset(
    raw: RawDataset,
    *,
    classes: list[int | str] | None,
    max_per_class: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> PreparedData:
    """Select classes, split (stratified, or the source's own split), cap the training split,
    and compute train-split normalisation.

    The images are taken once, in split order, into one array whose slices are the splits:
    an image folder decodes only the images the task keeps, and memory holds one copy of them.
    """
    kept, labels, class_names = select_classes(raw.labels, raw.class_names, classes)
    if len(class_names) < 2:
        raise DataError(
            f"Need at least 2 classes to train a classifier; got {class_names} "
            f"from classes={classes!r}"
        )
    parts = split_indices(labels, None if raw.splits is None else raw.splits[kept], max_per_class=max_per_class,
                          val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                          class_names=class_names)
    images = torch.from_numpy(np.asarray(raw.images[kept[np.concatenate([parts[n] for n in SPLITS])]]))
    bounds = np.cumsum([0] + [len(parts[n]) for n in SPLITS])
    splits = {
        name: Split(
            images=images[bounds[i] : bounds[i + 1]],
            labels=torch.from_numpy(np.ascontiguousarray(labels[parts[name]], dtype=np.int64)),
        )
        for i, name in enumerate(SPLITS)
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
            "predefined_splits": raw.splits is not None,
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
        images = np.ascontiguousarray(split.images.numpy())
        # Shapes and an explicit little-endian label layout keep the hash platform-stable
        # and tell [N, 1, 8, 8] from [N, 8, 8, 1] with the same bytes.
        digest.update(f"{name}:{list(images.shape)}:{images.dtype}\n".encode())
        digest.update(images.reshape(-1).data)  # the array's own buffer: no copy
        digest.update(split.labels.numpy().astype("<i8").tobytes())
    digest.update(json.dumps(list(data.class_names)).encode())
    return digest.hexdigest()


def save_prepared(data: PreparedData, directory: Path) -> None:
    """Write ``<split>.images.npy``, ``<split>.labels.npy`` and ``meta.json`` into ``directory``,
    all or nothing; the arrays are written from their own buffers (no copy in memory)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build the new directory beside the target, then swap it in with renames, so an
    # interrupted run leaves either the old complete directory or none, never half of one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for name in SPLITS:
            split = data.splits[name]
            np.save(tmp / f"{name}.images.npy", np.ascontiguousarray(split.images.numpy()), allow_pickle=False)
            np.save(tmp / f"{name}.labels.npy", split.labels.numpy().astype("<i8"), allow_pickle=False)
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


def _map_array(path: Path, directory: Path) -> torch.Tensor:
    """A ``.npy`` file as a tensor over a copy-on-write memory map (writable, the file untouched)."""
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except Exception as exc:  # missing file, bad header, truncated data
        raise DataError(f"Prepared data in {directory} is corrupt: cannot read {path}: {exc}") from exc
    # An empty array has no pages to map: numpy hands back a plain array or an empty map.
    return torch.from_numpy(np.asarray(array) if array.size == 0 else array)


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
        version = payload["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"Prepared data in {directory} is corrupt: cannot read {meta_path}: {exc}"
        ) from exc
    if version != FORMAT_VERSION:
        raise DataError(f"Prepared data in {directory} has format {version}, this version reads "
                        f"{FORMAT_VERSION}: run the prepare stage again (dvc repro prepare)")

    splits: dict[str, Split] = {}
    for name in SPLITS:
        path = directory / f"{name}.images.npy"
        split = Split(images=_map_array(path, directory),
                      labels=_map_array(directory / f"{name}.labels.npy", directory))
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
