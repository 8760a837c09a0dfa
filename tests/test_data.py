"""Data sources, splits and prepared files, on real data: sklearn digits and real image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data import (
    DataError,
    PreparedData,
    RawDataset,
    cap_per_class,
    data_hash,
    list_sources,
    load_prepared,
    load_source,
    prepare_dataset,
    save_prepared,
    select_classes,
    stratified_split,
)
from transferlab.data.sources import convert_channels, resize_images


@pytest.fixture(scope="module")
def digits() -> RawDataset:
    return load_source("digits", root="unused")


# --------------------------------------------------------------------------- sources


def test_list_sources() -> None:
    assert list_sources() == ["cifar10", "digits", "fashion_mnist", "imagefolder", "mnist"]


def test_unknown_source_names_the_choices() -> None:
    with pytest.raises(
        DataError, match=r"Unknown data source 'mnsit'; expected one of \['cifar10'"
    ):
        load_source("mnsit", root=".")


def test_digits(digits: RawDataset) -> None:
    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.images.dtype == np.uint8 and digits.labels.dtype == np.int64
    assert digits.images.min() == 0 and digits.images.max() == 255  # 16 -> 255
    assert digits.class_names == [str(i) for i in range(10)]
    assert digits.source == "digits"
    assert np.bincount(digits.labels).tolist()[:3] == [178, 182, 177]


def test_size_and_channel_conversion(digits: RawDataset) -> None:
    raw = load_source("digits", root=".", image_size=16, channels=3)
    assert raw.images.shape == (1797, 3, 16, 16) and raw.images.dtype == np.uint8
    assert np.array_equal(raw.images[:, 0], raw.images[:, 2])  # grey repeated
    np.testing.assert_array_equal(raw.labels, digits.labels)
    # Upsampling a constant image keeps it constant: the resize does not shift values.
    const = np.full((2, 1, 8, 8), 200, dtype=np.uint8)
    assert (resize_images(const, 5) == 200).all() and resize_images(const, 5).shape == (2, 1, 5, 5)


def test_rgb_to_grey_uses_luma_weights() -> None:
    rgb = np.zeros((3, 3, 2, 2), dtype=np.uint8)
    rgb[0, 0], rgb[1, 1], rgb[2, 2] = 255, 255, 255  # pure red, green, blue
    grey = convert_channels(rgb, 1)
    assert grey.shape == (3, 1, 2, 2) and grey.dtype == np.uint8
    assert grey[:, 0, 0, 0].tolist() == [76, 150, 29]  # round(255 * (.299, .587, .114))


@pytest.mark.parametrize(
    ("name", "download", "folder", "file"),
    [
        ("mnist", True, "MNIST/raw", "train-images-idx3-ubyte"),
        ("fashion_mnist", False, "FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
        ("cifar10", False, "cifar-10-batches-py", "data_batch_1"),
    ],
)
def test_missing_torchvision_data_names_the_folder(
    tmp_path: Path, name: str, download: bool, folder: str, file: str
) -> None:
    try:
        load_source(name, root=tmp_path, download=download)
    except DataError as exc:
        message = str(exc)
    else:  # only possible with network access
        pytest.skip(f"{name} downloaded; the offline error cannot be shown")
    assert f"'{name}'" in message
    assert str(tmp_path / folder) in message
    assert file in message
    assert "Download" in message


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST file format: magic (0, 0, uint8 code 8, ndim), big-endian dims, then bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_files_on_disk_are_read_and_joined(tmp_path: Path) -> None:
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 256, (2, 28, 28))
    _write_idx(raw_dir / "train-images-idx3-ubyte", train)
    _write_idx(raw_dir / "train-labels-idx1-ubyte", np.array([5, 0, 4]))
    _write_idx(raw_dir / "t10k-images-idx3-ubyte", test)
    _write_idx(raw_dir / "t10k-labels-idx1-ubyte", np.array([7, 2]))
    raw = load_source("mnist", root=tmp_path, download=False, image_size=14)
    assert raw.images.shape == (5, 1, 14, 14) and raw.images.dtype == np.uint8
    assert raw.labels.tolist() == [5, 0, 4, 7, 2]
    assert raw.class_names[0] == "0 - zero" and len(raw.class_names) == 10
    full = load_source("mnist", root=tmp_path, download=False)
    np.testing.assert_array_equal(full.images[:, 0], np.concatenate([train, test]))


# --------------------------------------------------------------------------- imagefolder


def _save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB")
    _save(
        root / "cat" / "a.png", Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8), "L")
    )
    _save(root / "cat" / "b.JPG", rgb, quality=90)
    _save(
        root / "cat" / "c.png",
        Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA"),
    )
    _save(root / "dog" / "d.gif", rgb.convert("P"))
    sixteen = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    _save(root / "dog" / "e.PNG", Image.fromarray(sixteen))  # 16-bit greyscale PNG
    _save(root / "dog" / "f.tiff", Image.new("CMYK", (5, 5), (0, 255, 255, 0)))
    (root / "dog" / "notes.txt").write_text("not an image")
    _save(root / "dog" / ".hidden.png", rgb)
    _save(root / ".cache" / "x.png", rgb)
    return root


def test_imagefolder_reads_every_mode(image_folder: Path) -> None:
    raw = load_source("imagefolder", root=".", path=image_folder, image_size=16)
    assert raw.class_names == ["cat", "dog"]
    assert raw.images.shape == (6, 3, 16, 16) and raw.images.dtype == np.uint8  # mixed -> RGB
    assert raw.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert raw.source == "imagefolder"
    images = np.asarray(raw.images)  # decoded here, not before
    assert images.shape == (6, 3, 16, 16) and images.dtype == np.uint8
    cmyk_red = images[5, :, 8, 8].tolist()
    assert cmyk_red[0] > 200 and cmyk_red[1] < 50 and cmyk_red[2] < 50


def test_imagefolder_grey_folder_gets_one_channel_and_16_bit_is_scaled(tmp_path: Path) -> None:
    root = tmp_path / "grey"
    _save(root / "a" / "x.png", Image.new("L", (6, 6), 40))
    _save(root / "a" / "y.png", Image.new("LA", (6, 6), (80, 255)))
    full = np.full((6, 6), 257 * 100, dtype=np.uint16)  # 100 at 8 bits
    _save(root / "b" / "z.png", Image.fromarray(full))
    images = np.asarray(load_source("imagefolder", root=".", path=root, image_size=4).images)
    assert images.shape == (3, 1, 4, 4)
    assert [int(images[i].mean()) for i in range(3)] == [40, 80, 100]
    rgb = np.asarray(load_source("imagefolder", root=".", path=root, image_size=4, channels=3).images)
    assert rgb.shape == (3, 3, 4, 4) and (rgb[2] == 100).all()


def test_imagefolder_corrupt_file_is_named(image_folder: Path) -> None:
    good = (image_folder / "cat" / "a.png").read_bytes()
    bad = image_folder / "dog" / "broken.png"
    bad.write_bytes(good[: len(good) // 2])  # truncated mid-stream: header fine, data not
    with pytest.raises(DataError, match="Cannot read image") as info:
        np.asarray(load_source("imagefolder", root=".", path=image_folder, image_size=8).images)
    assert str(bad) in str(info.value)


def test_imagefolder_faults_are_reported_all_at_once(image_folder: Path) -> None:
    good = (image_folder / "cat" / "a.png").read_bytes()
    broken = [image_folder / "cat" / "half.png", image_folder / "dog" / "junk.jpg"]
    broken[0].write_bytes(good[: len(good) // 2])
    broken[1].write_bytes(b"not a jpeg at all")
    for channels in (None, 3):  # the header pass (channel detection) and the decode pass
        with pytest.raises(DataError) as info:
            np.asarray(load_source("imagefolder", root=".", path=image_folder, image_size=8, channels=channels).images)
        message = str(info.value)
        assert f"in {image_folder}" in message
        # junk.jpg fails at the header; half.png only when decoded
        expected = broken[1:] if channels is None else broken
        assert f"Cannot read {len(expected)} image(s)" in message
        assert all(str(file) in message for file in expected), message
    for name in ("bird", "fish"):
        (image_folder / name).mkdir()
    with pytest.raises(DataError, match=r"2 class folder\(s\) hold no images: \['bird', 'fish'\]"):
        load_source("imagefolder", root=".", path=image_folder, image_size=8)


def test_too_small_classes_are_named_all_at_once(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls, n in (("apple", 2), ("pear", 5), ("plum", 1)):
        for i in range(n):
            _save(root / cls / f"{i}.png", Image.new("L", (4, 4), i * 20))
    raw = load_source("imagefolder", root=".", path=root, image_size=4)
    with pytest.raises(DataError, match=r"too few samples: 'apple' \(2\), 'plum' \(1\)"):
        prepare_dataset(raw, classes=None, max_per_class=None, val_fraction=0.2, test_fraction=0.2, seed=0)


def test_folder_fingerprint_follows_the_listing(image_folder: Path) -> None:
    from transferlab.data.sources import folder_fingerprint

    before = folder_fingerprint(image_folder)
    assert folder_fingerprint(image_folder) == before
    extra = _save(image_folder / "cat" / "new.png", Image.new("L", (4, 4)))
    added = folder_fingerprint(image_folder)
    assert added != before
    extra.unlink()
    assert folder_fingerprint(image_folder) == before


@pytest.mark.parametrize("problem", ["missing", "one_class", "empty_class", "no_size"])
def test_imagefolder_bad_layouts(tmp_path: Path, problem: str) -> None:
    root = tmp_path / "imgs"
    _save(root / "a" / "x.png", Image.new("L", (4, 4)))
    kwargs = {"image_size": 8}
    if problem == "missing":
        root = tmp_path / "nowhere"
    elif problem == "empty_class":
        (root / "b").mkdir()
        (root / "b" / "readme.txt").write_text("no images here")
    elif problem == "no_size":
        _save(root / "b" / "y.png", Image.new("L", (4, 4)))
        kwargs = {}
    with pytest.raises(DataError) as info:
        load_source("imagefolder", root=".", path=root, **kwargs)
    assert str(root) in str(info.value)


# --------------------------------------------------------------------------- split


def test_select_classes_relabels_in_given_order() -> None:
    labels = np.array([0, 1, 2, 3, 2, 1, 0, 3])
    names = ["zero", "one", "two", "three"]
    kept, new, new_names = select_classes(labels, names, ["three", 1])
    assert kept.tolist() == [1, 3, 5, 7]
    assert new.tolist() == [1, 0, 1, 0]
    assert new_names == ["three", "one"]
    kept, new, new_names = select_classes(labels, names, None)
    assert (
        kept.tolist() == list(range(8)) and new.tolist() == labels.tolist() and new_names == names
    )


@pytest.mark.parametrize("bad", [["two", "four"], [7], [1, "one"]])
def test_select_classes_rejects_unknown_and_duplicates(bad: list) -> None:
    with pytest.raises(DataError, match=r"\['zero', 'one', 'two', 'three'\]|listed twice"):
        select_classes(np.array([0, 1, 2, 3]), ["zero", "one", "two", "three"], bad)


def test_cap_per_class(digits: RawDataset) -> None:
    kept = cap_per_class(digits.labels, 50, seed=3)
    assert np.bincount(digits.labels[kept]).tolist() == [50] * 10
    assert np.all(np.diff(kept) > 0)
    assert np.array_equal(kept, cap_per_class(digits.labels, 50, seed=3))
    assert not np.array_equal(kept, cap_per_class(digits.labels, 50, seed=4))
    small = np.array([0, 0, 1, 1, 1, 1])
    assert cap_per_class(small, 3, seed=0).size == 5  # class 0 below the cap keeps both
    assert cap_per_class(small, None, seed=0).tolist() == list(range(6))


def test_stratified_split(digits: RawDataset) -> None:
    labels = digits.labels
    parts = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=7)
    assert set(parts) == {"train", "val", "test"}
    joined = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(joined), np.arange(labels.size))  # disjoint and covering
    for idx in parts.values():
        assert np.all(np.diff(idx) > 0)
    for cls, n in enumerate(np.bincount(labels)):
        assert (labels[parts["test"]] == cls).sum() == int(np.floor(n * 0.2 + 0.5))
        assert (labels[parts["val"]] == cls).sum() == int(np.floor(n * 0.1 + 0.5))
    again = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=7)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=8)
    assert not np.array_equal(parts["test"], other["test"])


def test_stratified_split_small_classes() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    parts = stratified_split(labels, val_fraction=0.1, test_fraction=0.1, seed=0)
    for name in ("train", "val", "test"):
        assert (labels[parts[name]] == 0).sum() == 1  # 3 samples: one everywhere
    no_val = stratified_split(labels, val_fraction=0.0, test_fraction=0.5, seed=0)
    assert no_val["val"].size == 0
    with pytest.raises(DataError, match=r"too few samples: 1 \(2\); at least 3"):
        stratified_split(np.array([0, 0, 0, 1, 1]), val_fraction=0.2, test_fraction=0.2, seed=0)
    with pytest.raises(DataError, match="below 1"):
        stratified_split(labels, val_fraction=0.5, test_fraction=0.5, seed=0)


# --------------------------------------------------------------------------- prepared


@pytest.fixture(scope="module")
def prepared(digits: RawDataset) -> PreparedData:
    return prepare_dataset(
        digits, classes=[3, "5", 8], max_per_class=60, val_fraction=0.2, test_fraction=0.2, seed=1
    )


def test_prepare_dataset(prepared: PreparedData, digits: RawDataset) -> None:
    assert prepared.class_names == ["3", "5", "8"]
    assert prepared.num_classes == 3 and prepared.channels == 1 and prepared.image_size == (8, 8)
    # max_per_class=60 caps the training split only; val and test keep 20% each of the 3 classes
    sizes = {k: len(v) for k, v in prepared.splits.items()}
    held_out = sum(int(np.floor(n * 0.2 + 0.5)) for n in np.bincount(digits.labels)[[3, 5, 8]])
    assert sizes == {"train": 180, "val": held_out, "test": held_out}
    assert prepared.meta["counts"] == sizes
    assert prepared.meta["source"] == "digits" and prepared.meta["image_size"] == [8, 8]
    train = prepared.splits["train"]
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [60, 60, 60]
    pixels = train.images.double() / 255
    assert prepared.mean[0] == pytest.approx(pixels.mean().item())
    assert prepared.std[0] == pytest.approx(pixels.std(unbiased=False).item())
    assert prepared.meta["data_hash"] == data_hash(prepared)
    same = prepare_dataset(
        digits, classes=[3, "5", 8], max_per_class=60, val_fraction=0.2, test_fraction=0.2, seed=1
    )
    assert data_hash(same) == data_hash(prepared)


def test_constant_images_get_a_nonzero_std() -> None:
    raw = RawDataset(np.zeros((12, 1, 2, 2), np.uint8), np.array([0, 1] * 6), ["a", "b"])
    data = prepare_dataset(
        raw, classes=None, max_per_class=None, val_fraction=0.2, test_fraction=0.2, seed=0
    )
    assert data.std == [1e-3]


def test_save_load_round_trip(prepared: PreparedData, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    save_prepared(prepared, out)
    save_prepared(prepared, out)  # overwriting an existing directory works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temp leftovers
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "test.images.npy",
        "test.labels.npy",
        "train.images.npy",
        "train.labels.npy",
        "val.images.npy",
        "val.labels.npy",
    ]
    loaded = load_prepared(out)
    for name, split in prepared.splits.items():
        assert torch.equal(loaded.splits[name].images, split.images)
        assert torch.equal(loaded.splits[name].labels, split.labels)
    assert loaded.class_names == prepared.class_names
    assert loaded.mean == prepared.mean and loaded.std == prepared.std
    assert loaded.meta == prepared.meta
    assert data_hash(loaded) == prepared.meta["data_hash"]
    assert json.loads((out / "meta.json").read_text())["meta"]["data_hash"] == data_hash(prepared)


def test_load_prepared_errors_name_the_directory(prepared: PreparedData, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing") as info:
        load_prepared(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value)

    out = tmp_path / "prepared"
    save_prepared(prepared, out)
    train = out / "train.images.npy"
    train.write_bytes(train.read_bytes()[:-10])  # truncated
    with pytest.raises(DataError, match="corrupt") as info:
        load_prepared(out)
    assert str(out) in str(info.value)

    save_prepared(prepared, out)
    blob = bytearray(train.read_bytes())
    blob[-1] ^= 0xFF  # same size, one flipped byte: only the hash can tell
    train.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="hash"):
        load_prepared(out)
