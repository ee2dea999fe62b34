"""Cascading randomisation: which blocks, in which order, and what the test measures."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from gradcam_cli.metrics import saliency_of, spearman
from gradcam_cli.sanity import cascade, randomisation_units


class WithToken(nn.Module):
    """A model with a parameter of its own beside its layers (like ViT's class token)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.conv(x) + self.token).relu().mean(dim=(2, 3)))


def test_blocks_follow_the_forward_pass_and_split_large_modules() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2))
    assert [n for n, _ in randomisation_units(net, torch.randn(1, 3, 8, 8))] == ["0", "2", "4"]
    assert [n for n, _ in randomisation_units(WithToken(), torch.randn(1, 3, 8, 8))] == [
        "(model)", "conv", "head"]
    resnet = torchvision.models.resnet18()
    names = [n for n, _ in randomisation_units(resnet, torch.randn(1, 3, 64, 64))]
    assert names[:5] == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0"]
    assert names[-1] == "fc" and "layer4.0.conv1" in names  # layer4's blocks hold > 1/4: split
    assert names.index("layer4.0.downsample.0") < names.index("layer4.1.conv1")


def test_cascade_randomises_from_the_top_and_leaves_the_model_alone() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    changed = []

    def maps(module: nn.Module) -> dict[str, torch.Tensor]:
        changed.append([name for name, p in module.state_dict().items()
                        if not torch.equal(p, before[name])])
        return {"m": torch.rand(4)}
    steps = cascade(net, torch.randn(1, 3, 8, 8), maps, lambda a, b: 0.0)
    assert [name for name, _ in steps] == ["4", "2", "0"]
    assert changed == [[], ["4.weight", "4.bias"], ["2.weight", "2.bias", "4.weight", "4.bias"],
                       ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_gradient_of_a_linear_model_decorrelates_and_runs_repeat() -> None:
    """The vanilla gradient of a linear model is its weight row: randomising the weight must
    leave (almost) no rank correlation, and the same seeds must give the same numbers."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    x = torch.randn(1, 3, 16, 16, requires_grad=True)

    def maps(module: nn.Module) -> dict[str, torch.Tensor]:
        (grad,) = torch.autograd.grad(module(x)[0, 0], x)
        return {"vanilla": saliency_of(grad[0])}
    first = cascade(net, x.detach(), maps, spearman)
    assert [name for name, _ in first] == ["1"]
    assert abs(first[0][1]["vanilla"]) < 0.2
    assert cascade(net, x.detach(), maps, spearman) == first
