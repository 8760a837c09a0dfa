"""MLflow runs: one run per pipeline execution.

``finetune`` opens the run (:func:`open_run`) and records the config,
lineage, the model's picture and per-epoch metrics, then leaves the run id in
a hand-off file (:mod:`transferlab.tracking.handoff`, outside every DVC
output). ``evaluate`` reopens that run for the test metrics and the logged
model. A stage that DVC skips logs nothing, so an unchanged pipeline never
makes a duplicate run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transferlab.tracking.tracker import Tracker, status_of

# What DVC tells a stage of `dvc exp run` (dvc/env.py), recorded on the run.
DVC_EXP_TAGS = {"DVC_EXP_NAME": "dvc_exp_name", "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev"}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay whole (``[1, 2]``)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def pipeline_outputs(repo_root: Path) -> set[str]:
    """Repo-relative files the pipeline itself rewrites: ``dvc.lock`` and every path
    ``dvc.yaml`` declares as a stage output, metric or plot (the git-tracked ones are
    the uncached outputs); inside ``dvc exp run`` also ``params.yaml``, which DVC
    rewrites with the experiment's values."""
    import yaml

    paths = {"dvc.lock"}
    if "DVC_EXP_NAME" in os.environ or "DVC_EXP_BASELINE_REV" in os.environ:
        paths.add("params.yaml")
    try:
        stages = (yaml.safe_load((repo_root / "dvc.yaml").read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return paths
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []) or []:
                paths.add(next(iter(entry)) if isinstance(entry, Mapping) else str(entry))
    return {p.rstrip("/") for p in paths}


def _dirty(porcelain: str, outputs: set[str]) -> bool:
    """Whether ``git status --porcelain -z`` lists a change outside the pipeline's outputs."""
    entries = iter(porcelain.split("\0"))
    for entry in entries:
        if not entry:
            continue
        status, path = entry[:2], entry[3:]
        if "R" in status or "C" in status:
            next(entries, None)  # the rename's source path follows
        if not any(path == out or path.startswith(out + "/") for out in outputs):
            return True
    return False


def lineage_tags(*, data_hash: str | None = None, weights_hash: str | None = None) -> dict[str, str]:
    """Git commit, dirty flag, DVC experiment and data hash: enough to reproduce the run.

    ``git_dirty`` is true only for changes beyond what the pipeline itself writes
    (:func:`pipeline_outputs`): a DVC run rewrites ``dvc.lock`` and its metrics."""
    tags: dict[str, str] = {}
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        status = _git("status", "--porcelain", "-z", "--untracked-files=no")
        top = (_git("rev-parse", "--show-toplevel") or "").strip()
        # A failed `git status` (None) says nothing about the tree: no tag
        # rather than a false "clean".
        if status is not None and top:
            tags["git_dirty"] = "true" if _dirty(status, pipeline_outputs(Path(top))) else "false"
    for var, tag in DVC_EXP_TAGS.items():
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    if data_hash:
        tags["data_hash"] = data_hash
    if weights_hash:
        tags["weights_hash"] = weights_hash
    return tags


@contextlib.contextmanager
def open_run(*, uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
             tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
    """Start (or resume, with ``run_id``) a run; it ends FINISHED, FAILED if the block
    raises, KILLED on Ctrl-C or SIGTERM: never left RUNNING."""
    if run_id:
        tracker = Tracker.resume(uri=uri, run_id=run_id)
        if tags:
            tracker.set_tags(tags)
    else:
        tracker = Tracker.start(uri=uri, experiment=experiment, run_name=run_name, tags=tags)
    try:
        yield tracker
    except BaseException as err:
        tracker.end(status_of(err))
        raise
    tracker.end("FINISHED")
