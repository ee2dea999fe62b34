"""The explanation maps, each a small function of a target layer's activations and gradients.

Vanilla backprop, guided backprop and deconvnet are input gradients under the engine's
``plain``, ``guided`` and ``deconv`` rules. Every CAM method here is a function of the layer's
activations A (NxCxhxw) and, where it needs them, the class score's gradients G = dS/dA or
per-channel weights from extra forward passes (``perturb``); ``cam`` does the part they share:
fold the layer's layout, take the ReLU and upsample to the input crop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layout import Layout, to_nchw

GRADIENT_METHODS = {"vanilla": "plain", "guided": "guided", "deconv": "deconv"}
DEFAULT_METHODS = ("vanilla", "guided", "deconv", "gradcam", "guided-gradcam")
GRADIENT_CAMS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
PERTURBATION_CAMS = ("scorecam", "ablationcam")
CAM_METHODS = (*GRADIENT_CAMS, "eigencam", *PERTURBATION_CAMS)
METHODS = (*DEFAULT_METHODS, *CAM_METHODS[1:])
DESCRIPTIONS = {
    "vanilla": "gradient of the class score w.r.t. the input (Simonyan et al. 2014)",
    "guided": "guided backprop: only positive gradients through positive ReLU inputs "
              "(Springenberg et al. 2014)",
    "deconv": "deconvnet: positive part of the gradient through every ReLU (Zeiler & Fergus 2013)",
    "gradcam": "channels weighted by their mean gradient (Selvaraju et al. 2017)",
    "guided-gradcam": "guided backprop x upsampled Grad-CAM (Selvaraju et al. 2017)",
    "gradcam++": "channels weighted by positive gradients with per-position coefficients "
                 "(Chattopadhay et al. 2018)",
    "xgradcam": "channels weighted by gradients averaged with the activations as weights "
                "(Fu et al. 2020)",
    "layercam": "every position weighted by its own positive gradient (Jiang et al. 2021)",
    "hirescam": "activations times gradients element-wise, summed over channels "
                "(Draelos & Carin 2020)",
    "eigencam": "first principal component of the activations, class-agnostic, sign set by the "
                "total activation (Muhammad & Yeasin 2020)",
    "scorecam": "channels weighted by the class score of the input masked by each channel "
                "(Wang et al. 2020); one forward pass per channel",
    "ablationcam": "channels weighted by the score drop when each is zeroed (Desai & Ramaswamy "
                   "2020); one pass of the layers after the target per channel",
}


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample Nxhxw maps to Nx1xHxW, the input crop's size."""
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)


def weighted_channels(acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k A^k: the class-activation map of per-channel weights (NxC) over NxCxhxw."""
    return (weights[:, :, None, None] * acts).sum(dim=1)


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is 0 (an all-zero channel or gradient carries no weight)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)


def gradcam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: α_k = spatial mean of G^k."""
    return weighted_channels(acts, grads.mean(dim=(2, 3)))


def gradcam_pp_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (eq. 19 with the exponential score): w_k = Σ_ij α_ij relu(G_ij),
    α_ij = G² / (2 G² + Σ_ab A_ab G³)."""
    g2 = grads.pow(2)
    alpha = _safe_divide(g2, 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads)
    return weighted_channels(acts, (alpha * grads.clamp(min=0)).sum(dim=(2, 3)))


def xgradcam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM: w_k = Σ_ij (A_ij / Σ_ab A_ab) G_ij."""
    share = _safe_divide(acts, acts.sum(dim=(2, 3), keepdim=True))
    return weighted_channels(acts, (share * grads).sum(dim=(2, 3)))


def layercam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Layer-CAM: Σ_k relu(G^k) ⊙ A^k, each position weighted by its own gradient."""
    return (grads.clamp(min=0) * acts).sum(dim=1)


def hirescam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """HiResCAM: Σ_k G^k ⊙ A^k, the element-wise product that Grad-CAM's averaging blurs."""
    return (grads * acts).sum(dim=1)


def eigencam_map(acts: torch.Tensor, _grads: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen-CAM: positions projected on the first principal direction of the centred activations.

    An SVD fixes that direction only up to sign, so the sign is chosen to make the projection
    correlate positively with the layer's total activation Σ_k A^k: the same input always gives
    the same map, and the map points where the layer is active.
    """
    n, _, h, w = acts.shape
    positions = acts.flatten(2).transpose(1, 2).double()           # N x hw x C
    centred = positions - positions.mean(dim=1, keepdim=True)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[:, 0]  # N x C
    projection = (centred @ direction[:, :, None])[..., 0]         # N x hw
    total = positions.sum(dim=2)
    agreement = ((projection - projection.mean(1, True)) * (total - total.mean(1, True))).sum(1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection)
    return (projection * sign[:, None]).reshape(n, h, w).to(acts.dtype)


CAM_MAPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": gradcam_map, "gradcam++": gradcam_pp_map, "xgradcam": xgradcam_map,
    "layercam": layercam_map, "hirescam": hirescam_map, "eigencam": eigencam_map,
}


def cam(method: str, activations: torch.Tensor, gradients: torch.Tensor | None,
        size: tuple[int, int], layout: Layout) -> torch.Tensor:
    """A gradient or eigen CAM method's map: fold the layout, apply the method, ReLU, upsample."""
    acts = to_nchw(activations, layout).float()
    grads = None if gradients is None else to_nchw(gradients, layout).float()
    return upsample(F.relu(CAM_MAPS[method](acts, grads)), size)


def weighted_cam(activations: torch.Tensor, weights: torch.Tensor,
                 size: tuple[int, int], layout: Layout) -> torch.Tensor:
    """The map of channel weights found by perturbation (Score-CAM, Ablation-CAM)."""
    return upsample(F.relu(weighted_channels(to_nchw(activations, layout).float(), weights)), size)


def gradcam(activations: torch.Tensor, gradients: torch.Tensor,
            size: tuple[int, int], layout: Layout) -> torch.Tensor:
    """Grad-CAM: ReLU(Σ_k α_k A^k), α_k the spatial mean of dScore/dA^k, upsampled to ``size``."""
    return cam("gradcam", activations, gradients, size, layout)


def guided_gradcam(guided: torch.Tensor, cam_map: torch.Tensor) -> torch.Tensor:
    """Guided Grad-CAM: guided backprop weighted pixel by pixel by the upsampled Grad-CAM."""
    return guided * cam_map
