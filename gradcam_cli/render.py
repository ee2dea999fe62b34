"""Turning maps into pictures: normalised gradients, heat-map overlays and labelled grids."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TITLES = {"input": "input crop", "vanilla": "vanilla backprop", "guided": "guided backprop",
          "deconv": "deconvnet", "gradcam": "Grad-CAM", "guided-gradcam": "guided Grad-CAM"}
CAM_ALPHA = 0.5


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] by min and max; a constant map becomes all zeros."""
    x = x.detach().float().cpu()
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Turn a [0, 1] CxHxW tensor into an HxWx3 uint8 RGB array."""
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def cam_overlay(cam: torch.Tensor, crop: np.ndarray) -> np.ndarray:
    """Colour a 1xHxW CAM with the jet map and blend it over the RGB crop the model saw."""
    heat = matplotlib.colormaps["jet"](normalise(cam)[0].numpy())[..., :3]
    blended = CAM_ALPHA * heat + (1 - CAM_ALPHA) * crop.astype(np.float64) / 255
    return (blended * 255).round().astype(np.uint8)


def map_image(method: str, values: torch.Tensor, crop: np.ndarray) -> np.ndarray:
    """The picture of one map: CAMs as overlays, gradient maps min-max normalised in RGB."""
    if values.shape[0] == 1:
        return cam_overlay(values, crop)
    return to_uint8(normalise(values))


def grid_png(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[np.ndarray]]]) -> bytes:
    """Draw a grid: a labelled row per explained class, a titled column per picture."""
    size = 2.2
    fig = Figure(figsize=(size * len(columns), size * len(rows) + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(TITLES.get(columns[c], columns[c]), fontsize=9)
        wrapped = "\n".join(textwrap.fill(line, 22) for line in label.splitlines())
        axes[r][0].set_ylabel(wrapped, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
