"""CAM refinements, as pytorch-grad-cam offers them: eigen smoothing, test-time augmentation
smoothing and several layers fused into one map.

- ``eigen_smooth``: a CAM's terms (w_k A^k, or G ⊙ A for HiResCAM and Layer-CAM) are projected
  on their first principal component instead of summed over channels (``methods.channel_sum``);
  the component's sign is chosen to correlate positively with the plain sum, as Eigen-CAM's is.
- ``aug_smooth``: the CAMs are computed again for the input flipped left-right and its
  normalised values multiplied by 0.9 and 1.1 (ttach's HorizontalFlip x Multiply, the
  reference's default: six copies, the input itself included), the classes chosen on the clean
  input; each map is min-max normalised, flipped back, and the six are averaged.
- ``fuse``: classify over several layers gives one map per CAM method, each layer's map min-max
  normalised per image and class, then their mean (pytorch-grad-cam's aggregation) or maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from . import methods as M
from .choices import CAM_FUSIONS
from .errors import ArgumentTypeError, unknown

# (flip left-right, intensity factor) per copy; the first is the input itself.
AUGMENTATIONS = ((False, 1.0), (False, 0.9), (False, 1.1), (True, 1.0), (True, 0.9), (True, 1.1))
# Maps that are sums of channel terms (guided Grad-CAM follows its Grad-CAM).
EIGEN_SMOOTHED = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam",
                  "guided-gradcam")


def aug_smoothed(methods: Sequence[str]) -> list[str]:
    """The methods aug smoothing averages: the CAMs and FullGrad (heat maps of the input's
    regions), not input gradients, guided Grad-CAM or input perturbations."""
    return [m for m in methods if m in M.CAM_METHODS or m == "fullgrad"]


@dataclass(frozen=True)
class CamSettings:
    """Eigen smoothing, augmentation smoothing, and how classify fuses several layers (None:
    one layer)."""

    aug_smooth: bool = False
    eigen_smooth: bool = False
    fuse: str | None = None

    def __post_init__(self) -> None:
        """Check every field once, naming it."""
        for name in ("aug_smooth", "eigen_smooth"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentTypeError(name, getattr(self, name), "True or False")
        if self.fuse is not None and self.fuse not in CAM_FUSIONS:
            raise unknown("fuse", self.fuse, CAM_FUSIONS)

    def used_by(self, methods: Sequence[str]) -> bool:
        """Whether these settings shape any of ``methods``' maps."""
        return (self.aug_smooth and bool(aug_smoothed(methods))) or self.fuse is not None or \
            (self.eigen_smooth and any(m in EIGEN_SMOOTHED for m in methods))

    def to_dict(self) -> dict:
        """The settings as a record and the resume check keep them."""
        return asdict(self)


def augment(inputs: torch.Tensor, flip: bool, factor: float) -> torch.Tensor:
    """One augmented copy of a batch: flipped left-right, its (normalised) values scaled."""
    x = inputs.flip(-1) if flip else inputs
    return x * factor if factor != 1 else x


def restore(maps: torch.Tensor, flip: bool) -> torch.Tensor:
    """Maps of an augmented copy put back on the input: the flip undone."""
    return maps.flip(-1) if flip else maps


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map (…xHxW) scaled to [0, 1]; a constant map becomes zeros."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1), 0)


def fuse(per_layer: Sequence[dict[str, torch.Tensor]], how: str,
         names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The maps ``names`` of several layers as one: each CAM's per-layer maps normalised, then
    their mean or maximum; guided Grad-CAM is guided backprop times the fused Grad-CAM (both
    must be in the maps); layer-independent maps are the first layer's."""
    first = per_layer[0]
    fused = {n: _fused([maps[n] for maps in per_layer], how) if n in M.CAM_METHODS else first[n]
             for n in names if n != "guided-gradcam"}
    if "guided-gradcam" in names:
        fused["guided-gradcam"] = first["guided"] * _fused([maps["gradcam"] for maps in per_layer], how)
    return {n: fused[n] for n in names}


def fuse_needs(methods: Sequence[str]) -> list[str]:
    """The methods ``fuse`` needs beside ``methods``: guided Grad-CAM's guided backprop and Grad-CAM."""
    return [m for m in ("guided", "gradcam") if "guided-gradcam" in methods and m not in methods]


def _fused(maps: list[torch.Tensor], how: str) -> torch.Tensor:
    """Normalised maps' mean or maximum."""
    stacked = torch.stack([minmax(m) for m in maps])
    return stacked.mean(dim=0) if how == "mean" else stacked.amax(dim=0)
