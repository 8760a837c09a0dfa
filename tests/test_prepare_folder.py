"""Preparing a folder of real image files: aspect ratio, predefined splits, file order,
the training-only cap, parallel decoding and streaming statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import REPO
from transferlab.compose import compose
from transferlab.config import load_config
from transferlab.config.validate import validate
from transferlab.data import DataError, load_source
from transferlab.data.prepared import _channel_stats, load_prepared
from transferlab.data.sources import decode_images, source_class_names
from transferlab.errors import ConfigError
from transferlab.stages import prepare


def _numbered(path: Path, number: int) -> None:
    """An 8x8 greyscale PNG whose pixels encode ``number``: no two images alike, and the
    number reads back from the prepared image (8 px stored at 8 px is not resampled)."""
    pixels = np.full((8, 8), number % 251, dtype=np.uint8)
    pixels[0, 0] = number // 251
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path)


def _number(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) * 251 + int(image[0, 1, 1])


def _numbers(data, split: str) -> set[int]:
    return {_number(image) for image in data.splits[split].images}


def _write(root: Path, layout: dict[str, int], start: int = 0) -> dict[str, set[int]]:
    """``layout``: relative class folder -> image count; returns each folder's numbers."""
    numbers, number = {}, start
    for folder, count in layout.items():
        numbers[folder] = set(range(number, number + count))
        for n in sorted(numbers[folder]):
            _numbered(root / folder / f"{n:04d}.png", n)
        number += count
    return numbers


def _cfg(tmp_path: Path, folder: Path, *overrides: str, out: str = "prepared"):
    return load_config(compose(["~experiment", "data=imagefolder", f"data.path={folder}", "data.image_size=8",
                                f"paths.prepared={tmp_path / out}", *overrides], config_dir=REPO / "conf"))


def test_aspect_ratio_is_kept(tmp_path: Path) -> None:
    """A 60x30 image with a centred 20x20 square: the shorter side goes to the stored size and
    the centre is cropped, so the square stays square (squashing would halve its width)."""
    for cls in ("a", "b"):
        image = Image.new("L", (60, 30), 255)
        ImageDraw.Draw(image).rectangle([20, 5, 39, 24], fill=0)  # 20 wide, 20 high, centred
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        image.save(tmp_path / "imgs" / cls / "wide.png")
        image.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "imgs" / cls / "tall.png")  # 30x60
    for size, side in ((30, 20), (15, 10)):
        images = np.asarray(load_source("imagefolder", root=".", path=tmp_path / "imgs", image_size=size).images)
        assert images.shape == (4, 1, size, size)
        for image in images[:, 0]:
            rows, cols = np.nonzero(image < 128)
            height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            # (edges blur by up to a pixel when shrinking; a squashed square would be half as wide)
            assert abs(height - side) <= 1 and abs(width - side) <= 1 and abs(height - width) <= 1
            assert abs((rows.min() + rows.max()) / 2 - (size - 1) / 2) <= 1  # still centred
            assert abs((cols.min() + cols.max()) / 2 - (size - 1) / 2) <= 1


@pytest.mark.parametrize("with_test", [True, False])
def test_predefined_splits_are_honoured(tmp_path: Path, with_test: bool) -> None:
    layout = {"train/a": 12, "train/b": 12, "val/a": 3, "val/b": 4}
    if with_test:
        layout |= {"test/a": 2, "test/b": 5}
    numbers = _write(tmp_path / "imgs", layout)
    in_part = {part: set().union(*(v for k, v in numbers.items() if k.startswith(part))) for part in
               ("train", "val", "test")}
    data = prepare.run(_cfg(tmp_path, tmp_path / "imgs", "data.val_fraction=0.5"))["target"]
    assert data.class_names == ["a", "b"]
    assert data.meta["predefined_splits"] is True
    assert _numbers(data, "val") == in_part["val"]  # val_fraction does not apply
    if with_test:
        assert _numbers(data, "train") == in_part["train"]
        assert _numbers(data, "test") == in_part["test"]
    else:  # test is carved from train/: test_fraction (0.15) of each class, rounded
        assert _numbers(data, "train") | _numbers(data, "test") == in_part["train"]
        assert not _numbers(data, "train") & _numbers(data, "test")
        assert data.meta["class_counts"]["test"] == [2, 2]


