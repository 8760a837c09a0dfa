"""Where backbone weights come from: files, whole-model checkpoints, torchvision's zoo (offline), MLflow URIs.
Real files written to tmp_path; no network is needed (or used when there is none)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from transferlab.config.schema import BackboneConfig, ExperimentConfig
from transferlab.config.validate import ConfigError
from conftest import build_model_for
from transferlab.models.backbones import create_backbone
from transferlab.models.weights import (
    WeightsError,
    check_weights_spec,
    kind_of,
    load_backbone_state,
    read_hub_checkpoint,
    read_weights_file,
    read_weights_meta,
    save_weights,
    torchvision_preprocessing,
    torchvision_state_dict,
    torchvision_weight_names,
)


@pytest.fixture(scope="module")
def resnet18_file_state() -> dict[str, torch.Tensor]:
    """A full torchvision resnet18 state dict (with its 1000-class `fc`), as a zoo file holds it."""
    torch.manual_seed(1)
    return {k: v.clone() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


def _fresh_resnet18():  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    return create_backbone("resnet18", channels=3, input_size=32)


def _assert_loaded(backbone, state: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:  # type: ignore[no-untyped-def]
    own = backbone.module.state_dict()
    for key, value in state.items():
        if key.startswith("fc.") or key in skip:
            continue
        assert torch.equal(own[key], value), key


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_weights_file_round_trip_into_resnet18(suffix: str, resnet18_file_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(resnet18_file_state, str(path))
    else:
        torch.save(resnet18_file_state, path)
    state = read_weights_file(path)
    assert set(state) == set(resnet18_file_state)
    assert all(torch.equal(state[k], v) for k, v in resnet18_file_state.items())

    backbone = _fresh_resnet18()
    assert not torch.equal(backbone.module.conv1.weight, resnet18_file_state["conv1.weight"])
    report = load_backbone_state(backbone, state, source=str(path))
    assert report.source == str(path)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]  # the replaced head
    assert report.missing == [] and report.unexpected == []
    _assert_loaded(backbone, resnet18_file_state)
    assert report.as_dict() == {"source": str(path), "missing": [], "unexpected": [], "ignored": report.ignored}


def test_load_reports_missing_and_unexpected_keys(resnet18_file_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = dict(resnet18_file_state)
    del state["layer4.1.bn2.running_mean"]
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    backbone = _fresh_resnet18()
    kept_mean = backbone.module.layer4[1].bn2.running_mean.clone()
    report = load_backbone_state(backbone, read_weights_file(path), source="partial")
    assert report.missing == ["layer4.1.bn2.running_mean", "layer4.1.bn2.weight"]
    assert report.unexpected == ["extra.weight"]
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert torch.equal(backbone.module.layer4[1].bn2.running_mean, kept_mean)  # missing keys keep their init
    _assert_loaded(backbone, state, skip={"extra.weight"})


def test_whole_model_checkpoint_with_backbone_prefix(tmp_path: Path) -> None:
    """The finetune stage's best.pt (preprocess + backbone + head) can seed a new backbone."""
    torch.manual_seed(3)
    cfg = ExperimentConfig(backbone=BackboneConfig(name="small_cnn", width=8, depth=2))
    model, _ = build_model_for(cfg, num_classes=10, data_channels=1, mean=[0.3], std=[0.4])
    checkpoint = tmp_path / "best.pt"
    torch.save(model.state_dict(), checkpoint)
    assert any(k.startswith(("head.", "preprocess.")) for k in torch.load(checkpoint, weights_only=True))

    torch.manual_seed(4)
    fresh = create_backbone("small_cnn", channels=1, input_size=8, width=8, depth=2)
    report = load_backbone_state(fresh, read_weights_file(checkpoint), source="best.pt")
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(fresh.module.state_dict()[key], value), key

    # wrapped ({"state_dict": ...}) and DDP-prefixed ("module.") checkpoints are accepted too
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    again = create_backbone("small_cnn", channels=1, input_size=8, width=8, depth=2)
    report = load_backbone_state(again, read_weights_file(wrapped), source="wrapped")
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(again.module.block1[0].weight, model.backbone.block1[0].weight)


def test_shape_mismatch_outside_the_head_names_the_key(resnet18_file_state) -> None:  # type: ignore[no-untyped-def]
    state = dict(resnet18_file_state)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem
    state["fc.weight"] = torch.zeros(10, 512)  # a different head: ignored, not refused
    backbone = _fresh_resnet18()
    before = backbone.module.layer1[0].conv1.weight.clone()
    with pytest.raises(WeightsError, match=r"1 shape mismatches\): conv1\.weight: file \(64, 1, 7, 7\) vs model "
                                           r"\(64, 3, 7, 7\)"):
        load_backbone_state(backbone, state, source="gray.pt")
    assert torch.equal(backbone.module.layer1[0].conv1.weight, before)  # nothing was loaded


