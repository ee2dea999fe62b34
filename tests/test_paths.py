"""Integrated Gradients against captum's ``IntegratedGradients`` (both rules) and SmoothGrad
against captum's ``NoiseTunnel`` given the same noise, on small random networks; their
options, batches, records, resume and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Saliency
from torch import nn

from gradcam_cli import paths
from gradcam_cli.errors import ArgumentError
from gradcam_cli.explanation import explain
from gradcam_cli.methods import overlay
from gradcam_cli.metrics import baseline_of
from gradcam_cli.paths import PathSettings, SmoothSettings
from gradcam_cli.settings import MethodSettings
from gradcam_cli.targets import Scoring, image_classes, top_classes, top_proxies

from .conftest import copy_batch_sizes, make_image
from .test_cli import compare_layers_error, evaluate_with_a_box, on_one_image, run


def small_net(outputs: int = 5, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    """A random conv net with batch norm, global pooling and a head."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), act(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, outputs))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


X = torch.randn(2, 3, 20, 17, generator=torch.Generator().manual_seed(1))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ig(**fields: object) -> MethodSettings:
    """The methods' settings with these Integrated Gradients settings."""
    return MethodSettings(ig=PathSettings(**fields))


def captum_baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The baseline as the paper's users write it: black pixels normalised, or evaluate's substrates."""
    if kind == "black":
        return ((0 - torch.tensor(MEAN)) / torch.tensor(STD))[None, :, None, None].expand_as(x)
    return baseline_of(x[0], kind)[None]


@pytest.mark.parametrize(("rule", "captum_rule"), [("riemann-trapezoid", "riemann_trapezoid"),
                                                   ("gausslegendre", "gausslegendre")])
@pytest.mark.parametrize("baseline", ["black", "blur", "mean"])
def test_integrated_gradients_equal_captum(rule: str, captum_rule: str, baseline: str) -> None:
    """Every image and class equals captum's attribution and convergence delta, with the path
    points of both images (each with classes of its own) split over batches of 5."""
    net, steps = small_net(), 7
    settings = PathSettings(ig_steps=steps, ig_baseline=baseline, ig_rule=rule).with_normalisation(MEAN, STD)
    result = explain(net, X, "3", methods=["integrated-gradients"], batch_size=5,
                     settings=MethodSettings(ig=settings), target=image_classes([[1, 3], [4, 0]]))
    maps = result.maps["integrated-gradients"]
    assert maps.shape == (2, 2, 3, 20, 17) and result.completeness.shape == (2, 2)
    for n in range(2):
        for k, c in enumerate(result.classes[n].tolist()):
            x = X[n:n + 1]
            expected, delta = IntegratedGradients(net).attribute(
                x, captum_baseline(x, baseline), target=c, n_steps=steps, method=captum_rule,
                return_convergence_delta=True)
            scale = expected.abs().max()
            assert torch.allclose(maps[n, k], expected[0], atol=1e-5 * scale, rtol=1e-5), (n, k)
            assert abs(float(result.completeness[n, k]) - float(delta)) <= 1e-5 * max(1.0, scale), (n, k)


def test_completeness_error_is_small_with_many_points_on_a_smooth_network() -> None:
    """Σ attributions ≈ S(x) - S(x') (Sundararajan et al.'s axiom) for a tanh network and 64
    Gauss-Legendre points, and the error is large with 2 trapezoid points."""
    net = small_net(act=nn.Tanh)
    fine = explain(net, X, "3", topk=1, methods=["integrated-gradients"],
                   settings=ig(ig_steps=64, ig_rule="gausslegendre", ig_baseline="blur"))
    coarse = explain(net, X, "3", topk=1, methods=["integrated-gradients"],
                     settings=ig(ig_steps=2, ig_baseline="blur", ig_rule="riemann-trapezoid"))
    with torch.no_grad():
        c = fine.classes[:, 0]
        gap = (net(X) - net(torch.stack([baseline_of(x, "blur") for x in X]))).gather(1, c[:, None])[:, 0]
    total = fine.maps["integrated-gradients"].flatten(1).sum(1)
    assert torch.allclose(total, gap, atol=1e-4 * gap.abs().max())
    assert fine.completeness.abs().max() < 1e-4 * gap.abs().max()
    assert coarse.completeness.abs().max() > 10 * fine.completeness.abs().max()


def test_similarity_and_negative_scores_take_the_same_paths() -> None:
    """An embedding's cosine similarity to two images' own proxies equals captum's Integrated
    Gradients of that similarity (the batches mix both images' points); -z gives minus the map."""
    net = small_net()
    with torch.no_grad():  # each image's nearest proxy is its own embedding
        proxies = torch.cat([net(X), torch.randn(2, 5, generator=torch.Generator().manual_seed(2))])
    settings = ig(ig_steps=6, ig_baseline="mean")
    result = explain(net, X, "3", methods=["integrated-gradients"], batch_size=5, settings=settings,
                     target=top_proxies(proxies, "cosine", topk=2))
    assert result.classes[:, 0].tolist() == [0, 1]

    class Similarity(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.cosine_similarity(net(x)[:, None], proxies[None], dim=-1, eps=1e-12)
    for n in range(2):
        for k, p in enumerate(result.classes[n].tolist()):
            x = X[n:n + 1]
            start = baseline_of(x[0], "mean")[None]
            expected = IntegratedGradients(Similarity()).attribute(x, start, target=p, n_steps=6)
            assert torch.allclose(result.maps["integrated-gradients"][n, k], expected[0],
                                  atol=1e-5 * expected.abs().max()), (n, k)
    plus = explain(net, X, "3", class_ids=[1], methods=["integrated-gradients"], settings=settings)
    minus = explain(net, X, "3", methods=["integrated-gradients"], settings=settings,
                    target=top_classes(class_ids=[1], scoring=Scoring("softmax", negative=True)))
    assert torch.allclose(minus.maps["integrated-gradients"], -plus.maps["integrated-gradients"], atol=1e-6)
    assert torch.allclose(minus.completeness, -plus.completeness, atol=1e-6)


def test_path_points_run_in_batches_on_the_gradient_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No forward pass takes more than ``batch_size`` path points, and every point is run once."""
    sizes = copy_batch_sizes(monkeypatch, paths)
    explain(small_net(), X, "3", topk=1, methods=["integrated-gradients"], batch_size=4,
            settings=ig(ig_steps=5, ig_baseline="mean"))
    assert sizes == [4, 4, 2, 2], sizes  # 2 x 5 path points, then both baselines


def test_black_baseline_needs_the_normalisation() -> None:
    with pytest.raises(ArgumentError, match="normalisation") as caught:
        explain(small_net(), X, "3", topk=1, methods=["integrated-gradients"])
    assert caught.value.argument == "ig_baseline"


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"ig_steps": 0}, "ig_steps"), ({"ig_steps": 1, "ig_rule": "riemann-trapezoid"}, "ig_steps"),
    ({"ig_steps": 2.5}, "ig_steps"),
    ({"ig_baseline": "white"}, "ig_baseline"), ({"ig_rule": "riemann_left"}, "ig_rule"),
    ({"black": "dark"}, "black"),
])
def test_bad_path_settings_are_refused_naming_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError) as caught:
        PathSettings(**kwargs)
    assert caught.value.argument == argument


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"samples": -1}, "samples"), ({"noise": 0}, "noise"), ({"smooth_type": "mean"}, "smooth_type"),
    ({"noise_seed": -3}, "noise_seed"),
])
def test_bad_smooth_settings_are_refused_naming_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError) as caught:
        SmoothSettings(**kwargs)
    assert caught.value.argument == argument


def captum_noise(attribution: object, x: torch.Tensor, net: nn.Module, **kwargs: object
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """captum's NoiseTunnel result for one image, and the noise it drew (the model's inputs
    minus the image, as a pre-hook sees them)."""
    seen = []
    handle = net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        result = NoiseTunnel(attribution).attribute(x, **kwargs)
    finally:
        handle.remove()
    return result, torch.cat(seen) - x


@pytest.mark.parametrize(("kind", "nt_type"), [("smoothgrad", "smoothgrad"),
                                               ("smoothgrad-sq", "smoothgrad_sq"), ("vargrad", "vargrad")])
def test_smoothgrad_equals_captum_noise_tunnel_given_its_noise(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                               nt_type: str) -> None:
    """Vanilla backprop smoothed over captum's own noisy copies equals NoiseTunnel(Saliency)
    (signed gradients), in batches of 3 copies."""
    net, x, samples = small_net(), X[:1], 7
    expected, noise = captum_noise(Saliency(net), x, net, nt_type=nt_type, nt_samples=samples,
                                   stdevs=0.3, target=2, abs=False)
    monkeypatch.setattr(paths, "noise_of", lambda _image, _settings: noise)
    result = explain(net, x, "3", class_ids=[2], methods=["vanilla"], batch_size=3,
                     settings=MethodSettings(smooth=SmoothSettings(samples=samples, smooth_type=kind)))
    assert len(noise) == samples
    assert torch.allclose(result.maps["vanilla"][0, 0], expected[0], atol=1e-6 * expected.abs().max(),
                          rtol=1e-5)


def test_smoothed_gradcam_equals_captum_noise_tunnel_of_layer_gradcam(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient CAM is averaged as a map: NoiseTunnel(LayerGradCam) upsampled (a linear step,
    so the mean of upsampled maps is the upsampled mean)."""
    net, x, samples = small_net(), X[:1], 5
    reference = LayerGradCam(net, net[3])
    cams, noise = captum_noise(reference, x, net, nt_type="smoothgrad", nt_samples=samples, stdevs=0.3,
                               target=1, relu_attributions=True)
    monkeypatch.setattr(paths, "noise_of", lambda _image, _settings: noise)
    result = explain(net, x, "3", class_ids=[1], methods=["gradcam"],
                     settings=MethodSettings(smooth=SmoothSettings(samples=samples)))
    expected = F.interpolate(cams, size=(20, 17), mode="bilinear", align_corners=False)
    assert torch.allclose(result.maps["gradcam"][0, 0], expected[0], atol=1e-6 * expected.abs().max())


def test_noise_level_is_a_fraction_of_each_images_range() -> None:
    """sigma = noise x (max - min) of the image: the drawn noise's spread, per image."""
    image = torch.rand(3, 40, 40) * 4 - 1  # range ≈ 4
    eps = paths.noise_of(image, SmoothSettings(samples=20, noise=0.1))
    sigma = 0.1 * float(image.max() - image.min())
    assert eps.shape == (20, 3, 40, 40)
    assert abs(float(eps.std()) / sigma - 1) < 0.02 and abs(float(eps.mean())) < 0.02 * sigma


def test_smoothing_is_reproducible_and_independent_of_batch_neighbours() -> None:
    """A rerun gives the same bytes; an image's smoothed maps are the same alone or batched."""
    net = small_net()
    settings = MethodSettings(smooth=SmoothSettings(samples=4, smooth_type="vargrad"))
    both = explain(net, X, "3", topk=1, methods=["guided", "gradcam"], settings=settings)
    again = explain(net, X, "3", topk=1, methods=["guided", "gradcam"], settings=settings)
    alone = explain(net, X[1:], "3", topk=1, methods=["guided", "gradcam"], settings=settings)
    clean = explain(net, X, "3", topk=1, methods=["guided", "gradcam"])
    for m in ("guided", "gradcam"):
        assert torch.equal(both.maps[m], again.maps[m])
        assert torch.allclose(both.maps[m][1], alone.maps[m][0], atol=1e-6)
        assert not torch.allclose(both.maps[m], clean.maps[m])


def test_smoothing_runs_copies_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pass takes more than ``batch_size`` noisy copies; every copy is run once, input
    gradients on the gradient copy, gradient CAMs on the model with its layers."""
    net, sizes, direct = small_net(), copy_batch_sizes(monkeypatch, paths), []
    settings = MethodSettings(smooth=SmoothSettings(samples=5))
    explain(net, X, "3", topk=1, methods=["vanilla", "guided"], batch_size=3, settings=settings)
    assert sizes == [3, 2, 3, 2], sizes  # 5 copies of each image
    net.register_forward_pre_hook(lambda _m, args: direct.append(len(args[0])))
    explain(net, X, "3", topk=1, methods=["vanilla", "gradcam"], batch_size=3, settings=settings)
    assert direct[-5:] == [2, 3, 2, 3, 2] and sizes == [3, 2, 3, 2], direct  # the clean pass, then copies


def test_integrated_gradients_are_drawn_and_measured_like_vanilla() -> None:
    assert not overlay("integrated-gradients")


CLASSIFY = ["classify", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", "64",
            "--topk", "1", "--json"]


def test_cli_integrated_gradients_record_and_resume(tmp_path: Path) -> None:
    """The completeness error and settings (black from --mean/--std) in the record; a rerun
    with other --ig-steps or --smooth redone (~15-30 s: four runs of a random resnet18 at 64 px)."""
    image = make_image(tmp_path / "a.png")
    base = [*CLASSIFY, "--image-path", str(image), "--output-dir", str(tmp_path / "o"), "--skip-existing",
            "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--method", "integrated-gradients,vanilla"]
    args = [*base, "--ig-steps", "3"]
    code, out, err = run(*args)
    assert code == 0, err
    record = json.loads(out)
    assert set(record["classes"][0]["maps"]) == {"integrated-gradients", "vanilla"}
    assert isinstance(record["classes"][0]["completeness_error"], float)
    assert record["settings"]["ig"] == {"ig_steps": 3, "ig_baseline": "black", "ig_rule": "gausslegendre",
                                        "black": [-2.0, -2.0, -2.0]}
    assert "smooth" not in record["settings"]
    assert json.loads(run(*args)[1])["status"] == "skipped"
    assert json.loads(run(*base, "--ig-steps", "4")[1])["status"] == "ok"
    smoothed = json.loads(run(*args, "--smooth", "2", "--noise", "0.2")[1])
    assert smoothed["status"] == "ok"
    assert smoothed["settings"]["smooth"] == {"samples": 2, "noise": 0.2, "smooth_type": "smoothgrad",
                                              "noise_seed": 0}


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "integrated-gradients", "--ig-steps", "0"], "--ig-steps 0: "),
    (["--method", "gradcam", "--ig-steps", "8"], "--ig-steps applies to --method integrated-gradients"),
    (["--method", "gradcam", "--ig-baseline", "blur"], "--ig-baseline applies to --method integrated"),
    (["--method", "occlusion", "--smooth", "4"], "--smooth applies to"),
    (["--method", "vanilla", "--noise", "0.2"], "--noise applies to --smooth"),
    (["--method", "vanilla", "--smooth", "3", "--noise", "-1"], "--noise -1.0: "),
])
def test_cli_bad_path_options_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    code, _, err = on_one_image(tmp_path, *CLASSIFY, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_compare_layers_refuses_integrated_gradients(tmp_path: Path) -> None:
    code, err = compare_layers_error(tmp_path, "integrated-gradients")
    assert code == 2 and "--method integrated-gradients: does not depend on the layer" in err


def test_evaluate_measures_integrated_gradients_and_smoothed_maps(tmp_path: Path) -> None:
    """Curves and pointing games of Integrated Gradients and smoothed vanilla maps, the
    completeness error in the class record (~8 s)."""
    code, out, err = evaluate_with_a_box(tmp_path, "--method", "vanilla,integrated-gradients",
                                             "--ig-steps", "3", "--smooth", "2")
    assert code == 0, err
    record = json.loads(out.splitlines()[0])
    cls = record["classes"][0]
    assert set(cls["metrics"]) == {"vanilla", "integrated-gradients"}
    assert 0 <= cls["metrics"]["integrated-gradients"]["deletion_auc"] <= 1
    assert cls["metrics"]["integrated-gradients"]["pointing_hit"] in (True, False)
    assert isinstance(cls["completeness_error"], float)
    assert record["settings"]["ig"]["ig_steps"] == 3 and record["settings"]["smooth"]["samples"] == 2
