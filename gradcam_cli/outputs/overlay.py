"""CAM overlays on the original photo: the map taken back through the crop and the resize into
the photo's own frame, and blended there at the photo's resolution.

Geometry: a photo pixel's centre u + 0.5 lies at (u + 0.5) * resized / size in the resized
image (the pixel-centre mapping PIL's resize uses), and at that minus the crop's left (or
top) in the crop's pixel units, where crop pixel j's centre is j + 0.5. The CAM is sampled
there bilinearly (beyond the outermost centres the edge value holds). A photo pixel whose
centre falls outside the crop (what the centre crop cut off, which the model never saw) is
hatched: the photo without heat, darkened to half in diagonal stripes ``HATCH`` pixels wide, so
that no one reads it as a region of low heat.

Memory: the result is one uint8 copy of the photo; the CAM is sampled and coloured through
``render.blend``'s uint8 table in bands of rows, so a 4000x3000 photo costs its 36 MB result
plus a few MB of band, and no float image of the photo is ever built.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..preprocess import Preprocess
from ..render import CAM_ALPHA, COLORMAP, blend, blend_table, normalise

BAND = 1 << 18  # pixels per band of rows
HATCH = 8       # pixels: the width of the stripes that mark what the crop cut off
Axis = tuple[int, int, np.ndarray, np.ndarray, np.ndarray]  # first, stop, index 0, index 1, weight of 1


def original_overlay(cam: torch.Tensor, image: Image.Image, preprocess: Preprocess,
                     colormap: str = COLORMAP, alpha: float = CAM_ALPHA) -> np.ndarray:
    """Blend a 1xhxw CAM (at the model input's size) over the original ``image`` as an HxWx3
    uint8 array of the image's size; the CAM is min-max normalised as on the crop."""
    blend_table(colormap, alpha)  # refuses a bad colour map or alpha before any work
    values = normalise(cam)[0].numpy()
    out = _pixels(image)
    (left, top), (width, height) = preprocess.crop_origin(image.size), preprocess.resized_size(image.size)
    c0, c1, x0, x1, wx = _axis(image.width, width, left, values.shape[1])
    r0, r1, y0, y1, wy = _axis(image.height, height, top, values.shape[0])
    _hatch(out, (r0, r1), (c0, c1))
    step = max(1, BAND // (c1 - c0))
    for start in range(r0, r1, step):
        rows = slice(start - r0, min(start + step, r1) - r0)
        band = _sample(values, y0[rows], y1[rows], wy[rows], x0, x1, wx)
        out[start:start + band.shape[0], c0:c1] = blend(band, out[start:start + band.shape[0], c0:c1],
                                                        colormap, alpha)
    return out


def _hatch(out: np.ndarray, rows: tuple[int, int], columns: tuple[int, int]) -> None:
    """Darken to half, in diagonal stripes, every pixel of ``out`` outside the ``rows`` x
    ``columns`` box (the crop), a band of rows at a time."""
    height, width = out.shape[:2]
    step = max(1, BAND // width)
    x = np.arange(width)
    for top in range(0, height, step):
        y = np.arange(top, min(top + step, height))[:, None]
        stripe = (x + y) // HATCH % 2 == 0
        inside = ((y >= rows[0]) & (y < rows[1])) & ((x >= columns[0]) & (x < columns[1]))
        band = out[top:top + len(y)]
        band[stripe & ~inside] //= 2


def _pixels(image: Image.Image) -> np.ndarray:
    """The photo as an HxWx3 uint8 array, read in bands so that no second full copy exists."""
    out = np.empty((image.height, image.width, 3), np.uint8)
    step = max(1, BAND // image.width)
    for top in range(0, image.height, step):
        band = image.crop((0, top, image.width, min(top + step, image.height)))
        out[top:top + band.height] = np.asarray(band.convert("RGB"))
    return out


def _axis(size: int, resized: int, offset: int, crop: int) -> Axis:
    """Along one axis: the photo pixels whose centre lies in the crop (first, stop), and for
    each the two crop pixels it is interpolated from and the second one's weight."""
    centre = (np.arange(size) + 0.5) * (resized / size) - offset
    inside = np.flatnonzero((centre >= 0) & (centre < crop))
    first, stop = int(inside[0]), int(inside[-1]) + 1
    position = np.clip(centre[first:stop] - 0.5, 0, crop - 1)
    i0 = np.floor(position).astype(np.intp)
    return first, stop, i0, np.minimum(i0 + 1, crop - 1), (position - i0).astype(np.float32)


def _sample(values: np.ndarray, y0: np.ndarray, y1: np.ndarray, wy: np.ndarray,
            x0: np.ndarray, x1: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``values`` at a band of rows and the inside columns (float32)."""
    rows = values[y0] * (1 - wy)[:, None] + values[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx
