"""Every architecture family explains an image with five finite, non-constant maps per class."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

from gradcam_cli import ARCHITECTURES, explain, load_model
from gradcam_cli.io import load_image
from gradcam_cli.methods import DEFAULT_METHODS
from gradcam_cli.models import find_layer
from gradcam_cli.pipeline import resolve_layer

from .conftest import SAMPLES

FAMILIES = ["resnet18", "vgg11", "alexnet", "densenet121", "inception_v3", "googlenet",
            "squeezenet1_0", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
            "mnasnet0_5", "regnet_x_400mf", "convnext_tiny"]


def hand_fold(arch: str, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A layer output folded by hand into NxCxhxw: Swin's maps are NxhxwxC; ViT's tokens are a
    class token, then the patch grid (side: image size / patch size) row by row; the other
    families' maps are NxCxhxw already."""
    if arch.startswith("swin"):
        return lambda t: t.permute(0, 3, 1, 2)
    if arch.startswith("vit"):
        side = module.image_size // module.patch_size
        return lambda t: t[:, 1:].reshape(len(t), side, side, t.shape[2]).permute(0, 3, 1, 2)
    return lambda t: t


def direct_cam(arch: str, module: torch.nn.Module, x: torch.Tensor, layer: str, cls: int) -> torch.Tensor:
    """Σ_k α_k A^k (before ReLU) by plain autograd on the hand-folded layer output (the hook
    hands a copy downstream, so in-place operations there leave the layer's output alone)."""
    kept = {}

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        kept["a"] = out
        return out.clone()
    handle = find_layer(module, layer).register_forward_hook(keep)
    try:
        logits = module.eval()(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, cls], kept["a"])
    fold = hand_fold(arch, module)
    acts, grad = fold(kept["a"].detach()), fold(grad)
    return (grad.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1)


def direct_gradcam(arch: str, module: torch.nn.Module, x: torch.Tensor, layer: str, cls: int) -> torch.Tensor:
    """Grad-CAM from its definition, upsampled bilinearly to the input: 1xHxW."""
    cam = direct_cam(arch, module, x, layer, cls).clamp(min=0)[:, None]
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0]


def no_positive_evidence(arch: str, module: torch.nn.Module, x: torch.Tensor, layer: str, cls: int) -> bool:
    """Check with plain autograd that Σ_k α_k A^k ≤ 0 everywhere, i.e. Grad-CAM is rightly blank."""
    return bool((direct_cam(arch, module, x, layer, cls) <= 0).all())


def channel_mean_is_negative(arch: str, module: torch.nn.Module, x: torch.Tensor, layer: str) -> bool:
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
    return bool((hand_fold(arch, module)(kept["a"]).mean(dim=1) < 0).all())


def ablation_is_blank(arch: str, module: torch.nn.Module, x: torch.Tensor, layer: str, cls: int) -> bool:
    """Recompute Ablation-CAM's weights the plain way (a hook swaps in the ablated outputs,
    the whole network runs for every channel) and check Σ_k w_k A^k ≤ 0 everywhere."""
    fold = hand_fold(arch, module)
    target, kept = find_layer(module, layer), {}
    handle = target.register_forward_hook(
        lambda _m, _i, out: kept.update(a=out.detach()) if "a" not in kept else None)
    with torch.no_grad():
        original = module.eval()(x)[0, cls]
    handle.remove()
    acts = kept["a"]
    count = fold(acts).shape[1]
    scores = []
    for start in range(0, count, 64):
        channels = range(start, min(start + 64, count))
        ablated = acts.expand(len(channels), *acts.shape[1:]).clone()
        for row, channel in enumerate(channels):  # Swin and ViT keep their channels last
            ablated[(row, ..., channel) if arch.startswith(("swin", "vit")) else (row, channel)] = 0
        handle = target.register_forward_hook(lambda _m, _i, _o, a=ablated: a)
        with torch.no_grad():
            scores.append(module(x.expand(len(channels), -1, -1, -1))[:, cls])
        handle.remove()
    weights = (original - torch.cat(scores)) / original
    return bool(((weights[:, None, None] * fold(acts)[0]).sum(dim=0) <= 0).all())


def check_architecture(arch: str, methods: Sequence[str] = DEFAULT_METHODS) -> None:
    """Explain the sample cat's top-2 classes at the model's own input size and check the maps.

    With random weights Grad-CAM can be blank for a class (no channel has positive evidence);
    a constant CAM map is accepted only when it is zero and an independent autograd
    computation confirms that case. Grad-CAM itself must equal plain autograd on the layer
    output folded by hand.
    """
    model = load_model(arch, "none")
    crop = model.preprocess.model_pixels(load_image(SAMPLES / "chelsea.png"))
    x = model.preprocess.to_tensor(crop)[None]
    layer = resolve_layer(model, None)
    result = explain(model.module, x, layer, topk=2, methods=methods, batch_size=64)
    for method, maps in result.maps.items():
        assert maps.shape[-2:] == model.preprocess.input_size, (arch, method)
        for k in range(2):
            m, cls = maps[0, k], int(result.classes[0, k])
            assert torch.isfinite(m).all(), (arch, method, k)
            if method == "gradcam":
                direct = direct_gradcam(arch, model.module, x, layer, cls)
                assert torch.allclose(m, direct, rtol=0, atol=1e-4 * float(direct.max()) + 1e-12), (arch, k)
            if m.max() == m.min() and method in ("gradcam", "guided-gradcam"):
                assert m.max() == 0 and no_positive_evidence(arch, model.module, x, layer, cls), (arch, k)
            elif m.max() == m.min() and method == "scorecam":
                assert m.max() == 0 and channel_mean_is_negative(arch, model.module, x, layer), (arch, k)
            elif m.max() == m.min() and method == "ablationcam":
                assert m.max() == 0 and ablation_is_blank(arch, model.module, x, layer, cls), (arch, k)
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
    """Swin's channels-last grid is read from the output, not assumed: 256 px gives 8x8, and
    Grad-CAM equals its definition on that grid, permuted by hand."""
    model, x = load_model("swin_t", "none").module, torch.randn(1, 3, 256, 256)
    result = explain(model, x, "features", topk=1, methods=["gradcam"])
    cls = int(result.classes[0, 0])
    assert direct_cam("swin_t", model, x, "features", cls).shape == (1, 8, 8)
    cam, direct = result.maps["gradcam"][0, 0], direct_gradcam("swin_t", model, x, "features", cls)
    assert cam.max() > 0 and torch.allclose(cam, direct, rtol=0, atol=1e-4 * float(direct.max()))
