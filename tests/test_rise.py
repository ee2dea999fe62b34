"""RISE (Petsiuk et al. 2018) against the paper's definition computed independently here: the
masks (seeded grids, bilinear upsampling written out in numpy, random shifts), the estimator
by brute force, their statistics, determinism, batches, records and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradcam_cli import perturb as P
from gradcam_cli.errors import ArgumentError
from gradcam_cli.explanation import explain
from gradcam_cli.metrics import baseline_of
from gradcam_cli.rise import RiseSettings, draw, masks_of
from gradcam_cli.settings import MethodSettings
from gradcam_cli.targets import Scoring, top_classes, top_proxies

from .conftest import copy_batch_sizes, make_image
from .test_cli import compare_layers_error, evaluate_with_a_box, on_one_image, run


def rising(**fields: object) -> MethodSettings:
    """The methods' settings with these RISE settings."""
    return MethodSettings(rise=RiseSettings(**fields))


def bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D array to ``size`` with half-pixel centres and edges held (the bilinear
    resize of PyTorch and OpenCV), written out: each axis separately."""
    for axis in (0, 1):
        length = grid.shape[axis]
        src = np.clip((np.arange(size[axis]) + 0.5) * length / size[axis] - 0.5, 0, length - 1)
        low = np.floor(src).astype(int)
        high, t = np.minimum(low + 1, length - 1), src - low
        a, b = np.take(grid, low, axis=axis), np.take(grid, high, axis=axis)
        shape = [1, 1]
        shape[axis] = -1
        grid = a * (1 - t.reshape(shape)) + b * t.reshape(shape)
    return grid


def reference_masks(n: int, cell: int, p: float, seed: int, size: tuple[int, int]) -> torch.Tensor:
    """The paper's masks (section 3, and its released code): N grids of h x w = ceil(H/cell) x
    ceil(W/cell) cells, each on with probability p, upsampled bilinearly to (h + 1) * cell x
    (w + 1) * cell and cropped at a shift in [0, cell) per axis; the random numbers drawn in
    the documented order (grids, then shifts)."""
    h, w = size
    rows, cols = -(-h // cell), -(-w // cell)
    g = torch.Generator().manual_seed(seed)
    grids = (torch.rand(n, rows, cols, generator=g) < p).double().numpy()
    shifts = torch.randint(0, cell, (n, 2), generator=g).numpy()
    out = np.empty((n, h, w))
    for i in range(n):
        up = bilinear(grids[i], ((rows + 1) * cell, (cols + 1) * cell))
        out[i] = up[shifts[i, 0]:shifts[i, 0] + h, shifts[i, 1]:shifts[i, 1] + w]
    return torch.from_numpy(out)


def brute_force(net: nn.Module, x: torch.Tensor, class_id: int, n: int, cell: int, p: float,
                seed: int, background: str) -> torch.Tensor:
    """gradcam's RISE map by the paper's sum, one masked copy at a time: S(λ) = Σ f(I_i) M_i(λ)
    / (p N), minus the mean masked score (the constant that makes the map signed)."""
    masks = reference_masks(n, cell, p, seed, tuple(x.shape[-2:]))
    fill = baseline_of(x[0], background).double()
    with torch.no_grad():
        scores = torch.stack([net((fill + m * (x[0].double() - fill)).float()[None])[0, class_id]
                              for m in masks]).double()
    return (torch.einsum("n,nhw->hw", scores, masks) / (p * n) - scores.mean())[None].float()


class Linear(nn.Module):
    """A score that is a known linear function of the input: two classes, weights per pixel."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.weight = nn.Parameter(torch.randn(2, 3, *size, generator=g))
        self.conv = nn.Conv2d(3, 3, 1)  # a layer to name
        nn.init.eye_(self.conv.weight[:, :, 0, 0])
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,kchw->nk", self.conv(x), self.weight)


def small_net(outputs: int = 5) -> nn.Module:
    """A random conv net with batch norm (folded in the fast copy), global pooling and a head."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, outputs))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


X = torch.randn(2, 3, 20, 28, generator=torch.Generator().manual_seed(1))


def test_masks_are_the_papers_upsampled_shifted_grids() -> None:
    """Each mask equals the paper's construction computed here (numpy bilinear, own crop)."""
    settings = RiseSettings(n_masks=40, cell=6, probability=0.4, seed=7)
    grids, shifts = draw(settings, (20, 28))
    assert grids.shape == (40, 4, 5) and shifts.shape == (40, 2)
    got = masks_of(grids[5:17], shifts[5:17], 6, (20, 28))
    assert got.shape == (12, 1, 20, 28)
    expected = reference_masks(40, 6, 0.4, 7, (20, 28))[5:17]
    assert torch.allclose(got[:, 0].double(), expected, atol=1e-6)


