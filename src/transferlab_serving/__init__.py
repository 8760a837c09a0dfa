"""The ``python_function`` flavour of a model that transferlab logged to MLflow.

The logged model (``runs:/<run id>/model``) holds a ``torch.export`` program (``pytorch`` flavour,
``data/model/model.pt2``) that takes raw ``uint8`` images ``[N, C, H, W]`` of any batch size and size,
``C`` 1 or 3, does its own preprocessing and returns class probabilities ``[N, classes]``; the class
names are in the model's metadata (``model_spec``). This module is its pyfunc loader
(``loader_module``): :func:`_load_pyfunc` puts the program on a device (CUDA when there is one;
``model_config={"device": ...}`` or ``MLFLOW_DEFAULT_PREDICTION_DEVICE`` choose another) and its
``predict`` returns a DataFrame: the predicted class name (``predicted``), its probability
(``probability``) and one ``prob_<class>`` column per class.

It needs only torch, numpy, pandas and MLflow: the logged model carries this package in its ``code/``
folder, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` work where transferlab is not
installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

PROGRAM_FILE = "model.pt2"
PREDICTED = "predicted"
PROBABILITY = "probability"
BATCH_SIZE = 256  # images per forward pass: a large request does not need its whole batch in memory at once


def probability_column(class_name: str) -> str:
    return f"prob_{class_name}"


def model_root(data_path: str | Path) -> Path:
    """The MLflow model folder (with ``MLmodel``) of the pyfunc data folder ``<model>/data/model``."""
    return Path(data_path).parents[1]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, else ``MLFLOW_DEFAULT_PREDICTION_DEVICE``, else CUDA when available, else the CPU
    (the choice ``mlflow.pytorch``'s own pyfunc makes)."""
    from mlflow.environment_variables import MLFLOW_DEFAULT_PREDICTION_DEVICE

    device = device or MLFLOW_DEFAULT_PREDICTION_DEVICE.get()
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_module(model_path: str | Path, device: torch.device) -> torch.nn.Module:
    """The ``pytorch`` flavour's module of the MLflow model in ``model_path``, on ``device``."""
    import mlflow.pytorch
    from mlflow.models import Model

    # mlflow.pytorch vets the program archive (no pickle payloads, unless MLflow is told to allow
    # them) and loads it on the CPU.
    module = mlflow.pytorch.load_model(str(model_path))
    if device.type == "cpu":
        return module
    program = Path(model_path) / Model.load(str(model_path)).flavors["pytorch"]["model_data"] / PROGRAM_FILE
    if not program.is_file():  # a pickled module (saved where torch.export failed) moves as it is
        return module.to(device)
    # An exported program's graph asserts its input's device (the CPU it was exported on), which
    # .to() leaves as it is; torch's own pass moves the program. The archive was vetted above.
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(torch.export.load(program), device).module()


def class_names(model_path: str | Path) -> list[str]:
    from mlflow.models import Model

    return list(Model.load(str(model_path)).metadata["model_spec"]["class_names"])


def prediction_frame(probabilities: np.ndarray, names: list[str]) -> pd.DataFrame:
    """The predicted class, its probability and each class's probability, a row per image."""
    best = probabilities.argmax(axis=1)
    frame = pd.DataFrame({PREDICTED: np.asarray(names, dtype=object)[best],
                          PROBABILITY: probabilities[np.arange(len(best)), best]})
    for i, name in enumerate(names):
        frame[probability_column(name)] = probabilities[:, i]
    return frame


class ImageClassifier:
    """A model's module on its device, with its class names: probabilities for uint8 images."""

    def __init__(self, module: torch.nn.Module, names: list[str], device: torch.device) -> None:
        self.module, self.class_names, self.device = module, names, device

    def get_raw_model(self) -> torch.nn.Module:
        return self.module

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, classes]`` (float32, on the CPU) of uint8 images ``[N, C, H, W]``."""
        if images.dim() != 4 or images.shape[1] not in (1, 3) or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images [N, C, H, W] with C 1 or 3, got {images.dtype} "
                             f"{list(images.shape)}")
        chunks = [self.module(images[start:start + BATCH_SIZE].to(self.device)).float().cpu()
                  for start in range(0, images.shape[0], BATCH_SIZE)]
        return torch.cat(chunks) if chunks else torch.zeros(0, len(self.class_names))

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = torch.from_numpy(np.array(model_input))  # a copy: the input may be read-only
        return prediction_frame(self.probabilities(images).numpy(), self.class_names)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> ImageClassifier:
    """The pyfunc of the model whose data is ``data_path`` (called by ``mlflow.pyfunc.load_model``)."""
    root = model_root(data_path)
    device = resolve_device((model_config or {}).get("device"))
    return ImageClassifier(load_module(root, device), class_names(root), device)
