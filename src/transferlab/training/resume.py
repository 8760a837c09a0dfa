"""The ``last`` checkpoint: everything an interrupted fit needs to continue exactly where it stopped.

Written atomically after every epoch: the model, optimiser, schedule and EMA
state, every RNG state (Python, NumPy, torch's CPU and CUDA generators, the
batch-order and augmentation generators), the epoch, the best so far with its
weights, the history, and the caller's own entries (the MLflow run id). It
lives outside every DVC output, in ``.transferlab/resume/``, keyed by the
output it belongs to (so DVC neither deletes it before a rerun nor hashes it),
and carries a fingerprint of the configuration and inputs: a checkpoint of
another setting is never resumed. The caller removes it when the stage ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.project import state_dir

LAST = "last.pt"


def rng_state() -> dict[str, Any]:
    """The global generators' states (plain data and tensors: loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LastCheckpoint:
    """The ``last`` checkpoint of the output ``owner`` (a model folder or a weights file) for the
    setting fingerprinted by ``setting``."""

    def __init__(self, owner: str | Path, setting: Any) -> None:
        where = hashlib.sha256(str(Path(owner).resolve()).encode()).hexdigest()[:16]
        self.path = state_dir("resume") / where / LAST
        self.key = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()

    def load(self) -> dict[str, Any] | None:
        """The checkpoint, if there is one for this very setting."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        return state if state.get("key") == self.key else None

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{LAST}.tmp-{os.getpid()}")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
