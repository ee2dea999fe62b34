"""CAM refinements against pytorch-grad-cam (random-weight resnet18, maps min-max normalised):
EigenGrad-CAM, eigen smoothing, test-time augmentation smoothing and several layers fused;
their settings, records and command-line options.

The SVD's sign is arbitrary: the reference keeps LAPACK's, gradcam orients every first
component to correlate positively with the plain sum of what it projects. The comparisons
undo that one difference by giving the reference the same orientation (``oriented``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import pytorch_grad_cam.base_cam
import pytorch_grad_cam.eigen_grad_cam
import pytorch_grad_cam.hirescam
import pytorch_grad_cam.layer_cam
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from gradcam_cli import explain
from gradcam_cli.errors import ArgumentError, ArgumentTypeError
from gradcam_cli.explanation import explain_layers
from gradcam_cli.models import find_layer
from gradcam_cli.refine import CamSettings, fuse
from gradcam_cli.settings import MethodSettings

from .conftest import make_image
from .test_cli import on_one_image, run
from .test_methods_peers import REFERENCE, model_and_input, normalised, with_head_scaled

TOLERANCE = 1e-5
REFERENCE = {**REFERENCE, "eigengradcam": pgc.EigenGradCAM, "fullgrad": pgc.FullGrad}


def oriented(batch: np.ndarray) -> np.ndarray:
    """The reference's projection, its sign chosen to correlate positively with Σ_k of ``batch``."""
    projection = get_2d_projection(batch)
    for p, total in zip(projection, batch.sum(axis=1), strict=True):
        if np.corrcoef(p.ravel(), total.ravel())[0, 1] < 0:
            p *= -1
    return projection


@pytest.fixture
def same_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give every pytorch-grad-cam module that projects the same sign rule as gradcam."""
    for module in (pytorch_grad_cam.base_cam, pytorch_grad_cam.eigen_grad_cam,
                   pytorch_grad_cam.layer_cam, pytorch_grad_cam.hirescam):
        monkeypatch.setattr(module, "get_2d_projection", oriented)


def cams(**fields: object) -> MethodSettings:
    """The methods' settings with these CAM settings."""
    return MethodSettings(cam=CamSettings(**fields))


def ours(model: torch.nn.Module, x: torch.Tensor, layer: str, method: str,
         settings: MethodSettings | None = None) -> tuple[np.ndarray, int]:
    """gradcam's normalised top-1 map and its class."""
    result = explain(model, x, layer, topk=1, methods=[method], settings=settings)
    return normalised(result.maps[method][0, 0, 0].numpy()), int(result.classes[0, 0])


def reference(model: torch.nn.Module, x: torch.Tensor, layers: list[str], method: str, class_id: int,
              **call: bool) -> np.ndarray:
    """pytorch-grad-cam's normalised map for ``class_id`` over ``layers``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with REFERENCE[method](model=model, target_layers=[find_layer(model, n) for n in layers]) as cam:
            return normalised(cam(input_tensor=x, targets=[ClassifierOutputTarget(class_id)], **call)[0])


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_eigengradcam_equals_pytorch_grad_cam(layer: str, same_sign: None) -> None:
    model, x = model_and_input("resnet18", 128)
    mine, class_id = ours(model, x, layer, "eigengradcam")
    assert np.abs(mine - reference(model, x, [layer], "eigengradcam", class_id)).max() <= TOLERANCE
    assert mine.std() > 0.01


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"])
def test_eigen_smooth_equals_pytorch_grad_cam(method: str, same_sign: None) -> None:
    """Grad-CAM++ within 1e-4, as without smoothing (test_methods_peers): the reference adds
    1e-6 to its coefficients' denominator even with the head scaled."""
    model, x = model_and_input("resnet18", 96)
    model = with_head_scaled(model, "fc", 1e4)
    mine, class_id = ours(model, x, "layer3", method, cams(eigen_smooth=True))
    expected = reference(model, x, ["layer3"], method, class_id, eigen_smooth=True)
    assert np.abs(mine - expected).max() <= (1e-4 if method == "gradcam++" else TOLERANCE)
    plain, _ = ours(model, x, "layer3", method)
    assert np.abs(mine - plain).max() > 1e-2  # smoothing changed the map


