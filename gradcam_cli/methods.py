"""The explanation maps, each a small function of a backward pass's results.

Vanilla backprop, guided backprop and deconvnet are input gradients under the engine's
``plain``, ``guided`` and ``deconv`` rules; the CAM maps are built here from a target
layer's activations and their plain gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import to_nchw

GRADIENT_METHODS = {"vanilla": "plain", "guided": "guided", "deconv": "deconv"}
METHODS = ("vanilla", "guided", "deconv", "gradcam", "guided-gradcam")
DESCRIPTIONS = {
    "vanilla": "gradient of the class score w.r.t. the input (Simonyan et al. 2014)",
    "guided": "guided backprop: only positive gradients through positive ReLU inputs "
              "(Springenberg et al. 2014)",
    "deconv": "deconvnet: positive part of the gradient through every ReLU (Zeiler & Fergus 2013)",
    "gradcam": "ReLU of the layer's activations weighted by their mean gradient "
               "(Selvaraju et al. 2017)",
    "guided-gradcam": "guided backprop x upsampled Grad-CAM (Selvaraju et al. 2017)",
}


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample Nxhxw maps to Nx1xHxW, the input crop's size."""
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)


def gradcam(activations: torch.Tensor, gradients: torch.Tensor,
            size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM: ReLU(Σ_k α_k A^k), α_k the spatial mean of dScore/dA^k, upsampled to ``size``."""
    acts, grads = to_nchw(activations), to_nchw(gradients)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    return upsample(F.relu((alpha * acts).sum(dim=1)), size)


def guided_gradcam(guided: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Guided Grad-CAM: guided backprop weighted pixel by pixel by the upsampled Grad-CAM."""
    return guided * cam
