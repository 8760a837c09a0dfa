"""A picture of the model graph, like Keras ``plot_model(show_shapes=True)``.

Two routes, chosen by whether Graphviz's ``dot`` is on PATH:

* ``dot`` found: torchview records the real forward pass (branches and
  residual adds included) and Graphviz lays it out. Each module node reads
  ``'layer1.0.conv1: Conv2d | input: (..) | output: (..)'`` and nested modules
  are dashed clusters labelled the same way. The DOT source is written next
  to the image as ``<to_file>.dot`` so it can be logged and inspected.
* no ``dot`` (a user without root, a slim container): a warning, then a
  matplotlib chart with one box per layer in forward order. It shows names
  and shapes but not branches.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import graphviz
import torch
from torch import nn

from transferlab.tracking.summary import (
    ROOT_DISPLAY_NAME,
    LayerRow,
    _device_of,
    format_shape,
    module_table,
    training_modes_preserved,
)

SUFFIXES = (".png", ".svg", ".pdf")

# Beyond this many boxes the matplotlib chart is a scroll, not a picture; the
# chart then groups layers by shorter name prefixes (e.g. whole ResNet blocks).
MAX_CHART_BOXES = 60

NO_DOT_MESSAGE = (
    "Graphviz 'dot' not found; install graphviz (apt-get install graphviz / "
    "brew install graphviz / conda install graphviz) for the full graph. "
    "Drawing a simple layer chart with matplotlib instead."
)


class GraphDrawingWarning(UserWarning):
    """The full Graphviz picture could not be drawn; a simpler chart was drawn instead."""


def dot_available() -> bool:
    """Whether Graphviz's ``dot`` executable is on PATH."""
    return shutil.which("dot") is not None


def plot_model(
    model: nn.Module,
    example_input: torch.Tensor,
    to_file: str | Path,
    *,
    show_shapes: bool = True,
    show_layer_names: bool = True,
    depth: int = 3,
) -> Path:
    """Draw ``model`` as it runs on ``example_input`` and save it to ``to_file``.

    The suffix of ``to_file`` picks the format (.png, .svg or .pdf). ``depth``
    is how many levels of the module tree to show: modules nested deeper are
    drawn as their ancestor at that depth. Shapes include the batch dimension
    of ``example_input``. With Graphviz the DOT source also goes to
    ``to_file.with_suffix('.dot')``. Returns ``to_file`` as a Path.

    Raises ValueError for an unsupported suffix or depth. If Graphviz is
    missing or fails on this model, warns (:class:`GraphDrawingWarning`) and
    draws the matplotlib chart instead.
    """
    to_file = Path(to_file)
    fmt = _format_of(to_file)
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (1 = top-level modules only), got {depth}")
    to_file.parent.mkdir(parents=True, exist_ok=True)
    dot_file = to_file.with_suffix(".dot")

    if dot_available():
        try:
            digraph = build_digraph(
                model,
                example_input,
                show_shapes=show_shapes,
                show_layer_names=show_layer_names,
                depth=depth,
            )
            image = digraph.pipe(format=fmt)
        # torchview wraps any failure of its traced forward in RuntimeError;
        # graphviz raises CalledProcessError when dot itself fails; Attribute/
        # TypeError would mean a torchview whose internals build_digraph no
        # longer matches (the dot-route tests catch that; a run should not).
        except (RuntimeError, subprocess.CalledProcessError, AttributeError, TypeError) as err:
            warnings.warn(
                f"Graphviz drawing failed ({type(err).__name__}: {err}); "
                "drawing a simple layer chart with matplotlib instead.",
                GraphDrawingWarning,
                stacklevel=2,
            )
        else:
            dot_file.write_text(digraph.source)
            to_file.write_bytes(image)
            return to_file
    else:
        warnings.warn(NO_DOT_MESSAGE, GraphDrawingWarning, stacklevel=2)

    # A .dot left from an earlier run would no longer describe this picture.
    dot_file.unlink(missing_ok=True)
    _draw_chart(
        model,
        example_input,
        to_file,
        fmt=fmt,
        show_shapes=show_shapes,
        show_layer_names=show_layer_names,
        depth=depth,
    )
    return to_file


