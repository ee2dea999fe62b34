"""FullGrad (Srinivas & Fleuret 2019) against pytorch-grad-cam and against its own definition:
the input-gradient and bias-gradient terms add up to the class score (completeness), and a
layer whose bias FullGrad cannot map is refused rather than left out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from gradcam_cli import explain
from gradcam_cli.errors import ArgumentError

from .test_cli import compare_layers_error
from .test_methods_peers import model_and_input, normalised, with_head_scaled


def with_batch_norm_statistics(model: nn.Module) -> nn.Module:
    """Random batch-norm scales, shifts and statistics: freshly built they make every implicit
    bias zero, and FullGrad would be its input term alone."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def test_fullgrad_equals_pytorch_grad_cam() -> None:
    """resnet18, head scaled so that the reference's 1e-7 in each channel's normalisation is
    negligible beside the channel's range."""
    model, x = model_and_input("resnet18", 128)
    model = with_head_scaled(with_batch_norm_statistics(model), "fc", 1e4)
    result = explain(model, x, "layer4", topk=1, methods=["fullgrad"])
    mine = normalised(result.maps["fullgrad"][0, 0, 0].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pgc.FullGrad(model=model, target_layers=[]) as cam:
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(result.classes[0, 0]))])[0]
    assert np.abs(mine - normalised(theirs)).max() <= 1e-5
    assert mine.std() > 0.01


def test_fullgrad_terms_add_up_to_the_score() -> None:
    """For a ReLU network in eval mode f(x) = ∇f·x + Σ_layers Σ (∂f/∂out ⊙ b): the terms the
    map is built from are complete (the bias of the head, not spatial, is the remainder)."""
    from gradcam_cli.fullgrad import bias_layers, bias_of

    model, x = model_and_input("resnet18", 64)
    model = with_batch_norm_statistics(model)
    for m in model.modules():  # the hooks keep each layer's own output, not the ReLU's
        if isinstance(m, nn.ReLU):
            m.inplace = False
    layers = bias_layers(model)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, _i, o: outputs.__setitem__(m, o)) for m in layers.values()]
    x = x.requires_grad_(True)
    with torch.enable_grad():
        score = model(x)[0, 3]
        grads = torch.autograd.grad(score, [x, *outputs.values()])
    for h in hooks:
        h.remove()
    total = (grads[0] * x).sum() + model.fc.bias[3]
    biases = [bias_of(m)[None, :, None, None] for m in outputs]
    total = total + sum((g * b).sum() for g, b in zip(grads[1:], biases, strict=True))
    assert len(layers) == 20  # resnet18's batch norms; its convolutions have no bias
    assert float(total.detach()) == pytest.approx(float(score.detach()), rel=1e-4)


class Grouped(nn.Module):
    """A conv net with a GroupNorm, whose bias FullGrad does not map."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean(dim=(2, 3)))


def test_a_bias_fullgrad_cannot_map_is_refused() -> None:
    with pytest.raises(ArgumentError, match=r"net\.1") as caught:
        explain(Grouped(), torch.randn(1, 3, 16, 16), "net.3", methods=["fullgrad"])
    assert caught.value.argument == "methods"


def test_compare_layers_refuses_fullgrad(tmp_path: Path) -> None:
    code, err = compare_layers_error(tmp_path, "fullgrad")
    assert code == 2 and "--method fullgrad: does not depend on the layer" in err
