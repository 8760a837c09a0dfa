"""A GPU of its own for each sweep job that runs beside others.

A job of a Hydra multirun (``hydra/launcher=parallel`` runs several at once) with ``trainer.device=auto``
claims one visible CUDA device for its whole run: the device of its job number modulo the visible count
when that one is free, else the next free one; while every device is taken it waits. A claim is an
exclusive lock on a file named after the device's UUID in the machine's temporary folder, so claims hold
across the sweeps and projects of one user on one machine whatever numbering ``CUDA_VISIBLE_DEVICES`` (or
SLURM) gives the devices, and a claim ends with its process, however the process ends.

Hydra's joblib launcher has no device placement of its own, and setting ``CUDA_VISIBLE_DEVICES`` per job
(``hydra.job.env_set``) does not work there: its worker processes run one job after another and CUDA reads
the variable once per process.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from filelock import FileLock, Timeout


def lock_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"transferlab-gpus-{uid}"


@contextmanager
def claim(job_num: int, device_ids: Sequence[str], locks: Path, *, poll_s: float = 1.0) -> Iterator[int]:
    """Hold the first free of ``device_ids`` (UUIDs, in visible order) starting from ``job_num`` modulo their
    count, waiting ``poll_s`` between rounds while all are held; yield its index."""
    locks.mkdir(parents=True, exist_ok=True)
    n = len(device_ids)
    order = [(job_num + i) % n for i in range(n)]
    waiting = False
    while True:
        for index in order:
            lock = FileLock(locks / f"{device_ids[index]}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield index
            finally:
                lock.release()
            return
        if not waiting:
            print(f"sweep job {job_num}: every GPU ({n}) is taken by another job; waiting for one")
            waiting = True
        time.sleep(poll_s)


@contextmanager
def job_device(device: str, job_num: int) -> Iterator[str]:
    """The device a sweep job trains on: ``cuda:<k>``, claimed for the job (see the module), for ``auto``
    where CUDA is present; ``device`` itself otherwise (a device named explicitly is never claimed)."""
    import torch

    if device != "auto" or not torch.cuda.is_available():
        yield device
        return
    ids = [str(torch.cuda.get_device_properties(k).uuid) for k in range(torch.cuda.device_count())]
    with claim(job_num, ids, lock_dir()) as index:
        print(f"sweep job {job_num}: cuda:{index} (claimed for this job)")
        yield f"cuda:{index}"
