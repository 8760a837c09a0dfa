"""``transferlab predict MODEL IMAGES...``: class predictions for image files, written to a CSV.

MODEL is a model folder of the pipeline (``models/``: ``best.pt`` and ``model_spec.json``), a logged
model (``runs:/<id>/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``) or a local
MLflow model folder. IMAGES are files or folders (searched recursively for the image extensions the
data stage reads). Each image is decoded as ``prepare`` stores it (the shorter side resized to the size
the model was trained on, the centre square kept, converted to its channels), so the model sees new
images as it saw its test split. A file that cannot be read gets a row with its error and is skipped.

Examples::

    transferlab predict models photos/ --out predictions.csv
    transferlab predict runs:/<run id>/model photos/ --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferlab.errors import ConfigError, DataError, WeightsError
from transferlab.models.assemble import SPEC_FILE, ModelSpec
from transferlab_serving import PREDICTED, ImageClassifier, probability_column

DEFAULT_OUT = "predictions.csv"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass
class LoadedModel:
    """A trained model on its device (raw uint8 images in, class probabilities out, as the logged
    model's pyfunc predicts), and its spec."""

    classifier: ImageClassifier
    spec: ModelSpec


@dataclass
class Prediction:
    """One file's predicted class and class probabilities, or why it could not be read."""

    file: Path
    predicted: str | None = None
    probabilities: np.ndarray | None = None
    error: str | None = None


def load_model(model: str, *, device: torch.device, tracking_uri: str) -> LoadedModel:
    """The model MODEL names: a pipeline model folder, a logged model's URI or a local MLflow model."""
    path = Path(model)
    if path.is_dir() and (path / SPEC_FILE).is_file():
        from transferlab.models.assemble import ServingModel, load_spec
        from transferlab.stages.evaluate import load_trained

        spec = load_spec(path)
        module = ServingModel(load_trained(path)).to(device)
    elif path.is_dir() or model.startswith(("runs:/", "models:/")):
        from transferlab.tracking.models import load_logged_model

        module, spec_dict = load_logged_model(model, uri=tracking_uri, device=device)
        spec = ModelSpec.from_dict(spec_dict)
    else:
        raise WeightsError(f"MODEL '{model}' is neither a model folder (with {SPEC_FILE} and best.pt, or an MLflow "
                           "model's MLmodel) nor runs:/<run id>/model, models:/<name>/<version> or models:/<name>@<alias>")
    return LoadedModel(ImageClassifier(module, spec.class_names, device), spec)


def find_images(paths: Sequence[str]) -> tuple[list[Path], int]:
    """The files to predict, in the order given (a folder's images sorted by path), and how many files
    under the folders were passed over for not having an image extension. A named file is always taken."""
    from transferlab.data.sources import IMAGE_EXTENSIONS

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(f"no such file or folder: {', '.join(missing)}")
    files: list[Path] = []
    passed_over = 0
    for given in map(Path, paths):
        if not given.is_dir():
            files.append(given)
            continue
        for file in sorted(p for p in given.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in file.relative_to(given).parts):
                continue
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(file)
            else:
                passed_over += 1
    if not files:
        raise DataError(f"no image files in {', '.join(paths)} (expected files ending in "
                        f"{sorted(IMAGE_EXTENSIONS)}, any case)")
    return files, passed_over


def _decode(file: Path, size: int, channels: int) -> np.ndarray | str:
    from transferlab.data.sources import decode_image

    try:
        return decode_image(file, size, channels)
    except DataError as err:
        return str(err)


def _decoded_batches(files: list[Path], *, size: int, channels: int, batch_size: int,
                     pool: ThreadPoolExecutor) -> Iterator[list[np.ndarray | str]]:
    """Each batch of files decoded (an array, or the error as text), the next batch decoding on the
    pool's threads while the caller runs the model on this one."""
    def submit(start: int) -> list[Future]:
        return [pool.submit(_decode, f, size, channels) for f in files[start:start + batch_size]]

    pending = submit(0)
    for start in range(0, len(files), batch_size):
        current, pending = pending, submit(start + batch_size)
        yield [future.result() for future in current]


def predict_files(model: LoadedModel, files: list[Path], *, batch_size: int,
                  workers: int | None = None) -> Iterator[Prediction]:
    """Each file's prediction, in order; a file that cannot be read gets its error instead."""
    from transferlab.data.sources import Progress, decode_workers

    spec = model.spec
    progress = Progress(len(files), desc="predict")
    try:
        with ThreadPoolExecutor(max_workers=workers or decode_workers()) as pool:
            batches = _decoded_batches(files, size=spec.stored_size, channels=spec.data_channels,
                                       batch_size=batch_size, pool=pool)
            for start, decoded in zip(range(0, len(files), batch_size), batches):
                images = [d for d in decoded if not isinstance(d, str)]
                probs: Iterator[np.ndarray] = iter(())
                if images:
                    probs = iter(model.classifier.probabilities(torch.from_numpy(np.stack(images))).numpy())
                for file, d in zip(files[start:start + batch_size], decoded):
                    if isinstance(d, str):
                        yield Prediction(file, error=d)
                    else:
                        p = next(probs)
                        yield Prediction(file, spec.class_names[int(p.argmax())], p)
                progress.update(len(decoded))
    finally:
        progress.close()


def write_predictions(predictions: Iterator[Prediction], class_names: list[str], out: Path
                      ) -> tuple[Counter, list[Prediction]]:
    """The CSV (path, predicted, one probability column per class, error), written as the predictions
    come; returns the counts per predicted class and the files that could not be read."""
    counts: Counter = Counter()
    failed: list[Prediction] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", PREDICTED, *map(probability_column, class_names), "error"])
        for p in predictions:
            if p.error is not None:
                print(f"predict: skipped {p.error}", file=sys.stderr)
                failed.append(p)
                writer.writerow([p.file, "", *([""] * len(class_names)), p.error])
            else:
                counts[p.predicted] += 1
                writer.writerow([p.file, p.predicted, *(f"{v:.6f}" for v in p.probabilities), ""])
    tmp.replace(out)  # a run cut short leaves no half-written CSV in place of an earlier one
    return counts, failed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="transferlab predict", description="Predict the classes of image files; write them to a CSV.",
        epilog="MODEL: a model folder (models/), runs:/<run id>/model, models:/<name>/<version>, "
               "models:/<name>@<alias>, or a local MLflow model folder.")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the CSV to write (default: {DEFAULT_OUT})")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: the GPU when there is one (default)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help="the MLflow store of runs:/ and models:/ URIs (MLFLOW_TRACKING_URI wins; "
                             f"default: {DEFAULT_TRACKING_URI} in the project folder)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from transferlab.training.runtime import resolve_device

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but CUDA is not available here; use auto or cpu")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the CSV file to write")
    files, passed_over = find_images(args.images)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device, tracking_uri=args.tracking_uri)
    print(f"predict: {len(files)} image(s) on {device}, decoded at {model.spec.stored_size} px "
          f"with {model.spec.data_channels} channel(s)", file=sys.stderr)
    counts, failed = write_predictions(predict_files(model, files, batch_size=args.batch_size),
                                       model.spec.class_names, out)
    print(f"predict: wrote {out}: {sum(counts.values())} image(s) predicted, {len(failed)} skipped")
    for name in model.spec.class_names:
        print(f"  {name}: {counts[name]}")
    for p in failed:
        print(f"  skipped {p.file}")
    if passed_over:
        print(f"  ({passed_over} file(s) in the folders without an image extension were not read)")


def main(argv: Sequence[str] | None = None) -> None:
    from transferlab.cli import guarded

    args = parse_args(argv)
    guarded(lambda: run(args))


if __name__ == "__main__":
    main()
