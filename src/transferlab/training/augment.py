"""Training-time augmentation (config group ``augment``).

An entry builds an :data:`Augment`: a callable that the training step applies to each uint8 batch
``[N, C, H, W]`` on the device, before the model's own preprocessing. It returns the augmented uint8
batch and the targets: the labels unchanged, or soft targets ``[N, num_classes]`` (float) when the
choice mixes images (mixup, cutmix). Its randomness is drawn per sample from the ``generator`` it is
given, never from the global RNG: the training loop owns that generator (seeded, on the batch's
device), so a run with augmentation is reproducible. Everything is batched tensor work on the device,
with no host sync (no ``.item()``, no Python branch on a tensor's value). Evaluation never augments,
and ``pretrain`` does not either.

Choices:

- ``none``: nothing (:func:`create_augment` returns None and the loop skips it);
- ``flip``: horizontal flip with probability ``p``; the input's shape is kept;
- ``light``: random-resized-crop to the model's input size (``scale``, ``ratio``) and flip;
- ``standard``: torchvision's reference classification recipe: random-resized-crop, flip,
  TrivialAugmentWide (``policy: trivial``, the recipe's ``ta_wide``) or RandAugment
  (``policy: rand``, ``num_ops``, ``magnitude``) or neither, then random erasing (``erase_p``);
- ``digits``: small rotations (``degrees``) and shifts (``translate``) with black fill and no flip,
  as Keras' RandomRotation/RandomTranslation for MNIST; the input's shape is kept.

Every choice but ``none`` also takes mixup/cutmix on the whole batch after the per-sample
transforms (``mixup_alpha``, ``cutmix_alpha``, ``mix_prob``, ``switch_prob``: timm's ``Mixup``
arguments, ``prob`` renamed ``mix_prob`` beside the other probabilities of the group).

Geometry (crop, flip, rotation, shear, translation) is one affine map per sample, applied by one
batched ``grid_sample`` with bilinear interpolation; see :func:`_warp` for why (measured).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from transferlab.config.schema import AugmentConfig, ExperimentConfig
from transferlab.registry import Registry

# (uint8 images [N, C, H, W], int64 labels [N], generator on their device)
#   -> (uint8 images [N, C, H', W'], labels [N] unchanged or float soft targets [N, num_classes])
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
# (config, *, size: the model's input side, num_classes) -> Augment, or None for no augmentation
AugmentBuilder = Callable[..., Optional[Augment]]
AUGMENTATIONS: Registry[AugmentBuilder] = Registry("augment.name", what="augmentation")
register_augmentation = AUGMENTATIONS.register

MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob")
POLICIES = ["trivial", "rand", "none"]
MAGNITUDE_BINS = 31  # torchvision's num_magnitude_bins for TrivialAugmentWide and RandAugment
DIGIT_SOURCES = ("digits", "mnist")  # data sources whose classes a mirror image changes

# An image stage: (uint8 images, generator) -> uint8 images
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def list_augmentations() -> list[str]:
    return AUGMENTATIONS.names()


def create_augment(cfg: AugmentConfig, *, size: int, num_classes: int) -> Augment | None:
    """The configured augmentation for a model that sees ``size`` x ``size`` images of
    ``num_classes`` classes; None when it does nothing (the loop then skips it)."""
    return AUGMENTATIONS[cfg.name].build(cfg, size=size, num_classes=num_classes)


def augment_warnings(cfg: ExperimentConfig) -> list[str]:
    """What is legal but probably a mistake in ``cfg``'s augmentation (printed once, before work)."""
    a = cfg.augment
    if AUGMENTATIONS[a.name].info.get("flips") and a.p > 0 and cfg.data.source in DIGIT_SOURCES:
        return [f"augment={a.name} flips images horizontally (augment.p={a.p}) but data.source="
                f"{cfg.data.source}: flipped digits change meaning; augment=digits shifts and rotates "
                "them without flipping"]
    return []


class _Pipeline:
    """The per-sample image stages in order, then the batch's mixing (if any)."""

    def __init__(self, stages: Sequence[Transform], mix: _Mix | None) -> None:
        self.stages, self.mix = list(stages), mix

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        for stage in self.stages:
            x = stage(x, generator)
        return (x, y) if self.mix is None else self.mix(x, y, generator)


