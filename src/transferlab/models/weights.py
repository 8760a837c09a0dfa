"""Where a backbone's initial weights come from (``backbone.weights``).

- ``null``: the builder's seeded random init;
- ``source``: trained by the pretrain stage on a source task;
- a name of the weights published for the backbone (kind ``published``):
  torchvision's (``DEFAULT``, ``IMAGENET1K_V1``, ...), fetched into torch's hub
  cache when online; timm's (``DEFAULT`` or a pretrained tag such as
  ``augreg_in21k_ft_in1k``), fetched into the Hugging Face hub cache when
  online. The backbone's registry entry names the source (``info["weights"]``, a key of
  :data:`PUBLISHED`: :class:`TorchvisionWeights`, :class:`TimmWeights`);
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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from transferlab.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    from transferlab.config.schema import BackboneConfig
    from transferlab.models.backbones import Backbone, Layer

FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MLFLOW_SCHEMES = ("runs:/", "models:/")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def kind_of(spec: str | None) -> str:
    """One of ``none``, ``source``, ``mlflow``, ``file``, ``published``."""
    if spec is None:
        return "none"
    if spec == "source":
        return "source"
    if spec.startswith(MLFLOW_SCHEMES):
        return "mlflow"
    if spec.lower().endswith(FILE_SUFFIXES) or "/" in spec or os.sep in spec:
        return "file"
    return "published"


class PublishedWeights(Protocol):
    """Where a backbone family's published weights come from."""

    def names(self, backbone: str) -> list[str]:
        """The weights names ``backbone.weights`` may give (``DEFAULT`` first)."""

    def preprocessing(self, backbone: str, spec: str) -> dict[str, Any]:
        """What the weights expect: mean, std, input_size, resize_size (and ``weights``, their full name)."""

    def ensure(self, backbone: str, spec: str) -> None:
        """Before any work: fail when the weights cannot be had."""

    def state_dict(self, cfg: "BackboneConfig", spec: str) -> dict[str, torch.Tensor]:
        """The weights, for the backbone ``cfg`` builds (its input size decided)."""


def published_weights(backbone: str) -> PublishedWeights | None:
    """The source of ``backbone``'s published weights (None: it has none): its registry entry names one of
    :data:`PUBLISHED` (``info["weights"]``)."""
    from transferlab.models.backbones import BACKBONES

    name = BACKBONES[backbone].info.get("weights")
    return PUBLISHED[name] if name else None


def torchvision_weight_names(backbone: str) -> list[str]:
    import torchvision

    enum = torchvision.models.get_model_weights(backbone)
    return ["DEFAULT", *enum.__members__.keys() - {"DEFAULT"}]


def check_weights_spec(backbone: str, spec: str | None, *, key: str = "backbone.weights") -> None:
    """Fail early on a weights name or file that cannot work."""

    kind = kind_of(spec)
    if kind == "published":
        source = published_weights(backbone)
        if source is None:
            raise ConfigError(f"{key}: '{spec}' is not a file, an MLflow URI, 'source' or null, and backbone "
                              f"'{backbone}' has no published weights; expected null, source, a file path "
                              "or runs:/... / models:/...")
        names = source.names(backbone)
        if not names:
            raise ConfigError(f"{key}: {backbone} has no published weights; expected null, source, a file path "
                              "or an MLflow model URI")
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


class TorchvisionWeights:
    """Torchvision's weights enums (``get_model_weights``), fetched into torch's hub cache by the pretrain stage,
    which fails there, naming the folder, when offline."""

    def names(self, backbone: str) -> list[str]:
        return torchvision_weight_names(backbone)

    def preprocessing(self, backbone: str, spec: str) -> dict[str, Any]:
        return torchvision_preprocessing(backbone, spec)

    def ensure(self, backbone: str, spec: str) -> None:
        """Nothing before work: the pretrain stage fetches them (:func:`hub_checkpoint`)."""

    def state_dict(self, cfg: "BackboneConfig", spec: str) -> dict[str, torch.Tensor]:
        return torchvision_state_dict(cfg.name, spec)[0]