def show_model(model: nn.Module, example_input: torch.Tensor, **kw: Any) -> Any:
    """Notebook helper: :func:`plot_model` to a temporary PNG, shown inline.

    Returns an ``IPython.display.Image`` when IPython is installed, else the
    PNG's Path. ``kw`` are :func:`plot_model`'s keyword options.
    """
    path = Path(tempfile.mkdtemp(prefix="transferlab-graph-")) / "model.png"
    plot_model(model, example_input, path, **kw)
    try:
        from IPython.display import Image
    except ImportError:
        return path
    return Image(filename=str(path))


def build_digraph(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    show_shapes: bool = True,
    show_layer_names: bool = True,
    depth: int = 3,
) -> graphviz.Digraph:
    """The torchview graph of one forward pass, with module nodes named like Keras layers.

    Building it needs only the ``graphviz`` Python package; rendering it
    (``.pipe``, ``.render``) needs the ``dot`` executable.
    """
    from torchview import draw_graph  # heavy import, only this route needs it

    with training_modes_preserved(model):  # torchview restores only the root's flag
        graph = draw_graph(
            model,
            input_data=example_input,
            depth=depth,
            expand_nested=True,
            show_shapes=show_shapes,
            # torchview would otherwise pick CUDA when present and move the model there.
            device=_device_of(model, fallback=example_input.device),
        )

    # torchview names module nodes (and cluster titles) by class only, and
    # builds labels in an overridable method; so rename the recorded nodes,
    # swap the label method on this instance, and redraw without a second forward.
    if show_layer_names:
        names = {id(module): name for name, module in model.named_modules()}
        for node in _module_nodes(graph.node_hierarchy):
            name = names.get(node.compute_unit_id)
            if name:  # the root ('') and torchview's own wrapper keep the class name
                node.name = f"{name}: {node.name}"
    graph.get_node_label = partial(_node_label, show_shapes=show_shapes)
    graph.visual_graph.body.clear()
    graph.running_node_id = 0
    graph.id_dict = {}
    graph.node_set = set()
    graph.edge_list = []
    graph.fill_visual_graph()
    return graph.visual_graph


def _format_of(to_file: Path) -> str:
    suffix = to_file.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"Unsupported image suffix {to_file.suffix!r} in {str(to_file)!r}; "
            f"expected one of {list(SUFFIXES)}"
        )
    return suffix[1:]


def _module_nodes(hierarchy: Any) -> Iterator[Any]:
    """Every torchview ModuleNode in its nested {node: [children]} hierarchy."""
    from torchview.computation_node import ModuleNode

    if isinstance(hierarchy, dict):
        for node, children in hierarchy.items():
            if isinstance(node, ModuleNode):
                yield node
            for child in children:
                yield from _module_nodes(child)
    elif isinstance(hierarchy, ModuleNode):
        yield hierarchy


def _node_label(node: Any, *, show_shapes: bool) -> str:
    """Graphviz HTML label: title, then input and output shapes (tensors: one shape)."""
    from torchview.computation_node import TensorNode

    table = '<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="4">{}</TABLE>>'
    if isinstance(node, TensorNode):
        # With inner tensors hidden, the only tensors drawn are the model's input and output.
        title = html.escape(node.name.removesuffix("-tensor"))
        if not show_shapes:
            return table.format(f"<TR><TD>{title}</TD></TR>")
        return table.format(f"<TR><TD>{title}</TD><TD>{node.tensor_shape}</TD></TR>")
    title = html.escape(node.name)
    if not show_shapes:
        return table.format(f"<TR><TD>{title}</TD></TR>")
    rows = (
        f'<TR><TD ROWSPAN="2">{title}</TD><TD>input:</TD>'
        f"<TD>{html.escape(_shapes_text(node.input_shape))}</TD></TR>"
        f"<TR><TD>output:</TD><TD>{html.escape(_shapes_text(node.output_shape))}</TD></TR>"
    )
    return table.format(rows)