def test_eigen_smooth_of_ablationcam_equals_pytorch_grad_cam(same_sign: None) -> None:
    """The reference's 256 ablated passes at 64 px (~5-30 s, depending on the machine's load)."""
    model, x = model_and_input("resnet18", 64)
    mine, class_id = ours(model, x, "layer3", "ablationcam", cams(eigen_smooth=True))
    expected = reference(model, x, ["layer3"], "ablationcam", class_id, eigen_smooth=True)
    assert np.abs(mine - expected).max() <= TOLERANCE


@pytest.mark.parametrize("method", ["gradcam", "eigengradcam", "fullgrad"])
def test_aug_smooth_equals_pytorch_grad_cam(method: str, same_sign: None) -> None:
    """Flips and intensity factors 0.9, 1, 1.1, each map min-max normalised, mapped back and
    averaged; the head scaled so that the reference's 1e-7 in its normalisation is negligible
    (~6-35 s: six explanations each side)."""
    model, x = model_and_input("resnet18", 96)
    model = with_head_scaled(model, "fc", 1e4)
    mine, class_id = ours(model, x, "layer3", method, cams(aug_smooth=True))
    assert np.abs(mine - reference(model, x, ["layer3"], method, class_id, aug_smooth=True)).max() \
        <= TOLERANCE
    assert np.abs(mine - ours(model, x, "layer3", method)[0]).max() > 1e-2


def test_aug_smooth_keeps_the_clean_inputs_classes() -> None:
    """Every augmented copy explains the classes chosen on the clean input."""
    model, x = model_and_input("resnet18", 64)
    plain = explain(model, x, "layer4", topk=3, methods=["gradcam"])
    smooth = explain(model, x, "layer4", topk=3, methods=["gradcam", "vanilla"],
                     settings=cams(aug_smooth=True))
    assert torch.equal(smooth.classes, plain.classes) and torch.equal(smooth.scores, plain.scores)
    vanilla = explain(model, x, "layer4", topk=3, methods=["vanilla"]).maps["vanilla"]
    assert torch.equal(smooth.maps["vanilla"], vanilla)  # input gradients are not smoothed


@pytest.mark.parametrize("how", ["mean", "max"])
def test_fused_layers_equal_pytorch_grad_cam(how: str) -> None:
    """Each layer's map min-max normalised at the input's size, then their mean or maximum,
    built from the reference's single-layer maps. The reference's own multi-layer mean
    normalises each layer's map before upsampling it (bilinear samples miss the extremes), so
    it differs slightly (README, "Where gradcam differs from peers")."""
    model, x = model_and_input("resnet18", 96)
    model = with_head_scaled(model, "fc", 1e4)
    results = explain_layers(model, x, ["layer3", "layer4"], topk=1, methods=["gradcam"])
    mine = normalised(fuse([r.maps for r in results], how, ["gradcam"])["gradcam"][0, 0, 0].numpy())
    class_id = int(results[0].classes[0, 0])
    single = [reference(model, x, [layer], "gradcam", class_id) for layer in ("layer3", "layer4")]
    combine = np.mean if how == "mean" else np.max
    assert np.abs(mine - normalised(combine(single, axis=0))).max() <= TOLERANCE
    if how == "mean":
        aggregated = reference(model, x, ["layer3", "layer4"], "gradcam", class_id)
        assert 1e-5 < np.abs(mine - aggregated).max() < 2e-3


def test_fuse_keeps_layer_independent_maps_and_guides_the_fused_gradcam() -> None:
    model, x = model_and_input("resnet18", 64)
    results = explain_layers(model, x, ["layer3", "layer4"], topk=2,
                             methods=["vanilla", "gradcam", "guided", "guided-gradcam"])
    fused = fuse([r.maps for r in results], "mean", ["vanilla", "guided-gradcam"])
    assert list(fused) == ["vanilla", "guided-gradcam"]
    assert torch.equal(fused["vanilla"], results[0].maps["vanilla"])
    gradcam = fuse([r.maps for r in results], "mean", ["gradcam"])["gradcam"]
    assert torch.allclose(fused["guided-gradcam"], results[0].maps["guided"] * gradcam)


