"""Data-parallel throughput: the pipeline's training under ``torchrun`` against one plain process.

The same training (``build_training``, as finetune uses it; the same global batch) runs in this process,
then under ``torchrun --standalone --nproc_per_node=K`` for each K of ``--procs`` (NCCL on GPUs, gloo on
the CPU). Prints images/s (global: every process's images) and the ratio to the plain process measured
in the same run. One process under torchrun is the plain code path (no process group), so its ratio is
the launcher's cost; more processes show the scaling.

    python benchmarks/bench_ddp.py --backbone resnet18 --size 64 --images 20000 --procs 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import digits_images  # noqa: E402

from transferlab.config.schema import (  # noqa: E402
    BackboneConfig, DropoutConfig, ExperimentConfig, HeadConfig, OptimizerConfig, RegularisationConfig,
    SchedulerConfig, TrainerConfig,
)
from transferlab.data.prepared import PreparedData, Split  # noqa: E402
from transferlab.training.build import build_training  # noqa: E402
from transferlab.training.runtime import resolve_device  # noqa: E402


def rate(args: argparse.Namespace) -> tuple[float, bool]:
    """Images/s of the whole job from the end of the first (warm-up) epoch to the end of the last, and
    whether this process is the one that reports (rank 0)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the CPUs shared alike (torchrun sets 1)
    images, labels = digits_images(args.images)
    cfg = ExperimentConfig(
        backbone=BackboneConfig(name=args.backbone, channels=1, input_size=args.size, width=16),
        head=HeadConfig(name="linear"), regularisation=RegularisationConfig(dropout=DropoutConfig(input=0.0)),
        optimizer=OptimizerConfig(name="sgd", lr=0.01, momentum=0.9), scheduler=SchedulerConfig(name="none"),
        trainer=TrainerConfig(epochs=args.epochs + 1, batch_size=args.batch, eval_batch_size=args.batch,
                              amp=args.amp, progress=False))
    val = images[:args.batch], labels[:args.batch]
    data = PreparedData({"train": Split(images, labels), "val": Split(*val), "test": Split(*val)},
                        [str(i) for i in range(10)], mean=[0.3], std=[0.3])
    torch.manual_seed(0)
    t = build_training(cfg, data, device=resolve_device(args.device))
    ends: list[float] = []
    t.fit(t.batches(data, "train"), t.batches(data, "val"), on_epoch_end=lambda *_: ends.append(time.perf_counter()))
    return args.epochs * len(images) / (ends[-1] - ends[0]), t.ctx.main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256, help="the global batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="torchrun processes to measure")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun process
    args = parser.parse_args()
    if args.worker:
        value, main_rank = rate(args)
        if main_rank:
            print(json.dumps({"rate": value}))
        return
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.backbone} at {args.size}px, global batch {args.batch}, {args.images} images x {args.epochs} "
          f"epochs on {name} ({torch.cuda.device_count() if device.type == 'cuda' else 'gloo'}), "
          f"torch {torch.__version__}")
    plain, _ = rate(args)
    print(f"{'one process':<34} {plain:>10.0f} img/s   1.00x")
    forwarded = ["--backbone", args.backbone, "--size", str(args.size), "--images", str(args.images), "--batch",
                 str(args.batch), "--epochs", str(args.epochs), "--device", args.device, *(["--amp"] * args.amp)]
    for k in args.procs:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
                               __file__, *forwarded, "--worker"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"torchrun with {k} processes failed:\n{proc.stderr[-3000:]}")
        value = json.loads(proc.stdout.strip().splitlines()[-1])["rate"]
        print(f"{f'torchrun, {k} process' + ('es' if k > 1 else ''):<34} {value:>10.0f} img/s {value / plain:>6.2f}x")


if __name__ == "__main__":
    main()