def _pipeline(cfg: AugmentConfig, num_classes: int, *stages: Transform) -> Augment:
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
    return _Pipeline(stages, _Mix(cfg, num_classes) if mixing else None)


@register_augmentation("none")
def _none(cfg: AugmentConfig, *, size: int, num_classes: int) -> None:
    return None


@register_augmentation("flip", keys=("p", *MIX_KEYS), flips=True)
def _flip(cfg: AugmentConfig, *, size: int, num_classes: int) -> Augment:
    p = cfg.p

    # torchvision.transforms.v2.RandomHorizontalFlip draws one decision per call (the whole batch)
    # from the global RNG; here each sample draws its own from the loop's generator, and only the
    # flip itself is torchvision's kernel. torch.where keeps it free of host syncs.
    def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        chosen = torch.rand(x.shape[0], device=x.device, generator=generator) < p
        return torch.where(chosen.view(-1, 1, 1, 1), TF.horizontal_flip(x), x)

    return _pipeline(cfg, num_classes, flip)


@register_augmentation("light", keys=("p", "scale", "ratio", *MIX_KEYS), flips=True)
def _light(cfg: AugmentConfig, *, size: int, num_classes: int) -> Augment:
    def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _warp(x, _crop_and_flip(x, generator, cfg, size), size, size)

    return _pipeline(cfg, num_classes, crop_flip)


@register_augmentation("standard", keys=("p", "scale", "ratio", "policy", "num_ops", "magnitude", "erase_p",
                                         *MIX_KEYS), flips=True)