def test_mask_statistics_mean_shift_range_and_smoothness() -> None:
    """Mean ≈ p, every shift in [0, cell) used, values in [0, 1], neighbours differ by at most
    1/cell (bilinear ramps over a cell or more: no hard grid edges)."""
    cell, size = 8, (40, 56)
    for p in (0.3, 0.5):
        settings = RiseSettings(n_masks=600, cell=cell, probability=p, seed=1)
        grids, shifts = draw(settings, size)
        assert set(shifts.flatten().tolist()) == set(range(cell))
        masks = masks_of(grids, shifts, cell, size)
        assert abs(float(masks.mean()) - p) < 0.02
        assert float(masks.min()) >= 0 and float(masks.max()) <= 1
        steps = torch.cat([masks.diff(dim=2).abs().flatten(), masks.diff(dim=3).abs().flatten()])
        assert float(steps.max()) <= 1 / cell + 1e-6


@pytest.mark.parametrize(("size", "cell", "background"), [((12, 20), 4, "zero"), ((160, 224), 32, "zero"),
                                                          ((12, 20), 5, "blur"), ((13, 9), 3, "mean")])
def test_estimator_equals_the_papers_sum_by_brute_force(size: tuple[int, int], cell: int,
                                                        background: str) -> None:
    """A linear score, both classes, non-square inputs (160x224 as a portrait photo), each fill."""
    net, n = Linear(size), 48
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    result = explain(net, x, "conv", class_ids=[0, 1], methods=["rise"], batch_size=20,
                     settings=rising(n_masks=n, cell=cell, probability=0.4, seed=3, background=background))
    assert result.maps["rise"].shape == (1, 2, 1, *size)
    for k in range(2):
        expected = brute_force(net, x, k, n, cell, 0.4, 3, background)
        scale = float(expected.abs().max())  # float32 scores of 10^5 pixels: compare relatively
        assert torch.allclose(result.maps["rise"][0, k], expected, atol=1e-5 * scale), k


def test_each_image_of_a_batch_has_its_own_map_and_one_set_of_passes_serves_every_class(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two images, three classes: 10 masks in batches of 4 are 4, 4, 2 copies per image; each
    image's map equals its map explained alone (same masks whatever the neighbours)."""
    sizes = copy_batch_sizes(monkeypatch, P)
    settings = rising(n_masks=10, cell=5)
    both = explain(small_net(), X, "2", topk=3, methods=["rise"], batch_size=4, settings=settings)
    assert sorted(sizes) == sorted([4, 4, 2] * 2)
    for i in range(2):
        alone = explain(small_net(), X[i:i + 1], "2", class_ids=both.classes[i].tolist(), methods=["rise"],
                        batch_size=4, settings=settings)
        assert torch.allclose(alone.maps["rise"][0], both.maps["rise"][i], atol=1e-5)


def test_maps_are_the_same_for_any_batch_size_and_byte_identical_when_rerun() -> None:
    settings = rising(n_masks=64, cell=6)
    one = explain(small_net(), X[:1], "2", topk=2, methods=["rise"], batch_size=1, settings=settings)
    many = explain(small_net(), X[:1], "2", topk=2, methods=["rise"], batch_size=64, settings=settings)
    again = explain(small_net(), X[:1], "2", topk=2, methods=["rise"], batch_size=64, settings=settings)
    assert torch.allclose(one.maps["rise"], many.maps["rise"], atol=1e-5)
    assert torch.equal(many.maps["rise"], again.maps["rise"])
    other = explain(small_net(), X[:1], "2", topk=2, methods=["rise"], batch_size=64,
                    settings=rising(n_masks=64, cell=6, seed=1))
    assert not torch.allclose(other.maps["rise"], many.maps["rise"], atol=1e-3)


def test_negative_side_and_similarity_scores() -> None:
    """The explained score is the target's: -z gives minus the map; a proxy's dot product equals
    the brute-force sum of that product."""
    net, settings = small_net(), rising(n_masks=24, cell=5)
    plus = explain(net, X[:1], "2", methods=["rise"], settings=settings, target=top_classes(class_ids=[1]))
    minus = explain(net, X[:1], "2", methods=["rise"], settings=settings,
                    target=top_classes(class_ids=[1], scoring=Scoring("softmax", negative=True)))
    assert torch.allclose(minus.maps["rise"], -plus.maps["rise"], atol=1e-5)
    proxies = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    result = explain(net, X[:1], "2", methods=["rise"], settings=settings,
                     target=top_proxies(proxies, "dot", topk=1))

    class Similarity(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return net(x) @ proxies.T
    expected = brute_force(Similarity(), X[:1], int(result.classes[0, 0]), 24, 5, 0.5, 0, "zero")
    assert torch.allclose(result.maps["rise"][0, 0], expected, atol=1e-4)


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"n_masks": 0}, "n_masks"), ({"n_masks": 2.5}, "n_masks"), ({"n_masks": True}, "n_masks"),
    ({"cell": 0}, "cell"), ({"cell": "8"}, "cell"), ({"probability": 0.0}, "probability"),
    ({"probability": 1.0}, "probability"), ({"probability": "half"}, "probability"),
    ({"probability": float("nan")}, "probability"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"background": "black"}, "background"),
])
def test_bad_settings_are_refused_naming_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ArgumentError) as caught:
        RiseSettings(**kwargs)
    assert caught.value.argument == argument