def _shapes_text(shapes: list[tuple[int, ...]]) -> str:
    """'(1, 64, 8, 8)', or '2 x (1, 64, 8, 8)' for the two inputs of a residual add."""
    counts: dict[tuple[int, ...], int] = {}
    for shape in shapes:
        counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    return ", ".join(str(s) if n == 1 else f"{n} x {s}" for s, n in counts.items())


def _chart_boxes(
    model: nn.Module, example_input: torch.Tensor, depth: int
) -> list[tuple[str, str, tuple[int, ...] | None, str]]:
    """(name, kind, output shape, colour) per box: the modules torchview would show at ``depth``.

    That is modules exactly ``depth`` levels down plus shallower leaves (and
    shallower modules holding their own parameters), in forward order.
    """
    rows = module_table(model, example_input)
    modules = dict(model.named_modules())
    has_children = {name: any(True for _ in m.children()) for name, m in modules.items()}

    def visible(level: int) -> list[LayerRow]:
        return [
            row
            for row in rows
            if row.name
            and (
                row.name.count(".") + 1 == level
                or (row.name.count(".") + 1 < level and (not has_children[row.name] or row.params))
            )
        ]

    while len(visible(depth)) > MAX_CHART_BOXES and depth > 1:
        depth -= 1
    layers = visible(depth) or [rows[0]]  # a bare leaf model has only its root row

    def colour(name: str) -> str:
        # Green for modules with weights, blue for parameter-free ones (in the
        # Graphviz picture blue marks torch functions such as the residual add).
        has_params = any(True for _ in modules[name].parameters())
        return "#c1ffc1" if has_params else "#f0f8ff"

    root = next(row for row in rows if row.name == "")
    return [
        ("input", "", tuple(example_input.shape), "#ffffe0"),
        *((row.name, row.kind, row.output_shape, colour(row.name)) for row in layers),
        ("output", "", root.output_shape, "#ffffe0"),
    ]


def _draw_chart(
    model: nn.Module,
    example_input: torch.Tensor,
    to_file: Path,
    *,
    fmt: str,
    show_shapes: bool,
    show_layer_names: bool,
    depth: int,
) -> None:
    """Vertical chain of boxes, one per layer: 'name: Kind' over 'output: shape'."""
    # Figure without pyplot: no global backend switch, no figure registry, thread safe.
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    texts, colours = [], []
    for name, kind, shape, colour in _chart_boxes(model, example_input, depth):
        if not kind:  # the input/output markers: just the tensor's shape
            texts.append(f"{name}\n{format_shape(shape)}" if show_shapes else name)
            colours.append(colour)
            continue
        title = f"{name or ROOT_DISPLAY_NAME}: {kind}" if show_layer_names else kind
        texts.append(f"{title}\noutput: {format_shape(shape)}" if show_shapes else title)
        colours.append(colour)

    # Geometry in inches (axes span the figure 1:1), text at 9 pt ~ 0.075 in per char.
    margin, box_h, gap = 0.2, 0.5 if show_shapes else 0.3, 0.3
    box_w = max(2.5, 0.075 * max(len(line) for t in texts for line in t.splitlines()) + 0.4)
    width = box_w + 2 * margin
    height = 2 * margin + len(texts) * box_h + (len(texts) - 1) * gap

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # top to bottom, like the Graphviz picture
    ax.axis("off")
    for i, (text, colour) in enumerate(zip(texts, colours)):
        top = margin + i * (box_h + gap)
        ax.add_patch(
            FancyBboxPatch(
                (margin, top),
                box_w,
                box_h,
                boxstyle="round,pad=0,rounding_size=0.06",
                facecolor=colour,
                edgecolor="black",
                linewidth=0.8,
            )
        )
        ax.text(width / 2, top + box_h / 2, text, ha="center", va="center", fontsize=9)
        if i + 1 < len(texts):
            ax.annotate(
                "",
                xy=(width / 2, top + box_h + gap),
                xytext=(width / 2, top + box_h),
                arrowprops={"arrowstyle": "-|>", "color": "black", "lw": 0.8,
                            "shrinkA": 0, "shrinkB": 0},
            )
    fig.savefig(to_file, format=fmt)
