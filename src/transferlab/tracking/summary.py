"""Per-layer table and parameter counts of a model, like Keras ``model.summary()``.

Shapes come from one real forward pass of an example batch (eval mode, no
grad) observed through module hooks, so they are what the model actually
produces, not what its constructor arguments suggest.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ROOT_DISPLAY_NAME = "(model)"  # how the root module (dotted name '') is shown


@dataclass(frozen=True)
class LayerRow:
    name: str  # dotted module name, e.g. 'backbone.layer1.0.conv1'; '' is the root
    kind: str  # class name, e.g. 'Conv2d'
    output_shape: tuple[int, ...] | None  # first tensor output; None if never called
    params: int  # own (non-recursive) parameters
    trainable: int  # own parameters with requires_grad


def param_counts(model: nn.Module, frozen: Collection[str] = frozenset()) -> dict[str, int]:
    """Total, trainable and frozen parameter counts (shared parameters counted once).

    A parameter is frozen when it does not require grad, or when its name is in
    ``frozen`` (the ``zero_lr`` freezing method keeps frozen parameters' grads on).
    """
    total = trainable = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if _trainable(name, p, frozen):
            trainable += p.numel()
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def _trainable(name: str, param: nn.Parameter, frozen: Collection[str]) -> bool:
    return param.requires_grad and name not in frozen


def module_table(model: nn.Module, example_input: torch.Tensor,
                 frozen: Collection[str] = frozenset()) -> list[LayerRow]:
    """One row per module, containers and the root included.

    Rows are in the order modules are first entered during the forward pass
    (so a container comes right before its children); modules the forward
    never calls come last with ``output_shape=None``. A module called several
    times (a shared ReLU) gets one row, from its first call.
    """
    first_call: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_enter(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            first_call.setdefault(name, len(first_call))

        return hook

    def on_exit(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name not in shapes:
                tensor = _first_tensor(output)
                shapes[name] = tuple(tensor.shape) if tensor is not None else None

        return hook

    modules = dict(model.named_modules())
    x = example_input.to(_device_of(model, fallback=example_input.device))
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(on_enter(name)))
            handles.append(module.register_forward_hook(on_exit(name)))
        with training_modes_preserved(model), torch.no_grad():
            model.eval()
            model(x)
    finally:
        for handle in handles:
            handle.remove()

    # Uncalled modules sort after every called one, in definition order.
    order = {name: first_call.get(name, len(modules) + i) for i, name in enumerate(modules)}
    rows = []
    for name in sorted(modules, key=order.__getitem__):
        own = [(f"{name}.{n}" if name else n, p) for n, p in modules[name].named_parameters(recurse=False)]
        rows.append(
            LayerRow(
                name=name,
                kind=type(modules[name]).__name__,
                output_shape=shapes.get(name),
                params=sum(p.numel() for _, p in own),
                trainable=sum(p.numel() for n, p in own if _trainable(n, p, frozen)),
            )
        )
    return rows


def layer_table(model: nn.Module, example_input: torch.Tensor,
                frozen: Collection[str] = frozenset()) -> list[LayerRow]:
    """Leaf modules, plus any module holding parameters of its own, in forward order.

    That selection covers every parameter exactly once (e.g. a ViT's
    class token on the root) without repeating containers' outputs.
    """
    children = {name: any(True for _ in m.children()) for name, m in model.named_modules()}
    return [
        row
        for row in module_table(model, example_input, frozen)
        if not children[row.name] or row.params > 0
    ]


def summary_text(model: nn.Module, example_input: torch.Tensor, frozen: Collection[str] = frozenset()) -> str:
    """A Keras-like text table of :func:`layer_table` followed by parameter totals."""
    header = ("Layer", "Type", "Output shape", "Params", "Trainable")
    body = [
        (
            row.name or ROOT_DISPLAY_NAME,
            row.kind,
            format_shape(row.output_shape),
            f"{row.params:,}",
            f"{row.trainable:,}",
        )
        for row in layer_table(model, example_input, frozen)
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        # Text columns left-aligned, counts right-aligned so digits line up.
        parts = [c.ljust(w) for c, w in zip(cells[:3], widths[:3])]
        parts += [c.rjust(w) for c, w in zip(cells[3:], widths[3:])]
        return "  ".join(parts).rstrip()

    rule_width = sum(widths) + 2 * (len(widths) - 1)
    counts = param_counts(model, frozen)
    lines = [
        f'Model: "{type(model).__name__}"',
        "=" * rule_width,
        line(header),
        "=" * rule_width,
        *(line(cells) for cells in body),
        "=" * rule_width,
        f"Total params: {counts['total']:,}",
        f"Trainable params: {counts['trainable']:,}",
        f"Frozen params: {counts['frozen']:,}",
    ]
    return "\n".join(lines) + "\n"


def format_shape(shape: tuple[int, ...] | None) -> str:
    """'(1, 64, 16, 16)' for a shape, 'not called' for a module the forward skipped."""
    return "not called" if shape is None else str(tuple(shape))


@contextmanager
def training_modes_preserved(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit.

    ``model.train(was_training)`` is not enough: fine-tuning often keeps
    frozen BatchNorm layers in eval mode inside a model in train mode, and a
    blanket restore would silently switch them back to updating statistics.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    # Inspecting a model must never move it, so the input follows the model.
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


def _first_tensor(output: Any) -> torch.Tensor | None:
    """First tensor in a (nested) tuple/list/namedtuple/dict output, depth first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None
