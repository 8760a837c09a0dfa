"""Pure, seeded index arithmetic on label arrays: which samples to keep and where they go.

Every function takes labels and returns indices, so the image arrays are touched once,
at the end, and the same seed always gives the same indices.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Integral

import numpy as np

from .sources import SPLITS, DataError, RawDataset

__all__ = ["SPLITS", "cap_per_class", "one_vs_rest", "predefined_split", "select_classes", "stratified_split"]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(
            f"labels must be a 1-D integer array; got dtype {labels.dtype} shape {labels.shape}"
        )
    return labels


def _rng(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise DataError(f"seed must be a non-negative integer; got {seed!r}")
    return np.random.default_rng(int(seed))


def _by_class(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, its indices in ascending order) for every class present, classes ascending."""
    if labels.size == 0:
        return []
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    return [(int(c), g) for c, g in zip(classes, groups, strict=True)]


def select_classes(
    labels: np.ndarray, class_names: list[str], classes: list[int | str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Keep only ``classes`` (indices or names) and relabel them 0..k-1 in the order given.

    Returns (kept indices ascending, new labels for those indices, new class names).
    ``None`` keeps every class unchanged.
    """
    labels = _check_labels(labels)
    names = [str(name) for name in class_names]
    if classes is None:
        return np.arange(labels.shape[0]), labels.astype(np.int64), names
    if isinstance(classes, (str, bytes)) or len(classes) == 0:
        raise DataError(
            f"classes must be a non-empty list of class names or indices; got {classes!r}"
        )

    chosen: list[int] = []
    for wanted in classes:
        # Names win over indices so a string "3" means the class named "3" (digits).
        if isinstance(wanted, str) and wanted in names:
            index = names.index(wanted)
        elif (
            isinstance(wanted, Integral)
            and not isinstance(wanted, bool)
            and 0 <= wanted < len(names)
        ):
            index = int(wanted)
        else:
            raise DataError(
                f"Unknown class {wanted!r}; expected one of {names} "
                f"or an index in 0..{len(names) - 1}"
            )
        if index in chosen:
            raise DataError(
                f"Class {wanted!r} ({names[index]!r}) is listed twice in {list(classes)}"
            )
        chosen.append(index)

    mapping = np.full(len(names), -1, dtype=np.int64)
    mapping[chosen] = np.arange(len(chosen))
    new_labels = mapping[labels] if labels.size else labels.astype(np.int64)
    kept = np.flatnonzero(new_labels >= 0)
    return kept, new_labels[kept], [names[i] for i in chosen]


def cap_per_class(labels: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """Indices (ascending) keeping at most ``max_per_class`` random samples of each class."""
    labels = _check_labels(labels)
    if max_per_class is None:
        return np.arange(labels.shape[0])
    if (
        isinstance(max_per_class, bool)
        or not isinstance(max_per_class, Integral)
        or max_per_class < 1
    ):
        raise DataError(f"max_per_class must be a positive integer or None; got {max_per_class!r}")
    rng = _rng(seed)
    kept = [
        rng.choice(group, size=max_per_class, replace=False)
        if group.size > max_per_class
        else group
        for _cls, group in _by_class(labels)
    ]
    return np.sort(np.concatenate(kept)) if kept else np.arange(0)


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise DataError(f"{name} must be a number in [0, 1); got {value!r}")
    return float(value)


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even; split sizes should not flip with parity.
    return int(math.floor(x + 0.5))


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of n samples; train keeps the rest, at least one."""
    n_val = max(1, _round_half_up(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, _round_half_up(n * test_fraction)) if test_fraction > 0 else 0
    # Rounding up both can leave train empty; take back from the larger held-out split.
    while n - n_val - n_test < 1:
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def stratified_split(
    labels: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    class_names: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Split indices into disjoint ascending 'train'/'val'/'test' arrays covering all samples.

    Each class is split on its own with sizes rounded per class, so class proportions
    match in every split; any split with a nonzero fraction gets at least one sample
    of every class. Classes too small for that are all named (by ``class_names``
    when given) in one error.
    """
    labels = _check_labels(labels)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 to leave a train split; "
            f"got {val_fraction} + {test_fraction}"
        )
    if labels.size == 0:
        raise DataError("Cannot split an empty dataset")
    rng = _rng(seed)
    groups = _by_class(labels)
    needed = 1 + (val_fraction > 0) + (test_fraction > 0)
    small = [
        f"{class_names[cls] if class_names is not None else cls!r} ({group.size})"
        for cls, group in groups
        if group.size < needed
    ]
    if small:
        raise DataError(
            f"Class(es) with too few samples: {', '.join(small)}; at least {needed} are needed "
            f"to put one in each of train{', val' if val_fraction > 0 else ''}"
            f"{', test' if test_fraction > 0 else ''}"
        )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for _cls, group in groups:
        n_val, n_test = _split_sizes(group.size, val_fraction, test_fraction)
        shuffled = rng.permutation(group)
        parts["test"].append(shuffled[:n_test])
        parts["val"].append(shuffled[n_test : n_test + n_val])
        parts["train"].append(shuffled[n_test + n_val :])
    return {
        name: np.sort(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()
    }


def predefined_split(
    labels: np.ndarray,
    splits: np.ndarray,
    *,
    test_fraction: float,
    seed: int,
    class_names: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Indices per split from the source's own split names (``splits[i]`` for sample ``i``).

    Without any 'test' sample, the test split is carved from 'train' as
    ``stratified_split`` would carve it (``test_fraction`` of each class, seeded);
    ``val_fraction`` never applies: the source's 'val' samples are the validation split.
    """
    labels = _check_labels(labels)
    parts = {name: np.flatnonzero(np.asarray(splits) == name) for name in SPLITS}
    if parts["test"].size == 0:
        train = parts["train"]
        carved = stratified_split(labels[train], val_fraction=0.0, test_fraction=test_fraction, seed=seed,
                                  class_names=class_names)
        parts["train"], parts["test"] = train[carved["train"]], train[carved["test"]]
    return parts


def one_vs_rest(raw: RawDataset, positive: str) -> RawDataset:
    """Relabel: 1 for class ``positive``, 0 for every other class."""
    if positive not in raw.class_names:
        raise DataError(f"data.positive_class: Unknown class '{positive}'; expected one of {raw.class_names}")
    pos = raw.class_names.index(positive)
    labels = (raw.labels == pos).astype(np.int64)
    return replace(raw, labels=labels, class_names=[f"not_{positive}", positive])
