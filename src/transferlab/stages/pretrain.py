"""Stage ``pretrain``: write the backbone's initial weights to one file.

Whatever ``backbone.weights`` names (see :mod:`transferlab.models.weights`),
the result is ``paths.weights`` (safetensors) plus a JSON sidecar with the
source, the load report and the preprocessing the weights expect. For
``source`` this stage trains the backbone on the source task first.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from transferlab.cli import stage_main
from transferlab.config.schema import ExperimentConfig
from transferlab.data import load_prepared, read_prepared_meta
from transferlab.models.assemble import build_backbone, resolve_input_size
from transferlab.models.weights import (
    kind_of, load_backbone_state, published_weights, read_weights_file, save_weights,
)
from transferlab.config.params import to_container
from transferlab.training.build import build_training, source_task_config
from transferlab.training.distributed import context
from transferlab.training.resume import LastCheckpoint
from transferlab.training.runtime import configure_threads, resolve_device, seed_everything


def train_source_task(cfg: ExperimentConfig, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """Train backbone + linear head on the source classes with ``pretrain``'s recipe; keep the backbone."""
    data = load_prepared(Path(cfg.paths.prepared) / "source")
    source = source_task_config(cfg)
    t = build_training(source, data, device=device)
    # An interrupted source task of this very setting continues; run() removes it once the weights are out.
    last = LastCheckpoint(cfg.paths.weights, {"config": to_container(source), "data": data.meta.get("data_hash")})
    result = t.fit(t.batches(data, "train"), t.batches(data, "val"), desc="pretrain (source task)", last=last)
    meta = {"mean": t.spec.mean, "std": t.spec.std, "input_size": t.spec.input_size,
            "source_task": {"classes": data.class_names, "epochs": t.settings.epochs,
                            "val_acc": result.history[result.best_epoch]["val_acc"],
                            "history": result.history, "data_hash": data.meta.get("data_hash")}}
    return t.backbone, meta


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    seed_everything(cfg.seed)
    configure_threads(cfg.trainer.num_threads)
    spec = cfg.backbone.weights
    kind = kind_of(spec)
    meta: dict[str, Any] = {"weights": spec, "kind": kind, "backbone": cfg.backbone.name}
    state, extra = None, {}
    if kind == "published":
        source = published_weights(cfg.backbone.name)
        assert source is not None  # validate() checked it
        extra = source.preprocessing(cfg.backbone.name, spec)  # type: ignore[arg-type]
        # Published weights have a size: the backbone is built at it unless input_size is configured.
        sized = replace(cfg.backbone, input_size=cfg.backbone.input_size or extra["input_size"])
        state = source.state_dict(sized, spec)  # type: ignore[arg-type]
    elif kind == "mlflow":
        from transferlab.tracking.models import mlflow_state_dict

        state, extra = mlflow_state_dict(spec, uri=cfg.tracking.uri)  # type: ignore[arg-type]
    elif kind == "file":
        state = read_weights_file(spec)  # type: ignore[arg-type]
    weights_size = extra.get("input_size")
    if weights_size and cfg.backbone.input_size not in (None, weights_size):
        print(f"pretrain: note: these weights were trained at {weights_size} px; backbone.input_size="
              f"{cfg.backbone.input_size} overrides that (null follows the weights)")
    data_size = max(read_prepared_meta(Path(cfg.paths.prepared) / "target")["image_size"])
    cfg = resolve_input_size(cfg, weights_size=weights_size, data_size=data_size)
    if kind == "source":
        backbone, extra = train_source_task(cfg, resolve_device(cfg.trainer.device))
    else:
        backbone = build_backbone(cfg.backbone)
    meta.update(extra)
    if state is not None:
        report = load_backbone_state(backbone, state, source=str(spec))
        meta["load_report"] = report.as_dict()
        print(f"pretrain: loaded {spec}: {len(report.missing)} missing, {len(report.unexpected)} unexpected, "
              f"{len(report.ignored)} replaced-head keys ignored")
        for label, keys in (("missing", report.missing), ("unexpected", report.unexpected)):
            if keys:
                print(f"pretrain: {label} keys: {keys[:10]}{' ...' if len(keys) > 10 else ''}")
    meta["input_size"] = cfg.backbone.input_size
    if not context().main:  # under torchrun, rank 0 writes
        return meta
    save_weights(cfg.paths.weights, backbone, meta)
    LastCheckpoint(cfg.paths.weights, None).remove()  # the source task's, if it ran (keyed by the output)
    print(f"pretrain: wrote {cfg.paths.weights} ({kind}, input size {cfg.backbone.input_size} px)")
    return meta


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
