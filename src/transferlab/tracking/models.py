"""Models in the MLflow store: earlier runs' weights in, the trained model out.

``backbone.weights`` may name an earlier run's model (``runs:/<id>/model``,
``models:/<name>/<version>`` or ``models:/<name>@<alias>``); its backbone's
weights come from that run's checkpoint artifact (a plain state dict, loaded
with ``weights_only=True``) rather than from unpickling a logged model. The
same checkpoint and its model spec make the trained model for an export
(:func:`download_trained`); :func:`register_model` puts a run's logged model
in the registry under an alias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transferlab.errors import TrackingError
from transferlab.models.weights import WeightsError, read_weights_file
from transferlab.tracking.store import sqlite_path, tracking_uri

CHECKPOINT_ARTIFACT = "checkpoint/best.pt"


def mlflow_run_id(spec: str, *, uri: str, key: str = "backbone.weights") -> str:
    """The run behind ``runs:/<id>/...``, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``
    (``uri`` resolved); errors name ``key``, the setting that gave ``spec``."""
    from mlflow import MlflowClient

    if spec.startswith("runs:/"):
        run_id = spec[len("runs:/"):].split("/", 1)[0]
        if not run_id:
            raise WeightsError(f"{key}: '{spec}' names no run; expected runs:/<run_id>/model")
        return run_id
    rest = spec[len("models:/"):]
    name, sep, version = rest.partition("/")
    if not sep and "@" in rest:
        name, _, alias = rest.partition("@")
        version = f"@{alias}"
    client = MlflowClient(uri)
    try:
        if version.startswith("@"):
            mv = client.get_model_version_by_alias(name, version[1:])
        else:
            mv = client.get_model_version(name, version)
    except Exception as err:
        raise WeightsError(f"{key}: could not resolve '{spec}' in {uri} "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not mv.run_id:
        raise WeightsError(f"{key}: '{spec}' was not logged by a run, so it has no checkpoint "
                           "to take weights from")
    return mv.run_id


def check_weights_uri(spec: str, *, uri: str) -> None:
    """Fail before any work when ``spec``'s run or its checkpoint is not in the store."""
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    run_id = mlflow_run_id(spec, uri=uri)
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise WeightsError(f"backbone.weights: '{spec}': no run {run_id} in the store {uri} "
                           "(is tracking.uri the store that holds it?)") from None
    folder, _, name = CHECKPOINT_ARTIFACT.rpartition("/")
    if CHECKPOINT_ARTIFACT not in {a.path for a in client.list_artifacts(run_id, folder)}:
        raise WeightsError(f"backbone.weights: '{spec}': run {run_id} has no {CHECKPOINT_ARTIFACT} artifact "
                           "to take weights from (did it finish its finetune stage?)")


