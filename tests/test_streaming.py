"""Data larger than the memory budget streams to the device, with the same results as resident data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO
from transferlab.errors import ConfigError
from transferlab.training.batches import PREFETCH, Batches, StreamedBatches, place_splits


def _data(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8), torch.arange(n) % 7


def test_streamed_batches_equal_resident_ones_in_any_order() -> None:
    images, labels = _data()
    resident, streamed = Batches(images.clone(), labels.clone()), StreamedBatches(images, labels, torch.device("cpu"))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    pairs = list(zip(resident.train_batches(order, 16, 3), streamed.train_batches(order, 16, 3)))
    assert len(pairs) == 3
    for (xr, yr), (xs, ys) in pairs:
        assert torch.equal(xr, xs) and torch.equal(yr, ys)
    assert torch.equal(pairs[0][1][0], images[order[:16]])
    evals = list(zip(resident.eval_batches(20), streamed.eval_batches(20)))
    assert [len(y) for _, (_, y) in evals] == [20, 20, 10]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in evals)


def test_a_read_error_reaches_the_loop() -> None:
    images, labels = _data()
    streamed = StreamedBatches(images[:10], labels, torch.device("cpu"))  # fewer images than labels
    with pytest.raises(IndexError):
        list(streamed.train_batches(torch.arange(50), 16, 3))


def test_the_smallest_splits_stay_resident_within_the_budget() -> None:
    batch = 100
    need = (PREFETCH + 2) * batch
    assert place_splits({"train": 5000, "val": 800}, batch, need + 6000) == {"train": "resident", "val": "resident"}
    assert place_splits({"train": 5000, "val": 800}, batch, need + 1000) == {"train": "stream", "val": "resident"}
    assert place_splits({"train": 5000, "val": 800}, batch, need) == {"train": "stream", "val": "stream"}
    with pytest.raises(ConfigError, match=r"^trainer.memory_budget_mb: .* trainer.batch_size"):
        place_splits({"train": 5000, "val": 800}, batch, need - 1)


def test_a_zero_budget_is_refused_naming_the_key() -> None:
    from transferlab.compose import compose
    from transferlab.config import load_config

    with pytest.raises(ConfigError, match=r"^trainer.memory_budget_mb: must be > 0"):
        load_config(compose(["trainer.memory_budget_mb=0"], config_dir=REPO / "conf"))


def _pipeline(tmp_path: Path, name: str, *extra: str) -> tuple[dict, list[str], str]:
    from transferlab.compose import compose
    from transferlab.config import load_config
    from transferlab.pipeline import run_pipeline, with_output_dir

    overrides = ["trainer.epochs=3", "pretrain.epochs=1", "trainer.progress=false", "tracking.log_model=false",
                 "tracking.log_graph=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 f"paths.cache={tmp_path / 'cache'}", "trainer.eval_batch_size=64", *extra]
    cfg = with_output_dir(load_config(compose(overrides, config_dir=REPO / "conf")), tmp_path / name)
    run_pipeline(cfg)
    out = Path(cfg.paths.metrics)
    history = (Path(cfg.paths.plots) / "history.csv").read_text().splitlines()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id],
                             filter_string=f"params.`paths.model` = '{cfg.paths.model}'")[0]
    metrics = {**json.loads((out / "train.json").read_text()), **json.loads((out / "test.json").read_text())}
    return metrics, history, run.data.params["data.placement"]


def test_the_default_experiment_streams_under_a_tiny_budget_with_the_same_results(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """Digits' training split is 37 KB: a 0.03 MB budget streams it (and keeps validation resident)."""
    monkeypatch.chdir(tmp_path)
    resident = _pipeline(tmp_path, "resident")
    streamed = _pipeline(tmp_path, "streamed", "trainer.memory_budget_mb=0.03")
    assert resident[2] == "train=resident val=resident"
    assert streamed[2] == "train=stream val=resident"
    assert streamed[1] == resident[1]  # every epoch's losses, accuracies and learning rates
    assert streamed[0] == pytest.approx(resident[0], abs=1e-6)
