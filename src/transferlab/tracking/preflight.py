"""Tracking checks that run before any work: the store, the server, the URIs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transferlab.errors import TrackingError

if TYPE_CHECKING:
    from transferlab.config.schema import ExperimentConfig


def check_tracking(cfg: "ExperimentConfig") -> None:
    """Fail fast, before any stage does work, on a tracking setup that cannot work.

    Resolves the store (:func:`transferlab.tracking.store.tracking_uri`), checks
    that a tracking server answers within a few seconds, creates or migrates a
    SQLite store and the experiment, and checks that ``backbone.weights`` given
    as ``runs:/`` or ``models:/`` names a run of that store with a checkpoint.
    """
    from transferlab.models.weights import kind_of
    from transferlab.tracking.store import ensure_store, tracking_uri

    uri = tracking_uri(cfg.tracking.uri)
    ensure_store(uri, cfg.tracking.experiment)
    if kind_of(cfg.backbone.weights) == "mlflow":
        from transferlab.tracking.models import check_weights_uri

        check_weights_uri(cfg.backbone.weights, uri=uri)  # type: ignore[arg-type]
