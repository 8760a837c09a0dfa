"""Simple baselines a run is measured against (config key ``baseline``).

``logistic``: scikit-learn's logistic regression (standardised inputs, L2, C=1) fitted on the pixels of the
training split. ``evaluate`` scores it on the test split beside the model (``baseline_test_acc``), so every
run shows whether transfer beat a linear model on raw pixels. ``finetune`` fits the same estimator on the
initial backbone's frozen features (a linear probe) and on the pixels, both scored on the validation split,
and warns when the pretrained features lose to the pixels: the source backbone is too weak to help.

The same estimator serves pixels and features, so the two differ only in what they see. It is cheap on small
data (the digits: well under a second); on tens of thousands of large images it takes minutes, which is
why the baseline is off unless a preset or the command line asks for it.
"""

from __future__ import annotations

import numpy as np
import torch

from transferlab.data import PreparedData


def logistic_regression():  # -> sklearn Pipeline
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 images ``[N, C, H, W]`` as rows of pixel values in [0, 1]."""
    return images.reshape(len(images), -1).numpy().astype(np.float32) / 255.0


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int) -> np.ndarray:
    """The backbone's pooled features of uint8 ``images`` (the model's own preprocessing, eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, len(images), batch_size):
            out = model.features(images[start:start + batch_size].to(device))
            rows.append((out[0] if isinstance(out, tuple) else out).float().cpu())  # Inception-v3: no aux
    finally:
        model.train(was_training)
    return torch.cat(rows).flatten(1).numpy()


def logistic_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    """Accuracy on ``(x_eval, y_eval)`` of logistic regression fitted on ``(x_train, y_train)``."""
    return float(logistic_regression().fit(x_train, y_train).score(x_eval, y_eval))


def pixel_baseline(data: PreparedData, split: str) -> float:
    """Logistic regression on the training split's pixels, scored on ``split``."""
    train, other = data.splits["train"], data.splits[split]
    return logistic_accuracy(pixels(train.images), train.labels.numpy(), pixels(other.images), other.labels.numpy())


def linear_probe(model: torch.nn.Module, data: PreparedData, *, batch_size: int) -> float:
    """Logistic regression on the frozen backbone's features of the training split, scored on validation."""
    train, val = data.splits["train"], data.splits["val"]
    return logistic_accuracy(features(model, train.images, batch_size=batch_size), train.labels.numpy(),
                             features(model, val.images, batch_size=batch_size), val.labels.numpy())


def weak_backbone_warning(probe_val_acc: float, baseline_val_acc: float,
                          source_val_acc: float | None = None) -> str | None:
    """The warning when a linear probe on the initial backbone's features scores below logistic regression
    on the pixels (both on validation): its features carry less about this task than the raw pixels do."""
    if probe_val_acc >= baseline_val_acc:
        return None
    source = f" (its source task reached val_acc={source_val_acc:.3f})" if source_val_acc is not None else ""
    return (f"the initial backbone looks weak for this task{source}: a linear probe on its frozen features "
            f"scores val_acc={probe_val_acc:.3f}, below logistic regression on the pixels "
            f"({baseline_val_acc:.3f}); train the source task longer (pretrain.epochs), re-initialise its top "
            f"layers (backbone.reinit_last_n) or choose other weights")
