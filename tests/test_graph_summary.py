"""Layer table, parameter counts and model pictures on real (tiny) models."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from transferlab.tracking import graph
from transferlab.tracking.graph import GraphDrawingWarning, build_digraph, plot_model, show_model
from transferlab.tracking.summary import layer_table, module_table, param_counts, summary_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_dot = pytest.mark.skipif(not graph.dot_available(), reason="Graphviz 'dot' not on PATH")


class Small(nn.Module):
    """Conv -> BN -> ReLU -> pool -> Linear; 224 + 16 + 36 = 276 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


Output = namedtuple("Output", ["logits", "embedding"])


class TupleOut(Small):
    """Same layers, but returns (logits, embedding) like a model with an aux output."""

    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        embedding = self.pool(self.features(x)).flatten(1)
        return Output(self.head(embedding), embedding)


class WithToken(nn.Module):
    """Holds a parameter of its own (like a ViT class token) and an unused module."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 5))
        self.proj = nn.Linear(5, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x + self.token)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)


def _assert_image(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width > 0 and height > 0


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# --- layer_table / summary ---------------------------------------------------


def test_layer_table_shapes_and_params(x):
    rows = layer_table(Small(), x)
    assert [(r.name, r.kind, r.output_shape, r.params) for r in rows] == [
        ("features.0", "Conv2d", (2, 8, 8, 8), 3 * 8 * 9 + 8),
        ("features.1", "BatchNorm2d", (2, 8, 8, 8), 16),
        ("features.2", "ReLU", (2, 8, 8, 8), 0),
        ("pool", "AdaptiveAvgPool2d", (2, 8, 1, 1), 0),
        ("head", "Linear", (2, 4), 36),
    ]
    assert all(r.trainable == r.params for r in rows)


def test_frozen_counts(x):
    model = Small()
    for p in model.features.parameters():
        p.requires_grad_(False)
    assert param_counts(model) == {"total": 276, "trainable": 36, "frozen": 240}
    rows = {r.name: r for r in layer_table(model, x)}
    assert (rows["features.0"].params, rows["features.0"].trainable) == (224, 0)
    assert (rows["head"].params, rows["head"].trainable) == (36, 36)

    text = summary_text(model, x)
    for expected in ("Total params: 276", "Trainable params: 36", "Frozen params: 240"):
        assert expected in text
    assert "features.0" in text and "Conv2d" in text and "(2, 8, 8, 8)" in text


def test_training_modes_restored_per_module(x):
    model = Small().train()
    model.features[1].eval()  # a frozen BN inside a training model must stay frozen
    before = _modes(model)
    layer_table(model, x)
    assert _modes(model) == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_hooks_and_modes_restored_when_forward_fails():
    model = Small().train()
    before = _modes(model)
    with pytest.raises(RuntimeError):
        layer_table(model, torch.randn(2, 5, 16, 16))  # wrong channel count
    assert _modes(model) == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_tuple_returning_forward(x):
    model = TupleOut()
    rows = layer_table(model, x)
    assert rows[-1].name == "head" and rows[-1].output_shape == (2, 4)
    root = next(r for r in module_table(model, x) if r.name == "")
    assert root.output_shape == (2, 4)  # first tensor of the namedtuple
    assert "Total params: 276" in summary_text(model, x)


def test_own_parameters_and_uncalled_modules():
    rows = {r.name: r for r in layer_table(WithToken(), torch.randn(2, 5))}
    assert rows[""].params == 5  # the token lives on the root
    assert rows["proj"].output_shape == (2, 3)
    assert rows["unused"].output_shape is None
    assert sum(r.params for r in rows.values()) == param_counts(WithToken())["total"]


def test_resnet18_table():
    model = resnet18(weights=None)
    rows = {r.name: r for r in layer_table(model, torch.zeros(1, 3, 32, 32))}
    assert rows["conv1"].output_shape == (1, 64, 16, 16)
    assert rows["layer4.1.bn2"].output_shape == (1, 512, 1, 1)
    assert rows["fc"].output_shape == (1, 1000)
    assert sum(r.params for r in rows.values()) == param_counts(model)["total"] == 11_689_512


# --- plot_model --------------------------------------------------------------


def test_digraph_source_names_layers_and_shapes(x):
    # Building the source needs only the graphviz package, not the dot binary.
    source = build_digraph(Small(), x).source
    assert "features.0: Conv2d" in source
    assert "head: Linear" in source
    assert "(2, 8, 8, 8)" in source
    assert "features: Sequential" in source  # the dashed cluster title


@needs_dot
def test_plot_model_dot_route_small(tmp_path, x):
    model = Small().train()
    model.features[1].eval()
    before = _modes(model)
    out = plot_model(model, x, tmp_path / "model.png")
    assert out == tmp_path / "model.png"
    _assert_image(out)
    source = out.with_suffix(".dot").read_text()
    assert "features.0: Conv2d" in source and "(2, 8, 8, 8)" in source
    assert _modes(model) == before


@needs_dot
def test_plot_model_dot_route_resnet18(tmp_path, recwarn):
    out = plot_model(resnet18(weights=None), torch.zeros(1, 3, 32, 32), tmp_path / "r18.png")
    _assert_image(out)
    source = out.with_suffix(".dot").read_text()
    assert "conv1: Conv2d" in source
    assert "layer1.0.conv1: Conv2d" in source
    assert "(1, 64, 16, 16)" in source
    assert not [w for w in recwarn if issubclass(w.category, GraphDrawingWarning)]


@needs_dot
def test_plot_model_svg_and_tuple_output(tmp_path, x):
    out = plot_model(TupleOut(), x, tmp_path / "model.svg")
    assert b"<svg" in out.read_bytes()
    assert "head: Linear" in out.with_suffix(".dot").read_text()


def test_plot_model_matplotlib_route(tmp_path, monkeypatch):
    monkeypatch.setattr(graph, "dot_available", lambda: False)
    model = resnet18(weights=None).train()
    model.bn1.eval()
    before = _modes(model)
    out = tmp_path / "r18.png"
    out.with_suffix(".dot").write_text("stale")  # must not outlive a chart-only run
    with pytest.warns(GraphDrawingWarning, match="Graphviz 'dot' not found"):
        plot_model(model, torch.zeros(1, 3, 32, 32), out)
    _assert_image(out)
    assert not out.with_suffix(".dot").exists()
    assert _modes(model) == before


def test_matplotlib_route_when_dot_not_on_path(tmp_path, monkeypatch, x):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot there
    with pytest.warns(GraphDrawingWarning, match="install graphviz"):
        out = plot_model(TupleOut(), x, tmp_path / "sub" / "model.png")
    _assert_image(out)


def test_chart_collapses_deep_models(monkeypatch):
    # resnet50 has ~170 leaves; the chart groups them into blocks instead.
    from torchvision.models import resnet50

    boxes = graph._chart_boxes(resnet50(weights=None), torch.zeros(1, 3, 32, 32), depth=3)
    assert len(boxes) <= graph.MAX_CHART_BOXES + 2  # + input and output markers
    assert ("layer1.0", "Bottleneck", (1, 256, 8, 8)) in [b[:3] for b in boxes]


@pytest.mark.parametrize("bad", ["model.jpg", "model", "model.dot"])
def test_plot_model_rejects_unknown_suffix(tmp_path, x, bad):
    with pytest.raises(ValueError, match="Unsupported image suffix"):
        plot_model(Small(), x, tmp_path / bad)


def test_plot_model_rejects_bad_depth(tmp_path, x):
    with pytest.raises(ValueError, match="depth must be >= 1"):
        plot_model(Small(), x, tmp_path / "model.png", depth=0)


def test_show_model(x, monkeypatch):
    monkeypatch.setattr(graph, "dot_available", lambda: False)
    with pytest.warns(GraphDrawingWarning):
        shown = show_model(Small(), x)
    data = shown.read_bytes() if isinstance(shown, Path) else shown.data
    assert data[:8] == PNG_MAGIC
