"""Training throughput: this project's loop against a common baseline.

Baseline: a typical loop — a DataLoader over CPU tensors, a host-to-device
copy per batch, fp32, NCHW, and ``loss.item()`` every step. Then the
project's loop (data resident on the device as uint8, no per-step sync),
alone and with bf16 autocast, channels-last and both, and the same with the
training split streamed from host memory (a memory budget that holds only
the streamed batches). Prints images/s and the ratio to the baseline
measured in the same run, and streamed against resident.

    python benchmarks/bench_training.py --backbone resnet18 --size 64 --images 20000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from transferlab.config.schema import (
    BackboneConfig, DropoutConfig, ExperimentConfig, HeadConfig, OptimizerConfig, RegularisationConfig,
    SchedulerConfig, TrainerConfig,
)
from transferlab.data.prepared import PreparedData, Split
from transferlab.models.assemble import FineTuneModel, Preprocess
from transferlab.models.backbones import create_backbone
from transferlab.models.heads import create_head
from transferlab.training.build import build_training


def digits_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits, repeated to ``n`` images (uint8, 1x8x8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(n) % len(d.target)
    images = torch.from_numpy(np.round(d.images[idx] * 255 / 16).astype(np.uint8)).unsqueeze(1)
    return images.contiguous(), torch.from_numpy(d.target[idx].astype(np.int64))


def build(backbone: str, size: int, device: torch.device) -> FineTuneModel:
    torch.manual_seed(0)
    bb = create_backbone(backbone, channels=3, input_size=size)
    head = create_head("linear", in_features=bb.out_features, num_classes=10)
    return FineTuneModel(Preprocess(1, 3, size, [0.3] * 3, [0.3] * 3), bb.module, head).to(device)


def baseline(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    model = build(args.backbone, args.size, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=args.batch,
                                         shuffle=True, drop_last=True)
    model.train()
    seen, started = 0, None
    for epoch in range(args.epochs + 1):  # the first epoch warms up
        if epoch == 1:
            _sync(device)
            started, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = model.head.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # the usual per-step logging
            seen += y.shape[0]
    _sync(device)
    return seen / (time.perf_counter() - started)


def ours(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor, device: torch.device, *,
         amp: bool, channels_last: bool, compile: bool = False, stream: bool = False) -> float:
    """The pipeline's own training (``build_training``, as finetune uses it) on the same model and data.
    One warm-up epoch first (cuDNN autotuning, allocator, compilation); the rate is timed from the end
    of the first epoch to the end of the last (each epoch end is a host sync)."""
    cfg = ExperimentConfig(
        backbone=BackboneConfig(name=args.backbone, channels=3, input_size=args.size),
        head=HeadConfig(name="linear"), regularisation=RegularisationConfig(dropout=DropoutConfig(input=0.0)),
        optimizer=OptimizerConfig(name="sgd", lr=0.01, momentum=0.9), scheduler=SchedulerConfig(name="none"),
        trainer=TrainerConfig(epochs=args.epochs + 1, batch_size=args.batch, eval_batch_size=args.batch, amp=amp,
                              channels_last=channels_last, compile=compile, progress=False,
                              # A budget that holds only the streamed batches: the training split streams.
                              memory_budget_mb=(8 * args.batch * images[0].numel() / 2**20) if stream else None))
    val = images[:args.batch], labels[:args.batch]
    data = PreparedData({"train": Split(images, labels), "val": Split(*val), "test": Split(*val)},
                        [str(i) for i in range(10)], mean=[0.3], std=[0.3])
    torch.manual_seed(0)
    t = build_training(cfg, data, device=device)
    ends: list[float] = []
    assert t.placement["train"] == ("stream" if stream else "resident"), t.placement
    t.fit(t.batches(data, "train"), t.batches(data, "val"), on_epoch_end=lambda *_: ends.append(time.perf_counter()))
    return args.epochs * len(images) / (ends[-1] - ends[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    images, labels = digits_images(args.images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.backbone} at {args.size}px, batch {args.batch}, {args.images} images x {args.epochs} epochs "
          f"on {name}, torch {torch.__version__}")
    base = baseline(args, images, labels, device)
    print(f"{'baseline (DataLoader, fp32, sync per step)':<46} {base:>10.0f} img/s   1.00x")
    variants = [("device-resident data, no per-step sync", False, False, False, False),
                ("streamed from host memory (memory budget)", False, False, False, True)]
    if device.type == "cuda":
        variants += [("  + bf16 autocast", True, False, False, False), ("  + channels-last", False, True, False, False),
                     ("  + bf16 + channels-last", True, True, False, False),
                     ("  + bf16 + channels-last, streamed", True, True, False, True)]
        if args.compile:
            variants.append(("  + bf16 + channels-last + compile", True, True, True, False))
    rates = {}
    for label, amp, cl, comp, stream in variants:
        rates[label] = rate = ours(args, images, labels, device, amp=amp, channels_last=cl, compile=comp,
                                   stream=stream)
        print(f"{label:<46} {rate:>10.0f} img/s {rate / base:>6.2f}x")
    pairs = [("device-resident data, no per-step sync", "streamed from host memory (memory budget)"),
             ("  + bf16 + channels-last", "  + bf16 + channels-last, streamed")]
    for resident, streamed in pairs:
        if resident in rates and streamed in rates:
            print(f"streamed / resident ({resident.strip(' +')}): {rates[streamed] / rates[resident]:.2f}x")


if __name__ == "__main__":
    main()
