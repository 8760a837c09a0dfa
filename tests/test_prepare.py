"""Stage prepare on real image files: no target val/test image reaches pretraining, and running
out of memory is a clear error."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, subprocess_env
from transferlab.compose import compose
from transferlab.config import load_config
from transferlab.stages import prepare


def _unique_images(root: Path, counts: dict[str, int]) -> Path:
    """PNG files whose pixels encode a running number: no two images are alike."""
    number = 0
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = np.full((8, 8), number % 251, dtype=np.uint8)
            pixels[0, 0], pixels[0, 1] = number // 251, 7
            Image.fromarray(pixels, "L").save(root / cls / f"{i:03d}.png")
            number += 1
    return root


def _params(tmp_path: Path, folder: Path, *overrides: str) -> dict:
    return compose(["~experiment", "data=imagefolder", f"data.path={folder}", "data.image_size=8",
                    "backbone.weights=source", f"paths.prepared={tmp_path / 'prepared'}", *overrides],
                   config_dir=REPO / "conf")


def _image_bytes(data, splits) -> set[bytes]:
    return {image.numpy().tobytes() for name in splits for image in data.splits[name].images}


@pytest.mark.parametrize("overrides", [
    ["data.classes=[a,b]", "pretrain.classes=[b,c]"],  # one class shared
    ["data.classes=[a,b,c]", "pretrain.classes=[a,b,c]"],  # the same classes
    ["data.positive_class=a", "pretrain.classes=[b,c]"],  # one-vs-rest draws on every class
])
def test_pretraining_never_sees_target_val_or_test_images(
        tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str]) -> None:
    folder = _unique_images(tmp_path / "imgs", {"a": 20, "b": 20, "c": 20})
    tasks = prepare.run(load_config(_params(tmp_path, folder, *overrides)))
    held_out = _image_bytes(tasks["target"], ("val", "test"))
    source = _image_bytes(tasks["source"], ("train", "val", "test"))
    assert held_out and source
    assert not held_out & source
    assert "warning: pretrain.classes and the target task share classes" in capsys.readouterr().err
    # Only the held-out images are withheld: the target's training images of a shared class stay.
    assert _image_bytes(tasks["target"], ("train",)) & source


def test_disjoint_classes_keep_the_whole_source_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _unique_images(tmp_path / "imgs", {"a": 10, "b": 10, "c": 10, "d": 10})
    tasks = prepare.run(load_config(_params(tmp_path, folder, "data.classes=[a,b]", "pretrain.classes=[c,d]")))
    assert sum(len(split) for split in tasks["source"].splits.values()) == 20
    assert "warning" not in capsys.readouterr().err


def _limit_memory() -> None:
    limit = 16 * 2**30  # far below the allocation asked for, far above what importing torch needs
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_out_of_memory_names_the_stage_and_the_size(tmp_path: Path) -> None:
    folder = _unique_images(tmp_path / "imgs", {"a": 3, "b": 3})
    params = _params(tmp_path, folder, "data.image_size=100000", "data.channels=3", "backbone.channels=3",
                     "pretrain.classes=[a,b]")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "transferlab.stages.prepare", "--params",
                           str(tmp_path / "params.yaml")], cwd=tmp_path, env=subprocess_env(PYTHONPATH=str(REPO / "src")),
                          capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: prepare: out of memory: 6 images of 3x100000x100000 need 180.0 GB as uint8; lower "
        "data.image_size, or prepare fewer images (data.classes) on a machine with more memory")
    assert not (tmp_path / "prepared").exists()
