"""Pictures: normalisation, overlays in RGB order, and the labelled grid."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from gradcam_cli.render import cam_overlay, grid_png, map_image, normalise


def test_normalise_spans_zero_to_one_and_handles_constants() -> None:
    x = torch.tensor([[-2.0, 0.0], [2.0, 6.0]])
    assert normalise(x).tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert normalise(torch.full((2, 2), 3.0)).eq(0).all()


def test_overlay_is_red_where_cam_peaks_and_keeps_rgb_order() -> None:
    black = np.zeros((2, 2, 3), dtype=np.uint8)
    cam = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    out = cam_overlay(cam, black).astype(int)
    peak, cold = out[1, 1], out[0, 0]
    assert peak[0] > peak[1] + 30 and peak[0] > peak[2] + 30   # jet's top is red, channel 0
    assert cold[2] > cold[0] + 30 and cold[2] > cold[1] + 30   # jet's bottom is blue, channel 2
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert cam_overlay(cam, red)[0, 0].tolist()[0] > 100  # the photo's red stays in channel 0


def test_gradient_maps_are_normalised_rgb() -> None:
    grad = torch.zeros(3, 2, 2)
    grad[0, 0, 0] = 5.0  # a positive red gradient in the corner
    out = map_image("vanilla", grad, np.zeros((2, 2, 3), np.uint8))
    assert out.dtype == np.uint8 and out[0, 0].tolist() == [255, 0, 0]


def test_grid_has_a_cell_per_class_and_column() -> None:
    cell = np.full((32, 32, 3), 128, np.uint8)
    png = grid_png(["input", "vanilla"], [("cat\np = 0.5", [cell, cell]), ("dog\np = 0.2", [cell, cell])])
    image = Image.open(io.BytesIO(png))
    assert image.size == (2 * 220, 2 * 220 + 30)  # 2.2-inch cells at 100 dpi, plus titles
    assert grid_png(["input"], [("cat", [cell])]) == grid_png(["input"], [("cat", [cell])])
