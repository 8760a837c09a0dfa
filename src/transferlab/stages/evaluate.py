"""Stage ``evaluate``: test metrics, confusion matrix, and the logged model.

Reopens the MLflow run that ``finetune`` started, adds the test metrics, the
confusion matrix (picture and DVC plot data) and the model itself
(``mlflow.pytorch``, with a signature and an input example), registered
under ``tracking.register`` with the alias ``tracking.register_alias`` when set.
With a ``baseline``, scores it on the same test split (``baseline_test_acc``,
in the run and in ``metrics/test.json``).
"""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.cli import stage_main
from transferlab.config.schema import ExperimentConfig
from transferlab.data import DataError, PreparedData, load_prepared
from transferlab.models.assemble import FineTuneModel, build_model, load_spec
from transferlab.stages.finetune import BEST
from transferlab.training.runtime import configure_threads, resolve_device


def load_trained(model_dir: str | Path) -> FineTuneModel:
    """The trained model, rebuilt from the spec saved beside its checkpoint (preprocessing included)."""
    model, _ = build_model(load_spec(model_dir))
    state = torch.load(Path(model_dir) / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _check_classes(model_dir: str | Path, data: PreparedData) -> None:
    trained = load_spec(model_dir).class_names
    if trained != data.class_names:
        raise DataError(f"the model in {model_dir} was trained on classes {trained}, but the prepared test data "
                        f"has {data.class_names}: run the finetune stage again (dvc repro finetune)")


@torch.no_grad()
def predict(model: FineTuneModel, images: torch.Tensor, *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and class probabilities for uint8 ``images``."""
    device = next(model.parameters()).device
    preds, probs = [], []
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size].to(device))
        preds.append(model.head.predict(logits).cpu())
        probs.append(model.head.probabilities(logits).cpu())
    return torch.cat(preds).numpy(), torch.cat(probs).numpy()


@torch.no_grad()
def unit_mass(model: FineTuneModel, images: torch.Tensor, labels: np.ndarray, class_names: list[str], *,
              batch_size: int) -> dict[str, Any]:
    """Over-complete head: how each class's probability mass spreads over its units
    (mean softmax over all units, for the test images of that class)."""
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        chunks.append(model.head.unit_logits(model.feature_dropout(model.features(x))).softmax(dim=1).cpu())
    probs = torch.cat(chunks).numpy()
    out: dict[str, Any] = {}
    for c, units in enumerate(model.head.groups):
        rows = probs[labels == c]
        if len(rows) == 0:
            continue
        share = rows[:, units].mean(axis=0)
        out[class_names[c]] = {"units": units, "mass": [round(float(v), 4) for v in share],
                               "in_class": round(float(share.sum()), 4)}
    return out


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=0)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(class_names)}
    return {
        "test_acc": float((y_true == y_pred).mean()),
        "test_macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def plot_confusion(matrix: list[list[int]], class_names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(f"Confusion matrix (test, n={int(m.sum())})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    from transferlab.tracking.handoff import run_of_model
    from transferlab.tracking.models import register_model
    from transferlab.tracking.run import open_run

    configure_threads(cfg.trainer.num_threads)
    device = resolve_device(cfg.trainer.device)
    data = load_prepared(Path(cfg.paths.prepared) / "target")
    _check_classes(cfg.paths.model, data)
    model = load_trained(cfg.paths.model).to(device)
    test = data.splits["test"]
    y_true = test.labels.numpy()
    y_pred, _ = predict(model, test.images, batch_size=cfg.trainer.eval_batch_size)
    metrics = classification_metrics(y_true, y_pred, data.class_names)
    if model.head.overcomplete:
        metrics["unit_mass"] = unit_mass(model, test.images, y_true, data.class_names,
                                         batch_size=cfg.trainer.eval_batch_size)
    summary = {"test_acc": metrics["test_acc"], "test_macro_f1": metrics["test_macro_f1"]}
    if cfg.baseline is not None:  # the same training images and test split, raw pixels, a linear model
        from transferlab.baselines import pixel_baseline

        summary["baseline_test_acc"] = metrics["baseline_test_acc"] = pixel_baseline(data, "test")

    metrics_dir, plots_dir = Path(cfg.paths.metrics), Path(cfg.paths.plots)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    (metrics_dir / "test.json").write_text(json.dumps(summary, indent=2))
    (metrics_dir / "per_class.json").write_text(json.dumps(metrics["per_class"], indent=2))
    plots_dir.mkdir(parents=True, exist_ok=True)
    with open(plots_dir / "confusion.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows((data.class_names[a], data.class_names[p]) for a, p in zip(y_true, y_pred))
    image = plot_confusion(metrics["confusion_matrix"], data.class_names, plots_dir / "confusion.png")

    run_id = run_of_model(cfg.paths.model, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                          checkpoint=Path(cfg.paths.model) / BEST)
    with open_run(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, run_id=run_id) as tracker:
        flat = dict(summary)
        for name, row in metrics["per_class"].items():
            for key in ("precision", "recall", "f1"):
                flat[f"test_{key}_{name}"] = row[key]
        tracker.log_metrics(flat)
        tracker.log_dict(metrics, "evaluation/test_metrics.json")
        tracker.log_artifact(image, artifact_path="evaluation")
        tracker.log_artifact(plots_dir / "confusion.csv", artifact_path="evaluation")
        if cfg.tracking.log_model:
            tracker.log_model(model.cpu(), test.images[:4], load_spec(cfg.paths.model).to_dict())
            if cfg.tracking.register:
                tracker.call_in_run(partial(register_model, run_id, cfg.tracking.register,
                                            alias=cfg.tracking.register_alias), "the model registration")
    baseline = f" ({cfg.baseline} regression on pixels: {summary['baseline_test_acc']:.4f})" if cfg.baseline else ""
    print(f"evaluate: test_acc={metrics['test_acc']:.4f} macro_f1={metrics['test_macro_f1']:.4f}{baseline}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
