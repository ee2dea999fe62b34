"""Raw maps (--save-maps), overlays on the original photo (--overlay original) and the CAM
colours (--colormap, --alpha) through the pipeline and the command line: the arrays read back
and normalised by the README's rule give the PNGs' pixels, computed here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from gradcam_cli import classify, compare_layers, load_model
from gradcam_cli.errors import ArgumentError
from gradcam_cli.io import load_image
from gradcam_cli.models import LoadedModel
from gradcam_cli.outputs.overlay import original_overlay

from .test_cli import run

SIZE = 64  # the model's input: quick, and the crop of a 300x200 photo


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    """A random resnet18 at 64 px."""
    return load_model("resnet18", "none", preprocess={"input_size": (SIZE, SIZE)})


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    """A 90x60 landscape photo with detail everywhere."""
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    path = tmp_path / "pic.png"
    Image.fromarray(coarse).resize((90, 60), Image.BICUBIC).save(path)
    return path


def png(path: str) -> np.ndarray:
    """A PNG's pixels."""
    return np.asarray(Image.open(path))


def shown(array: np.ndarray) -> np.ndarray:
    """The README's rule for a gradient map: min-max over the whole CxHxW map in float32, times
    255, rounded; one channel drawn as gray."""
    x = array.astype(np.float32)
    scaled = np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    return np.repeat(scaled, 3, axis=0).transpose(1, 2, 0) if len(x) == 1 else scaled.transpose(1, 2, 0)


