"""How a layer's output becomes an NxCxhxw feature map: its layout, decided by probe forwards.

A layer output is a convolutional map (NxCxhxw), a channels-last map (NxhxwxC, Swin) or a token
sequence (NxTxC, ViT: prefix tokens, then the patch grid row by row). The layout is never
guessed from the shape (an 8x12 map with 8 channels fits both map layouts); it is decided by
running the model on zeros of the input's size, once per model and input size:

- a second forward at twice the input's width shows which axis follows the width: axis 3 of
  NxCxhxw, axis 2 of NxhxwxC, axis 1 of tokens; a third at twice its height, which follows the
  height: axis 2, axis 1, axis 1 again. An output whose axes follow the sides otherwise (logits,
  pooled features, attention windows, attention heads' NxheadsxTxd, whose token axis follows
  both sides) has no grid;
- a token sequence lies on the grid of the last convolution before it (the patch embedding),
  so h and w follow the input's sides; the tokens before that grid are prefix tokens (class,
  distillation, register tokens);
- a model that runs at one input size only (torchvision's ViT) allows no second forward: a map
  is then taken to lie on the last convolution's grid, in whichever layout puts it in place.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .engine import evaluating
from .errors import ArgumentError

Shape = tuple[int, ...]
Grid = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """Where a layer output keeps its channels and its h x w ``grid``: ``kind`` is "nchw",
    "nhwc" or "tokens" (NxTxC: ``prefix`` leading tokens, then the grid row by row)."""

    kind: str
    grid: Grid
    prefix: int = 0

    @property
    def channel_axis(self) -> int:
        """The axis of the layer output that holds its channels."""
        return 1 if self.kind == "nchw" else -1


def to_nchw(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Fold a layer output of this layout into NxCxhxw."""
    (h, w), shape = layout.grid, tuple(t.shape)
    if layout.kind == "tokens" and len(shape) == 3 and shape[1] == layout.prefix + h * w:
        return t[:, layout.prefix:].transpose(1, 2).reshape(shape[0], shape[2], h, w)
    if layout.kind == "nhwc" and len(shape) == 4 and shape[1:3] == layout.grid:
        return t.permute(0, 3, 1, 2)
    if layout.kind == "nchw" and len(shape) == 4 and shape[2:] == layout.grid:
        return t
    raise ValueError(f"a layer output of shape {shape} does not fit {layout}")


Probe = dict[str, tuple[Shape, "Layout | None"]]
_PROBES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Probe]] = weakref.WeakKeyDictionary()


def probe(module: nn.Module, example: torch.Tensor) -> Probe:
    """Each submodule's output shape and layout (None: no grid), by name, for inputs shaped like
    ``example`` (NxCxHxW); probed once per model, input shape and set of submodules."""
    key = (tuple(example.shape[1:]), example.dtype, example.device, tuple(map(id, module.modules())))
    probes = _PROBES.setdefault(module, {})
    if key not in probes:
        probes[key] = _decide(module, example[:1])
    return probes[key]


def _decide(module: nn.Module, example: torch.Tensor) -> Probe:
    """Run the model on zeros like ``example``, at twice its width and at twice its height;
    decide every layout."""
    try:
        seen = _shapes(module, torch.zeros_like(example))
    except Exception as exc:  # whatever the model raises for an input it cannot take
        _, channels, height, width = example.shape
        raise ArgumentError("input_size", f"{height},{width}", f"the model cannot run on {channels}-channel "
                            f"{height}x{width} inputs ({type(exc).__name__}: {exc})") from exc
    n, c, h, w = example.shape
    wider = _other_size(module, example.new_zeros(n, c, h, 2 * w))
    taller = _other_size(module, example.new_zeros(n, c, 2 * h, w))
    return {name: (shape, _layout(shape, grid, wider.get(name), taller.get(name)))
            for name, (shape, grid) in seen.items()}


def _other_size(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[Shape, Grid | None]]:
    """``_shapes`` at another input size; empty when the model refuses that size."""
    try:
        return _shapes(module, x)
    except Exception:  # any refusal of another size (torchvision's ViT asserts its own)
        return {}


def _shapes(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[Shape, Grid | None]]:
    """Each submodule's output shape at its last call, with the grid of the last convolution
    that had finished by then."""
    seen: dict[str, tuple[Shape, Grid | None]] = {}
    conv: list[Grid | None] = [None]

    def record(name: str, m: nn.Module):
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                if isinstance(m, nn.Conv2d) and out.dim() == 4:
                    conv[0] = tuple(out.shape[2:])
                seen[name] = tuple(out.shape), conv[0]
        return hook

    handles = [m.register_forward_hook(record(n, m)) for n, m in module.named_modules()]
    try:
        with evaluating(module), torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _layout(shape: Shape, conv: Grid | None, wider: tuple[Shape, Grid | None] | None,
            taller: tuple[Shape, Grid | None] | None) -> Layout | None:
    """The layout of an output of ``shape`` made after a convolution on grid ``conv``, from the
    same at twice the input's width (``wider``; None when the model runs at one size only) and
    at twice its height (``taller``; None when the model refuses that size alone)."""
    if wider is None:
        return _on_grid(shape, conv)
    across, down = _follows(shape, wider), None if taller is None else _follows(shape, taller)
    if len(shape) == 4 and across == [3] and down in (None, [2]):
        return Layout("nchw", shape[2:])
    if len(shape) == 4 and across == [2] and down in (None, [1]):
        return Layout("nhwc", shape[1:3])
    narrow, wide = _tokens(shape, conv), _tokens(*wider)
    if across == [1] and down in (None, [1]) and narrow and wide and narrow.prefix == wide.prefix:
        return narrow
    return None


def _follows(shape: Shape, other: tuple[Shape, Grid | None]) -> list[int]:
    """The axes of ``shape`` that differ at the other input size (all of them if the rank does)."""
    return [i for i in range(len(shape)) if len(other[0]) != len(shape) or shape[i] != other[0][i]]


def _on_grid(shape: Shape, conv: Grid | None) -> Layout | None:
    """For a model that runs at one input size: a map on the last convolution's grid, or tokens."""
    if len(shape) == 4 and shape[2:] == conv:
        return Layout("nchw", conv)
    if len(shape) == 4 and shape[1:3] == conv:
        return Layout("nhwc", conv)
    return _tokens(shape, conv)


def _tokens(shape: Shape, conv: Grid | None) -> Layout | None:
    """A token sequence NxTxC: prefix tokens, then the last convolution's grid."""
    if len(shape) != 3 or conv is None or shape[1] < conv[0] * conv[1]:
        return None
    return Layout("tokens", conv, shape[1] - conv[0] * conv[1])