def test_settings_are_checked_and_recorded_only_when_they_shape_a_map() -> None:
    with pytest.raises(ArgumentError) as caught:
        CamSettings(fuse="median")
    assert caught.value.argument == "fuse"
    with pytest.raises(ArgumentTypeError) as caught:
        CamSettings(aug_smooth="yes")
    assert caught.value.argument == "aug_smooth"
    assert MethodSettings().to_dict(["gradcam"]) == {}
    smooth = cams(aug_smooth=True)
    assert smooth.to_dict(["vanilla"]) == {}
    assert smooth.to_dict(["gradcam"]) == {"cam": {"aug_smooth": True, "eigen_smooth": False, "fuse": None}}
    assert cams(eigen_smooth=True).to_dict(["eigencam"]) == {}  # already a projection


CLASSIFY = ["classify", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", "64",
            "--topk", "1", "--json"]


def test_cli_fuses_layers_and_records_them(tmp_path: Path) -> None:
    """classify --layers a,b --fuse max: one map per method, the layers and fusion recorded,
    a rerun with another fusion redone (~6 s)."""
    image = make_image(tmp_path / "a.png")
    base = [*CLASSIFY, "--image-path", str(image), "--output-dir", str(tmp_path / "o"),
            "--method", "gradcam,vanilla,eigengradcam", "--layers", "layer3,layer4", "--skip-existing"]
    code, out, err = run(*base, "--fuse", "max")
    assert code == 0, err
    record = json.loads(out)
    assert record["layers"] == ["layer3", "layer4"] and record["fuse"] == "max"
    assert set(record["classes"][0]["maps"]) == {"gradcam", "vanilla", "eigengradcam"}
    assert record["settings"]["cam"]["fuse"] == "max"
    assert json.loads(run(*base, "--fuse", "max")[1])["status"] == "skipped"
    assert json.loads(run(*base, "--fuse", "mean")[1])["status"] == "ok"


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "vanilla", "--aug-smooth"], "--aug-smooth applies to"),
    (["--method", "eigencam", "--eigen-smooth"], "--eigen-smooth applies to"),
    (["--method", "gradcam", "--fuse", "max"], "--fuse max: "),
    (["--method", "gradcam", "--layers", "layer4"], "--layers layer4: "),
    (["--method", "gradcam", "--layer", "layer3", "--layers", "layer3,layer4"], "--layers "),
])
def test_cli_bad_refinement_options_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    code, _, err = on_one_image(tmp_path, *CLASSIFY, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_compare_layers_and_evaluate_take_the_new_methods(tmp_path: Path) -> None:
    """compare-layers with EigenGrad-CAM eigen-smoothed Grad-CAM; evaluate measures
    EigenGrad-CAM and FullGrad, aug-smoothed (~10 s)."""
    image = make_image(tmp_path / "a.png")
    common = ["--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", "64",
              "--image-path", str(image), "--json"]
    code, out, err = run("compare-layers", *common, "--output-dir", str(tmp_path / "c"),
                         "--layers", "layer3,layer4", "--method", "eigengradcam,gradcam", "--eigen-smooth")
    assert code == 0, err
    assert set(json.loads(out)["classes"][0]["maps"]["layer3"]) == {"eigengradcam", "gradcam"}
    code, out, err = run("evaluate", *common, "--output-dir", str(tmp_path / "e"), "--steps", "2",
                         "--method", "eigengradcam,fullgrad", "--aug-smooth")
    assert code == 0, err
    record = json.loads(out)
    assert set(record["classes"][0]["metrics"]) == {"eigengradcam", "fullgrad"}
    assert record["settings"]["cam"]["aug_smooth"] is True