def mlflow_state_dict(spec: str, *, uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone weights of an earlier run and the preprocessing they expect."""
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    run_id = mlflow_run_id(spec, uri=uri)
    client = MlflowClient(uri)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, dst_path=tmp)
        except Exception as err:
            raise WeightsError(f"backbone.weights: could not fetch {CHECKPOINT_ARTIFACT} of run {run_id} for "
                               f"'{spec}' ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                               f"Is tracking.uri ({uri}) the store that holds that run?") from None
        state = read_weights_file(local)
    meta: dict[str, Any] = {"mlflow_run_id": run_id}
    size = client.get_run(run_id).data.params.get("model.input_size")
    if size and size.isdigit():
        meta["input_size"] = int(size)
    if "preprocess.mean" in state:
        meta.update(mean=state["preprocess.mean"].flatten().tolist(), std=state["preprocess.std"].flatten().tolist())
    return state, meta


def log_model(model: torch.nn.Module, example: torch.Tensor, spec: dict[str, Any] | None = None) -> str:
    """``mlflow.pytorch`` model of the active run, with signature and input example; returns the format.
    ``spec`` (the model spec: classes, input size, normalisation, preprocessing) goes into the
    model's metadata (``MLmodel``), where ``mlflow.models.get_model_info(uri).metadata`` reads it.

    Saved as a ``torch.export`` program (``pt2``: no pickle, loads without this
    package, takes raw uint8 images of any batch size); a model that cannot be
    exported falls back to a pickle. Requirements are given, not inferred:
    inference loads the model in a subprocess and costs many seconds.
    """
    import warnings

    import mlflow.pytorch
    import torchvision
    from mlflow.models import infer_signature

    model.eval()
    x = example.numpy()
    with torch.no_grad():
        y = model(example).numpy()
    signature = infer_signature(x, y)
    metadata = {"model_spec": spec} if spec is not None else None
    requirements = [f"torch=={torch.__version__.split('+')[0]}",
                    f"torchvision=={torchvision.__version__.split('+')[0]}"]
    try:
        mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=x, metadata=metadata,
                                 pip_requirements=requirements, serialization_format="pt2")
        return "pt2"
    except Exception as err:  # torch.export does not cover every model
        warnings.warn(f"torch.export failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      "logging the model as a pickle instead", stacklevel=2)
    mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=x, metadata=metadata,
                             pip_requirements=[*requirements, "transferlab"], serialization_format="pickle")
    return "pickle"


MLMODEL_FILE = "MLmodel"


def load_logged_model(model: str, *, uri: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model :func:`log_model` logged (``runs:/<id>/model``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, or a local MLflow model folder) on ``device``, with its model spec.

    The module takes raw uint8 images ``[N, C, H, W]`` and returns the head's output (class logits)."""
    import tempfile

    import mlflow.pytorch
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        if Path(model).is_dir():
            local = Path(model)
        else:
            uri = tracking_uri(uri)
            store = sqlite_path(uri)
            if store is not None and not store.is_file():  # MLflow would create an empty store
                raise WeightsError(f"'{model}': there is no MLflow store at {store} (set --tracking-uri or "
                                   "MLFLOW_TRACKING_URI to the store that holds it)")
            try:
                local = Path(download_artifacts(artifact_uri=model, dst_path=tmp, tracking_uri=uri,
                                                registry_uri=uri))
            except Exception as err:
                raise WeightsError(f"could not fetch the model '{model}' from the store {uri} "
                                   f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if not (local / MLMODEL_FILE).is_file():
            raise WeightsError(f"'{model}' is not an MLflow model (no {MLMODEL_FILE} file in {local})")
        info = Model.load(str(local))
        spec = (info.metadata or {}).get("model_spec")
        if "pytorch" not in info.flavors or spec is None:
            raise WeightsError(f"'{model}' is not a model logged by transferlab (needs the pytorch flavour and "
                               "a model_spec in its metadata)")
        # MLflow refuses pickle payloads in an exported program unless allowed (and a pickled model,
        # log_model's fallback, unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set); it loads on the CPU.
        try:
            module = mlflow.pytorch.load_model(str(local))
        except Exception as err:
            raise WeightsError(f"could not load the model '{model}' ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''})") from None
        program = local / info.flavors["pytorch"]["model_data"] / "model.pt2"
        if device.type != "cpu" and program.is_file():
            # An exported program's graph asserts its input's device (the CPU it was exported on), which
            # .to() leaves as it is; torch's own pass moves the program. The archive was vetted above.
            from torch.export.passes import move_to_device_pass

            module = move_to_device_pass(torch.export.load(program), device).module()
        else:
            module = module.to(device)
    return module, spec
SPEC_ARTIFACT = "checkpoint/model_spec.json"


def download_trained(model: str, dst: str | Path, *, uri: str) -> Path:
    """The model folder (``best.pt`` beside ``model_spec.json``, what ``evaluate.load_trained`` reads) of
    the run behind the MLflow model URI ``model``, downloaded from its checkpoint artifacts into ``dst``."""
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # a client would create an empty store there
        raise TrackingError(f"no MLflow store at {db} to find '{model}' in (set MLFLOW_TRACKING_URI or "
                            "--tracking-uri to the store that holds the run)")
    run_id = mlflow_run_id(model, uri=uri, key="model")
    client = MlflowClient(uri)
    for artifact in (CHECKPOINT_ARTIFACT, SPEC_ARTIFACT):
        try:
            local = client.download_artifacts(run_id, artifact, dst_path=str(dst))  # dst/<file name>
        except Exception as err:
            raise WeightsError(f"model: could not fetch {artifact} of run {run_id} for '{model}' "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                               "did the run finish its finetune stage?") from None
    return Path(local).parent


def register_model(run_id: str, name: str, *, alias: str) -> None:
    """Register the model that run ``run_id`` logged as a new version of ``name`` and point ``alias`` at it
    (``models:/<name>@<alias>``). Called through ``Tracker.call_in_run``, which makes the run's store the
    active one (the registry is the tracking store)."""
    import mlflow
    from mlflow import MlflowClient

    version = mlflow.register_model(f"runs:/{run_id}/model", name).version
    MlflowClient().set_registered_model_alias(name, alias, version)
    print(f"tracking: registered the model of run {run_id} as '{name}' version {version}, alias '{alias}' "
          f"(models:/{name}@{alias})")
