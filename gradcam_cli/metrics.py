"""Faithfulness and localisation metrics of one saliency map, each as the paper defines it.

All take the map as the model saw the image: ``saliency`` is HxW, non-negative, at the
input crop's resolution (``saliency_of`` turns any of gradcam's maps into that).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms import functional as TF

Scorer = Callable[[torch.Tensor], torch.Tensor]  # Bx3xHxW inputs -> B scores of one class
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0  # RISE's insertion substrate


def saliency_of(values: torch.Tensor, cam: bool | None = None) -> torch.Tensor:
    """One non-negative value per pixel: a CAM as it is, a gradient map's largest absolute
    value over colour channels (Simonyan et al. 2014). ``cam`` None tells a CAM by its one
    channel, which a one-channel model's gradients have too: callers that know say which."""
    values = values.detach().float().cpu()
    is_cam = values.shape[0] == 1 if cam is None else cam
    return values[0].clamp(min=0) if is_cam else values.abs().amax(dim=0)


def baseline_of(image: torch.Tensor, baseline: str) -> torch.Tensor:
    """What removed pixels become, in the model's input space: a blurred copy of the image
    ("blur"), its per-channel mean colour ("mean"), or zero ("zero", the normalisation's mean
    colour); ``evaluate`` has checked ``baseline``."""
    if baseline == "blur":
        return TF.gaussian_blur(image, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])
    if baseline == "mean":
        return image.mean(dim=(-2, -1), keepdim=True).expand_as(image).clone()
    return torch.zeros_like(image)  # "zero"


def perturbation_curve(score: Scorer, image: torch.Tensor, saliency: torch.Tensor,
                       baseline: torch.Tensor, steps: int, insert: bool,
                       batch_size: int = 32) -> torch.Tensor:
    """The class score after 0, 1/steps, …, all of the pixels, most salient first, are removed
    (replaced by ``baseline``) or, with ``insert``, copied from the image onto the baseline
    (Petsiuk et al. 2018). Ties in saliency are broken by pixel order, so the curve is fixed."""
    h, w = saliency.shape
    order = torch.argsort(saliency.flatten(), descending=True, stable=True)
    rank = torch.empty(h * w, dtype=torch.long)
    rank[order] = torch.arange(h * w)
    counts = torch.round(torch.arange(steps + 1) * (h * w / steps)).long()
    start, end = (baseline, image) if insert else (image, baseline)
    scores = []
    for part in counts.split(batch_size):
        changed = (rank.view(1, 1, h, w) < part.view(-1, 1, 1, 1)).to(image.device)
        scores.append(score(torch.where(changed, end, start)))
    return torch.cat(scores).float().cpu()


def auc(curve: torch.Tensor) -> float:
    """Area under a curve sampled at equal steps over [0, 1] (trapezoidal rule)."""
    return float(((curve[1:] + curve[:-1]) / 2).mean())


def confidence_change(score: Scorer, image: torch.Tensor, saliency: torch.Tensor,
                      original: float) -> tuple[float, bool]:
    """Drop and increase of confidence (Chattopadhay et al. 2018) when the image is multiplied
    by its min-max normalised map: max(0, Y - O) / Y, and whether O > Y."""
    span = saliency.max() - saliency.min()
    weight = (saliency - saliency.min()) / span if span > 0 else torch.zeros_like(saliency)
    masked = float(score((image * weight.to(image.device))[None])[0])
    return max(0.0, original - masked) / original, masked > original


def pointing_hit(saliency: torch.Tensor, mask: torch.Tensor,
                 tolerance: float | tuple[float, float]) -> bool | None:
    """Zhang et al. 2016's pointing game: does the map's maximum (the first, in pixel order)
    lie within ``tolerance`` pixels of the object? None when the mask has no object.

    ``tolerance`` is a radius, or (across, down) radii when the image was squashed: a circle
    of the original image is then an ellipse of the map."""
    inside = mask.nonzero().float()
    if not len(inside):
        return None
    peak = torch.tensor(divmod(int(saliency.flatten().argmax()), saliency.shape[1])).float()
    across, down = tolerance if isinstance(tolerance, tuple) else (tolerance, tolerance)
    if across == 0 or down == 0:
        return bool(mask[int(peak[0]), int(peak[1])])
    radii = torch.tensor([down, across])
    return bool(((inside - peak) / radii).norm(dim=1).min() <= 1.0)


def energy_in(saliency: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Energy-based pointing game (Wang et al. 2020): the share of the map's mass inside the
    object. None when the mask is empty or the map is all zero."""
    total = float(saliency.sum())
    if not mask.any() or total <= 0:
        return None
    return float(saliency[mask.bool()].sum()) / total


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two maps (ties get their average rank); None when either
    map is constant, since the correlation is then undefined."""
    ra, rb = _ranks(a.flatten().double().numpy()), _ranks(b.flatten().double().numpy())
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2)[inverse]
