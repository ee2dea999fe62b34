"""The explanation maps, each a small function of a target layer's activations and gradients.

Vanilla backprop, guided backprop and deconvnet are input gradients under the engine's
``plain``, ``guided`` and ``deconv`` rules. Every CAM method here is a function of the layer's
activations A (NxCxhxw) and, where it needs them, the class score's gradients G = dS/dA or
per-channel weights from extra forward passes (``perturb``); ``cam`` does the part they share:
fold the layer's layout, take the ReLU and upsample to the input crop.

``REGISTRY`` holds one entry per method (name, title, description, what it needs, default);
every list of names callers use is derived from it. Occlusion's passes are in ``occlusion``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import Layout, to_nchw


@dataclass(frozen=True)
class Method:
    """One explanation method: its name, what it computes, what it needs, how it is drawn."""

    name: str
    title: str          # the column title in grids and plots
    description: str    # one line for `gradcam methods`
    needs: str          # what it is computed from: input-gradient (under ``rule``), layer-gradient,
                        # guided-and-layer-gradient, layer (activations only), layer-passes (a
                        # forward pass per channel), input-passes (a forward pass per patch position)
                        # input-path (input gradients at points between a baseline and the input)
                        # bias-gradient (input and every bias's gradient: FullGrad)
    rule: str | None = None   # an input-gradient method's engine rule
    default: bool = False     # computed when no method is given

    @property
    def layered(self) -> bool:
        """Whether the map depends on the target layer (so compare-layers can use it)."""
        return self.needs not in ("input-gradient", "input-passes", "bias-gradient", "input-path")

    @property
    def backpropagates(self) -> bool:
        """Whether it takes gradients through the shared forward pass (so that pass keeps a graph)."""
        return self.needs in ("input-gradient", "layer-gradient", "guided-and-layer-gradient",
                              "bias-gradient")

    @property
    def overlay(self) -> bool:
        """Whether the map is one channel drawn as a heat map over the crop (CAMs, occlusion),
        rather than an input gradient's picture."""
        return self.needs in ("layer-gradient", "layer", "layer-passes", "input-passes", "bias-gradient")


REGISTRY: tuple[Method, ...] = (
    Method("vanilla", "vanilla backprop", "gradient of the class score w.r.t. the input "
           "(Simonyan et al. 2014)", "input-gradient", rule="plain", default=True),
    Method("guided", "guided backprop", "guided backprop: only positive gradients through positive "
           "ReLU inputs (Springenberg et al. 2014)", "input-gradient", rule="guided", default=True),
    Method("deconv", "deconvnet", "deconvnet: positive part of the gradient through every ReLU "
           "(Zeiler & Fergus 2013)", "input-gradient", rule="deconv", default=True),
    Method("integrated-gradients", "integrated gradients", "input gradients averaged along a path from "
           "a baseline, times the input's difference to it (Sundararajan et al. 2017); a forward "
           "and backward pass per path point", "input-path"),
    Method("gradcam", "Grad-CAM", "channels weighted by their mean gradient (Selvaraju et al. 2017)",
           "layer-gradient", default=True),
    Method("guided-gradcam", "guided Grad-CAM", "guided backprop x upsampled Grad-CAM "
           "(Selvaraju et al. 2017)", "guided-and-layer-gradient", default=True),
    Method("gradcam++", "Grad-CAM++", "channels weighted by positive gradients with per-position "
           "coefficients (Chattopadhay et al. 2018)", "layer-gradient"),
    Method("xgradcam", "XGrad-CAM", "channels weighted by gradients averaged with the activations as "
           "weights (Fu et al. 2020)", "layer-gradient"),
    Method("layercam", "Layer-CAM", "every position weighted by its own positive gradient "
           "(Jiang et al. 2021)", "layer-gradient"),
    Method("hirescam", "HiResCAM", "activations times gradients element-wise, summed over channels "
           "(Draelos & Carin 2020)", "layer-gradient"),
    Method("eigengradcam", "EigenGrad-CAM", "first principal component of activations x gradients, "
           "sign set by HiResCAM's map (pytorch-grad-cam's)", "layer-gradient"),
    Method("eigencam", "Eigen-CAM", "first principal component of the activations, class-agnostic, "
           "sign set by the total activation (Muhammad & Yeasin 2020)", "layer"),
    Method("scorecam", "Score-CAM", "channels weighted by the class score of the input masked by each "
           "channel (Wang et al. 2020); one forward pass per channel", "layer-passes"),
    Method("ablationcam", "Ablation-CAM", "channels weighted by the score drop when each is zeroed "
           "(Desai & Ramaswamy 2020); one pass of the layers after the target per channel",
           "layer-passes"),
    Method("fullgrad", "FullGrad", "input-gradient x input plus every conv and batch-norm bias x its "
           "gradient, each channel normalised (Srinivas & Fleuret 2019); not layer-dependent",
           "bias-gradient"),
    Method("occlusion", "occlusion", "drop of the class score when a patch covers each position, "
           "averaged over overlapping patches (Zeiler & Fergus 2014); one pass per patch position",
           "input-passes"),
    Method("rise", "RISE", "class score averaged over randomly masked copies, each pixel weighted "
           "by its visibility (Petsiuk et al. 2018); one pass per mask", "input-passes"),
)
REGISTRY_BY_NAME = {m.name: m for m in REGISTRY}

