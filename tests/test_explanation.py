"""The explain API against captum, and the promises it makes about the caller's model."""

from __future__ import annotations

import copy
import types
from dataclasses import replace

import pytest
import torch
import torchvision
from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam, Saliency
from torch import nn
from torchvision.models import get_model

from gradcam_cli import UsageError, explain
from gradcam_cli.explanation import explain_layers
from gradcam_cli.methods import METHODS
from gradcam_cli.paths import PathSettings, SmoothSettings
from gradcam_cli.refine import CamSettings
from gradcam_cli.rise import RiseSettings
from gradcam_cli.settings import MethodSettings


def by_max(x: torch.Tensor) -> torch.Tensor:
    """The shared normalisation for comparisons: divide by the largest magnitude."""
    return x / x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-30)


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to ``tol`` after normalising both by their maximum magnitude."""
    return float((by_max(ours) - by_max(ref.detach())).abs().max()) <= tol


@pytest.fixture(scope="module", params=[("resnet18", "layer4"), ("vgg11", "features"),
                                        ("alexnet", "features")], ids=lambda p: p[0])
def reference_case(request: pytest.FixtureRequest) -> tuple[nn.Module, str, torch.Tensor]:
    torch.manual_seed(1)
    model = get_model(request.param[0], weights=None).eval()
    return model, request.param[1], torch.randn(2, 3, 224, 224)


def test_maps_equal_captum(reference_case: tuple[nn.Module, str, torch.Tensor]) -> None:
    model, layer, x = reference_case
    result = explain(model, x, layer, class_ids=[7, 250])
    for k, cls in enumerate([7, 250]):
        target = [cls, cls]
        ours = {m: result.maps[m][:, k] for m in result.maps}
        assert close(ours["vanilla"], Saliency(model).attribute(x, target=target, abs=False))
        assert close(ours["guided"], GuidedBackprop(model).attribute(x, target=target))
        assert close(ours["deconv"], Deconvolution(model).attribute(x, target=target))
        module = dict(model.named_modules())[layer]
        cam = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, (224, 224), "bilinear")
        assert close(ours["gradcam"], cam)
        ggc = GuidedGradCam(model, module).attribute(x, target=target, interpolate_mode="bilinear")
        assert close(ours["guided-gradcam"], ggc, 1e-4)


def _modular_copy(model: nn.Module) -> nn.Module:
    """A copy whose BasicConv2d blocks call an nn.ReLU module instead of F.relu."""
    twin = copy.deepcopy(model)
    for block in twin.modules():
        if type(block).__name__ == "BasicConv2d":
            block.relu = nn.ReLU()
            block.forward = types.MethodType(lambda self, x: self.relu(self.bn(self.conv(x))), block)
    return twin


@pytest.mark.parametrize("arch,layer,size", [("inception_v3", "Mixed_7c", 299),
                                             ("googlenet", "inception5b", 224)])
def test_functional_relus_are_guided(arch: str, layer: str, size: int) -> None:
    model = get_model(arch, weights=None, init_weights=True).eval()
    x = torch.randn(1, 3, size, size)
    result = explain(model, x, layer, class_ids=[3], methods=["vanilla", "guided"])
    assert not close(result.maps["guided"][:, 0], result.maps["vanilla"][:, 0], 1e-2)
    twin = _modular_copy(model)
    reference = GuidedBackprop(twin).attribute(x, target=3)
    assert close(result.maps["guided"][:, 0], reference)
    blocks = [n for n, m in model.named_modules()
              if type(m).__name__ == "BasicConv2d" and not n.lower().startswith("aux")]
    assert result.gates == len(blocks)  # every executed block's functional ReLU was found


def test_rank_maps_equal_single_class_run() -> None:
    """Class i's maps carry nothing of class j (seed 001 leaked the previous rank's gradient)."""
    model = get_model("resnet18", weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    top3 = explain(model, x, "layer4", topk=3)
    second = top3.classes[:, 1]
    for n in range(2):
        alone = explain(model, x[n:n + 1], "layer4", class_ids=[int(second[n])])
        for method, maps in top3.maps.items():
            assert torch.allclose(maps[n, 1], alone.maps[method][0, 0], atol=1e-6, rtol=1e-4), method


def _state(model: nn.Module) -> tuple:
    """Everything explain must leave as it was, down to each module's instance attributes."""
    hooks = [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for n, m in model.named_modules()]
    return (hooks, [(n, m.training) for n, m in model.named_modules()],
            [p.grad for p in model.parameters()], {k: v.clone() for k, v in model.state_dict().items()},
            {n: dict(vars(m)) for n, m in model.named_modules()})


