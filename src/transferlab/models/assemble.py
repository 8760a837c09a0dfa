"""Preprocessing + backbone + head, assembled from a :class:`ModelSpec`.

The assembled model takes raw ``uint8`` images ``[N, C, H, W]`` (or floats
in 0..255) and does its own preprocessing on whatever device it lives on:
scale to [0, 1], adapt channels, resize and centre-crop to the backbone's
input size, normalise. Data therefore stays compact on the device, and the
model logged to MLflow predicts from raw images exactly as in training.

The spec is decided once, from the config, the prepared data and the
weights' metadata (:meth:`ModelSpec.decide`), and saved beside the
checkpoint (:func:`save_spec`): ``evaluate``, predictions and the logged
model rebuild the model from it alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config.schema import BackboneConfig, DropoutConfig, ExperimentConfig, HeadConfig
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.heads import Head, create_head


class Preprocess(nn.Module):
    """uint8 -> [0, 1] -> channels -> resize to ``resize`` (square) -> centre crop ``size`` -> normalise.

    As torchvision's eval transforms (resize 256, crop 224): images stored larger than the input
    are centre-cropped, smaller ones are resized up. ``resize`` defaults to ``size`` (no crop).

    ``forward`` takes the stored images (``in_channels``, square) and skips the resize when they
    already have the size it would give (training's fast path); :meth:`serve` takes images of any
    size in 1 or 3 channels and always resizes, without a branch on the input's shape, so that
    ``torch.export`` keeps the batch, channels, height and width dynamic. On the stored images both
    give the same pixels: a resize to the size an image already has is the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, mean: list[float], std: list[float],
                 *, resize: int | None = None) -> None:
        super().__init__()
        resize = size if resize is None else resize
        if resize < size:
            raise ValueError(f"resize ({resize}) must be at least the crop size ({size})")
        if in_channels not in (1, 3) or out_channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {in_channels} -> {out_channels}")
        if len(mean) != out_channels or len(std) != out_channels:
            raise ValueError(f"normalisation needs {out_channels} means and stds, got {mean}, {std}")
        self.in_channels, self.out_channels, self.size, self.resize = in_channels, out_channels, size, resize
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if self.in_channels == 1 and self.out_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif self.in_channels == 3 and self.out_channels == 1:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        h, w = x.shape[-2], x.shape[-1]
        if (h, w) != (self.size, self.size):  # an input already at the crop size (augmented) passes as it is
            if (h, w) != (self.resize, self.resize):
                x = self._resize(x)
            x = self._crop(x)
        return (x - self.mean) / self.std

    def serve(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` of any size, ``C`` 1 or 3: the centre square (as ``prepare`` keeps
        it), resized and cropped like the stored images. Channels are converted by indexing and
        weighting instead of branching: grey to RGB takes channel ``min(i, C - 1)`` for each ``i``
        (a copy of the grey channel), RGB to grey weighs by ``luma[:C] / sum(luma[:C])`` (1 for grey),
        the very values ``forward`` computes."""
        x = x.float() / 255.0
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        if self.out_channels == 3:
            x = x.index_select(1, torch.arange(3, device=x.device).clamp(max=c - 1))
        else:
            luma = self.luma[:, :c]
            x = (x * (luma / luma.sum())).sum(dim=1, keepdim=True)
        side = torch.sym_min(h, w)
        square = torch.arange(side, device=x.device)
        x = x.index_select(2, square + (h - side) // 2).index_select(3, square + (w - side) // 2)
        return (self._crop(self._resize(x)) - self.mean) / self.std

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        # Antialiased like the prepare-time resize, so shrinking at train time does not alias either.
        return F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                             antialias=True)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize == self.size:
            return x
        top = (self.resize - self.size) // 2
        return x[..., top:top + self.size, top:top + self.size]


class FineTuneModel(nn.Module):
    """``preprocess -> input dropout -> backbone -> feature dropout -> head``.

    In training mode a backbone with an auxiliary branch (inception_v3)
    makes ``forward`` return ``(logits, aux_logits)``.
    """

    def __init__(self, preprocess: Preprocess, backbone: nn.Module, head: Head, *, input_dropout: float = 0.0,
                 feature_dropout: float = 0.0, aux_head: nn.Module | None = None) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        self.backbone = backbone
        self.feature_dropout = nn.Dropout(feature_dropout) if feature_dropout > 0 else nn.Identity()
        self.head = head
        self.aux_head = aux_head

    def features(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.pixel_features(self.preprocess(x))

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(self.input_dropout(pixels))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.classify(self.preprocess(x))

    def classify(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The head's output for preprocessed ``pixels``."""
        out = self.pixel_features(pixels)
        aux = None
        if isinstance(out, tuple):  # torchvision's InceptionOutputs(logits, aux_logits)
            out, aux = out[0], out[1]
        logits = self.head(self.feature_dropout(out))
        if self.training and aux is not None and self.aux_head is not None:
            return logits, self.aux_head(aux)
        return logits


class ServingModel(nn.Module):
    """The trained model as it is served: raw ``uint8`` images ``[N, C, H, W]`` of any batch size and
    size, ``C`` 1 or 3 (:meth:`Preprocess.serve`), in; class probabilities ``[N, classes]`` out, one
    output form for every head (a binary head's single logit becomes the two classes' probabilities).
    What the MLflow model, the ONNX export and ``predict`` run."""

    def __init__(self, model: FineTuneModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        return model.head.probabilities(model.classify(model.preprocess.serve(images)))


def serving_trace(side: int) -> tuple[torch.Tensor, dict[int, Any]]:
    """The example input and the dynamic dimensions ``torch.export`` traces :class:`ServingModel` with
    (batch, channels 1 to 3, height and width all free), at about ``side`` pixels."""
    from torch.export import Dim

    # Sizes 0 and 1 would be specialised: trace with two 3-channel images, not square (a square
    # example would let height and width share one symbol).
    example = torch.zeros(2, 3, side, side + 1, dtype=torch.uint8)
    return example, {0: Dim("batch"), 1: Dim("channels", min=1, max=3), 2: Dim("height"), 3: Dim("width")}


def export_serving(model: FineTuneModel, *, side: int) -> torch.export.ExportedProgram:
    """:class:`ServingModel` of ``model`` (eval mode) as a ``torch.export`` program (:func:`serving_trace`)."""
    example, dims = serving_trace(side)
    return torch.export.export(ServingModel(model).eval(), (example,), dynamic_shapes=(dims,))


@dataclass
class Normalisation:
    mean: list[float]
    std: list[float]

    @classmethod
    def for_channels(cls, mean: Sequence[float], std: Sequence[float], channels: int) -> "Normalisation":
        """Statistics for the channels the backbone sees (grey repeated to RGB, RGB averaged to grey)."""
        if len(mean) == channels:
            return cls(list(mean), list(std))
        if len(mean) == 1:
            return cls(list(mean) * channels, list(std) * channels)
        return cls([sum(mean) / len(mean)], [sum(std) / len(std)])


SPEC_FILE = "model_spec.json"
# torchvision's eval transforms resize to 256 for a 224 crop: what is kept when data is stored larger.
DEFAULT_CROP_FRACTION = 224 / 256


@dataclass
class ModelSpec:
    """Everything that rebuilds the trained model and feeds it, decided once."""

    backbone: BackboneConfig  # with input_size decided
    head: HeadConfig
    dropout: DropoutConfig
    class_names: list[str]
    data_channels: int  # channels of the stored images the model is fed
    mean: list[float]  # normalisation, per channel the backbone sees ([0, 1] scale)
    std: list[float]
    resize: int  # stored images are resized to this square, then centre-cropped to backbone.input_size
    stored_size: int  # the side of the square images it was trained on (the prepared data's); predict decodes to it

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> int:
        return int(self.backbone.input_size)  # type: ignore[arg-type]

    @classmethod
    def decide(cls, cfg: ExperimentConfig, *, class_names: list[str], data_channels: int, data_size: int,
               data_mean: Sequence[float] | None = None, data_std: Sequence[float] | None = None,
               weights_meta: dict[str, Any] | None = None) -> "ModelSpec":
        """Input size: the configured one, else the weights' own, else the data's (at least the
        backbone's minimum). Normalisation: the weights' own statistics, else the training data's.
        Resize: images stored larger than the input are resized to the input's crop fraction
        (the weights' own, else torchvision's 224/256), never past their stored size, then cropped."""
        meta = weights_meta or {}
        cfg = resolve_input_size(cfg, weights_size=meta.get("input_size"), data_size=data_size)
        size = int(cfg.backbone.input_size)  # type: ignore[arg-type]
        channels = cfg.backbone.channels
        if "mean" in meta:
            norm = Normalisation.for_channels(meta["mean"], meta["std"], channels)
        elif data_mean is not None and data_std is not None:
            norm = Normalisation.for_channels(data_mean, data_std, channels)
        else:
            norm = Normalisation([0.0] * channels, [1.0] * channels)
        resize = size
        if data_size > size:
            fraction = size / meta["resize_size"] if meta.get("resize_size") else DEFAULT_CROP_FRACTION
            resize = min(data_size, max(size, round(size / fraction)))
        return cls(backbone=cfg.backbone, head=cfg.head, dropout=cfg.regularisation.dropout,
                   class_names=list(class_names), data_channels=int(data_channels), mean=norm.mean, std=norm.std,
                   resize=int(resize), stored_size=int(data_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        from omegaconf import OmegaConf

        def typed(schema: type, value: dict[str, Any]) -> Any:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))

        # A spec saved before stored_size was recorded: images decoded at the resize size reach the
        # backbone as its stored images did (Preprocess crops them without resampling).
        return cls(**{"stored_size": d["resize"], **d, "backbone": typed(BackboneConfig, d["backbone"]),
                      "head": typed(HeadConfig, d["head"]), "dropout": typed(DropoutConfig, d["dropout"])})


def save_spec(spec: ModelSpec, model_dir: str | Path) -> Path:
    """Write the spec beside the checkpoint (atomically)."""
    path = Path(model_dir) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(spec.to_dict(), indent=2))
    os.replace(tmp, path)
    return path


def load_spec(model_dir: str | Path) -> ModelSpec:
    from transferlab.errors import WeightsError

    path = Path(model_dir) / SPEC_FILE
    if not path.is_file():
        raise WeightsError(f"'{path}' is missing: run the finetune stage (dvc repro finetune)")
    return ModelSpec.from_dict(json.loads(path.read_text()))


def build_model(spec: ModelSpec) -> tuple[FineTuneModel, Backbone]:
    """Assemble the model ``spec`` describes (fresh weights)."""
    backbone = build_backbone(spec.backbone)
    head = build_head(spec.head, spec.dropout, in_features=backbone.out_features, num_classes=spec.num_classes)
    preprocess = Preprocess(spec.data_channels, spec.backbone.channels, spec.input_size, spec.mean, spec.std,
                            resize=spec.resize)
    aux_head = None
    if backbone.aux_features is not None:
        aux_units = head.out.out_features if not head.overcomplete else spec.num_classes
        aux_head = nn.Linear(backbone.aux_features, aux_units)
    model = FineTuneModel(preprocess, backbone.module, head, input_dropout=spec.dropout.input,
                          feature_dropout=spec.dropout.features, aux_head=aux_head)
    return model, backbone


def resolve_input_size(cfg: ExperimentConfig, *, weights_size: int | None, data_size: int) -> ExperimentConfig:
    """``cfg`` with ``backbone.input_size`` decided: the configured size, else
    the weights' own, else the data's (at least the backbone's minimum)."""
    from transferlab.models.backbones import min_input_size

    size = cfg.backbone.input_size
    if size is None:
        size = weights_size if weights_size else max(data_size, min_input_size(cfg.backbone.name))
    return replace(cfg, backbone=replace(cfg.backbone, input_size=int(size)))


def build_backbone(cfg: BackboneConfig) -> Backbone:
    return create_backbone(cfg.name, channels=cfg.channels, input_size=cfg.input_size, width=cfg.width,
                           depth=cfg.depth, hidden=list(cfg.hidden), activation=cfg.activation)


def build_head(cfg: HeadConfig, drop: DropoutConfig, *, in_features: int, num_classes: int) -> Head:
    dropouts = list(drop.per_layer) if drop.per_layer is not None else [drop.hidden] * len(cfg.hidden)
    head = create_head(cfg.name, in_features=in_features, num_classes=num_classes, hidden=list(cfg.hidden),
                       activations=list(cfg.activations), dropouts=dropouts, num_units=cfg.num_units,
                       pooling=cfg.pooling)
    if cfg.init == "normal":
        for module in head.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.05)
                nn.init.zeros_(module.bias)
    return head
