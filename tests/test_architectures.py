"""Every architecture family explains an image with five finite, non-constant maps per class."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import torch

from gradcam_cli import ARCHITECTURES, explain, load_model
from gradcam_cli.io import load_image
from gradcam_cli.layout import to_nchw
from gradcam_cli.methods import DEFAULT_METHODS
from gradcam_cli.models import find_layer
from gradcam_cli.pipeline import resolve_layer

from .conftest import SAMPLES

FAMILIES = ["resnet18", "vgg11", "alexnet", "densenet121", "inception_v3", "googlenet",
            "squeezenet1_0", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
            "mnasnet0_5", "regnet_x_400mf", "convnext_tiny"]


def no_positive_evidence(module: torch.nn.Module, x: torch.Tensor, layer: str, cls: int) -> bool:
    """Check with plain autograd that Σ_k α_k A^k ≤ 0 everywhere, i.e. Grad-CAM is rightly blank."""
    kept = {}
    handle = find_layer(module, layer).register_forward_hook(lambda _m, _i, out: kept.setdefault("a", out))
    try:
        logits = module.eval()(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, cls], kept["a"])
    acts, grad = to_nchw(kept["a"]), to_nchw(grad)
    return bool(((grad.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1) <= 0).all())


def channel_mean_is_negative(module: torch.nn.Module, x: torch.Tensor, layer: str) -> bool:
    """Score-CAM's softmax weights are nearly uniform for a random network (maxvit_t on the
    sample: largest weight 0.00199 against 1/512 = 0.00195), so its map is ReLU of about the
    channel mean of the activations: blank exactly where that mean is negative everywhere."""
    kept = {}
    handle = find_layer(module, layer).register_forward_hook(
        lambda _m, _i, out: kept.update(a=out.detach()) if "a" not in kept else None)
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        handle.remove()
    return bool((to_nchw(kept["a"]).mean(dim=1) < 0).all())


def ablation_is_blank(module: torch.nn.Module, x: torch.Tensor, layer: str, cls: int) -> bool:
    """Recompute Ablation-CAM's weights the plain way (a hook swaps in the ablated outputs,
    the whole network runs for every channel) and check Σ_k w_k A^k ≤ 0 everywhere."""
    target, kept = find_layer(module, layer), {}
    handle = target.register_forward_hook(
        lambda _m, _i, out: kept.update(a=out.detach()) if "a" not in kept else None)
    with torch.no_grad():
        original = module.eval()(x)[0, cls]
    handle.remove()
    acts = kept["a"]
    scores = []
    for start in range(0, acts.shape[1], 64):
        channels = range(start, min(start + 64, acts.shape[1]))
        ablated = acts.repeat(len(channels), 1, 1, 1)
        for row, channel in enumerate(channels):
            ablated[row, channel] = 0
        handle = target.register_forward_hook(lambda _m, _i, _o, a=ablated: a)
        with torch.no_grad():
            scores.append(module(x.expand(len(channels), -1, -1, -1))[:, cls])
        handle.remove()
    weights = (original - torch.cat(scores)) / original
    return bool(((weights[:, None, None] * to_nchw(acts)[0]).sum(dim=0) <= 0).all())


def check_architecture(arch: str, methods: Sequence[str] = DEFAULT_METHODS) -> None:
    """Explain the sample cat's top-2 classes at the model's own input size and check the maps.

    With random weights Grad-CAM can be blank for a class (no channel has positive evidence);
    a constant CAM map is accepted only when it is zero and an independent autograd
    computation confirms that case.
    """
    model = load_model(arch, "none")
    crop = model.preprocess.crop_image(load_image(SAMPLES / "chelsea.png"))
    x = model.preprocess.to_tensor(crop)[None]
    layer = resolve_layer(model, None)
    result = explain(model.module, x, layer, topk=2, methods=methods, batch_size=64)
    size = model.preprocess.crop
    for method, maps in result.maps.items():
        assert maps.shape[-2:] == (size, size), (arch, method)
        for k in range(2):
            m = maps[0, k]
            assert torch.isfinite(m).all(), (arch, method, k)
            if m.max() == m.min() and method in ("gradcam", "guided-gradcam"):
                cls = int(result.classes[0, k])
                assert m.max() == 0 and no_positive_evidence(model.module, x, layer, cls), (arch, k)
            elif m.max() == m.min() and method == "scorecam":
                assert m.max() == 0 and channel_mean_is_negative(model.module, x, layer), (arch, k)
            elif m.max() == m.min() and method == "ablationcam":
                cls = int(result.classes[0, k])
                assert m.max() == 0 and ablation_is_blank(model.module, x, layer, cls), (arch, k)
            else:
                assert m.max() > m.min(), (arch, method, k)


@pytest.mark.parametrize("arch", FAMILIES)
def test_family(arch: str) -> None:
    check_architecture(arch)


@pytest.mark.sweep
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture(arch: str) -> None:
    start = time.perf_counter()
    check_architecture(arch)
    print(f"{arch}: {time.perf_counter() - start:.1f}s")


TRANSFORMERS = ["vit_b_16", "swin_t", "maxvit_t"]
GRADIENT_AND_EIGEN = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam"]


@pytest.mark.parametrize("arch", TRANSFORMERS[:2])
def test_transformer_cams_without_a_reshape_function(arch: str) -> None:
    check_architecture(arch, GRADIENT_AND_EIGEN)


@pytest.mark.sweep
@pytest.mark.parametrize("arch", TRANSFORMERS)
def test_transformer_perturbation_cams(arch: str) -> None:
    check_architecture(arch, ["scorecam", "ablationcam"])


def test_swin_grid_follows_the_input_size() -> None:
    """Swin's channels-last grid is read from the output, not assumed: 256 px gives 8x8."""
    model = load_model("swin_t", "none").module
    result = explain(model, torch.randn(1, 3, 256, 256), "features", topk=1, methods=["gradcam"])
    cam = result.maps["gradcam"][0, 0, 0]
    assert cam.shape == (256, 256) and torch.isfinite(cam).all() and cam.max() > cam.min()
