"""Explanations in a notebook: the labelled grid the CLI writes, drawn from an ``Explanation``.

``explain_images`` explains a few images (files or PIL images) through a loaded model's own
preprocessing, so the result knows the crops the model saw and the class names; its grid
equals the ``grid.png`` that ``classify`` writes for the same image and settings. A result of
``explain`` (tensors in, no preprocessing known) shows its input min-max scaled to 0..255 and
labels rows by class id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from ..errors import ArgumentError
from ..explanation import Explanation, explain_layers
from ..io import load_image, png_bytes, to_rgb
from ..methods import DEFAULT_METHODS
from ..models import LoadedModel, default_layer
from ..paths import with_normalisation
from ..render import DPI, grid_image, map_image, normalise, to_uint8
from ..settings import MethodSettings, check_settings


def explain_images(model: LoadedModel, images: Sequence[str | Path | Image.Image], layer: str | None = None,
                   topk: int = 3, class_ids: Sequence[int] = (), methods: Sequence[str] = DEFAULT_METHODS,
                   batch_size: int = 32, settings: MethodSettings | None = None) -> Explanation:
    """``explain`` for a few images as ``classify`` sees them (decoded, resized, cropped by the
    model's preprocessing; ``layer`` defaults to the architecture's), keeping the crops and the
    class names for ``show``, ``plot`` and ``_repr_png_``."""
    crops = [model.preprocess.model_pixels(to_rgb(i) if isinstance(i, Image.Image) else load_image(i))
             for i in images]
    x = torch.stack([model.preprocess.to_tensor(c) for c in crops])
    x = x.to(next(model.module.parameters()).device)
    chosen = layer or default_layer(model.arch, model.module, model.preprocess)
    settings = with_normalisation(check_settings(settings), model.preprocess)
    result = explain_layers(model.module, x, [chosen], topk, class_ids, methods, batch_size,
                            settings=settings)[0]
    result.pictures, result.names = [np.asarray(c) for c in crops], list(model.categories)
    return result


def checked_image(result: Explanation, image: int) -> int:
    """The index of one image of the batch, refused naming ``image`` when there is none."""
    count = len(result.classes)
    if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < count:
        raise ArgumentError("image", image, f"this explanation has {count} image(s): give 0 to {count - 1}")
    return image


def picture(result: Explanation, image: int) -> np.ndarray:
    """The input column's picture: the model's crop, or the input tensor min-max scaled."""
    if result.pictures is not None:
        return result.pictures[image]
    return to_uint8(normalise(result.inputs[image]))


def labels(result: Explanation, image: int) -> list[str]:
    """Each shown row's label: the class name (or id) and its score, as classify's grid."""
    return [f"{name}\n{result.symbol} = {value:.3f}" for _k, name, value in _rows(result, image)]


def _rows(result: Explanation, image: int) -> list[tuple[int, str, float]]:
    """The image's explained candidates that have maps: (rank, name, score)."""
    rows = []
    for k, class_id in enumerate(result.classes[image].tolist()):
        value = float(result.scores[image, class_id]) if class_id >= 0 else math.nan
        if math.isfinite(value):
            name = result.names[class_id] if result.names is not None else f"class {class_id}"
            rows.append((k, name, value))
    return rows


def grid(result: Explanation, image: int) -> np.ndarray:
    """One image's labelled grid (rows: classes; columns: its input and every map), RGB."""
    image = checked_image(result, image)
    crop, methods = picture(result, image), list(result.maps)
    rows = [(label, [crop, *[map_image(m, result.maps[m][image, k], crop) for m in methods]])
            for label, (k, _n, _v) in zip(labels(result, image), _rows(result, image), strict=True)]
    return grid_image(["input", *methods], rows)


def stacked(result: Explanation, image: int | None = None) -> np.ndarray:
    """One image's grid, or every image's one below the other on white."""
    if image is not None:
        return grid(result, image)
    grids = [grid(result, i) for i in range(len(result.classes))]
    width = max(g.shape[1] for g in grids)
    return np.concatenate([np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0)), constant_values=255)
                           for g in grids])


def png(result: Explanation, image: int | None = None) -> bytes:
    """The grid(s) as PNG bytes."""
    return png_bytes(stacked(result, image))


def figure(result: Explanation, image: int | None = None) -> Figure:
    """A matplotlib Figure showing the grid(s) pixel for pixel at its dpi."""
    pixels = stacked(result, image)
    shown = Figure(figsize=(pixels.shape[1] / DPI, pixels.shape[0] / DPI), dpi=DPI)
    shown.figimage(pixels, origin="upper")
    return shown


class Picture:
    """PNG bytes that IPython displays inline."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _repr_png_(self) -> bytes:
        """The picture, for Jupyter."""
        return self.data


def show(result: Explanation, image: int | None = None) -> None:
    """Display the grid(s): inline when running in IPython, else in the system's image viewer."""
    try:
        from IPython import display, get_ipython
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display.display(result if image is None else Picture(png(result, image)))
    else:
        Image.fromarray(stacked(result, image)).show()