def heat_over(cam: np.ndarray, crop: np.ndarray, name: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """The README's rule for a CAM: min-max normalised (float32), coloured by matplotlib's map,
    blended over the crop with weight ``alpha``, rounded."""
    x = cam[0].astype(np.float32)
    heat = matplotlib.colormaps[name]((x - x.min()) / (x.max() - x.min()))[..., :3]
    return ((alpha * heat + (1 - alpha) * crop / 255) * 255).round().astype(np.uint8)


def test_npy_arrays_normalise_to_exactly_the_pngs(model: LoadedModel, picture: Path, tmp_path: Path) -> None:
    record, = classify(model, [picture], tmp_path / "o", topk=2, methods=["vanilla", "gradcam"],
                       save_maps="npy")
    crop = np.asarray(model.preprocess.model_pixels(load_image(picture)))
    assert "npz" not in record
    for c in record["classes"]:
        assert set(c["arrays"]) == {"vanilla", "gradcam"}
        vanilla, cam = (np.load(c["arrays"][m]) for m in ("vanilla", "gradcam"))
        assert vanilla.dtype == cam.dtype == np.float32
        assert vanilla.shape == (1, 3, SIZE, SIZE) and cam.shape == (1, 1, SIZE, SIZE)
        assert np.array_equal(png(c["maps"]["vanilla"]), shown(vanilla[0]))
        assert np.array_equal(png(c["maps"]["gradcam"]), heat_over(cam[0], crop))
        assert cam.min() >= 0 and cam.max() > 0 and vanilla.min() < 0  # not normalised for display
    assert record["settings"]["save_maps"] == "npy"


def test_npz_holds_the_same_arrays_by_name_and_is_deterministic(model: LoadedModel, picture: Path,
                                                                 tmp_path: Path) -> None:
    npy, = classify(model, [picture], tmp_path / "a", topk=2, methods=["guided", "gradcam"], save_maps="npy")
    runs = [next(classify(model, [picture], tmp_path / name, topk=2, methods=["guided", "gradcam"],
                          save_maps="npz")) for name in ("b", "c")]
    npz = runs[0]
    assert Path(npz["npz"]).name == "maps.npz" and Path(npz["npz"]).parent == Path(npz["grid"]).parent
    with np.load(npz["npz"]) as data:
        names = [name for c in npz["classes"] for name in c["arrays"].values()]
        assert sorted(data.files) == sorted(names)
        for c, expected in zip(npz["classes"], npy["classes"], strict=True):
            folder = Path(expected["maps"]["gradcam"]).parent.name
            assert c["arrays"] == {m: f"{folder}/{m}" for m in ("guided", "gradcam")}
            for m in ("guided", "gradcam"):
                assert np.array_equal(data[c["arrays"][m]], np.load(expected["arrays"][m]))
    assert Path(runs[0]["npz"]).read_bytes() == Path(runs[1]["npz"]).read_bytes()


def test_compare_layers_stacks_the_layers_in_the_records_order(model: LoadedModel, picture: Path,
                                                               tmp_path: Path) -> None:
    record, = compare_layers(model, [picture], tmp_path / "o", layers=["layer3", "layer4"],
                             methods=["gradcam"], save_maps="npy", colormap="viridis", alpha=0.25)
    crop = np.asarray(model.preprocess.model_pixels(load_image(picture)))
    c, = record["classes"]
    stacked = np.load(c["arrays"]["gradcam"])
    assert stacked.shape == (2, 1, SIZE, SIZE)
    for n, layer in enumerate(record["layers"]):
        assert np.array_equal(png(c["maps"][layer]["gradcam"]), heat_over(stacked[n], crop, "viridis", 0.25))
    assert not np.array_equal(stacked[0], stacked[1])


def test_original_overlay_is_at_the_photos_size_and_the_grid_stays_the_crops(
        model: LoadedModel, picture: Path, tmp_path: Path) -> None:
    crop_run, = classify(model, [picture], tmp_path / "a", topk=1, methods=["vanilla", "gradcam"],
                         save_maps="npy")
    record, = classify(model, [picture], tmp_path / "b", topk=1, methods=["vanilla", "gradcam"],
                       save_maps="npy", overlay="original", colormap="inferno", alpha=0.7)
    c = record["classes"][0]
    cam = np.load(c["arrays"]["gradcam"])[0]
    expected = original_overlay(torch.from_numpy(cam), load_image(picture), model.preprocess, "inferno", 0.7)
    assert png(c["maps"]["gradcam"]).shape == (60, 90, 3)
    assert np.array_equal(png(c["maps"]["gradcam"]), expected)
    assert png(c["maps"]["vanilla"]).shape == (SIZE, SIZE, 3)  # gradient maps stay on the crop
    assert Image.open(record["grid"]).size == Image.open(crop_run["grid"]).size
    assert record["settings"]["overlay"] == "original" and record["settings"]["colormap"] == "inferno"
    assert record["settings"]["alpha"] == 0.7


def test_a_photo_changed_before_its_overlay_fails_alone(model: LoadedModel, picture: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other.png"
    Image.open(picture).transpose(Image.FLIP_LEFT_RIGHT).save(other)

    def swapped(path: str | Path) -> Image.Image:  # the writer's second look finds other bytes
        if Path(path) == picture:
            picture.write_bytes(other.read_bytes())
        return load_image(path)
    monkeypatch.setattr("gradcam_cli.pipeline.load_image", swapped)
    records = list(classify(model, [picture, other], tmp_path / "o", topk=1, methods=["gradcam"],
                            overlay="original", batch_size=2))
    assert records[0]["status"] == "error" and "changed" in records[0]["error"]
    assert records[0]["error"].startswith(str(picture))
    assert records[1]["status"] == "ok"


def test_defaults_record_nothing_new(model: LoadedModel, picture: Path, tmp_path: Path) -> None:
    record, = classify(model, [picture], tmp_path / "o", topk=1, methods=["gradcam"])
    assert not {"save_maps", "overlay", "colormap", "alpha"} & set(record["settings"])
    assert "npz" not in record and "arrays" not in record["classes"][0]
    assert sorted(p.name for p in Path(record["grid"]).parent.rglob("*") if p.is_file()) == \
        ["gradcam.png", "grid.png", "summary.json"]


def test_resume_checks_the_output_settings_and_the_array_files(model: LoadedModel, picture: Path,
                                                               tmp_path: Path) -> None:
    def again(**options: object) -> dict:
        return next(classify(model, [picture], tmp_path / "o", topk=1, methods=["gradcam"],
                             skip_existing=True, **options))
    assert again(save_maps="npy")["status"] == "ok"
    assert again(save_maps="npy")["status"] == "skipped"
    for options in ({"save_maps": "npz"}, {"save_maps": "npz", "alpha": 0.4},
                    {"save_maps": "npz", "alpha": 0.4, "colormap": "gray"},
                    {"save_maps": "npz", "alpha": 0.4, "colormap": "gray", "overlay": "original"}):
        assert again(**options)["status"] == "ok", options
        assert again(**options)["status"] == "skipped", options
    record = again(save_maps="npz", alpha=0.4, colormap="gray", overlay="original")
    Path(record["npz"]).unlink()
    assert again(save_maps="npz", alpha=0.4, colormap="gray", overlay="original")["status"] == "ok"
    record = again(save_maps="npy")
    assert record["status"] == "ok"
    Path(record["classes"][0]["arrays"]["gradcam"]).unlink()
    assert again(save_maps="npy")["status"] == "ok"


@pytest.mark.parametrize(("argument", "value"), [("save_maps", "npy2"), ("overlay", "full"),
                                                 ("colormap", "jett"), ("alpha", 2.0)])
def test_bad_output_arguments_are_refused_before_any_image(model: LoadedModel, picture: Path, tmp_path: Path,
                                                           argument: str, value: object) -> None:
    with pytest.raises(ArgumentError) as caught:
        classify(model, [picture], tmp_path / "o", **{argument: value})
    assert caught.value.argument == argument
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.png"))


CLASSIFY = ["classify", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", str(SIZE),
            "--topk", "1", "--method", "vanilla,gradcam", "--json"]


def test_cli_flags_reach_the_files(picture: Path, tmp_path: Path) -> None:
    code, out, err = run(*CLASSIFY, "--image-path", str(picture), "--output-dir", str(tmp_path / "o"),
                         "--save-maps", "npy", "--overlay", "original", "--colormap", "viridis",
                         "--alpha", "0.3")
    assert code == 0, err
    record = json.loads(out)
    c = record["classes"][0]
    assert np.load(c["arrays"]["gradcam"]).shape == (1, 1, SIZE, SIZE)
    assert png(c["maps"]["gradcam"]).shape == (60, 90, 3)
    assert {k: record["settings"][k] for k in ("save_maps", "overlay", "colormap", "alpha")} == \
        {"save_maps": "npy", "overlay": "original", "colormap": "viridis", "alpha": 0.3}
    code, out, err = run("compare-layers", "--arch", "resnet18", "--weights", "none", "--no-cuda",
                         "--input-size", str(SIZE), "--layers", "layer3,layer4", "--json",
                         "--image-path", str(picture), "--output-dir", str(tmp_path / "l"),
                         "--save-maps", "npz")
    assert code == 0, err
    record = json.loads(out)
    folder = Path(record["classes"][0]["maps"]["layer3"]["gradcam"]).parent.parent.name
    with np.load(record["npz"]) as data:
        assert data.files == [f"{folder}/gradcam"] and data[f"{folder}/gradcam"].shape == (2, 1, SIZE, SIZE)


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--save-maps", "npy2", "'npy2' is not one of 'none', 'npy', 'npz'"),
    ("--overlay", "full", "'full' is not one of 'crop', 'original'"),
    ("--colormap", "jett", "--colormap jett: not a matplotlib colour map; e.g. jet, viridis"),
    ("--alpha", "2", "--alpha 2.0: the heat map's weight: a number from 0 to 1"),
    ("--alpha", "x", "'x' is not a valid float"),
])
def test_cli_bad_values_are_one_line_and_exit_2(picture: Path, tmp_path: Path, flag: str, value: str,
                                                words: str) -> None:
    code, out, err = run(*CLASSIFY, "--image-path", str(picture), "--output-dir", str(tmp_path / "o"),
                         flag, value)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("gradcam: error: ") and words in err, err
