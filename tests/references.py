"""Independent references the tests compare gradcam with: Grad-CAM written out from its
definition with one forward hook and plain autograd, on a layer output folded by hand."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradcam_cli.models import find_layer

Fold = Callable[[torch.Tensor], torch.Tensor]


def output_and_gradient(model: nn.Module, x: torch.Tensor, layer: str,
                        cls: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output and d logit[cls] / d output for image 0, by a hook and plain autograd
    (``.logits`` of a Hugging Face output)."""
    kept = {}
    handle = find_layer(model, layer).register_forward_hook(lambda _m, _i, out: kept.update(a=out))
    try:
        out = model.eval()(x)
    finally:
        handle.remove()
    logits = out.logits if hasattr(out, "logits") else out
    (grad,) = torch.autograd.grad(logits[0, cls], kept["a"])
    return kept["a"].detach(), grad


def hand_gradcam(model: nn.Module, x: torch.Tensor, layer: str, cls: int, fold: Fold) -> torch.Tensor:
    """Grad-CAM from its definition: relu(Σ_k mean(G^k)·A^k) on the hand-folded grid, upsampled
    bilinearly to the input (HxW)."""
    acts, grads = map(fold, output_and_gradient(model, x, layer, cls))
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))
    return F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
