"""Turning maps into pictures: normalised gradients, heat-map overlays and labelled grids."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from functools import lru_cache

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import ArgumentError
from .methods import REGISTRY, overlay
from .methods import title as map_title

TITLES = {"input": "input crop", **{m.name: m.title for m in REGISTRY}}
COLORMAP, CAM_ALPHA = "jet", 0.5  # the heat map's colours and weight by default
DPI = 100
LABEL_WIDTH, TITLE_HEIGHT, GAP = 120, 22, 4  # pixels


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] by min and max; a constant map becomes all zeros."""
    x = x.detach().float().cpu()
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Turn a [0, 1] CxHxW tensor into an HxWx3 uint8 RGB array."""
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def as_rgb(picture: np.ndarray) -> np.ndarray:
    """An HxWx3 picture; a one-channel model's HxW gray pixels drawn as RGB."""
    return np.repeat(picture[..., None], 3, axis=2) if picture.ndim == 2 else picture


def check_colormap(colormap: str) -> None:
    """Refuse a name that is not a matplotlib colour map, naming a few that are."""
    if colormap not in matplotlib.colormaps:
        raise ArgumentError("colormap", colormap, "not a matplotlib colour map; e.g. jet, viridis, "
                            "inferno, turbo, gray (matplotlib.colormaps lists them all)")


def check_alpha(alpha: float) -> None:
    """Refuse a heat-map weight outside 0..1 (or not a number)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ArgumentError("alpha", alpha, "the heat map's weight: a number from 0 to 1")


def check_colours(colormap: str, alpha: float) -> None:
    """Refuse a bad colour map or alpha (before any work that would draw with them)."""
    check_colormap(colormap)
    check_alpha(alpha)


@lru_cache(maxsize=8)
def blend_table(colormap: str = COLORMAP, alpha: float = CAM_ALPHA) -> np.ndarray:
    """Every blended colour as a uint8 table [colour index, photo value, channel]: a CAM pixel
    of colour index i over a photo value p becomes round(255 (alpha heat_i + (1 - alpha) p/255)),
    the same float arithmetic for every overlay, with no float image ever built."""
    check_colours(colormap, alpha)
    colours = matplotlib.colormaps[colormap]
    heat = colours(np.arange(colours.N))[:, None, :3]
    photo = np.arange(256, dtype=np.float64)[None, :, None]
    return ((alpha * heat + (1 - alpha) * photo / 255) * 255).round().astype(np.uint8)


def colour_index(values: np.ndarray, n: int) -> np.ndarray:
    """matplotlib's colour index of [0, 1] values in an n-colour map: floor(v n), 1 -> n - 1."""
    return np.minimum((values * np.float32(n)).astype(np.intp), n - 1)


def blend(values: np.ndarray, photo: np.ndarray, colormap: str = COLORMAP,
          alpha: float = CAM_ALPHA) -> np.ndarray:
    """Colour HxW [0, 1] float32 values and blend them over an HxWx3 uint8 photo."""
    table = blend_table(colormap, alpha)
    index = colour_index(values, table.shape[0])[..., None]
    return table[index, photo, np.arange(3)]


def cam_overlay(cam: torch.Tensor, crop: np.ndarray, colormap: str = COLORMAP,
                alpha: float = CAM_ALPHA) -> np.ndarray:
    """Colour a min-max normalised 1xHxW CAM with ``colormap`` and blend it with weight
    ``alpha`` over the crop the model saw (RGB, or a one-channel model's gray pixels)."""
    return blend(normalise(cam)[0].numpy(), as_rgb(crop), colormap, alpha)


def map_image(method: str, values: torch.Tensor, crop: np.ndarray, colormap: str = COLORMAP,
              alpha: float = CAM_ALPHA) -> np.ndarray:
    """The picture of one map: CAMs as overlays, gradient maps min-max normalised, in RGB, or
    in gray for a one-channel model (whose gradients have one channel, like a CAM)."""
    if overlay(method):
        return cam_overlay(values, crop, colormap, alpha)
    return to_uint8(normalise(values))


def grid_image(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[np.ndarray]]]) -> np.ndarray:
    """Lay pictures out at their own resolution: a labelled row per class, a titled column each.

    matplotlib draws only the text on a blank canvas; the pictures are then pasted pixel for
    pixel, so nothing is resampled and a grid costs a few milliseconds rather than a figure
    of axes per image.
    """
    cell_h, cell_w = rows[0][1][0].shape[:2]
    width = LABEL_WIDTH + len(columns) * (cell_w + GAP)
    height = TITLE_HEIGHT + len(rows) * (cell_h + GAP)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    for c, column in enumerate(columns):
        x = LABEL_WIDTH + c * (cell_w + GAP) + cell_w / 2
        fig.text(x / width, 1 - 4 / height, TITLES.get(column) or map_title(column), fontsize=9,
                 ha="center", va="top")
    for r, (label, _) in enumerate(rows):
        middle = TITLE_HEIGHT + r * (cell_h + GAP) + cell_h / 2
        wrapped = "\n".join(textwrap.fill(line, 18) for line in label.splitlines())
        fig.text(4 / width, 1 - middle / height, wrapped, fontsize=8, va="center")
    canvas.draw()
    drawn = np.asarray(canvas.buffer_rgba())[..., :3]
    grid = np.full((height, width, 3), 255, dtype=np.uint8)  # exact size, however matplotlib rounds
    grid[:min(height, drawn.shape[0]), :min(width, drawn.shape[1])] = drawn[:height, :width]
    for r, (_, images) in enumerate(rows):
        top = TITLE_HEIGHT + r * (cell_h + GAP)
        for c, image in enumerate(images):
            left = LABEL_WIDTH + c * (cell_w + GAP)
            grid[top:top + cell_h, left:left + cell_w] = as_rgb(image)
    return grid


Panel = tuple[str, str, str, Sequence, dict[str, Sequence[float]]]  # title, x, y, ticks, lines


def line_plot(panels: Sequence[Panel]) -> np.ndarray:
    """Labelled line charts side by side, as an RGB array: numeric x values are plotted as
    they are, names become one tick each (e.g. the blocks of a randomisation test)."""
    fig = Figure(figsize=(5.5 * len(panels), 4.2), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    for i, (title, xlabel, ylabel, ticks, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        named = bool(ticks) and isinstance(ticks[0], str)
        xs = list(range(len(ticks))) if named else list(ticks)
        for label, values in lines.items():
            ax.plot(xs, [np.nan if v is None else v for v in values], marker="." if named else None,
                    label=label)
        if named:
            ax.set_xticks(xs, ticks, rotation=90, fontsize=6)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
