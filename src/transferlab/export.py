"""``transferlab export MODEL --out model.onnx``: the trained model as an ONNX file
(also ``python -m transferlab.export``).

MODEL is a model folder (``best.pt`` beside ``model_spec.json``: ``models/`` after ``dvc repro``) or an
MLflow model URI (``runs:/<id>/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``) in the
store ``--tracking-uri`` (an exported ``MLFLOW_TRACKING_URI`` wins, as everywhere).

The ONNX model takes raw uint8 images ``images [N, C, H, W]`` (any batch size and size, C 1 or 3) and
returns class probabilities ``probabilities [N, classes]``: preprocessing included, as in the PyTorch
model (:class:`~transferlab.models.assemble.ServingModel`, what MLflow logs). Its ``metadata_props``
carry the class names (``class_names``, a JSON list, in output order) and the model spec (``model_spec``,
JSON).

``--check`` runs the test split of the prepared data (default ``data/prepared/target``) through
onnxruntime and through PyTorch, prints the largest absolute difference of the probabilities, and fails
(exit 1, no file written) above 1e-4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from transferlab.cli import guarded
from transferlab.errors import DataError, ExportError
from transferlab.models.assemble import FineTuneModel, ModelSpec, ServingModel, load_spec, serving_trace
from transferlab.models.weights import MLFLOW_SCHEMES

TOLERANCE = 1e-4
DEFAULT_CHECK_DATA = "data/prepared/target"
EXTRA = "pip install 'transferlab[export]'"


def require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}, not installed here: {EXTRA}")


def load_model(model: str, *, uri: str) -> tuple[FineTuneModel, ModelSpec]:
    """The trained model (eval mode, CPU) and its spec, from a model folder or an MLflow model URI."""
    from transferlab.stages.evaluate import load_trained

    if model.startswith(MLFLOW_SCHEMES):
        from transferlab.tracking.models import download_trained

        with tempfile.TemporaryDirectory() as tmp:
            folder = download_trained(model, tmp, uri=uri)
            return load_trained(folder), load_spec(folder)
    if not Path(model).is_dir():
        raise ExportError(f"model '{model}' is neither a model folder (best.pt beside model_spec.json) nor "
                          "an MLflow model URI (runs:/<id>/model, models:/<name>/<version>, models:/<name>@<alias>)")
    return load_trained(model), load_spec(model)


def export_onnx(model: FineTuneModel, spec: ModelSpec, path: str | Path) -> None:
    """Write ``model``'s :class:`ServingModel` to ``path``, every input dimension dynamic, spec in the metadata.

    The dynamo exporter (``torch.export``): the TorchScript one cannot convert the antialiased resize
    that preprocessing applies (``aten::_upsample_bilinear2d_aa``), and is deprecated.
    """
    example, dims = serving_trace(spec.stored_size)
    program = torch.onnx.export(ServingModel(model).eval(), (example,), dynamo=True, verbose=False,
                                input_names=["images"], output_names=["probabilities"],
                                dynamic_shapes={"images": dims})
    program.model.metadata_props.update({
        "class_names": json.dumps(spec.class_names),
        "model_spec": json.dumps(spec.to_dict()),
        "input": "images: uint8 [N, C, H, W], C 1 or 3, any N, H and W; raw pixel values 0..255",
        "output": "probabilities: float32 [N, classes], in the order of class_names",
    })
    program.save(str(path))


def check_images(folder: str | Path, spec: ModelSpec) -> torch.Tensor:
    """The test images of prepared data ``folder``, refused unless they are of the model's classes."""
    from transferlab.data import load_prepared

    data = load_prepared(Path(folder))
    if data.class_names != spec.class_names:
        raise DataError(f"--check {folder}: the prepared data has classes {data.class_names}, the model "
                        f"{spec.class_names}")
    return data.splits["test"].images


@torch.no_grad()
def max_difference(model: FineTuneModel, path: str | Path, images: torch.Tensor, *, batch_size: int = 256) -> float:
    """The largest absolute difference of the probabilities of onnxruntime and PyTorch on ``images``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = ServingModel(model).eval()
    worst = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].contiguous()
        ours = reference(x).numpy()
        theirs = session.run(["probabilities"], {"images": x.numpy()})[0]
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="transferlab export", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("model", help="model folder (best.pt + model_spec.json) or runs:/... / models:/... URI")
    parser.add_argument("--out", required=True, help="the ONNX file to write")
    parser.add_argument("--check", nargs="?", const=DEFAULT_CHECK_DATA, default=None, metavar="PREPARED",
                        help=f"compare with PyTorch on this prepared data's test split (default {DEFAULT_CHECK_DATA})")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="the MLflow store of a runs:/ or models:/ MODEL (default sqlite:///mlflow.db)")
    args = parser.parse_args(argv)

    def run() -> None:
        require("onnx", "onnxscript", *(["onnxruntime"] if args.check else []))
        if args.check and not Path(args.check).is_dir():
            raise DataError(f"--check {args.check}: no such folder of prepared data (run the prepare stage)")
        model, spec = load_model(args.model, uri=args.tracking_uri)
        images = check_images(args.check, spec) if args.check else None
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            export_onnx(model, spec, tmp)
            if images is not None:
                diff = max_difference(model, tmp, images)
                print(f"export: onnxruntime vs PyTorch on {images.shape[0]} test images of {args.check}: "
                      f"max |probability difference| = {diff:.3g} (limit {TOLERANCE:g})")
                if not diff <= TOLERANCE:
                    print(f"error: the ONNX model differs from the PyTorch model by {diff:.3g} > {TOLERANCE:g}; "
                          f"{out} not written", file=sys.stderr)
                    raise SystemExit(1)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"export: wrote {out} (input images uint8 [N, C, H, W], C 1 or 3, any size; output "
              f"probabilities of {spec.class_names})")

    guarded(run)


if __name__ == "__main__":
    main()
