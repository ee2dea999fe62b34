"""FullGrad (Srinivas & Fleuret 2019): the input-gradient times the input plus, for every
convolution and batch norm, its bias times the gradient at its output.

For a ReLU network these terms add up to the class score (less the head's bias), so nothing
is left out; the map post-processes each term channel by channel (ψ: absolute value, min-max
to [0, 1], bilinear upsampling to the input) and sums them all, as pytorch-grad-cam does. It
does not depend on the target layer. A batch norm's bias is its implicit one in eval mode,
b - μ w / √(σ² + ε) (w its scale). A layer whose bias would be needed but cannot be mapped this way (group
or layer norm, a batch norm fused with its activation, a batch norm without running
statistics) is refused: leaving it out would draw a plausible but incomplete map.

Where the reference normalises with (t - min) / (max - min + 1e-7), gradcam divides exactly
(a constant channel gives 0): with small gradients the 1e-7 would outweigh the range.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import ForwardPass
from .errors import ArgumentError
from .methods import upsample
from .refine import minmax

UNMAPPED = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.BatchNorm1d, nn.BatchNorm3d, nn.Conv1d,
            nn.Conv3d)


def bias_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The layers whose biases FullGrad sums, by name: every Conv2d with a bias and every
    BatchNorm2d; a layer with a bias it cannot map is refused, naming it."""
    found = {}
    for name, layer in module.named_modules():
        if (isinstance(layer, nn.Conv2d) and layer.bias is not None) or type(layer) is nn.BatchNorm2d:
            _check_statistics(name, layer)
            found[name] = layer
        elif isinstance(layer, (*UNMAPPED, nn.BatchNorm2d)) and getattr(layer, "bias", None) is not None:
            raise ArgumentError("methods", "fullgrad", f"layer {name} ({type(layer).__name__}) has a "
                                "bias whose gradient FullGrad cannot map onto the image (it maps "
                                "those of Conv2d and BatchNorm2d only); choose another method")
    if not found:
        raise ArgumentError("methods", "fullgrad", "the model has no Conv2d or BatchNorm2d bias; "
                            "FullGrad would be the input-gradient alone: choose vanilla")
    return found


def _check_statistics(name: str, layer: nn.Module) -> None:
    """A batch norm without running statistics normalises by the batch: no fixed bias."""
    if isinstance(layer, nn.BatchNorm2d) and layer.running_mean is None:
        raise ArgumentError("methods", "fullgrad", f"layer {name} (BatchNorm2d) keeps no running "
                            "statistics, so its bias depends on the batch; choose another method")


def bias_of(layer: nn.Module) -> torch.Tensor:
    """A layer's bias per channel: a convolution's own, a batch norm's implicit one in eval mode."""
    if isinstance(layer, nn.BatchNorm2d):
        scale = layer.running_var.add(layer.eps).rsqrt()
        if layer.weight is not None:
            scale = scale * layer.weight
        shift = -layer.running_mean * scale
        return (shift if layer.bias is None else shift + layer.bias).detach()
    return layer.bias.detach()


def fullgrad_map(fp: ForwardPass, score: torch.Tensor, layers: dict[str, nn.Module]) -> torch.Tensor:
    """Nx1xHxW FullGrad maps of one score per image, from one backward pass to the input and to
    every bias layer's output."""
    names = list(layers)
    grads = fp.gradients(score.sum(), "plain", [fp.inputs, *(fp.activations[n] for n in names)])
    size = tuple(fp.inputs.shape[-2:])
    total = _psi(grads[0] * fp.inputs.detach()).sum(dim=1, keepdim=True)
    for name, grad in zip(names, grads[1:], strict=True):
        terms = grad * bias_of(layers[name]).to(grad)[None, :, None, None]
        total = total + upsample(_psi(terms).sum(dim=1), size)  # upsampling is linear: sum first
    return total.detach()


def _psi(terms: torch.Tensor) -> torch.Tensor:
    """FullGrad's post-processing before upsampling: absolute value, then each channel of each
    image min-max scaled to [0, 1]."""
    return minmax(terms.abs().float())
