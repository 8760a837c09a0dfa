"""Augmentation throughput: each ``augment`` preset on a uint8 batch on the device (CUDA when present).

Prints images/s of each preset alone, and of a training step (resnet18 forward + backward, unless
``--model none``) with the preset as a ratio to the same step without augmentation. ``--compare``
also times the alternatives the presets' implementation was chosen over (see
``transferlab/training/augment.py``): v2's ``resized_crop`` looped per sample against the batched
``grid_sample``, and every TrivialAugment op on the whole batch then ``torch.where``-selected against
the per-sample identity magnitudes.

    python benchmarks/bench_augment.py                    # 256 x 3 x 224 x 224, resnet18 steps
    python benchmarks/bench_augment.py --model none --batch 64 --compare
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from transferlab.config.schema import AugmentConfig
from transferlab.training.augment import _AutoAugment, _warp, create_augment

PRESETS = {
    "flip": {},
    "light": {},
    "standard": {},
    "standard(rand)": {"policy": "rand"},
    "digits": {},
    "light+mixup+cutmix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="input side; the crops' output side too")
    parser.add_argument("--model", default="resnet18", help="torchvision model for the step, or none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="also time the alternatives not chosen")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device, generator=g)
    y = torch.randint(0, 10, (args.batch,), device=device, generator=g)
    print(f"device {device}, batch {tuple(x.shape)} uint8, {args.repeats} repeats")

    step: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    if args.model != "none":
        import torchvision

        model = torchvision.models.get_model(args.model, num_classes=10).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(images: torch.Tensor, targets: torch.Tensor) -> None:
            loss = F.cross_entropy(model(images.float() / 255), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()

        plain = timed(lambda: step(x, y), device, args.repeats)
        print(f"{'none':>20}: step {args.batch / plain:8.1f} images/s")

    for name, keys in PRESETS.items():
        augment = create_augment(AugmentConfig(name=name.split("(")[0].split("+")[0], **keys),  # type: ignore[arg-type]
                                 size=args.size, num_classes=10)
        assert augment is not None
        alone = timed(lambda: augment(x, y, g), device, args.repeats)
        line = f"{name:>20}: alone {args.batch / alone:8.1f} images/s"
        if step is not None:
            with_step = timed(lambda: step(*augment(x, y, g)), device, args.repeats)
            line += f", step {args.batch / with_step:8.1f} images/s = {plain / with_step:.3f} x no augmentation"
        print(line)

    if args.compare:
        compare(x, g, device, args.repeats)


def compare(x: torch.Tensor, g: torch.Generator, device: torch.device, repeats: int) -> None:
    n, size = x.shape[0], x.shape[-1]
    crop = AugmentConfig(name="light")
    from transferlab.training.augment import _crop_and_flip

    def per_sample() -> torch.Tensor:
        # v2's kernel takes one crop per call: a Python loop over the batch (parameters fixed here,
        # which only flatters the loop)
        return torch.stack([TF.resized_crop(img, 10, 20, size // 2, size // 2, [size, size]) for img in x])

    def batched() -> torch.Tensor:
        return _warp(x, _crop_and_flip(x, g, crop, size), size, size)

    print(f"random-resized-crop: v2 per-sample loop {n / timed(per_sample, device, repeats):8.1f} images/s, "
          f"batched grid_sample {n / timed(batched, device, repeats):8.1f} images/s")

    ops = _AutoAugment("trivial", size=size, num_ops=1, magnitude=0)

    def identity_magnitudes() -> torch.Tensor:  # what the standard preset does
        d = ops.draw(n, g, device)
        return ops.colour(x, d)

    def every_op_then_select() -> torch.Tensor:
        # Every pixel op fully on the whole batch with v2's kernels (one magnitude each: v2 takes a
        # scalar), then torch.where picks each sample's
        outputs = [x, TF.adjust_brightness(x, 1.5), TF.adjust_saturation(x, 1.5), TF.adjust_contrast(x, 1.5),
                   TF.adjust_sharpness(x, 1.5), TF.posterize(x, 4), TF.solarize(x, 128),
                   TF.autocontrast(x), TF.equalize(x)]
        op = torch.randint(len(outputs), (n,), device=device, generator=g).view(-1, 1, 1, 1)
        out = outputs[0]
        for k, candidate in enumerate(outputs[1:], start=1):
            out = torch.where(op == k, candidate, out)
        return out

    print(f"TrivialAugment pixel ops: per-sample identity magnitudes {n / timed(identity_magnitudes, device, repeats):8.1f}"
          f" images/s, every op then where-select {n / timed(every_op_then_select, device, repeats):8.1f} images/s")


if __name__ == "__main__":
    main()