# The names callers use, all derived from the registry.
METHODS = tuple(m.name for m in REGISTRY)
DEFAULT_METHODS = tuple(m.name for m in REGISTRY if m.default)
DESCRIPTIONS = {m.name: m.description for m in REGISTRY}
GRADIENT_METHODS = {m.name: m.rule for m in REGISTRY if m.needs == "input-gradient"}
GRADIENT_CAMS = tuple(m.name for m in REGISTRY if m.needs == "layer-gradient")
PERTURBATION_CAMS = tuple(m.name for m in REGISTRY if m.needs == "layer-passes")
CAM_METHODS = tuple(m.name for m in REGISTRY if m.overlay and m.layered)


def method_of(map_name: str) -> Method:
    """The registry entry a map's name comes from: occlusion-35 (one of several patch sizes)
    is occlusion's."""
    base, _, size = map_name.rpartition("-")
    return REGISTRY_BY_NAME[base] if base == "occlusion" and size.isdigit() else REGISTRY_BY_NAME[map_name]


def title(map_name: str) -> str:
    """A map's title in grids and plots: the method's, with the patch size of an occlusion map."""
    size = map_name.rpartition("-")[2]
    entry = method_of(map_name)
    return f"{entry.title} {size} px" if entry.name != map_name else entry.title


def overlay(map_name: str) -> bool:
    """Whether a map is drawn over the crop as a heat map (and measured as it is)."""
    return method_of(map_name).overlay


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample Nxhxw maps to Nx1xHxW, the input crop's size."""
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)


def weighted_channels(acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_k A^k (NxCxhxw) for per-channel weights (NxC): the terms a class-activation map sums
    over k (``channel_sum``), or projects on their first principal component (eigen smoothing)."""
    return weights[:, :, None, None] * acts


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
    return grads.clamp(min=0) * acts


def hirescam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """HiResCAM: Σ_k G^k ⊙ A^k, the element-wise product that Grad-CAM's averaging blurs."""
    return grads * acts


def eigencam_map(acts: torch.Tensor, _grads: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen-CAM: positions projected on the first principal direction of the centred activations.

    An SVD fixes that direction only up to sign, so the sign is chosen to make the projection
    correlate positively with the layer's total activation Σ_k A^k: the same input always gives
    the same map, and the map points where the layer is active.
    """
    return first_component(acts)


def eigengradcam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """EigenGrad-CAM (pytorch-grad-cam's): the first principal component of G ⊙ A, its sign
    set by HiResCAM's map Σ_k G^k ⊙ A^k, so it points where the class score is raised."""
    return first_component(grads * acts)


def first_component(terms: torch.Tensor) -> torch.Tensor:
    """Positions (NxCxhxw) projected on the first principal direction of the centred terms.

    An SVD fixes that direction only up to sign, so the sign is chosen to make the projection
    correlate positively with the terms' plain sum Σ_k: the same input always gives the same
    map, and the map points where the sum does (for Eigen-CAM, where the layer is active).
    """
    n, _, h, w = terms.shape
    positions = terms.flatten(2).transpose(1, 2).double()          # N x hw x C
    centred = positions - positions.mean(dim=1, keepdim=True)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[:, 0]  # N x C
    projection = (centred @ direction[:, :, None])[..., 0]         # N x hw
    total = positions.sum(dim=2)
    agreement = ((projection - projection.mean(1, True)) * (total - total.mean(1, True))).sum(1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection)
    return (projection * sign[:, None]).reshape(n, h, w).to(terms.dtype)


# Each gives the terms (NxCxhxw) its map sums over the channels.
CAM_MAPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": gradcam_map, "gradcam++": gradcam_pp_map, "xgradcam": xgradcam_map,
    "layercam": layercam_map, "hirescam": hirescam_map,
}
# Each gives its map (Nxhxw), a projection on a first principal component.
PROJECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "eigencam": eigencam_map, "eigengradcam": eigengradcam_map,
}


def channel_sum(terms: torch.Tensor, eigen_smooth: bool = False) -> torch.Tensor:
    """A CAM from its terms: their sum over channels, or with ``eigen_smooth`` their first
    principal component (pytorch-grad-cam's eigen smoothing, oriented as the sum)."""
    return first_component(terms) if eigen_smooth else terms.sum(dim=1)


def cam(method: str, activations: torch.Tensor, gradients: torch.Tensor | None,
        size: tuple[int, int], layout: Layout, eigen_smooth: bool = False) -> torch.Tensor:
    """A gradient or eigen CAM method's map: fold the layout, apply the method, ReLU, upsample."""
    acts = to_nchw(activations, layout).float()
    grads = None if gradients is None else to_nchw(gradients, layout).float()
    if method in PROJECTIONS:
        return upsample(F.relu(PROJECTIONS[method](acts, grads)), size)
    return upsample(F.relu(channel_sum(CAM_MAPS[method](acts, grads), eigen_smooth)), size)


def weighted_cam(activations: torch.Tensor, weights: torch.Tensor,
                 size: tuple[int, int], layout: Layout, eigen_smooth: bool = False) -> torch.Tensor:
    """The map of channel weights found by perturbation (Score-CAM, Ablation-CAM)."""
    terms = weighted_channels(to_nchw(activations, layout).float(), weights)
    return upsample(F.relu(channel_sum(terms, eigen_smooth)), size)


def gradcam(activations: torch.Tensor, gradients: torch.Tensor,
            size: tuple[int, int], layout: Layout) -> torch.Tensor:
    """Grad-CAM: ReLU(Σ_k α_k A^k), α_k the spatial mean of dScore/dA^k, upsampled to ``size``."""
    return cam("gradcam", activations, gradients, size, layout)


def guided_gradcam(guided: torch.Tensor, cam_map: torch.Tensor) -> torch.Tensor:
    """Guided Grad-CAM: guided backprop weighted pixel by pixel by the upsampled Grad-CAM."""
    return guided * cam_map
