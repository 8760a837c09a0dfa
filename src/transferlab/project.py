"""Where the project is, wherever a stage or job runs, and its git-ignored state folder."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR = ".transferlab"  # git-ignored: hand-off files, spooled tracking records, live jobs


def project_root() -> Path:
    """The project's folder: ``DVC_ROOT`` in a DVC stage (DVC points it at the parent repo for queued
    and temporary experiments), else the working directory. A copy under ``<project>/.dvc/tmp/exps/``
    maps back to the project too, so that the store and the jobs of all experiments are shared."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    for parent in root.parents:
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return root


def state_dir(name: str) -> Path:
    """A folder of the project's git-ignored run state (``.transferlab/<name>``), created if missing."""
    path = project_root() / STATE_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path
