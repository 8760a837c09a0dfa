"""Augmented training throughput: the project's training with ``augment=standard`` plus mixup/cutmix,
against the same without augmentation, against a torchvision-style DataLoader pipeline, and streamed
against resident. Every figure is a ratio of rates measured in the same run.

- ours: ``build_training`` + ``Training.fit`` as finetune runs them (data resident on the device as
  uint8, the augmentation batched on the device, bf16 autocast and channels-last on CUDA), with
  ``augment=standard augment.mixup_alpha=0.2 augment.cutmix_alpha=1.0`` and with ``augment=none``;
  and the augmented one with a ``trainer.memory_budget_mb`` that holds only the read-ahead, so the
  training split streams from host memory.
- DataLoader: torchvision's reference recipe as usually written: a Dataset of uint8 images on the
  CPU, ``transforms.v2`` per sample in ``--workers`` worker processes (RandomResizedCrop,
  RandomHorizontalFlip, TrivialAugmentWide, ToDtype/Normalize, RandomErasing), pinned batches, then
  on the device MixUp or CutMix (``RandomChoice``) on the batch and the same model and optimizer
  step (same autocast and memory format as ours, no per-step sync). Its workers persist across
  epochs, its best case.

The images are crops of scikit-learn's two sample photos, stored at ``--stored`` px. Each rate is
timed as bench_training.py times it: one warm-up epoch, then from the end of the first epoch to the
end of the last (each epoch end waits for the device). Ours also validates on one batch per epoch.

    python benchmarks/bench_augment_training.py                  # resnet50, 224 px from 256, on a GPU
    python benchmarks/bench_augment_training.py --backbone small_cnn --size 32 --stored 36 \\
        --images 512 --batch 64 --epochs 1 --workers 2           # a quick check on the CPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torchvision.transforms import v2

from transferlab.config.schema import (
    AugmentConfig, BackboneConfig, DropoutConfig, ExperimentConfig, HeadConfig, OptimizerConfig,
    RegularisationConfig, SchedulerConfig, TrainerConfig,
)
from transferlab.data.prepared import PreparedData, Split
from transferlab.training.build import Training, build_training

CLASSES = 10
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
STANDARD = AugmentConfig(name="standard", mixup_alpha=0.2, cutmix_alpha=1.0)


def photo_images(n: int, stored: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 RGB images ``stored`` px square: random-resized crops of scikit-learn's sample
    photos (at most 512 distinct, repeated), and labels cycling over ``CLASSES``."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(p.copy()).permute(2, 0, 1).contiguous() for p in load_sample_images().images]
    crop = v2.RandomResizedCrop(stored, scale=(0.1, 1.0), antialias=True)
    torch.manual_seed(0)
    distinct = torch.stack([crop(photos[i % len(photos)]) for i in range(min(n, 512))])
    idx = torch.arange(n) % len(distinct)
    return distinct[idx].contiguous(), idx % CLASSES


def experiment(args: argparse.Namespace, device: torch.device, augment: AugmentConfig, *,
               memory_budget_mb: float | None = None) -> ExperimentConfig:
    cuda = device.type == "cuda"
    return ExperimentConfig(
        backbone=BackboneConfig(name=args.backbone, channels=3, input_size=args.size),
        head=HeadConfig(name="linear"), regularisation=RegularisationConfig(dropout=DropoutConfig(input=0.0)),
        optimizer=OptimizerConfig(name="sgd", lr=0.01, momentum=0.9), scheduler=SchedulerConfig(name="none"),
        augment=augment,
        trainer=TrainerConfig(epochs=args.epochs + 1, batch_size=args.batch, eval_batch_size=args.batch, amp=cuda,
                              channels_last=cuda, progress=False, memory_budget_mb=memory_budget_mb))


def prepared(images: torch.Tensor, labels: torch.Tensor, batch: int) -> PreparedData:
    val = Split(images[:batch], labels[:batch])
    return PreparedData({"train": Split(images, labels), "val": val, "test": val},
                        [str(i) for i in range(CLASSES)], mean=MEAN, std=STD)


def training(args: argparse.Namespace, data: PreparedData, device: torch.device, augment: AugmentConfig, *,
             stream: bool = False) -> Training:
    # A budget that holds only the streamed read-ahead (as bench_training.py's): the training split streams.
    budget = 8 * args.batch * data.splits["train"].images[0].numel() / 2**20 if stream else None
    torch.manual_seed(0)
    t = build_training(experiment(args, device, augment, memory_budget_mb=budget), data, device=device)
    assert t.placement["train"] == ("stream" if stream else "resident"), t.placement
    return t


def ours(args: argparse.Namespace, data: PreparedData, device: torch.device, augment: AugmentConfig, *,
         stream: bool = False) -> float:
    t = training(args, data, device, augment, stream=stream)
    ends: list[float] = []
    t.fit(t.batches(data, "train"), t.batches(data, "val"), on_epoch_end=lambda *_: ends.append(time.perf_counter()))
    return args.epochs * len(data.splits["train"]) / (ends[-1] - ends[0])


class PhotoDataset(torch.utils.data.Dataset):
    """uint8 images on the CPU, transformed per sample (torchvision's ``ImageFolder`` + transform, minus
    the decoding)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def dataloader(args: argparse.Namespace, data: PreparedData, device: torch.device) -> float:
    """torchvision's reference classification recipe (``ta_wide``, random erasing 0.1, mixup 0.2,
    cutmix 1.0) on the same model and optimizer as :func:`ours`."""
    transform = v2.Compose([
        v2.RandomResizedCrop(args.size, antialias=True), v2.RandomHorizontalFlip(),
        v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD), v2.RandomErasing(0.1)])
    train = data.splits["train"]
    loader = torch.utils.data.DataLoader(
        PhotoDataset(train.images, train.labels, transform), batch_size=args.batch, shuffle=True, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    mix = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=CLASSES), v2.CutMix(alpha=1.0, num_classes=CLASSES)])
    t = training(args, data, device, AugmentConfig(name="none"))  # the model and optimizer, nothing else
    model, opt, s = t.model, t.optimizer, t.settings
    model.train()
    seen, started = 0, 0.0
    for epoch in range(args.epochs + 1):  # the first epoch warms up
        if epoch == 1:
            _sync(device)
            started, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = mix(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if s.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.amp):
                # Normalised on the CPU already: the backbone and head, without the model's preprocessing.
                logits = model.head(model.backbone(x)).float()
                loss = model.head.loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += y.shape[0]
    _sync(device)
    return seen / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224, help="the model's input side (the crops' side)")
    parser.add_argument("--stored", type=int, default=256, help="the stored images' side")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--workers", type=int, default=16, help="the DataLoader's worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}")
    print(f"torch {torch.__version__}")
    precision = "bf16 autocast + channels-last" if device.type == "cuda" else "fp32"
    print(f"settings: {args.backbone} at {args.size}px from {args.stored}px, batch {args.batch}, {args.images} images "
          f"x {args.epochs} timed epochs (+1 warm-up), {precision}, DataLoader workers {args.workers}")
    images, labels = photo_images(args.images, args.stored)
    data = prepared(images, labels, args.batch)

    rates = {}
    for key, label, run in [
        ("none", "ours, augment=none", lambda: ours(args, data, device, AugmentConfig(name="none"))),
        ("standard", "ours, augment=standard + mixup/cutmix", lambda: ours(args, data, device, STANDARD)),
        ("stream", "ours, augment=standard + mixup/cutmix, streamed",
         lambda: ours(args, data, device, STANDARD, stream=True)),
        ("loader", "DataLoader, v2 transforms + mixup/cutmix", lambda: dataloader(args, data, device)),
    ]:
        rates[key] = run()
        print(f"{label:<50} {rates[key]:>10.1f} img/s")
    print(f"augmented / not augmented (ours): {rates['standard'] / rates['none']:.2f}x")
    print(f"ours / DataLoader (both augmented): {rates['standard'] / rates['loader']:.2f}x")
    print(f"streamed / resident (augmented): {rates['stream'] / rates['standard']:.2f}x")


if __name__ == "__main__":
    main()
