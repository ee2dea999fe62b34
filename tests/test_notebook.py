"""Explanations in a notebook: the grid the CLI writes, as a picture (``_repr_png_``), a
matplotlib Figure (``plot``) and on screen (``show``)."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from gradcam_cli import explain, load_model
from gradcam_cli.outputs.notebook import explain_images
from gradcam_cli.pipeline import classify

from .conftest import make_image

METHODS = ["vanilla", "gradcam", "occlusion"]


def pixels(png: bytes) -> np.ndarray:
    """A PNG's RGB pixels."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def model() -> object:
    """A random-weight resnet18 at a small input size, so that tests stay fast."""
    torch.manual_seed(0)
    return load_model("resnet18", weights="none", preprocess={"input_size": (64, 80)})


def test_repr_png_is_the_grid_classify_writes(tmp_path: Path, model: object) -> None:
    """Same image, classes and methods: the notebook's picture equals grid.png pixel for pixel."""
    image = make_image(tmp_path / "a.png", size=(96, 70))
    record = next(classify(model, [image], tmp_path / "out", topk=2, methods=METHODS))
    result = explain_images(model, [image], topk=2, methods=METHODS)
    assert np.array_equal(pixels(result._repr_png_()), np.asarray(Image.open(record["grid"]).convert("RGB")))


def test_plot_returns_a_figure_of_that_grid(tmp_path: Path, model: object) -> None:
    """The Figure, drawn at its own size and dpi, has the grid's pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    result = explain_images(model, [make_image(tmp_path / "a.png")], topk=1, methods=["gradcam"])
    figure = result.plot()
    assert isinstance(figure, Figure)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    drawn = np.asarray(canvas.buffer_rgba())[..., :3]
    assert np.array_equal(drawn, pixels(result._repr_png_()))


def test_each_image_of_a_batch_has_its_grid(tmp_path: Path, model: object) -> None:
    """``grid(i)`` is image i's grid (equal to the grid of that image explained alone up to float
    rounding from the batch's shape: a map value may land in the next of jet's 256 colours,
    2 levels at alpha 0.5); ``_repr_png_`` stacks them in order."""
    a, b = make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png", mode="L")
    both = explain_images(model, [a, b], topk=1, methods=["gradcam"])
    alone = [pixels(explain_images(model, [i], topk=1, methods=["gradcam"])._repr_png_()) for i in (a, b)]
    for i in (0, 1):
        assert both.grid(i).shape == alone[i].shape
        assert np.abs(both.grid(i).astype(int) - alone[i]).max() <= 2, i
    assert np.abs(both.grid(0).astype(int) - both.grid(1)).max() > 100  # two different pictures
    assert np.array_equal(pixels(both._repr_png_()), np.concatenate([both.grid(0), both.grid(1)]))


def test_explain_without_pictures_shows_its_input_scaled_and_class_ids() -> None:
    """explain() knows no preprocessing: the input column is the tensor min-max scaled to
    0..255 (checked by hand), and rows are labelled by class id."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(1, 3, 20, 24)
    result = explain(net, x, "1", topk=1, methods=["gradcam"])
    grid = pixels(result._repr_png_())
    scaled = ((x[0] - x.min()) / (x.max() - x.min())).permute(1, 2, 0).numpy()
    expected = (scaled * 255).round().astype(np.uint8)
    from gradcam_cli.render import GAP, LABEL_WIDTH, TITLE_HEIGHT
    assert np.array_equal(grid[TITLE_HEIGHT:TITLE_HEIGHT + 20, LABEL_WIDTH:LABEL_WIDTH + 24], expected)
    assert result.labels(0)[0].startswith(f"class {int(result.classes[0, 0])}\n")
    assert grid.shape[1] == LABEL_WIDTH + 2 * (24 + GAP)


def test_show_displays_inline_in_ipython_and_opens_a_viewer_elsewhere(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: object) -> None:
    """In IPython the Explanation itself is displayed (Jupyter then asks ``_repr_png_``);
    in a plain interpreter the grid opens in the system's image viewer."""
    result = explain_images(model, [make_image(tmp_path / "a.png")], topk=1, methods=["gradcam"])
    opened: list[np.ndarray] = []
    monkeypatch.setattr(Image.Image, "show", lambda self, *a, **k: opened.append(np.asarray(self)))
    monkeypatch.setitem(sys.modules, "IPython", None)  # not installed
    result.show()
    assert len(opened) == 1 and np.array_equal(opened[0], pixels(result._repr_png_()))
    shown: list[object] = []
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: object()
    ipython.display = types.SimpleNamespace(display=shown.append)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    result.show()
    assert shown == [result] and len(opened) == 1


def test_an_image_index_out_of_range_names_the_argument(tmp_path: Path, model: object) -> None:
    """One image: image=1 is refused naming ``image``."""
    result = explain_images(model, [make_image(tmp_path / "a.png")], topk=1, methods=["gradcam"])
    with pytest.raises(ValueError, match="image"):
        result.plot(image=1)