def test_a_cell_as_large_as_the_input_is_refused() -> None:
    """One cell per side gives masks without structure: refused, naming the input's size."""
    with pytest.raises(ArgumentError, match="20x28") as caught:
        explain(small_net(), X[:1], "2", methods=["rise"], settings=rising(n_masks=4, cell=20))
    assert caught.value.argument == "cell"


def test_settings_are_kept_only_when_rise_is_asked_for() -> None:
    settings = rising(n_masks=10, cell=4, probability=0.25)
    assert settings.to_dict(["gradcam"]) == {}
    assert settings.to_dict(["rise"])["rise"] == {"n_masks": 10, "cell": 4, "probability": 0.25, "seed": 0,
                                                  "background": "zero"}


CLASSIFY = ["classify", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", "64",
            "--topk", "1", "--json", "--layer", "layer4"]


def test_cli_rise_is_recorded_and_redone_when_the_masks_change(tmp_path: Path) -> None:
    """The settings in the record, a rerun skipped, another --rise-masks redone (~10-20 s:
    three runs of a random resnet18 at 64 px)."""
    image = make_image(tmp_path / "a.png")
    base = [*CLASSIFY, "--image-path", str(image), "--output-dir", str(tmp_path / "o"),
            "--method", "rise", "--rise-cell", "16", "--rise-probability", "0.3", "--skip-existing"]
    code, out, err = run(*base, "--rise-masks", "16")
    assert code == 0, err
    record = json.loads(out)
    assert set(record["classes"][0]["maps"]) == {"rise"}
    assert record["settings"]["rise"] == {"n_masks": 16, "cell": 16, "probability": 0.3, "seed": 0,
                                          "background": "zero"}
    assert json.loads(run(*base, "--rise-masks", "16")[1])["status"] == "skipped"
    again = json.loads(run(*base, "--rise-masks", "8")[1])
    assert again["status"] == "ok" and again["settings"]["rise"]["n_masks"] == 8


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "rise", "--rise-masks", "0"], "--rise-masks 0: "),
    (["--method", "rise", "--rise-probability", "1.5"], "--rise-probability 1.5: "),
    (["--method", "rise", "--rise-cell", "64"], "--rise-cell 64: "),
    (["--method", "gradcam", "--rise-masks", "8"], "--rise-masks applies to --method rise"),
    (["--method", "gradcam", "--rise-cell", "8"], "--rise-cell applies to --method rise"),
    (["--method", "gradcam", "--rise-probability", "0.2"], "--rise-probability applies to --method rise"),
    (["--method", "gradcam", "--rise-fill", "blur"], "--rise-fill applies to --method rise"),
])
def test_cli_bad_rise_options_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    code, _, err = on_one_image(tmp_path, *CLASSIFY, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_methods_lists_rise_and_compare_layers_refuses_it(tmp_path: Path) -> None:
    assert any(line.split()[0] == "rise" for line in run("methods")[1].splitlines())
    code, err = compare_layers_error(tmp_path, "rise")
    assert code == 2 and "--method rise: does not depend on the layer" in err


def test_evaluate_measures_rise_maps(tmp_path: Path) -> None:
    """Curves and pointing games of a RISE map beside Grad-CAM's (~8 s)."""
    code, out, err = evaluate_with_a_box(tmp_path, "--method", "gradcam,rise",
                                             "--rise-masks", "16", "--rise-cell", "16")
    assert code == 0, err
    record = json.loads(out.splitlines()[0])
    metrics = record["classes"][0]["metrics"]
    assert set(metrics) == {"gradcam", "rise"}
    assert 0 <= metrics["rise"]["deletion_auc"] <= 1 and metrics["rise"]["pointing_hit"] in (True, False)
    assert record["settings"]["rise"]["n_masks"] == 16
