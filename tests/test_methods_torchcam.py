"""The CAM family against torchcam (a test-only dependency), the third peer.

Maps are compared after min-max normalisation at the input's size, for the top-1 class of a
random-weight model. Where torchcam differs (README, "Where gradcam differs from peers"), the
test reproduces torchcam's map by hand from the difference, so the cause is shown, not guessed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchcam import methods

from gradcam_cli import explain

TOLERANCE = 1e-4
KINDS = {"gradcam": methods.GradCAM, "gradcam++": methods.GradCAMpp, "xgradcam": methods.XGradCAM,
         "layercam": methods.LayerCAM, "scorecam": methods.ScoreCAM}


def normalised(a: torch.Tensor) -> np.ndarray:
    """Min-max to [0, 1] as a numpy array; a constant map becomes zeros."""
    a = a.detach().double() - a.min()
    return (a / a.max() if a.max() > 0 else a).numpy()


def upsampled(cam: torch.Tensor, size: int) -> torch.Tensor:
    """A low-resolution map bilinearly upsampled (half-pixel centres) to size x size."""
    return F.interpolate(cam[None, None].double(), size=(size, size), mode="bilinear",
                         align_corners=False)[0, 0]


def torchcam_map(model: torch.nn.Module, x: torch.Tensor, method: str, class_id: int) -> torch.Tensor:
    """torchcam's map for ``class_id`` at layer4, upsampled to the input."""
    options = {"batch_size": 64} if method == "scorecam" else {}
    with KINDS[method](model, target_layer="layer4", input_shape=tuple(x.shape[1:]), **options) as cam:
        scores = model(x)
        low = cam(class_id, scores, normalized=False)[0][0]
    return upsampled(low, x.shape[-1])


def setup(size: int = 224) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A random-weight resnet18, a fixed input, and layer4's activations and class gradient."""
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, size, size)
    seen = {}
    hook = model.layer4.register_forward_hook(lambda _m, _i, out: seen.update(a=out))
    logits = model(x)
    hook.remove()
    (grads,) = torch.autograd.grad(logits[0, logits.argmax()], seen["a"])
    return model, x, torch.stack([seen["a"].detach()[0], grads[0]])


@pytest.mark.parametrize("method", ["gradcam", "xgradcam", "layercam"])
def test_gradient_cams_equal_torchcam(method: str) -> None:
    model, x, _ = setup()
    result = explain(model, x, "layer4", topk=1, methods=[method])
    mine = normalised(result.maps[method][0, 0, 0])
    theirs = normalised(torchcam_map(model, x, method, int(result.classes[0, 0])))
    assert np.abs(mine - theirs).max() <= TOLERANCE and mine.std() > 0.01


def test_torchcam_gradcam_pp_never_divides_its_coefficients() -> None:
    """torchcam 0.5.0 divides ``alpha[mask]`` in place, a copy made by boolean indexing, so
    its weights are Σ G²·relu(G): the same computed by hand equals its map; the paper's
    (eq. 19, gradcam's) does not."""
    model, x, (acts, grads) = setup()
    result = explain(model, x, "layer4", topk=1, methods=["gradcam++"])
    theirs = normalised(torchcam_map(model, x, "gradcam++", int(result.classes[0, 0])))
    undivided = (grads.pow(2) * grads.clamp(min=0)).sum(dim=(1, 2))
    by_hand = upsampled((undivided[:, None, None] * acts).sum(0).clamp(min=0), x.shape[-1])
    assert np.abs(normalised(by_hand) - theirs).max() <= TOLERANCE
    assert np.abs(normalised(result.maps["gradcam++"][0, 0, 0]) - theirs).max() > 1e-2


def test_torchcam_scorecam_normalises_masks_before_upsampling() -> None:
    """torchcam min-max normalises each activation at the layer's resolution and then
    upsamples it; the paper (and gradcam, and pytorch-grad-cam) upsample first. Score-CAM by
    hand with torchcam's order equals torchcam's map; gradcam's differs a little."""
    model, x, (acts, _) = setup(size=64)
    result = explain(model, x, "layer4", topk=1, methods=["scorecam"], batch_size=64)
    class_id = int(result.classes[0, 0])
    theirs = normalised(torchcam_map(model, x, "scorecam", class_id))
    flat = acts.flatten(1)
    low = (acts - flat.amin(1)[:, None, None]) / (flat.amax(1) - flat.amin(1)).clamp(min=1e-12)[:, None, None]
    masks = F.interpolate(low[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        scores = torch.cat([model(x * part)[:, class_id] for part in masks.split(64)])
    by_hand = (scores.softmax(0)[:, None, None] * acts).sum(0).clamp(min=0)
    assert np.abs(normalised(upsampled(by_hand, 64)) - theirs).max() <= TOLERANCE
    difference = np.abs(normalised(result.maps["scorecam"][0, 0, 0]) - theirs).max()
    assert 0 < difference < 0.05