class TimmWeights:
    """timm's pretrained weights of ``timm/<name>``: ``DEFAULT`` (timm's default tag) or a tag
    (``timm.list_pretrained()`` lists ``<name>.<tag>``), from the Hugging Face hub cache
    (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), downloaded there when missing and online.
    Their preprocessing is ``timm.data.resolve_data_config``'s: mean, std, input size, and
    ``floor(input_size / crop_pct)`` as the resize before the centre crop (timm's eval transform; the
    model resizes bilinearly where timm's weights may name bicubic)."""

    def _arch(self, backbone: str) -> str:
        from transferlab.models.backbones import TIMM_PREFIX

        return backbone[len(TIMM_PREFIX):]

    def _cfg(self, backbone: str, spec: str) -> Any:
        from transferlab.models.backbones import import_timm

        arch = self._arch(backbone)
        return import_timm().models.get_pretrained_cfg(arch if spec == "DEFAULT" else f"{arch}.{spec}")

    def names(self, backbone: str) -> list[str]:
        from transferlab.models.backbones import import_timm

        arch = self._arch(backbone)
        tags = [n.partition(".")[2] for n in import_timm().list_pretrained(arch) if n.partition(".")[0] == arch]
        return ["DEFAULT", *tags] if tags else []

    def preprocessing(self, backbone: str, spec: str) -> dict[str, Any]:
        from timm.data import resolve_data_config

        cfg = self._cfg(backbone, spec)
        data = resolve_data_config(pretrained_cfg=cfg.to_dict())
        size = int(data["input_size"][-1])
        return {"mean": list(data["mean"]), "std": list(data["std"]), "input_size": size,
                "resize_size": math.floor(size / data["crop_pct"]), "weights": f"{backbone}.{cfg.tag}"}

    def ensure(self, backbone: str, spec: str) -> None:
        self.file(backbone, spec)

    def file(self, backbone: str, spec: str) -> Path:
        """The weights file in the Hugging Face hub cache, downloaded there when missing."""
        import huggingface_hub
        from huggingface_hub import constants

        cfg = self._cfg(backbone, spec)
        if not cfg.hf_hub_id:
            return hub_checkpoint(cfg.url, what=f"timm weights {backbone}.{cfg.tag}")
        repo, filename = cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors"
        cached = huggingface_hub.try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
        try:
            return Path(huggingface_hub.hf_hub_download(repo, filename))
        except Exception as err:  # connection, offline-mode and hub errors differ by huggingface_hub version
            raise WeightsError(
                f"Could not get the timm weights {backbone}.{cfg.tag} (Hugging Face repo {repo}, file {filename}): "
                f"{type(err).__name__}. Offline? On a machine online, run "
                f"`hf download {repo} {filename}` (or load the model once with timm), then copy its cache folder "
                f"models--{repo.replace('/', '--')} into {constants.HF_HUB_CACHE} (the Hugging Face hub cache: "
                "HF_HUB_CACHE, default ~/.cache/huggingface/hub) and run again."
            ) from None

    def state_dict(self, cfg: "BackboneConfig", spec: str) -> dict[str, torch.Tensor]:
        """The weights as the backbone holds them: read here (tensors only), then put through timm's own
        loading (its checkpoint filter: position embeddings resized to the input size, input channels
        adapted, classifier dropped)."""
        from transferlab.models.backbones import import_timm, timm_build_kwargs

        timm = import_timm()
        arch, tag = self._arch(cfg.name), self._cfg(cfg.name, spec).tag
        state = read_weights_file(self.file(cfg.name, spec))
        model = timm.create_model(f"{arch}.{tag}", pretrained=True, pretrained_cfg_overlay={"state_dict": state},
                                  **timm_build_kwargs(arch, channels=cfg.channels, input_size=int(cfg.input_size)))
        return model.state_dict()


# Where each family's published weights come from, by the name its backbone entry gives.
PUBLISHED: dict[str, PublishedWeights] = {"torchvision": TorchvisionWeights(), "timm": TimmWeights()}


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
    if backbone.adapt_state is not None:
        state = backbone.adapt_state(state)
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


def reinit_choice(backbone: Backbone, n: int, frozen: frozenset[str] | set[str] = frozenset(),
                  *, prefix: str = "backbone.") -> list[Layer]:
    """The last ``n`` layers (:func:`~transferlab.models.backbones.backbone_layers`) that
    ``backbone.reinit_last_n`` re-initialises. Refused: more layers than the backbone has, and a layer
    that freezing keeps fixed (``frozen``: the model's parameter names, ``prefix`` before the backbone's),
    which would stay random. Build and preflight both ask here."""
    from transferlab.models.backbones import backbone_layers

    layers = backbone_layers(backbone)
    if n > len(layers):
        raise ConfigError(f"backbone.reinit_last_n={n}, but the backbone has only {len(layers)} layers: "
                          f"{[layer.name for layer in layers]}")
    chosen = layers[len(layers) - n:] if n else []
    fixed = [layer.name for layer in chosen if any(prefix + p in frozen for p in layer.params)]
    if fixed:
        raise ConfigError(f"backbone.reinit_last_n={n} re-initialises {fixed}, which regularisation.freeze "
                          "also freezes: they would stay random; re-initialise fewer layers "
                          "(backbone.reinit_last_n=0: none) or freeze fewer")
    return chosen


def reinit_last_layers(backbone: Backbone, layers: list[Layer], fresh: Backbone) -> None:
    """Give ``layers`` of the backbone (:func:`reinit_choice`) the weights of ``fresh``, the same backbone
    freshly initialised (its own init, as ``weights=null`` gets): parameters and buffers (BatchNorm
    statistics) alike. The other layers keep what was loaded."""
    own, new = backbone.module.state_dict(), fresh.module.state_dict()
    keys: set[str] = set()
    for layer in layers:
        path = layer.name.split("+")[0]
        keys.update(layer.params)
        keys.update(k for k in own if k.startswith(path + "."))
    backbone.module.load_state_dict({k: new[k] for k in keys}, strict=False)


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