def _standard(cfg: AugmentConfig, *, size: int, num_classes: int) -> Augment:
    ops = _AutoAugment(cfg.policy, size=size, num_ops=cfg.num_ops, magnitude=cfg.magnitude)

    def crop_flip_auto(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        crop = _crop_and_flip(x, generator, cfg, size)
        if not ops.rounds:
            return _warp(x, crop, size, size)
        # The first op's geometry (identity for a sample whose op is not geometric) joins the crop's
        # warp: one resampling instead of two. Each later op needs the earlier ones' result: its own warp.
        first = ops.draw(x.shape[0], generator, x.device)
        x = ops.colour(_warp(x, crop, size, size, inner=first.geometry), first)
        for _ in range(ops.rounds - 1):
            later = ops.draw(x.shape[0], generator, x.device)
            x = ops.colour(_warp(x, later.geometry, size, size), later)
        return x

    def erase(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _erase(x, generator, cfg.erase_p)

    return _pipeline(cfg, num_classes, crop_flip_auto, erase)


@register_augmentation("digits", keys=("degrees", "translate", *MIX_KEYS))
def _digits(cfg: AugmentConfig, *, size: int, num_classes: int) -> Augment:
    def rotate_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        u = torch.rand(n, 3, device=x.device, generator=generator) * 2 - 1  # [-1, 1): angle, dx, dy
        angle = torch.deg2rad(u[:, 0] * cfg.degrees)
        shift = _affine(1, 0, -u[:, 1] * cfg.translate * w, 0, 1, -u[:, 2] * cfg.translate * h)
        return _warp(x, _rotation(angle, (w - 1) / 2, (h - 1) / 2) @ shift, h, w)

    return _pipeline(cfg, num_classes, rotate_shift)


# --- geometry ----------------------------------------------------------------------------------------
# A map is a batch of 3x3 matrices [N, 3, 3] taking an output pixel (x, y, 1) to the source pixel it
# shows; pixel (x, y) is the centre of column x, row y.

def _affine(a, b, c, d, e, f) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[N, 3, 3] maps x_src = a x + b y + c, y_src = d x + e y + f (tensors [N] or numbers)."""
    like = next(v for v in (a, b, c, d, e, f) if isinstance(v, torch.Tensor))
    # numbers become fills on the device, not host-to-device copies
    rows = [v.float().expand_as(like) if isinstance(v, torch.Tensor) else torch.full_like(like, v, dtype=torch.float32)
            for v in (a, b, c, d, e, f)]
    n = like.shape[0]
    zero, one = torch.zeros_like(rows[0]), torch.ones_like(rows[0])
    return torch.stack([*rows, zero, zero, one], dim=1).view(n, 3, 3)


def _rotation(angle: torch.Tensor, cx: float, cy: float) -> torch.Tensor:
    """Rotates the content by ``angle`` (radians, per sample) about (cx, cy), counter-clockwise
    for a positive angle as torchvision's ``rotate``."""
    cos, sin = angle.cos(), angle.sin()
    return _affine(cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def _warp(x: torch.Tensor, outer: torch.Tensor, height: int, width: int,
          inner: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` resampled onto ``height`` x ``width``: output pixel p shows source pixel ``outer @ p``,
    or with ``inner``, ``outer @ inner @ p`` and black where ``inner @ p`` falls outside the output
    frame (an op applied to the ``outer``-warped image, its outside filled black as torchvision's
    ``affine`` fills it, but with a single resampling). Bilinear; outside the source is black.

    Why one batched ``grid_sample`` rather than torchvision's kernels per sample: v2's
    ``resized_crop``/``affine`` take one set of parameters per call, so per-sample parameters mean a
    Python loop over the batch. Measured on the CPU (2 shared cores, loaded), 256 x 3 x 256 x 256
    uint8 to 224 x 224: per-sample ``TF.resized_crop`` 4.5 s (antialiased) / 4.9 s (not), batched
    ``grid_sample`` 2.3 s; on a GPU the loop is also 256 kernel launches and more per step, the grid one.
    The cost: no antialiasing when a crop is shrunk (torchvision's tensor ``resized_crop`` antialiases),
    and ops that TrivialAugment applies with nearest interpolation are bilinear here.
    """
    n, _, h_in, w_in = x.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=x.device, dtype=torch.float32),
                            torch.arange(width, device=x.device, dtype=torch.float32), indexing="ij")
    pixels = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # [H, W, 3]
    to_source = outer if inner is None else outer @ inner
    source = torch.einsum("nij,hwj->nhwi", to_source[:, :2], pixels)
    # grid_sample's coordinates (align_corners=False): -1 and 1 are the outer edges of the source
    grid = torch.stack([(source[..., 0] + 0.5) * (2.0 / w_in), (source[..., 1] + 0.5) * (2.0 / h_in)], dim=-1) - 1
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if inner is not None:
        frame = torch.einsum("nij,hwj->nhwi", inner[:, :2], pixels)
        inside = ((frame >= -0.5).all(-1) & (frame[..., 0] <= width - 0.5) & (frame[..., 1] <= height - 0.5))
        out = out * inside.unsqueeze(1)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _sized_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                 generator: torch.Generator, device: torch.device, *, whole: bool,
                 tries: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample a box's (height, width) with area ``scale`` x the image's and width / height in
    ``ratio`` (log-uniform), and whether one fitted: torchvision's ``RandomResizedCrop.get_params`` /
    ``RandomErasing.get_params``, batched: each sample draws all ``tries`` candidates at once and keeps
    the first that fits (``whole``: the box may be the whole image), so no Python loop waits on values."""
    u = torch.rand(n, tries, 2, device=device, generator=generator)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w <= width) & (h <= height) if whole else (w < width) & (h < height)
    fits &= (w >= 1) & (h >= 1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first True (0 when none is)
    return h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1), fits.any(dim=1)


def _placed(extent: torch.Tensor, room: int, generator: torch.Generator) -> torch.Tensor:
    """A start for each box of ``extent`` pixels along a side of ``room``, uniform over 0..room-extent."""
    u = torch.rand(extent.shape[0], device=extent.device, generator=generator)
    return (u * (room - extent + 1)).floor()


def _crop_and_flip(x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig, size: int) -> torch.Tensor:
    """Per sample the map of a random-resized-crop to ``size`` x ``size`` (torchvision's parameters:
    ``scale``, ``ratio``, 10 tries, else the central crop of the nearest allowed ratio), mirrored
    with probability ``cfg.p``."""
    n, _, height, width = x.shape
    h, w, found = _sized_boxes(n, height, width, cfg.scale, cfg.ratio, generator, x.device, whole=True)
    fallback_w, fallback_h = float(width), float(height)  # torchvision's fallback: the central crop
    if width / height < min(cfg.ratio):
        fallback_h = float(round(width / min(cfg.ratio)))
    elif width / height > max(cfg.ratio):
        fallback_w = float(round(height * max(cfg.ratio)))
    h, w = torch.where(found, h, fallback_h), torch.where(found, w, fallback_w)
    top = torch.where(found, _placed(h, height, generator), (height - h).div(2, rounding_mode="floor"))
    left = torch.where(found, _placed(w, width, generator), (width - w).div(2, rounding_mode="floor"))
    flip = torch.rand(n, device=x.device, generator=generator) < cfg.p
    sx, sy = w / size, h / size
    # x_src = left + (x + 0.5) * sx - 0.5, or mirrored: left + (size - x - 0.5) * sx - 0.5
    return _affine(torch.where(flip, -sx, sx), 0, left - 0.5 + torch.where(flip, size - 0.5, 0.5) * sx,
                   0, sy, top - 0.5 + 0.5 * sy)


def _box_mask(top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
              height: int, width: int) -> torch.Tensor:
    """[N, 1, H, W]: True inside each sample's box (rows top..top+h-1, columns left..left+w-1)."""
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def _erase(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """torchvision's RandomErasing (area 2-33%, width/height 0.3-3.3), per sample with probability ``p``.
    The recipe erases to 0 after normalisation, i.e. to the normalisation's mean; on uint8 before the
    model's preprocessing, the box takes the image's own mean colour, its closest stand-in."""
    n, _, height, width = x.shape
    h, w, found = _sized_boxes(n, height, width, (0.02, 0.33), (0.3, 3.3), generator, x.device, whole=False)
    top, left = _placed(h, height, generator), _placed(w, width, generator)
    chosen = found & (torch.rand(n, device=x.device, generator=generator) < p)
    mask = _box_mask(top, left, h, w, height, width) & chosen.view(-1, 1, 1, 1)
    mean = x.float().mean(dim=(2, 3), keepdim=True).round_().to(torch.uint8)
    return torch.where(mask, mean, x)


# --- TrivialAugmentWide / RandAugment ----------------------------------------------------------------

class _Draw:
    """One round of ops for a batch: each sample's op, its magnitude, and the op's geometry."""

    def __init__(self, op: torch.Tensor, magnitude: torch.Tensor, geometry: torch.Tensor) -> None:
        self.op, self.magnitude, self.geometry = op, magnitude, geometry


class _AutoAugment:
    """torchvision's ``TrivialAugmentWide`` (one op per sample, random magnitude bin) and
    ``RandAugment`` (``num_ops`` ops per sample, fixed ``magnitude`` bin), with their op lists and
    magnitudes (``_AUGMENTATION_SPACE``), drawn per sample and applied to the whole batch at once.

    v2's kernels take one op and magnitude per call, and grouping the samples by op needs the groups'
    sizes on the host (a sync per step). Here every op runs on the whole batch with a per-sample
    magnitude that is the identity for the samples that did not choose it: the geometric ops are one
    affine map per sample (:func:`_warp`, shared with the crop); brightness, saturation, contrast and
    sharpness blend each image with its own degenerate image (black, grey, grey mean, blurred: v2's
    kernels at factor 0) by a per-sample factor, 1 for the others; posterize masks bits per sample
    (8 bits for the others); solarize thresholds per sample (256 for the others); autocontrast and
    equalize (v2's batched kernels) are ``torch.where``-selected. The alternative, every op computed
    by v2's kernels for the whole batch and then ``torch.where``-selected, cannot give per-sample
    magnitudes (v2 takes one scalar) and is no faster: measured with ``benchmarks/bench_augment.py
    --compare`` on 256 x 3 x 224 x 224 uint8 on the CPU (2 shared cores, loaded), 36.2 images/s here
    against 36.4 for it. On the CPU the blur of the sharpness op (v2's kernel, ~40%) and equalize
    (~15%) dominate; the GPU was not measured.
    """

    def __init__(self, policy: str, *, size: int, num_ops: int, magnitude: int) -> None:
        self.policy, self.magnitude = policy, magnitude
        self.rounds = {"trivial": 1, "rand": num_ops, "none": 0}[policy]
        wide = policy == "trivial"
        bins = torch.arange(MAGNITUDE_BINS, dtype=torch.float32)
        linear = lambda top: torch.linspace(0.0, top, MAGNITUDE_BINS)  # noqa: E731
        shear, shift = (0.99, 32.0) if wide else (0.3, 150.0 / 331.0 * size)
        levels = 6 if wide else 4  # posterize: 8 bits down to 2 (wide) or 4
        # (name, magnitudes per bin or None, signed): torchvision's _AUGMENTATION_SPACE
        space = [
            ("Identity", None, False),
            ("ShearX", linear(shear), True), ("ShearY", linear(shear), True),
            ("TranslateX", linear(shift), True), ("TranslateY", linear(shift), True),
            ("Rotate", linear(135.0 if wide else 30.0), True),
            ("Brightness", linear(0.99 if wide else 0.9), True), ("Color", linear(0.99 if wide else 0.9), True),
            ("Contrast", linear(0.99 if wide else 0.9), True), ("Sharpness", linear(0.99 if wide else 0.9), True),
            ("Posterize", (8 - bins / ((MAGNITUDE_BINS - 1) / levels)).round(), False),
            ("Solarize", linear(1.0).flip(0), False),
            ("AutoContrast", None, False), ("Equalize", None, False),
        ]
        self.names = [name for name, _, _ in space]
        self._table = torch.stack([m if m is not None else torch.zeros(MAGNITUDE_BINS) for _, m, _ in space])
        self._signed = torch.tensor([signed for _, _, signed in space])
        self.size = size
        self._devices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The magnitude table and signs on ``device`` (copied there once)."""
        if device not in self._devices:
            self._devices[device] = self._table.to(device), self._signed.to(device)
        return self._devices[device]

    def _is(self, op: torch.Tensor, name: str) -> torch.Tensor:
        return op == self.names.index(name)

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> _Draw:
        table, signed = self._on(device)
        op = torch.randint(len(self.names), (n,), device=device, generator=generator)
        if self.policy == "trivial":
            level = torch.randint(MAGNITUDE_BINS, (n,), device=device, generator=generator)
        else:
            level = torch.full((n,), self.magnitude, device=device)
        negative = torch.rand(n, device=device, generator=generator) <= 0.5  # as torchvision: rand <= 0.5
        m = table[op, level]
        m = torch.where(signed[op] & negative, -m, m)
        return _Draw(op, m, self._geometry(op, m))

    def _geometry(self, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Each sample's map for its op: shears about the top-left corner (torchvision's
        ``center=[0, 0]``), shifts by whole pixels, rotation about the centre; identity otherwise."""
        c = (self.size - 1) / 2
        shift = -m.trunc()
        maps = {
            "ShearX": _affine(1, m, 0.5 * m, 0, 1, 0),
            "ShearY": _affine(1, 0, 0, m, 1, 0.5 * m),
            "TranslateX": _affine(1, 0, shift, 0, 1, 0),
            "TranslateY": _affine(1, 0, 0, 0, 1, shift),
            "Rotate": _rotation(torch.deg2rad(m), c, c),
        }
        geometry = _affine(1, 0, torch.zeros_like(m), 0, 1, 0)
        for name, matrix in maps.items():
            geometry = torch.where(self._is(op, name).view(-1, 1, 1), matrix, geometry)
        return geometry

    def colour(self, x: torch.Tensor, d: _Draw) -> torch.Tensor:
        """The pixel ops of ``d`` on uint8 ``x`` (the geometric ones are already in the warp)."""
        op, m = d.op, d.magnitude.view(-1, 1, 1, 1)
        is_ = lambda name: self._is(op, name).view(-1, 1, 1, 1)  # noqa: E731
        xf = x.float()
        grey = TF.rgb_to_grayscale(xf) if x.shape[1] == 3 else xf
        # Each blend op mixes the image with its degenerate image: factor * x + (1 - factor) * degenerate
        degenerate = torch.where(is_("Brightness"), 0.0,
                     torch.where(is_("Contrast"), grey.mean(dim=(1, 2, 3), keepdim=True),  # noqa: E128
                     torch.where(is_("Color"), grey, TF.adjust_sharpness(x, 0.0).float())))  # noqa: E128
        blends = is_("Brightness") | is_("Contrast") | is_("Sharpness") | (is_("Color") & (x.shape[1] == 3))
        factor = torch.where(blends, 1.0 + m, 1.0)
        x = (factor * xf + (1 - factor) * degenerate).round_().clamp_(0, 255).to(torch.uint8)
        bits = torch.where(is_("Posterize"), m, 8.0).to(torch.int32)
        x = x & ((0xFF << (8 - bits)) & 0xFF).to(torch.uint8)
        threshold = torch.where(is_("Solarize"), 255.0 * m, 256.0)
        x = torch.where(x >= threshold, 255 - x, x)
        x = torch.where(is_("AutoContrast"), TF.autocontrast(x), x)
        return torch.where(is_("Equalize"), TF.equalize(x), x)


# --- mixup / cutmix ----------------------------------------------------------------------------------

class _Beta:
    """Samples Beta(alpha, alpha) from a generator on any device, without host syncs.

    torch.distributions.Beta draws through the global RNG (``torch._standard_gamma`` takes no
    generator), so it cannot be seeded per run. Here: the inverse CDF, tabulated once by SciPy at
    4097 quantiles and interpolated linearly at a uniform draw (error < 1e-3 in lambda: invisible in
    a uint8 blend)."""

    POINTS = 4097

    def __init__(self, alpha: float) -> None:
        from scipy.special import betaincinv

        grid = torch.linspace(0.0, 1.0, self.POINTS, dtype=torch.float64)
        self._quantiles = torch.from_numpy(betaincinv(alpha, alpha, grid.numpy())).float()
        self._devices: dict[torch.device, torch.Tensor] = {}

    def _on(self, device: torch.device) -> torch.Tensor:
        """The quantiles on ``device`` (copied there once)."""
        if device not in self._devices:
            self._devices[device] = self._quantiles.to(device)
        return self._devices[device]

    def __call__(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        q = self._on(device)
        at = torch.rand(n, device=device, generator=generator) * (self.POINTS - 1)
        below = at.floor().long().clamp_(max=self.POINTS - 2)
        return torch.lerp(q[below], q[below + 1], at - below)


class _Mix:
    """timm's ``Mixup`` with ``mode='elem'`` (a lambda per sample) on a uint8 batch: each sample is
    mixed with the next one in the batch (``roll(1)``, as torchvision's MixUp/CutMix) with
    probability ``mix_prob``, by cutmix (probability ``switch_prob`` when both alphas are > 0) or
    mixup, lambda ~ Beta(alpha, alpha); cutmix pastes a box of area ~ (1 - lambda) (timm's
    ``rand_bbox``, clipped) and its lambda becomes the kept area's share (timm's ``correct_lam``).

    Images stay uint8: mixup blends in float and rounds back (round(lam * a + (1 - lam) * b)); the
    rounding is at most half a grey level, while a float batch would be 4x the memory and traffic of
    uint8 for every later step. Targets are the exact ``lam * onehot(y) + (1 - lam) * onehot(y_next)``.
    """

    def __init__(self, cfg: AugmentConfig, num_classes: int) -> None:
        self.num_classes, self.mix_prob = num_classes, cfg.mix_prob
        self.mixup = _Beta(cfg.mixup_alpha) if cfg.mixup_alpha > 0 else None
        self.cutmix = _Beta(cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else None
        self.switch_prob = cfg.switch_prob if self.mixup and self.cutmix else float(self.cutmix is not None)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, height, width = x.shape
        device = x.device
        u = torch.rand(n, 4, device=device, generator=generator)
        mixed, cut = u[:, 0] < self.mix_prob, u[:, 1] < self.switch_prob
        lam = torch.ones(n, device=device)
        if self.mixup is not None:
            lam = torch.where(cut, lam, self.mixup(n, generator, device))
        if self.cutmix is not None:
            # timm's rand_bbox: a box of (1 - lam)'s square root x each side, centred anywhere, clipped
            side = (1 - self.cutmix(n, generator, device)).sqrt()
            half_h, half_w = (height * side).floor().div(2, rounding_mode="floor"), (width * side).floor().div(
                2, rounding_mode="floor")
            cy, cx = (u[:, 2] * height).floor(), (u[:, 3] * width).floor()
            top, bottom = (cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height)
            left, right = (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)
            boxed = cut & mixed
            box = _box_mask(top, left, bottom - top, right - left, height, width) & boxed.view(-1, 1, 1, 1)
            lam = torch.where(cut, 1 - (bottom - top) * (right - left) / (height * width), lam)
        lam = torch.where(mixed, lam, 1.0)
        partner = x.roll(1, dims=0)
        if self.mixup is not None:
            blend = lam.view(-1, 1, 1, 1).where(~cut.view(-1, 1, 1, 1), 1.0)
            x = torch.lerp(partner.float(), x.float(), blend).round_().to(torch.uint8)
        if self.cutmix is not None:
            x = torch.where(box, partner, x)
        one_hot = F.one_hot(y, self.num_classes).float()
        targets = lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot.roll(1, dims=0)
        return x, targets
