"""Data-parallel training under ``torchrun`` (``torch.distributed``, DDP).

``torchrun --nproc_per_node=N`` starts N copies of a command and gives each
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`context` joins the process
group they name (NCCL on CUDA, gloo on the CPU) and each process takes GPU
``LOCAL_RANK``. Without torchrun it is the one-process context, and nothing
changes.

What data parallelism changes, and what it keeps:

- **Data.** Each rank holds (or streams) only its shard of a split: the images
  ``rank::world``. An epoch's batch order is one permutation of the whole split,
  drawn from the generator every rank seeds alike; each rank trains on the
  members of its shard in that order. A global batch of ``trainer.batch_size``
  images is ``batch_size / world`` on each rank, so the learning rate, its
  schedule and ``optimizer.lr_base_size`` scaling see the configured batch.
- **Gradients** are averaged over the ranks by DDP (the mean over the global
  batch). Freezing, max-norm and EMA act on the weights after each step, which
  are identical on every rank. ``trainer.sync_batchnorm`` makes BatchNorm use the
  global batch's statistics (``nn.SyncBatchNorm``); otherwise each rank's own.
- **Metrics** are sums reduced over the ranks once per epoch (one collective),
  so every rank reports, early-stops and picks the best epoch alike.
- **Outputs.** Rank 0 alone logs to MLflow and writes checkpoints, metrics and
  DVC outputs; the others train and wait.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from transferlab.errors import ConfigError


@dataclass(frozen=True)
class Context:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that logs and writes."""
        return self.rank == 0


SINGLE = Context()


def context(device: torch.device | None = None) -> Context:
    """The torchrun context of this process, joining its process group on first use (NCCL for CUDA, else
    gloo); one process when not started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    ctx = Context(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return ctx


def device_for(device: torch.device, ctx: Context) -> torch.device:
    """Each rank's own GPU (``cuda:LOCAL_RANK``) under torchrun; ``device`` otherwise."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def local_batch_size(batch_size: int, ctx: Context, key: str = "trainer.batch_size") -> int:
    """Each rank's share of the global batch; refused unless the ranks can share it evenly."""
    if batch_size % ctx.world:
        raise ConfigError(f"{key}: {batch_size} is the global batch of {ctx.world} processes and must be a "
                          f"multiple of {ctx.world}")
    return batch_size // ctx.world


def shard_indices(n: int, ctx: Context) -> slice:
    """The images of this rank's shard of a split of ``n``: ``rank::world``."""
    return slice(ctx.rank, n, ctx.world)


def local_order(order: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The members of this rank's shard in the global ``order`` (a permutation of the whole split), as
    indices into the shard."""
    if not ctx.enabled:
        return order
    return order[order % ctx.world == ctx.rank] // ctx.world


def all_sum(values: list[torch.Tensor], ctx: Context) -> list[torch.Tensor]:
    """``values`` (device scalars) summed over the ranks, in one collective."""
    if not ctx.enabled:
        return values
    import torch.distributed as dist

    stacked = torch.stack([v.double() for v in values])
    dist.all_reduce(stacked)
    return [stacked[i].to(v.dtype) for i, v in enumerate(values)]


def broadcast(value: Any, ctx: Context) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap(model: torch.nn.Module, ctx: Context, device: torch.device) -> torch.nn.Module:
    """``model`` in DDP (what the training steps call), built over the parameters that train now."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
