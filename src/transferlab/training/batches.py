"""How a split's batches reach the device: resident, or streamed from the prepared files.

:class:`Batches` keeps a split on the device as uint8 for the whole run; a batch
is an index into it. :class:`StreamedBatches` keeps only the labels there and
gathers each batch's images from host memory (a memory-mapped prepared file, so
a split may be larger than RAM), a background thread reading ahead into pinned
memory and a side CUDA stream copying ahead, so the copies overlap compute.
Both yield the same batches for the same order, so the training loop, the
augmentation and the results do not depend on which path ran.

:func:`place_splits` chooses, per split, against ``trainer.memory_budget_mb``.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from transferlab.errors import ConfigError

PREFETCH = 2  # batches read ahead by the streaming thread (each also holds one copy on the device)


@dataclass
class Batches:
    """A split resident on the device."""

    images: torch.Tensor  # uint8 [N, C, H, W], on the device
    labels: torch.Tensor  # int64 [N], on the device
    total: int | None = None  # under torchrun, these are one rank's shard of a split of this many images

    placement = "resident"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def split_len(self) -> int:
        """The whole split's size (the shard's own where there are no shards)."""
        return len(self) if self.total is None else self.total

    @property
    def device(self) -> torch.device:
        return self.images.device

    def train_batches(self, order: torch.Tensor, batch_size: int, steps: int
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` batches in ``order`` (a CPU permutation)."""
        order = order.to(self.device, non_blocking=True)
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            yield self.images[idx], self.labels[idx]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


class StreamedBatches:
    """A split whose images stay in host memory (typically memory-mapped) and stream to the device."""

    placement = "stream"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, *,
                 total: int | None = None) -> None:
        self.images = images  # uint8 [N, C, H, W], on the host
        self.labels = labels.to(device)  # small: resident
        self._device = torch.device(device)
        self.total = total  # as Batches.total

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def split_len(self) -> int:
        return len(self) if self.total is None else self.total

    @property
    def device(self) -> torch.device:
        return self._device

    def train_batches(self, order: torch.Tensor, batch_size: int, steps: int
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order_device = order.to(self.device, non_blocking=True)
        spans = [(step * batch_size, (step + 1) * batch_size) for step in range(steps)]
        host = self._read_ahead([order[a:b] for a, b in spans])
        for (a, b), x in zip(spans, self._copy_ahead(host)):
            yield x, self.labels[order_device[a:b]]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spans = [(start, start + batch_size) for start in range(0, len(self), batch_size)]
        host = self._read_ahead([slice(a, b) for a, b in spans])
        for (a, b), x in zip(spans, self._copy_ahead(host)):
            yield x, self.labels[a:b]

    def _read_ahead(self, selections: list) -> Iterator[torch.Tensor]:
        """The images of each selection, gathered on the host by a background thread (file reads and
        the gather release the GIL), ``PREFETCH`` ahead, pinned when they go to a GPU."""
        pin = self.device.type == "cuda"
        ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()

        def work() -> None:
            try:
                for sel in selections:
                    x = self.images[sel]
                    x = x.pin_memory() if pin else x.contiguous()
                    while not stop.is_set():
                        try:
                            ready.put(x, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as err:  # handed to the consumer, raised there
                ready.put(err)

        thread = threading.Thread(target=work, name="transferlab-stream", daemon=True)
        thread.start()
        try:
            for _ in selections:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def _copy_ahead(self, host: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Host batches on the device; on CUDA the next batch's copy runs on a side stream while the
        current one computes."""
        if self.device.type != "cuda":
            for x in host:
                yield x.to(self.device)
            return
        copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        def start(x: torch.Tensor) -> torch.Tensor:
            with torch.cuda.stream(copy_stream):
                return x.to(self.device, non_blocking=True)

        pending = None
        for x in host:
            nxt = start(x)
            if pending is not None:
                compute.wait_stream(copy_stream)
                pending.record_stream(compute)
                yield pending
            pending = nxt
        if pending is not None:
            compute.wait_stream(copy_stream)
            pending.record_stream(compute)
            yield pending


def split_bytes(images: torch.Tensor) -> int:
    return int(images.numel()) * images.element_size()


def memory_budget(budget_mb: float | None, device: torch.device) -> int:
    """Bytes the training data may occupy: ``trainer.memory_budget_mb``, else half of the free memory
    of the device (a GPU's, or on the CPU the host's available RAM)."""
    if budget_mb is not None:
        return int(budget_mb * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def place_splits(sizes: dict[str, int], batch_bytes: int, budget: int) -> dict[str, str]:
    """``resident`` or ``stream`` per split (bytes in ``sizes``), smallest first while they fit in
    ``budget``; streaming needs room for its read-ahead (``batch_bytes`` each). Refuses, naming the
    keys, when not even streaming fits."""
    stream_need = (PREFETCH + 2) * batch_bytes
    if stream_need > budget:
        raise ConfigError(
            f"trainer.memory_budget_mb: {budget / 2**20:.3g} MB cannot hold even the streamed batches "
            f"({stream_need / 2**20:.3g} MB for trainer.batch_size at the stored image size); raise the budget "
            "or lower trainer.batch_size")
    placement, left = {}, budget - stream_need
    for name, size in sorted(sizes.items(), key=lambda kv: kv[1]):
        if size <= left:
            placement[name], left = "resident", left - size
        else:
            placement[name] = "stream"
    return {name: placement[name] for name in sizes}