def test_builtin_backbone_width_mismatch_is_refused(tmp_path: Path) -> None:
    narrow = create_backbone("small_cnn", channels=1, input_size=8, width=4, depth=2)
    wide = create_backbone("small_cnn", channels=1, input_size=8, width=8, depth=2)
    with pytest.raises(WeightsError, match=r"block1\.0\.weight: file \(4, 1, 3, 3\) vs model \(8, 1, 3, 3\)"):
        load_backbone_state(wide, narrow.module.state_dict(), source="narrow")


def test_wrong_backbone_shares_no_keys(resnet18_file_state) -> None:  # type: ignore[no-untyped-def]
    small = create_backbone("small_cnn", channels=1, input_size=8)
    with pytest.raises(WeightsError, match=r"share no keys with the backbone; wrong backbone\?"):
        load_backbone_state(small, resnet18_file_state, source="resnet18.pt")


class _Payload:
    """Unpickling this creates a file: what a malicious weights file would do (with worse commands)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch '{self.target}'",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "trap": _Payload(target)}, path)
    assert not target.exists()
    with pytest.raises(WeightsError, match=r"Refused to load '.*evil\.pt': it is not a plain state dict that "
                                           r"loads with weights_only=True .*convert the file to \.safetensors"):
        read_weights_file(path)
    assert not target.exists(), "the payload ran"

    # the payload is real: a plain torch.load would have run it (so the check above can fail)
    control = tmp_path / "control.pt"
    torch.save(_Payload(tmp_path / "ran"), control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_files_that_are_no_state_dict(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"weights file '.*nope\.pt' does not exist"):
        read_weights_file(tmp_path / "nope.pt")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(WeightsError, match="holds no state dict of tensors"):
        read_weights_file(listed)


def test_save_weights_round_trip_with_meta(tmp_path: Path) -> None:
    torch.manual_seed(5)
    backbone = create_backbone("small_cnn", channels=1, input_size=8, width=4, depth=2)
    path = tmp_path / "weights" / "backbone.safetensors"
    meta = {"source": "null", "mean": [0.3], "std": [0.4], "input_size": 8}
    save_weights(path, backbone, meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["backbone.json", "backbone.safetensors"]
    assert read_weights_meta(path) == meta
    fresh = create_backbone("small_cnn", channels=1, input_size=8, width=4, depth=2)
    report = load_backbone_state(fresh, read_weights_file(path), source=str(path))
    assert report.missing == [] and report.unexpected == []
    for key, value in backbone.module.state_dict().items():
        assert torch.equal(fresh.module.state_dict()[key], value), key
    with pytest.raises(WeightsError, match=r"backbone2\.json' is missing: run the pretrain stage"):
        read_weights_meta(tmp_path / "backbone2.safetensors")


# --------------------------------------------------------------------------- torchvision's zoo, offline


def test_torchvision_weights_offline_says_where_to_put_the_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    try:
        torchvision_state_dict("resnet18", "DEFAULT")
    except WeightsError as err:
        message = str(err)
    else:
        pytest.skip("the network is reachable here: the weights were downloaded")
    assert "resnet18-f37072fd.pth" in message
    assert str(checkpoints / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "TORCH_HOME" in message
    assert not (checkpoints / "resnet18-f37072fd.pth").exists()


def _named_by_hash(directory: Path, stem: str, payload: bytes) -> Path:
    """A hub-cache style file whose name carries the SHA-256 prefix of its content."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    path.write_bytes(payload)
    return path


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (Path.touch, (self.marker,))


def test_hub_file_whose_hash_matches_its_name_loads(tmp_path: Path) -> None:
    torch.manual_seed(6)
    state = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    path = _named_by_hash(tmp_path / "checkpoints", "mobilenet_v3_small", _saved(state))
    loaded = read_hub_checkpoint(path)
    assert set(loaded) == set(state) and torch.equal(loaded["features.0.0.weight"], state["features.0.0.weight"])
    backbone = create_backbone("mobilenet_v3_small", channels=3, input_size=32)
    report = load_backbone_state(backbone, loaded, source="IMAGENET1K_V1")
    assert sorted(report.ignored) == ["classifier.3.bias", "classifier.3.weight"]
    assert report.missing == [] and report.unexpected == []


