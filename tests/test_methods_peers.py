"""The CAM family against pytorch-grad-cam (`grad-cam`, a test-only dependency).

Maps are compared after the same normalisation (min-max to [0, 1] at the input's size) on
random-weight models with a fixed input; where gradcam deliberately differs from the reference,
the test shows the difference and the cause (README, "Where gradcam differs from peers").
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn

from gradcam_cli import explain
from gradcam_cli.models import find_layer

REFERENCE = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
             "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM, "eigencam": pgc.EigenCAM,
             "scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}
TOLERANCE = 1e-4


def normalised(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    a = a - a.min()
    return a / a.max() if a.max() > 0 else a


def ours(model: nn.Module, x: torch.Tensor, layer: str, method: str) -> tuple[np.ndarray, int]:
    """gradcam's normalised map for the top-1 class, and that class."""
    result = explain(model, x, layer, topk=1, methods=[method], batch_size=64)
    return normalised(result.maps[method][0, 0, 0].numpy()), int(result.classes[0, 0])


def reference(model: nn.Module, x: torch.Tensor, layer: str, method: str, class_id: int) -> np.ndarray:
    """pytorch-grad-cam's normalised map for ``class_id``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with REFERENCE[method](model=model, target_layers=[find_layer(model, layer)]) as cam:
            if hasattr(cam, "batch_size"):
                cam.batch_size = 64
            return normalised(cam(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0])


def model_and_input(arch: str, size: int = 224) -> tuple[nn.Module, torch.Tensor]:
    """A random-weight torchvision model in eval mode and a fixed input."""
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)().eval(), torch.randn(1, 3, size, size)


def with_head_scaled(model: nn.Module, head: str, factor: float) -> nn.Module:
    """A copy whose last linear layer's weights are multiplied by ``factor``."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        find_layer(model, head).weight.mul_(factor)
    return model


CASES = [("resnet18", "layer3", "fc"), ("resnet18", "layer4", "fc"),
         ("vgg11", "features.19", "classifier.6")]


@pytest.mark.parametrize(("arch", "layer", "head"), CASES)
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"])
def test_gradient_cams_equal_pytorch_grad_cam(arch: str, layer: str, head: str, method: str) -> None:
    model, x = model_and_input(arch)
    if method == "gradcam++":  # see test_gradcam_pp_reference_eps_dominates_small_gradients
        model = with_head_scaled(model, head, 1e4)
    mine, class_id = ours(model, x, layer, method)
    assert np.abs(mine - reference(model, x, layer, method, class_id)).max() <= TOLERANCE
    assert mine.std() > 0.01  # a real map, not two blanks agreeing


def test_gradcam_pp_reference_eps_dominates_small_gradients() -> None:
    """pytorch-grad-cam adds 1e-6 to Grad-CAM++'s denominator 2G² + ΣA·G³. With random
    weights G is ~1e-4, so G² ~ 1e-8 and the constant outweighs the formula; gradcam divides
    exactly (0 where the denominator is 0). Scaling the head makes G large, and then the
    two agree (previous test); unscaled they differ."""
    model, x = model_and_input("resnet18")
    mine, class_id = ours(model, x, "layer3", "gradcam++")
    assert np.abs(mine - reference(model, x, "layer3", "gradcam++", class_id)).max() > 1e-2


def test_inplace_relu_after_the_layer_changes_the_references_activations() -> None:
    """vgg11's features.18 is a conv whose output the next in-place ReLU overwrites. The
    reference keeps that tensor, so it weights post-ReLU values with pre-ReLU gradients;
    gradcam keeps a copy of the layer's own output. Without the in-place ReLU they agree."""
    model, x = model_and_input("vgg11")
    mine, class_id = ours(model, x, "features.18", "gradcam")
    assert np.abs(mine - reference(model, x, "features.18", "gradcam", class_id)).max() > 1e-2
    model.features[19].inplace = False
    assert np.abs(mine - ours(model, x, "features.18", "gradcam")[0]).max() == 0
    assert np.abs(mine - reference(model, x, "features.18", "gradcam", class_id)).max() <= TOLERANCE


@pytest.mark.parametrize(("arch", "layer"), [("resnet18", "layer3"), ("vgg11", "features.19")])
def test_eigencam_equals_the_reference_projection_with_a_fixed_sign(arch: str, layer: str) -> None:
    """The reference keeps whichever sign LAPACK returns; gradcam orients the component to
    correlate positively with the total activation. Same projection, up to that sign."""
    model, x = model_and_input(arch)
    mine, _ = ours(model, x, layer, "eigencam")
    acts = {}
    handle = find_layer(model, layer).register_forward_hook(
        lambda _m, _i, out: acts.setdefault("a", out.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    projection = torch.from_numpy(get_2d_projection(acts["a"].numpy()))
    total = acts["a"].sum(dim=1)[0].flatten()
    sign = 1.0 if np.corrcoef(projection[0].flatten(), total)[0, 1] >= 0 else -1.0
    size = x.shape[-2:]
    expected = torch.nn.functional.interpolate((sign * projection).clamp(min=0)[:, None], size=size,
                                               mode="bilinear", align_corners=False)
    assert np.abs(mine - normalised(expected[0, 0].numpy())).max() <= TOLERANCE


def test_ablationcam_equals_pytorch_grad_cam() -> None:
    # layer3 of resnet18 at 96x96: 256 channels keeps the reference's 256 full passes quick
    model, x = model_and_input("resnet18", 96)
    mine, class_id = ours(model, x, "layer3", "ablationcam")
    assert np.abs(mine - reference(model, x, "layer3", "ablationcam", class_id)).max() <= TOLERANCE


def test_scorecam_equals_pytorch_grad_cam_with_the_same_mask_upsampling(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference upsamples Score-CAM's masks with align_corners=True
    (nn.UpsamplingBilinear2d); gradcam uses the same upsampling as for every displayed map
    (align_corners=False), as the Score-CAM authors' code does. With the reference's
    upsampling switched to align_corners=False the maps agree; as shipped they differ."""
    model, x = model_and_input("resnet18", 96)
    mine, class_id = ours(model, x, "layer3", "scorecam")
    shipped = reference(model, x, "layer3", "scorecam", class_id)
    assert np.abs(mine - shipped).max() > 1e-3

    def half_pixel(size: tuple[int, int]) -> nn.Module:
        return nn.Upsample(size=size, mode="bilinear", align_corners=False)
    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d", half_pixel)
    assert np.abs(mine - reference(model, x, "layer3", "scorecam", class_id)).max() <= TOLERANCE
