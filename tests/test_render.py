"""Pictures: normalisation, overlays in RGB order, and the labelled grid."""

from __future__ import annotations

import numpy as np
import torch

from gradcam_cli.render import GAP, LABEL_WIDTH, TITLE_HEIGHT, cam_overlay, grid_image, map_image, normalise


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


def test_grid_places_each_picture_unresampled_with_titles_and_labels() -> None:
    cells = [np.full((32, 40, 3), value, np.uint8) for value in (10, 20, 30, 40)]
    grid = grid_image(["input", "vanilla"], [("cat\np = 0.5", cells[:2]), ("dog\np = 0.2", cells[2:])])
    assert grid.shape == (TITLE_HEIGHT + 2 * (32 + GAP), LABEL_WIDTH + 2 * (40 + GAP), 3)
    for i, cell in enumerate(cells):
        top, left = TITLE_HEIGHT + (i // 2) * (32 + GAP), LABEL_WIDTH + (i % 2) * (40 + GAP)
        assert np.array_equal(grid[top:top + 32, left:left + 40], cell)
    assert (grid[:TITLE_HEIGHT, LABEL_WIDTH:] < 128).any()       # column titles drawn
    assert (grid[TITLE_HEIGHT:, :LABEL_WIDTH] < 128).any()       # row labels drawn
    assert np.array_equal(grid, grid_image(["input", "vanilla"], [("cat\np = 0.5", cells[:2]),
                                                                  ("dog\np = 0.2", cells[2:])]))
