"""CAM overlays: colour maps and alpha on the crop, and CAMs mapped back onto the original photo
through the preprocessing's resize and centre crop, checked against geometry done by hand."""

from __future__ import annotations

import tracemalloc

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from gradcam_cli.errors import ArgumentError
from gradcam_cli.outputs.overlay import HATCH, original_overlay
from gradcam_cli.preprocess import Preprocess
from gradcam_cli.render import cam_overlay

GRAY = ((0.5,) * 3, (0.25,) * 3)  # mean, std: irrelevant to geometry


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB photo of ``width`` x ``height``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def spike(i: int, j: int, size: int = 8) -> torch.Tensor:
    """A 1 x size x size CAM that is 1 in crop pixel (i, j) and 0 elsewhere."""
    cam = torch.zeros(1, size, size)
    cam[0, i, j] = 1.0
    return cam


def tent(n: int, per_crop_pixel: float, offset: int, j: int) -> np.ndarray:
    """Bilinear weight of crop pixel ``j`` at each of ``n`` original pixels along one axis: an
    original pixel's centre u + 0.5 lies at (u + 0.5) / per_crop_pixel - offset in the crop's
    pixel units, where crop pixel j's centre is j + 0.5 (interior pixels only, no clamping)."""
    centre = (np.arange(n) + 0.5) / per_crop_pixel - offset
    return np.maximum(0.0, 1 - np.abs(centre - (j + 0.5)))


def gray_level(value: np.ndarray) -> np.ndarray:
    """What matplotlib's 256-colour gray map gives a [0, 1] value, as 0..255 (alpha 1)."""
    return np.minimum((value * 256).astype(int), 255)


# (photo width, height), preprocessing, original pixels per crop pixel across and down, crop's
# (left, top) in the resized image: landscape 52x32 -> shorter side 8 -> 13x8, left round(2.5) = 2
# (Python's and torchvision's round to even); portrait the same turned; squash 40x24 -> 8x8.
SHORTER = Preprocess((8, 8), *GRAY, resize="shorter", resize_to=8)
CASES = {"landscape": ((52, 32), SHORTER, (4, 4), (2, 0)),
         "portrait": ((32, 52), SHORTER, (4, 4), (0, 2)),
         "squash": ((40, 24), Preprocess((8, 8), *GRAY, resize="squash"), (5, 3), (0, 0))}


@pytest.mark.parametrize("case", CASES)
def test_a_crop_pixel_lands_where_the_inverse_geometry_says(case: str) -> None:
    (width, height), preprocess, (sx, sy), (left, top) = CASES[case]
    i, j = 3, 5
    photo = noise(width, height)
    out = original_overlay(spike(i, j), photo, preprocess, colormap="gray", alpha=1.0)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    inside = np.zeros((height, width), bool)
    inside[top * sy:(top + 8) * sy, left * sx:(left + 8) * sx] = True
    expected = gray_level(np.outer(tent(height, sy, top, i), tent(width, sx, left, j)))
    tolerance = 0 if case != "squash" else 1  # fifths and thirds are not exact in binary
    assert np.abs(out[..., 0][inside].astype(int) - expected[inside]).max() <= tolerance
    assert (out[inside][:, :1] == out[inside]).all()  # gray inside
    # the peak: the original pixels nearest crop pixel (i, j)'s centre, found by hand
    peak_rows = {"landscape": [13, 14], "portrait": [21, 22], "squash": [10]}[case]
    peak_cols = {"landscape": [29, 30], "portrait": [21, 22], "squash": [27]}[case]
    heat = np.where(inside, out[..., 0].astype(int), -1)
    peak = heat == heat.max()
    assert sorted(set(np.nonzero(peak)[0])) == peak_rows and sorted(set(np.nonzero(peak)[1])) == peak_cols
    # outside the crop (what the centre crop cut off) the photo, hatched: half in stripes
    y, x = np.mgrid[:height, :width]
    stripe = (x + y) // HATCH % 2 == 0
    pixels = np.asarray(photo)
    assert np.array_equal(out[~inside & stripe], pixels[~inside & stripe] // 2)
    assert np.array_equal(out[~inside & ~stripe], pixels[~inside & ~stripe])


def test_identity_geometry_gives_the_crop_overlay() -> None:
    photo = noise(9, 7, seed=1)
    cam = torch.rand(1, 7, 9, generator=torch.Generator().manual_seed(0))
    preprocess = Preprocess((7, 9), *GRAY, resize="none", crop="none")
    assert np.array_equal(original_overlay(cam, photo, preprocess), cam_overlay(cam, np.asarray(photo)))


def test_a_large_photo_keeps_its_size_in_bounded_memory() -> None:
    photo = Image.new("RGB", (4000, 3000), (40, 90, 160))
    preprocess = Preprocess((224, 224), *GRAY, resize="shorter", resize_to=256)
    cam = torch.rand(1, 224, 224, generator=torch.Generator().manual_seed(0))
    tracemalloc.start()
    out = original_overlay(cam, photo, preprocess)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (3000, 4000, 3)
    assert peak < 36_000_000 + 20_000_000  # the uint8 result plus bands, never float copies of it
    # resized 341x256, crop left round(58.5) = 58, top 16: columns whose centre is left of the
    # crop are the photo, hatched (each pixel as it was or halved), and no heat
    cut = int(58 * 4000 / 341)
    def unheated(pixels: np.ndarray) -> np.ndarray:
        pixels = pixels.reshape(-1, 3)
        return (pixels == (40, 90, 160)).all(axis=1) | (pixels == (20, 45, 80)).all(axis=1)
    assert unheated(out[:, :cut]).all() and not unheated(out[:, cut + 2]).all()


def default_overlay(cam: torch.Tensor, crop: np.ndarray, name: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """The overlay by its definition: the min-max normalised CAM through matplotlib's colour map,
    blended over the crop with weight ``alpha``."""
    x = cam[0]
    heat = matplotlib.colormaps[name](((x - x.min()) / (x.max() - x.min())).numpy())[..., :3]
    return ((alpha * heat + (1 - alpha) * crop / 255) * 255).round().astype(np.uint8)


@pytest.mark.parametrize(("name", "alpha"), [("jet", 0.5), ("viridis", 0.3), ("tab10", 1.0), ("gray", 0.0)])
def test_crop_overlay_follows_the_colour_map_and_alpha(name: str, alpha: float) -> None:
    crop = np.asarray(noise(16, 12, seed=2))
    cam = torch.rand(1, 12, 16, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(cam_overlay(cam, crop, name, alpha), default_overlay(cam, crop, name, alpha))
    if (name, alpha) == ("jet", 0.5):
        assert np.array_equal(cam_overlay(cam, crop), default_overlay(cam, crop))


@pytest.mark.parametrize(("argument", "value"), [("colormap", "jett"), ("alpha", 1.5), ("alpha", -0.1),
                                                 ("alpha", float("nan"))])
def test_bad_colour_map_or_alpha_is_refused_naming_the_argument(argument: str, value: object) -> None:
    with pytest.raises(ArgumentError) as caught:
        original_overlay(spike(1, 1), noise(8, 8), SHORTER, **{argument: value})
    assert caught.value.argument == argument
    if argument == "colormap":
        assert "jet" in caught.value.problem and "viridis" in caught.value.problem
