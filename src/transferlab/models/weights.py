"""Where a backbone's initial weights come from (``backbone.weights``).

- ``null``: the builder's seeded random init;
- ``source``: trained by the pretrain stage on a source task;
- a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ...), fetched
  into torch's hub cache when online;
- a local file: ``.safetensors``, or a state dict read with
  ``torch.load(weights_only=True)`` (pickles that would run code are refused);
- an MLflow model URI of an earlier run (``runs:/<id>/model``,
  ``models:/<name>/<version>``): its backbone's weights
  (:mod:`transferlab.tracking.models`).

Whatever the source, the pretrain stage writes the weights to one
``.safetensors`` file (pinned by ``dvc.lock``) with a JSON sidecar that
records the source and the preprocessing the weights expect.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transferlab.errors import ConfigError, WeightsError
from transferlab.models.backbones import Backbone, is_torchvision

FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MLFLOW_SCHEMES = ("runs:/", "models:/")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def kind_of(spec: str | None) -> str:
    """One of ``none``, ``source``, ``mlflow``, ``file``, ``torchvision``."""
    if spec is None:
        return "none"
    if spec == "source":
        return "source"
    if spec.startswith(MLFLOW_SCHEMES):
        return "mlflow"
    if spec.lower().endswith(FILE_SUFFIXES) or "/" in spec or os.sep in spec:
        return "file"
    return "torchvision"


def torchvision_weight_names(backbone: str) -> list[str]:
    import torchvision

    enum = torchvision.models.get_model_weights(backbone)
    return ["DEFAULT", *enum.__members__.keys() - {"DEFAULT"}]


def check_weights_spec(backbone: str, spec: str | None, *, key: str = "backbone.weights") -> None:
    """Fail early on a weights name or file that cannot work."""

    kind = kind_of(spec)
    if kind == "torchvision":
        if not is_torchvision(backbone):
            raise ConfigError(f"{key}: '{spec}' is not a file, an MLflow URI, 'source' or null, and backbone "
                              f"'{backbone}' has no torchvision weights; expected null, source, a file path "
                              "or runs:/... / models:/...")
        names = torchvision_weight_names(backbone)
        if spec not in names:
            raise ConfigError(f"{key}: Unknown weights '{spec}' for {backbone}; expected one of "
                              f"{sorted(names)}, null, source, a file path or an MLflow model URI")
    elif kind == "file" and not Path(spec).is_file():  # type: ignore[arg-type]
        raise ConfigError(f"{key}: weights file '{spec}' does not exist")


@dataclass
class LoadReport:
    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # replaced-head keys

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "missing": self.missing, "unexpected": self.unexpected,
                "ignored": self.ignored}


def torchvision_state_dict(backbone: str, spec: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torchvision weights from torch's hub cache, downloaded there first when missing.

    Returns the state dict and the preprocessing the weights were trained with.
    """
    import torchvision

    weights = torchvision.models.get_model_weights(backbone)[spec]
    path = hub_checkpoint(weights.url, what=f"{weights} for {backbone}")
    return read_hub_checkpoint(path), torchvision_preprocessing(backbone, spec)


def hub_checkpoint(url: str, *, what: str) -> Path:
    """The cached file for ``url`` under ``$TORCH_HOME/hub/checkpoints``, downloaded
    (hash-checked by torch) when missing."""
    filename = url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_prefix(path), progress=False)
    except Exception as err:  # urllib/socket errors differ by platform and Python version
        raise WeightsError(
            f"Could not get {what} from {url} ({type(err).__name__}: {err}). "
            f"Offline? Download that file elsewhere and put it at {path} "
            "(or point TORCH_HOME at a folder whose hub/checkpoints/ holds it), then run again."
        ) from None
    return path


def _hash_prefix(path: Path) -> str | None:
    """The SHA-256 prefix torchvision puts in its file names (``resnet18-f37072fd.pth``)."""
    match = torch.hub.HASH_REGEX.search(path.name)
    return match.group(1) if match else None


def read_hub_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A hub-cache file, refused unless its SHA-256 matches the prefix in its name.

    torch.hub checks the hash only while downloading, and torchvision loads the
    cached file as a full pickle: a file someone placed in the cache could run
    code. Here every read checks the hash, then loads tensors only.
    """
    import hashlib

    path = Path(path)
    prefix = _hash_prefix(path)
    if prefix:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(prefix):
            raise WeightsError(
                f"Refused {path}: its SHA-256 starts with {digest.hexdigest()[:len(prefix)]}, but its name "
                f"says {prefix}. The file is damaged or not the published one; delete it and download it again."
            )
    return read_weights_file(path)


def torchvision_preprocessing(backbone: str, spec: str) -> dict[str, Any]:
    """Mean, std, crop and resize size of the eval transforms of torchvision's weights ``spec``."""
    import torchvision

    weights = torchvision.models.get_model_weights(backbone)[spec]
    transforms = weights.transforms()
    mean, std = list(transforms.mean), list(transforms.std)
    if backbone == "inception_v3":
        # Its weights were trained on (x - 0.5) / 0.5, which torchvision's
        # `transform_input` recreates from ImageNet-normalised input.
        mean, std = [0.5] * 3, [0.5] * 3
    return {"mean": mean, "std": std, "input_size": int(transforms.crop_size[0]),
            "resize_size": int(transforms.resize_size[0]), "weights": str(weights)}


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a plain tensor pickle (no code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"Refused to load '{path}': it is not a plain state dict that loads with weights_only=True "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). A pickle can run code on load; convert the "
            "file to .safetensors or save only model.state_dict()."
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"'{path}' holds no state dict of tensors")
    return obj


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept whole-model checkpoints of ours and DDP checkpoints."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_backbone_state(backbone: Backbone, state: dict[str, torch.Tensor], *, source: str) -> LoadReport:
    """Load ``state`` into ``backbone``; report missing and unexpected keys.

    Keys of the layers the new head replaces are ignored; any other shape
    mismatch is refused.
    """
    state = _strip(dict(state))
    report = LoadReport(source)
    own = backbone.module.state_dict()
    keep = {}
    mismatched = []
    for key, value in state.items():
        if key.startswith(backbone.replaced_keys):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            keep[key] = value
    if mismatched:
        raise WeightsError(f"weights from {source} do not fit the backbone ({len(mismatched)} shape "
                           f"mismatches): " + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
    if not keep and own:
        raise WeightsError(f"weights from {source} share no keys with the backbone; wrong backbone? "
                           f"(first keys in file: {list(state)[:3]})")
    report.missing = sorted(set(own) - set(keep))
    backbone.module.load_state_dict(keep, strict=False)
    return report


def save_weights(path: str | Path, backbone: Backbone, meta: dict[str, Any]) -> None:
    """Write the backbone's weights and their sidecar JSON atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.module.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    meta_path = weights_meta_path(path)
    meta_path.with_suffix(".tmp").write_text(json.dumps(meta, indent=2))
    os.replace(meta_path.with_suffix(".tmp"), meta_path)


def weights_meta_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def read_weights_meta(path: str | Path) -> dict[str, Any]:
    meta_path = weights_meta_path(path)
    if not meta_path.is_file():
        raise WeightsError(f"'{meta_path}' is missing: run the pretrain stage (dvc repro pretrain)")
    return json.loads(meta_path.read_text())