@pytest.mark.parametrize("val_classes", [["a", "c"], ["a"]])
def test_mismatched_split_classes_name_both_folders(tmp_path: Path, val_classes: list[str]) -> None:
    _write(tmp_path / "imgs", {"train/a": 3, "train/b": 3} | {f"val/{c}": 2 for c in val_classes})
    for check in (lambda: source_class_names("imagefolder", path=tmp_path / "imgs"),  # what preflight asks
                  lambda: prepare.run(_cfg(tmp_path, tmp_path / "imgs"))):
        with pytest.raises(DataError) as info:
            check()
        message = str(info.value)
        assert str(tmp_path / "imgs" / "train") in message and str(tmp_path / "imgs" / "val") in message
        assert "only in val/: " + str(sorted(set(val_classes) - {"a", "b"})) in message
        assert "only in train/: ['b']" in message
    assert not (tmp_path / "prepared").exists()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_result_is_independent_of_file_order_and_of_when_files_came(tmp_path: Path) -> None:
    layout = {"a": 9, "b": 9, "c": 9}
    numbers = _write(tmp_path / "grown", layout)
    first = prepare.run(_cfg(tmp_path, tmp_path / "grown", out="grown_prep"))["target"]
    _numbered(tmp_path / "grown" / "b" / "0100.png", 100)  # an image added later
    prepare.run(_cfg(tmp_path, tmp_path / "grown", out="grown_prep"))
    # The same files written at once, classes and files in reverse order.
    for cls in reversed(layout):
        for n in sorted(numbers[cls] | ({100} if cls == "b" else set()), reverse=True):
            _numbered(tmp_path / "fresh" / cls / f"{n:04d}.png", n)
    prepare.run(_cfg(tmp_path, tmp_path / "fresh", out="fresh_prep"))
    grown, fresh = tmp_path / "grown_prep" / "target", tmp_path / "fresh_prep" / "target"
    grown_files, fresh_files = _files(grown), _files(fresh)
    assert grown_files.keys() == fresh_files.keys()
    for name in grown_files:
        if name != "meta.json":  # it records data.path, which differs
            assert grown_files[name] == fresh_files[name], name
    assert load_prepared(grown).meta["data_hash"] == load_prepared(fresh).meta["data_hash"]
    assert load_prepared(grown).meta["data_hash"] != first.meta["data_hash"]  # the new image is in


def test_max_per_class_caps_the_training_split_only(tmp_path: Path) -> None:
    _write(tmp_path / "imgs", {c: 30 for c in "abcde"})
    full = prepare.run(_cfg(tmp_path, tmp_path / "imgs", out="full"))["target"]
    capped = prepare.run(_cfg(tmp_path, tmp_path / "imgs", "data.max_per_class=10", out="capped"))["target"]
    assert torch.bincount(capped.splits["train"].labels).tolist() == [10] * 5
    assert len(full.splits["train"]) > 50
    for split in ("val", "test"):
        assert len(capped.splits[split]) == len(full.splits[split]) > 5
        assert _numbers(capped, split) == _numbers(full, split)  # the very same images
    assert _numbers(capped, "train") < _numbers(full, "train")


def _photos(root: Path, count: int) -> list[Path]:
    """JPEGs of various sizes and aspects (some large enough for a reduced-scale decode)."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        height, width = rng.integers(20, 60), rng.integers(20, 60)
        if i % 4 == 0:
            height, width = height * 6, width * 6
        gradient = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
        pixels = np.clip(gradient + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        files.append(root / f"{i:03d}.jpg")
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "RGB").save(files[-1], quality=90)
    return files


def test_parallel_decoding_equals_one_worker(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = _photos(tmp_path / "photos", 40)
    single = decode_images(files, size=24, channels=3, folder=tmp_path, workers=1)
    parallel = decode_images(files, size=24, channels=3, folder=tmp_path, workers=4)
    assert single.shape == (40, 3, 24, 24)
    assert single.tobytes() == parallel.tobytes()
    assert single.std() > 10  # real pictures, not blanks
    # Outside a terminal: one line per ~10%, ending at 100%.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare: decoding")]
    assert len(lines) == 20 and lines[-1] == "prepare: decoding images: 40/40 (100%)"


def test_streaming_statistics_equal_a_float64_reference() -> None:
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (37, 3, 11, 13), dtype=np.uint8))
    images[:, 1] //= 4  # channels with different statistics
    pixels = images.double() / 255
    reference_mean = pixels.mean(dim=(0, 2, 3))
    reference_std = pixels.std(dim=(0, 2, 3), unbiased=False)
    for chunk_bytes in (1, 1000, 2**30):  # one image per chunk, a few, all at once
        mean, std = _channel_stats(images, chunk_bytes=chunk_bytes)
        assert np.allclose(mean, reference_mean.numpy(), rtol=0, atol=1e-6)
        assert np.allclose(std, reference_std.numpy(), rtol=0, atol=1e-6)


def test_stored_size_below_the_input_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.image_size: the stored size 200 is smaller than "
                                          r"backbone\.input_size=224"):
        _cfg(tmp_path, tmp_path, "data.image_size=200", "backbone.input_size=224")  # load_config validates
    validate(_cfg(tmp_path, tmp_path, "data.image_size=256", "backbone.input_size=224"))
    validate(_cfg(tmp_path, tmp_path, "data.image_size=224", "backbone.input_size=224"))