def test_hub_file_with_the_wrong_hash_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain state dict at the cache path of resnet18's weights, but not the published file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), checkpoints / "resnet18-f37072fd.pth")
    with pytest.raises(WeightsError) as caught:
        torchvision_state_dict("resnet18", "DEFAULT")
    assert str(checkpoints / "resnet18-f37072fd.pth") in str(caught.value)
    assert "SHA-256" in str(caught.value) and "f37072fd" in str(caught.value)


def test_crafted_pickle_in_the_hub_cache_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At resnet18's cache path the hash refuses it; named with its own hash, weights_only does."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    crafted = _saved({"fc.weight": _Payload(marker)})
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(crafted)
    with pytest.raises(WeightsError, match="SHA-256"):
        torchvision_state_dict("resnet18", "DEFAULT")
    own_hash = _named_by_hash(tmp_path / "elsewhere", "resnet18", crafted)
    with pytest.raises(WeightsError, match="Refused to load"):
        read_hub_checkpoint(own_hash)
    assert not marker.exists()


def test_app_refuses_a_crafted_pickle_in_the_hub_cache(tmp_path: Path) -> None:
    """The user's path: `python -m transferlab backbone=resnet18 backbone.weights=DEFAULT` with a
    payload placed where the offline error tells users to put the file."""
    import pickle
    import shutil
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(
        pickle.dumps({"fc.weight": _Payload(marker)}, protocol=2))
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    proc = subprocess.run(
        [sys.executable, "-m", "transferlab", "backbone=resnet18", "backbone.weights=DEFAULT",
         "trainer.epochs=1", "tracking.log_graph=false", "tracking.log_model=false"],
        cwd=tmp_path, env=subprocess_env(TORCH_HOME=str(tmp_path / "torch")), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "resnet18-f37072fd.pth" in proc.stderr and "SHA-256" in proc.stderr
    assert not marker.exists()


def test_torchvision_preprocessing_follows_the_weights() -> None:
    assert torchvision_preprocessing("mobilenet_v3_small", "IMAGENET1K_V1") == {
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": 224,
        "resize_size": 256, "weights": "MobileNet_V3_Small_Weights.IMAGENET1K_V1"}
    inception = torchvision_preprocessing("inception_v3", "DEFAULT")
    assert inception["input_size"] == 299 and inception["resize_size"] == 342 and inception["mean"] == [0.5] * 3


# --------------------------------------------------------------------------- check_weights_spec


def test_torchvision_weight_names() -> None:
    names = torchvision_weight_names("resnet50")
    assert names[0] == "DEFAULT" and sorted(names) == ["DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"]


def test_check_weights_spec_unknown_torchvision_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"backbone\.weights: Unknown weights 'IMAGENET1K_V9' for resnet18; "
                                          r"expected one of \['DEFAULT', 'IMAGENET1K_V1'\]"):
        check_weights_spec("resnet18", "IMAGENET1K_V9")
    check_weights_spec("resnet18", "DEFAULT")
    check_weights_spec("resnet18", "IMAGENET1K_V1")


def test_check_weights_spec_torchvision_name_on_builtin_backbone() -> None:
    with pytest.raises(ConfigError, match=r"backbone\.weights: 'DEFAULT' is not a file, an MLflow URI, 'source' "
                                          r"or null, and backbone 'small_cnn' has no published weights"):
        check_weights_spec("small_cnn", "DEFAULT")
    with pytest.raises(ConfigError, match=r"^pretrain\.weights: "):
        check_weights_spec("mlp", "IMAGENET1K_V1", key="pretrain.weights")


def test_check_weights_spec_files_and_the_rest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backbone\.weights: weights file '.*missing\.safetensors' does not "
                                          r"exist"):
        check_weights_spec("resnet18", str(tmp_path / "missing.safetensors"))
    present = tmp_path / "w.pt"
    present.write_bytes(b"")
    for spec in (None, "source", "runs:/0123abc/model", "models:/digits/3", str(present)):
        check_weights_spec("small_cnn", spec)
        check_weights_spec("resnet18", spec)


@pytest.mark.parametrize(("spec", "kind"), [
    (None, "none"),
    ("source", "source"),
    ("runs:/0123abc/model", "mlflow"),
    ("models:/digits/3", "mlflow"),
    ("weights/backbone.safetensors", "file"),
    ("backbone.safetensors", "file"),
    ("init.PT", "file"),
    ("ckpt/best", "file"),
    ("/abs/path/w.bin", "file"),
    ("model.ckpt", "file"),
    ("DEFAULT", "published"),
    ("IMAGENET1K_V1", "published"),
])
def test_kind_of(spec: str | None, kind: str) -> None:
    assert kind_of(spec) == kind