def _same(a: tuple, b: tuple) -> bool:
    """Equal states; instance attributes must be the very same objects, none added or lost."""
    attributes = a[4].keys() == b[4].keys() and all(
        a[4][n].keys() == b[4][n].keys() and all(a[4][n][k] is b[4][n][k] for k in a[4][n]) for n in a[4])
    return (a[0] == b[0] and a[1] == b[1] and all(g is None for g in b[2])
            and all(torch.equal(a[3][k], b[3][k]) for k in a[3]) and attributes)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode logits, computed on a copy so its own flags and statistics stay."""
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x)


def test_model_left_as_it_was_also_after_error() -> None:
    model = get_model("resnet18", weights=None)
    model.train()
    model.layer2.eval()  # mixed flags must come back exactly
    # Instance forwards of the caller's own, on a layer before the target (which Ablation-CAM
    # replays) and on the target itself: both must survive, as the very same objects.
    model.layer1.forward = types.MethodType(lambda self, x: nn.Sequential.forward(self, x) * 0.5,
                                            model.layer1)
    model.layer3.forward = types.MethodType(lambda self, x: nn.Sequential.forward(self, x) + 0.1,
                                            model.layer3)
    x = torch.randn(1, 3, 64, 64)
    before, outputs = _state(model), _outputs(model, x)
    quick = MethodSettings(rise=RiseSettings(n_masks=16), ig=PathSettings(ig_steps=4, ig_baseline="blur"))
    refined = replace(quick, smooth=SmoothSettings(samples=2),
                      cam=CamSettings(aug_smooth=True, eigen_smooth=True))
    runs = [([method], quick) for method in METHODS] + [(["vanilla", "gradcam", "scorecam"], refined)]
    for methods, settings in runs:
        explain(model, x, "layer3", topk=1, methods=methods, batch_size=64, settings=settings)
        assert torch.equal(_outputs(model, x), outputs), methods
        assert _same(before, _state(model)), methods
    with pytest.raises(UsageError):
        explain(model, x, "layer3", class_ids=[5000])  # fails inside the forward pass
    assert _same(before, _state(model))
    assert model.training and not model.layer2.training and model.layer3.training


def test_unknown_layer_suggests_close_names() -> None:
    model = get_model("resnet18", weights=None)
    with pytest.raises(UsageError, match="did you mean layer4"):
        explain(model, torch.randn(1, 3, 64, 64), "layer44")


class Detour(nn.Module):
    """A network with a spatial branch whose output never reaches the score."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.unused = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        self.unused(a)
        return self.fc(a.mean(dim=(2, 3)))


def test_layer_without_gradient_is_explained_not_drawn_blank() -> None:
    x = torch.randn(1, 3, 8, 8)
    assert explain(Detour(), x, "conv", topk=1).maps["gradcam"].shape == (1, 1, 1, 8, 8)
    with pytest.raises(UsageError, match="gradient is zero at every position"):
        explain(Detour(), x, "unused", topk=1)


def test_several_layers_share_one_forward_and_one_backward_per_class() -> None:
    model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 64, 64)
    layers = ["layer1", "layer2", "layer3", "layer4"]
    explain_layers(model, x, layers, topk=1, methods=["gradcam"])  # layouts probed once per model
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    backwards = []
    real = torch.autograd.grad

    def counting(*args: object, **kwargs: object) -> tuple:
        backwards.append(1)
        return real(*args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.autograd, "grad", counting)
        results = explain_layers(model, x, layers, topk=2, methods=["gradcam", "hirescam"])
    assert len(forwards) == 1 and len(backwards) == 2  # one forward; one backward per class
    for layer, result in zip(layers, results, strict=True):
        alone = explain(model, x, layer, topk=2, methods=["gradcam", "hirescam"])
        assert result.layer == layer
        for method in ("gradcam", "hirescam"):
            assert torch.allclose(result.maps[method], alone.maps[method], atol=1e-6)
