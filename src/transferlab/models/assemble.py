"""Preprocessing + backbone + head, assembled from config.

The assembled model takes raw ``uint8`` images ``[N, C, H, W]`` (or floats
in 0..255) and does its own preprocessing on whatever device it lives on:
scale to [0, 1], adapt channels, resize to the backbone's input size,
normalise. Data therefore stays compact on the device, and the model logged
to MLflow predicts from raw images exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config.schema import BackboneConfig, ExperimentConfig, HeadConfig
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.heads import Head, create_head


class Preprocess(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, size: int, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if in_channels not in (1, 3) or out_channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {in_channels} -> {out_channels}")
        if len(mean) != out_channels or len(std) != out_channels:
            raise ValueError(f"normalisation needs {out_channels} means and stds, got {mean}, {std}")
        self.in_channels, self.out_channels, self.size = in_channels, out_channels, size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if self.in_channels == 1 and self.out_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif self.in_channels == 3 and self.out_channels == 1:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            # Antialiased like the prepare-time resize, so shrinking at train time does not alias either.
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std


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
        return self.backbone(self.input_dropout(self.preprocess(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.features(x)
        aux = None
        if isinstance(out, tuple):  # torchvision's InceptionOutputs(logits, aux_logits)
            out, aux = out[0], out[1]
        logits = self.head(self.feature_dropout(out))
        if self.training and aux is not None and self.aux_head is not None:
            return logits, self.aux_head(aux)
        return logits


@dataclass
class Normalisation:
    mean: list[float]
    std: list[float]

    @classmethod
    def for_channels(cls, mean: list[float], std: list[float], channels: int) -> "Normalisation":
        """Statistics for the channels the backbone sees (grey repeated to RGB, RGB averaged to grey)."""
        if len(mean) == channels:
            return cls(list(mean), list(std))
        if len(mean) == 1:
            return cls(list(mean) * channels, list(std) * channels)
        return cls([sum(mean) / len(mean)], [sum(std) / len(std)])


def build_model(cfg: ExperimentConfig, *, num_classes: int, data_channels: int,
                normalisation: Normalisation) -> tuple[FineTuneModel, Backbone]:
    """Assemble the fine-tuning model for ``num_classes`` (fresh weights)."""
    backbone = build_backbone(cfg.backbone)
    head = build_head(cfg.head, cfg, in_features=backbone.out_features, num_classes=num_classes)
    preprocess = Preprocess(data_channels, cfg.backbone.channels, cfg.backbone.input_size,
                            normalisation.mean, normalisation.std)
    aux_head = None
    if backbone.aux_features is not None:
        aux_units = head.out.out_features if not head.overcomplete else num_classes
        aux_head = nn.Linear(backbone.aux_features, aux_units)
    model = FineTuneModel(preprocess, backbone.module, head, input_dropout=cfg.regularisation.dropout.input,
                          feature_dropout=cfg.regularisation.dropout.features, aux_head=aux_head)
    return model, backbone


def resolve_input_size(cfg: ExperimentConfig, *, weights_size: int | None, data_size: int) -> ExperimentConfig:
    """``cfg`` with ``backbone.input_size`` decided: the configured size, else
    the weights' own, else the data's (at least the backbone's minimum)."""
    from dataclasses import replace

    from transferlab.models.backbones import min_input_size

    size = cfg.backbone.input_size
    if size is None:
        size = weights_size if weights_size else max(data_size, min_input_size(cfg.backbone.name))
    return replace(cfg, backbone=replace(cfg.backbone, input_size=int(size)))


def build_backbone(cfg: BackboneConfig) -> Backbone:
    return create_backbone(cfg.name, channels=cfg.channels, input_size=cfg.input_size, width=cfg.width,
                           depth=cfg.depth, hidden=list(cfg.hidden), activation=cfg.activation)


def build_head(cfg: HeadConfig, exp: ExperimentConfig, *, in_features: int, num_classes: int) -> Head:
    drop = exp.regularisation.dropout
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
