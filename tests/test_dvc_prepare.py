"""DVC and the prepared data, with real dvc in a temporary git repo: changed image folders re-prepare (in DVC
and in the app), and prepare ignores which weights are used. (Beside test_dvc_workflows.py, so that the
suite's workers share the long DVC tests.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run
from test_dvc_workflows import TINY, _images, _prepared_count

pytestmark = pytest.mark.slow


def test_adding_images_re_prepares_in_dvc_and_in_the_app(project: Path) -> None:
    folder = project / "images"  # inside the repo, git-ignored: the user's data
    for cls in ("cat", "dog"):
        _images(folder, cls, 0 if cls == "cat" else 100, 10)
    (project / ".gitignore").write_text((project / ".gitignore").read_text() + "/images/\n")
    task = ["~experiment", "data=imagefolder", "data.path=images", "data.image_size=8", "backbone.channels=1",
            "backbone.weights=null", *TINY]
    run(["python", "-m", "transferlab.compose", *task], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "image folder experiment"], project)

    run(["dvc", "repro", "prepare"], project)
    assert _prepared_count(project / "data" / "prepared") == 20
    assert "up to date" in run(["dvc", "status", "prepare"], project).stdout
    app = ["python", "-m", "transferlab", *task]
    first = run(app, project)
    assert "prepare: target" in first.stdout

    _images(folder, "cat", 50, 5)  # 5 new images
    status = run(["dvc", "status", "prepare"], project).stdout
    assert "modified:" in status and "images" in status, status
    repro = run(["dvc", "repro", "prepare"], project)
    assert "Running stage 'prepare'" in repro.stdout
    assert _prepared_count(project / "data" / "prepared") == 25
    second = run(app, project)
    assert "prepare: target: 2 classes ['cat', 'dog'], " in second.stdout  # re-prepared, not the cache
    caches = list((project / "outputs" / "cache" / "prepared").iterdir())
    assert sorted(_prepared_count(c) for c in caches) == [20, 25]


def test_prepare_does_not_depend_on_which_weights_are_used(project: Path) -> None:
    """Switching backbone.weights between two non-`source` values leaves `prepare` up to date;
    a value prepare does read (data.val_fraction) changes it."""
    run(["python", "-m", "transferlab.compose", *TINY, "backbone.weights=null"], project)
    run(["dvc", "repro", "prepare"], project)
    assert "up to date" in run(["dvc", "status", "prepare"], project).stdout
    weights = project / "init.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"block1.0.weight": torch.zeros(8, 1, 3, 3)}, str(weights))
    run(["python", "-m", "transferlab.compose", *TINY, f"backbone.weights={weights}"], project)
    assert "up to date" in run(["dvc", "status", "prepare"], project).stdout
    run(["python", "-m", "transferlab.compose", *TINY, f"backbone.weights={weights}", "data.val_fraction=0.2"],
        project)
    assert "modified" in run(["dvc", "status", "prepare"], project).stdout
