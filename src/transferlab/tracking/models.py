"""Models in the MLflow store: earlier runs' weights in, the trained model out.

``backbone.weights`` may name an earlier run's model (``runs:/<id>/model``,
``models:/<name>/<version>`` or ``models:/<name>@<alias>``); its backbone's
weights come from that run's checkpoint artifact (a plain state dict, loaded
with ``weights_only=True``) rather than from unpickling a logged model. The
same checkpoint and its model spec make the trained model for an export
(:func:`download_trained`); :func:`register_model` puts a run's logged model
in the registry under an alias.

The trained model goes out as an MLflow model (:func:`log_model`): a
``torch.export`` program with the ``pytorch`` flavour and a pyfunc flavour of
our own (:mod:`transferlab_serving`), which :func:`load_logged_model` shares.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import transferlab_serving as serving
from transferlab.errors import TrackingError
from transferlab.models.assemble import FineTuneModel, ServingModel, export_serving
from transferlab.models.weights import WeightsError, read_weights_file
from transferlab.tracking.store import sqlite_path, tracking_uri

if TYPE_CHECKING:
    from mlflow.models import Model, ModelSignature

CHECKPOINT_ARTIFACT = "checkpoint/best.pt"
OUTPUT = "probabilities"  # what a logged model returns (the metadata's "output"; earlier ones returned logits)


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


def log_model(model: FineTuneModel, example: torch.Tensor, spec: dict[str, Any]) -> str:
    """The trained model as the active run's MLflow model ``model``; returns its format.
    ``spec`` (the model spec: classes, input size, normalisation, preprocessing) goes into the
    model's metadata (``MLmodel``), where ``mlflow.models.get_model_info(uri).metadata`` reads it.

    Saved as a ``torch.export`` program of :class:`ServingModel` (``pt2``: no pickle, loads without
    this package; uint8 images of any batch size and size, 1 or 3 channels, in; class probabilities
    out), with the ``pytorch`` flavour and a pyfunc flavour of our own (:mod:`transferlab_serving`,
    carried in the model's ``code/``: class names and probabilities, on CUDA when present), through
    :func:`save_model`. A model that cannot be exported falls back to a pickle of ``mlflow.pytorch``
    (whose generic pyfunc returns bare probabilities, and which needs transferlab to load).
    ``example`` (stored images) is the input example MLflow checks the pyfunc with.
    """
    import warnings

    import mlflow.pytorch
    from mlflow.models import Model, infer_signature

    model.eval()
    uri = f"runs:/{mlflow.active_run().info.run_id}/model"
    try:
        program = export_serving(model, side=int(spec["stored_size"]))
    except Exception as err:  # torch.export does not cover every model
        warnings.warn(f"torch.export failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      "logging the model as a pickle instead", stacklevel=2)
    else:
        Model.log(artifact_path=None, name="model", flavor=sys.modules[__name__], program=program,
                  example=example.numpy(), spec=spec)
        print(f"tracking: logged the model as {uri}")
        return "pt2"
    served = ServingModel(model).eval()
    with torch.no_grad():
        probabilities = served(example).numpy()
    mlflow.pytorch.log_model(served, name="model", signature=infer_signature(example.numpy(), probabilities),
                             input_example=example.numpy(), metadata=metadata(spec),
                             pip_requirements=[*requirements(), "transferlab"], serialization_format="pickle")
    print(f"tracking: logged the model as {uri} (a pickle: loading it needs transferlab)")
    return "pickle"


def metadata(spec: dict[str, Any]) -> dict[str, Any]:
    return {"model_spec": spec, "output": OUTPUT}


def requirements() -> list[str]:
    """What the logged model needs besides MLflow (which brings numpy and pandas): the torch and
    torchvision it was made with."""
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]


def signature(class_names: list[str]) -> ModelSignature:
    """uint8 images ``[N, C, H, W]``, every dimension free, in; the pyfunc's columns out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
        outputs=Schema([ColSpec("string", serving.PREDICTED), ColSpec("float", serving.PROBABILITY),
                        *(ColSpec("float", serving.probability_column(name)) for name in class_names)]))


def save_model(path: str, mlflow_model: Model | None = None, *, program: torch.export.ExportedProgram,
               example: np.ndarray, spec: dict[str, Any]) -> None:
    """The MLflow model of an exported :class:`ServingModel` in ``path`` (``Model.log`` calls this: this
    module is the flavour it logs with). ``data/model/model.pt2`` is the ``pytorch`` flavour's
    (``mlflow.pytorch.load_model``: the program's module, on the CPU); the pyfunc flavour's loader is
    :mod:`transferlab_serving`, copied into ``code/``."""
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import Model

    mlflow_model = mlflow_model or Model()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "model"  # copied to <path>/data/model, the pyfunc's data (transferlab_serving.model_root)
        data.mkdir()
        torch.export.save(program, data / serving.PROGRAM_FILE)
        mlflow_model.add_flavor("pytorch", model_data="data/model", pytorch_version=str(torch.__version__))
        mlflow.pyfunc.save_model(path, loader_module=serving.__name__, data_path=str(data),
                                 code_paths=[str(Path(serving.__file__).parent)], mlflow_model=mlflow_model,
                                 signature=signature(spec["class_names"]), input_example=example,
                                 pip_requirements=requirements(), metadata=metadata(spec),
                                 model_config={"device": None})


MLMODEL_FILE = "MLmodel"


def load_logged_model(model: str, *, uri: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model :func:`log_model` logged (``runs:/<id>/model``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, or a local MLflow model folder) on ``device``, with its model spec;
    loaded as its pyfunc loads it (:func:`transferlab_serving.load_module`).

    The module takes raw uint8 images ``[N, C, H, W]`` and returns class probabilities."""
    import tempfile

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
        metadata = info.metadata or {}
        if "pytorch" not in info.flavors or "model_spec" not in metadata:
            raise WeightsError(f"'{model}' is not a model logged by transferlab (needs the pytorch flavour and "
                               "a model_spec in its metadata)")
        if metadata.get("output") != OUTPUT:
            raise WeightsError(f"'{model}' was logged by an older transferlab, whose model returns logits: "
                               "log it again (run its evaluate stage) or predict from its model folder")
        # MLflow refuses pickle payloads in an exported program unless allowed (and a pickled model,
        # log_model's fallback, unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set).
        try:
            module = serving.load_module(local, device)
        except Exception as err:
            raise WeightsError(f"could not load the model '{model}' ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return module, metadata["model_spec"]


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
