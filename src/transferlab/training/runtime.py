"""Device choice, seeding and CPU threads."""

from __future__ import annotations

import atexit
import os
import random
from pathlib import Path

import numpy as np
import torch

from transferlab.errors import ConfigError
from transferlab.project import state_dir


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else MPS (Apple silicon) when present, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device: '{name}', but CUDA is not available here; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device: '{name}', but MPS (Apple silicon) is not available here; use auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_job_file: Path | None = None


def configure_threads(num_threads: int | None) -> None:
    """Use ``num_threads`` CPU threads, or (null) share the CPUs with the project's other training
    processes: this one registers itself, and :func:`share_threads` splits the CPUs among the live ones."""
    global _job_file
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        return
    if _job_file is None:
        _job_file = state_dir("jobs") / str(os.getpid())  # one file per training process running now
        _job_file.touch()
        atexit.register(_job_file.unlink, missing_ok=True)
    share_threads()


def share_threads() -> None:
    """Threads = CPUs // live training processes of this project (at least 1). Called at every epoch,
    so a job that starts or ends rebalances the others; a no-op when ``trainer.num_threads`` is set."""
    if _job_file is None:
        return
    live = 0
    for path in _job_file.parent.iterdir():
        if path.name.isdigit() and _alive(int(path.name)):
            live += 1
        else:
            path.unlink(missing_ok=True)  # left by a killed process
    torch.set_num_threads(max(1, _cpu_count() // max(live, 1)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _cpu_count() -> int:
    """CPUs this process may use: ``OMP_NUM_THREADS`` when set (torch's own setting, which a plain
    ``torch.set_num_threads`` would otherwise override), else its affinity mask (taskset, SLURM), else all."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
