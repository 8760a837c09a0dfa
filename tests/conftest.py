"""Shared fixtures: the repo root, a subprocess environment, a project copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Parallel test workers (pytest-xdist) share the CPUs: each worker, and every process it starts, gets
# CPUs // workers threads (OMP_NUM_THREADS, which the training code honours), unless the caller set it.
# Without this each of them takes every CPU and the suite spends a third of its time oversubscribed.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cpus // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def subprocess_env(**extra: str) -> dict[str, str]:
    """This interpreter's bin first on PATH, so `python`, `dvc` and `mlflow`
    in commands (dvc.yaml's stages too) are the ones under test."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def copy_project(dest: Path) -> Path:
    """A git repo at ``dest`` holding this project's files as they are now
    (tracked and untracked-but-not-ignored), committed: what a clone gets."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "project copy"], dest)
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


@pytest.fixture(autouse=True)
def _mlflow_environment() -> None:
    """``mlflow.set_tracking_uri`` exports the URI to os.environ, where the pipeline takes it
    for the user's explicit choice; no test may leave it (or a run or experiment id) behind."""
    names = ["MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"]
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def params_file(tmp_path: Path, edits: dict[str, object]) -> Path:
    """The repo's params.yaml with ``edits`` (dotted keys) applied and every path and the store under
    ``tmp_path``, so that even a stage that wrongly went on would not touch the repo."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] = {k: str(tmp_path / "out" / k) for k in params["paths"]}
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in edits.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def digit_batches(n_train: int, n_val: int):  # type: ignore[no-untyped-def]
    """Training and validation Batches of the real 8x8 digits, uint8 like the prepared data."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from transferlab.training.loop import Batches

    raw = load_digits()
    images = torch.from_numpy(np.rint(raw.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    end = n_train + n_val
    return Batches(images[:n_train], labels[:n_train]), Batches(images[n_train:end], labels[n_train:end])


def build_model_for(cfg, *, num_classes: int, data_channels: int, mean: list[float], std: list[float],
                    data_size: int = 8):  # type: ignore[no-untyped-def]
    """The fine-tuning model ``cfg`` describes for data of these facts (fresh weights), via its model spec."""
    from transferlab.models.assemble import ModelSpec, build_model

    spec = ModelSpec.decide(cfg, class_names=[str(i) for i in range(num_classes)], data_channels=data_channels,
                            data_size=data_size, data_mean=mean, data_std=std)
    return build_model(spec)


def prepared_from(train, val, *, num_classes: int = 10):  # type: ignore[no-untyped-def]
    """A PreparedData of two Batches (test = val), with the training split's channel statistics."""
    from transferlab.data.prepared import PreparedData, Split

    x = train.images.cpu().double() / 255
    mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3), unbiased=False).tolist()
    splits = {"train": Split(train.images, train.labels), "val": Split(val.images, val.labels),
              "test": Split(val.images, val.labels)}
    return PreparedData(splits, [str(i) for i in range(num_classes)], mean, std)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most slow end-to-end tests first (in-file order kept): xdist hands whole files to the
    workers in this order, so the long ones start early and the workers finish together (the file with
    seven, about a quarter of the suite's time, no longer starts last by its name)."""
    slow: dict[object, int] = {}
    for item in items:
        if item.get_closest_marker("slow"):
            slow[item.path] = slow.get(item.path, 0) + 1
    items.sort(key=lambda item: -slow.get(item.path, 0))
