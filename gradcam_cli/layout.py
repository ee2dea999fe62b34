"""How a layer's output becomes an NxCxhxw feature map, whatever the architecture's layout."""

from __future__ import annotations

import math

import torch


def token_grid(tokens: int) -> tuple[int, int] | None:
    """Return (leading extra tokens, grid side) when a token count folds into a square grid."""
    for extra in (0, 1):
        side = math.isqrt(tokens - extra)
        if side > 1 and side * side == tokens - extra:
            return extra, side
    return None


def is_spatial(shape: torch.Size | tuple[int, ...]) -> bool:
    """Tell whether a layer output has a spatial grid of at least 2x2 to explain."""
    if len(shape) == 4:
        return min(shape[2], shape[3]) > 1 or min(shape[1], shape[2]) > 1
    return len(shape) == 3 and token_grid(shape[1]) is not None


def _channels_last(t: torch.Tensor) -> bool:
    """Tell an NxHxWxC map (Swin) from NxCxHxW: crops are square, so a square trailing pair
    means channels-first."""
    return t.dim() == 4 and t.shape[2] != t.shape[3] and t.shape[1] == t.shape[2]


def channel_axis(t: torch.Tensor) -> int:
    """The axis of a layer output that holds its channels (1, or last for tokens and Swin)."""
    return t.dim() - 1 if t.dim() == 3 or _channels_last(t) else 1


def grid_size(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The (h, w) of a spatial layer output's grid, whatever its layout."""
    if len(shape) == 3:
        side = token_grid(shape[1])[1]
        return side, side
    return (shape[1], shape[2]) if shape[2] != shape[3] and shape[1] == shape[2] else (shape[2], shape[3])


def to_nchw(t: torch.Tensor) -> torch.Tensor:
    """Fold a layer output into NxCxhxw.

    Convolutional maps pass unchanged; channels-last maps (Swin) are permuted; token sequences
    (ViT) lose their class token and are folded into the square patch grid, whose side is
    read from the token count.
    """
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2) if _channels_last(t) else t
    grid = token_grid(t.shape[1]) if t.dim() == 3 else None
    if grid is None:
        raise ValueError(f"a layer output of shape {tuple(t.shape)} has no spatial grid")
    extra, side = grid
    return t[:, extra:].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
