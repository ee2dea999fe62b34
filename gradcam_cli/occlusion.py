"""Occlusion sensitivity (Zeiler & Fergus 2014): how much the explained score drops when a patch
of the image is replaced by a fill, at every position of a sliding window.

The map's value at a pixel is the mean, over every window position covering it, of (score of
the unoccluded input - score with that window filled): captum's ``Occlusion`` with
``sliding_window_shapes`` (C, p, p), ``strides`` (C, s, s) and ``baselines`` the fill.

Borders (``border``):

- ``edge`` (default, captum's anchors): windows start at the image's top-left corner and step
  by the stride until one reaches the far edge; that last one may hang past the edge and is
  cut there, so every pixel is covered and the input keeps its size.
- ``pad`` (seed 001, grad-cam-pytorch's demo): the input is surrounded by patch//2 of fill on
  every side, windows slide over the padded input, and the map is cropped back; with stride 1
  every pixel is the centre of a window. The model then sees a larger input (a network with
  global pooling accepts it; one with a fixed input size is refused) and drops are measured
  from the padded input's score, as seed 001 does.

Passes run on the model's own torch.fx graph in eval mode, its weights shared rather than
copied (``perturb.shared_graph``: a copy would add the model's size to the peak). Where its
first layers are local (convolutions, pooling, pointwise activations, sums), they run once on
the unoccluded image and each window recomputes them only where it changes them
(``local.Reuse``); this is used only after the first, middle and last windows' logits equal
those of full passes, else every window runs in full.

Seed 001 stores one value per window (occluded - unoccluded: negative where the region
matters) rather than averaging over covering windows, and starts its columns one stride late;
gradcam reports the drop (positive where the region matters), averaged per pixel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import local
from .choices import OCCLUSION_BORDERS as BORDERS
from .choices import OCCLUSION_FILLS as FILLS
from .engine import run_model
from .errors import ArgumentError, ArgumentTypeError, unknown
from .metrics import baseline_of
from .perturb import chunks
from .precision import reduced
from .targets import Target


@dataclass(frozen=True)
class OcclusionSettings:
    """Patch sizes (a map each), one stride (default: half of each patch), what a patch becomes
    (``fill``: zero in the normalised space, i.e. the normalisation's mean colour; the image's
    mean colour; a blurred copy) and the border convention (``edge`` or ``pad``)."""

    patches: tuple[int, ...] = (32,)
    stride: int | None = None
    fill: str = "zero"
    border: str = "edge"

    def __post_init__(self) -> None:
        """Check every field once, naming it."""
        if isinstance(self.patches, (int, str)) or not isinstance(self.patches, Sequence):
            raise ArgumentTypeError("patches", self.patches, f"a sequence of sizes, e.g. [{self.patches!r}]")
        if not self.patches or not all(_positive(p) for p in self.patches):
            raise ArgumentError("patches", next((p for p in self.patches if not _positive(p)), ()),
                                "patch sizes are positive integers (pixels of the model's input)")
        object.__setattr__(self, "patches", tuple(dict.fromkeys(self.patches)))
        if self.stride is not None and not _positive(self.stride):
            raise ArgumentError("stride", self.stride, "a positive integer (pixels)")
        if self.stride is not None and self.stride > min(self.patches):
            raise ArgumentError("stride", self.stride, f"larger than the patch {min(self.patches)}: "
                                "pixels between two windows would have no value")
        if self.fill not in FILLS:
            raise unknown("fill", self.fill, FILLS)
        if self.border not in BORDERS:
            raise unknown("border", self.border, BORDERS)

    def stride_for(self, patch: int) -> int:
        """The stride of one patch size: the given one, or half the patch."""
        return self.stride or max(1, patch // 2)

    def names(self) -> list[str]:
        """The maps' names: occlusion, or occlusion-P per patch size when there are several."""
        return ["occlusion"] if len(self.patches) == 1 else [f"occlusion-{p}" for p in self.patches]

    def used_by(self, methods: Sequence[str]) -> bool:
        """Whether these settings shape any of ``methods``' maps."""
        return "occlusion" in methods

    def to_dict(self) -> dict:
        """The settings as a record and the resume check keep them."""
        return {**asdict(self), "patches": list(self.patches)}


def _positive(value: object) -> bool:
    """A positive int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def occlusion_maps(fast: nn.Module, inputs: torch.Tensor, target: Target, settings: OcclusionSettings,
                   batch_size: int, progress: bool) -> dict[str, torch.Tensor]:
    """Per map name, NxKx1xHxW maps of every image's K explained scores; ``fast`` is the model
    as passes should run it (``perturb.shared_graph``), and one set of passes serves all K scores."""
    height, width = inputs.shape[-2:]
    if settings.border == "edge" and max(settings.patches) > min(height, width):
        raise ArgumentError("patches", max(settings.patches), f"larger than the input ({height}x{width}); "
                            f"choose at most {min(height, width)}, or border 'pad'")
    maps = {}
    for name, patch in zip(settings.names(), settings.patches, strict=True):
        per_image = []
        for i in range(len(inputs)):
            drops = window_drops(fast, inputs[i:i + 1].detach(), target, i, patch, settings,
                                 batch_size, progress)
            per_image.append(spread(drops, patch, settings, (height, width)))
        maps[name] = torch.stack(per_image)
    return maps


def window_drops(fast: nn.Module, image: torch.Tensor, target: Target, i: int, patch: int,
                 settings: OcclusionSettings, batch_size: int, progress: bool = False,
                 reuse: bool = True) -> torch.Tensor:
    """K x rows x cols: the drop of image ``i``'s K explained scores for each window position,
    the occluded copies run ``batch_size`` at a time; with ``reuse``, through the layers a window
    changes only locally once (``local.Reuse``) when that pays and agrees with full passes."""
    x, fill = _framed(image, patch, settings)
    stride = settings.stride_for(patch)
    rows, cols = _anchors(x.shape[-2], patch, stride), _anchors(x.shape[-1], patch, stride)
    windows = torch.cartesian_prod(rows, cols).view(-1, 2)
    x = x.contiguous(memory_format=torch.channels_last)

    def full(chunk: torch.Tensor) -> torch.Tensor:
        covered = _window_masks(windows[chunk], patch, x.shape[-2:]).to(x.device)
        return run_model(fast, torch.where(covered, fill, x))
    with torch.inference_mode():
        with local.counting(fast) as macs:
            base = target.score(_logits(fast, x, settings), i).float()
        exact = reuse and not reduced()  # a half-precision pass is not reproduced box by box
        plan = local.Reuse.build(fast, x, fill, windows, patch, sum(macs)) if exact else None
        passes = plan.logits if plan is not None and _agrees(plan, full, len(windows)) else full
        scores = [target.score(passes(chunk), i).float()
                  for chunk in chunks(torch.arange(len(windows)), batch_size, f"occlusion {patch}", progress)]
    drops = base - torch.cat(scores)                              # windows x K
    return drops.T.reshape(-1, len(rows), len(cols))


def _agrees(plan: local.Reuse, full: Callable[[torch.Tensor], torch.Tensor], count: int) -> bool:
    """Whether reuse gives the full passes' logits for the first, middle and last windows (the
    ones touching each border and one inside), to float rounding."""
    check = torch.tensor(sorted({0, count // 2, count - 1}))
    expected = full(check).float()
    got = plan.logits(check).float()
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4,
                                                          atol=1e-5 * float(expected.abs().max()) + 1e-7)


def spread(drops: torch.Tensor, patch: int, settings: OcclusionSettings,
           size: tuple[int, int]) -> torch.Tensor:
    """Kx1xHxW: each pixel's mean drop over the windows covering it (cut at the edge; the
    padding cropped off)."""
    stride = settings.stride_for(patch)
    ones = torch.ones(1, 1, patch, patch, dtype=drops.dtype, device=drops.device)
    total = F.conv_transpose2d(drops[:, None], ones, stride=stride)
    count = F.conv_transpose2d(torch.ones_like(drops[:1, None]), ones, stride=stride)
    half = patch // 2 if settings.border == "pad" else 0
    rows, cols = slice(half, half + size[0]), slice(half, half + size[1])
    return (total / count)[:, :, rows, cols]


def _framed(image: torch.Tensor, patch: int,
            settings: OcclusionSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The input the windows slide over and its fill: the image, or with ``pad`` the image
    surrounded by patch//2 of fill (the fill's own border repeated, for a blurred fill)."""
    fill = baseline_of(image[0], settings.fill)[None]
    if settings.border == "edge":
        return image, fill
    half = patch // 2
    fill = F.pad(fill, (half,) * 4, mode="replicate")
    inside = F.pad(torch.ones_like(image[:, :1], dtype=torch.bool), (half,) * 4)
    return torch.where(inside, F.pad(image, (half,) * 4), fill), fill


def _logits(fast: nn.Module, x: torch.Tensor, settings: OcclusionSettings) -> torch.Tensor:
    """The unoccluded input's logits; a padded input the model cannot take is refused."""
    try:
        return run_model(fast, x)
    except (RuntimeError, AssertionError, ValueError) as exc:  # how models refuse a size they lack
        if settings.border == "edge":
            raise
        raise ArgumentError("border", "pad", "this model does not take an input larger than its "
                            f"own ({(str(exc) or type(exc).__name__).splitlines()[0][:80]}); "
                            "use border 'edge'") from exc


def _anchors(length: int, patch: int, stride: int) -> torch.Tensor:
    """Window starts along one side: 0, stride, … until a window reaches the far edge (captum's)."""
    steps = -(-max(length - patch, 0) // stride)
    return torch.arange(steps + 1) * stride


def _window_masks(starts: torch.Tensor, patch: int, size: torch.Size) -> torch.Tensor:
    """Bx1xHxW booleans, true inside each window starting at (row, col)."""
    rows, cols = torch.arange(size[0]), torch.arange(size[1])
    inside_rows = (rows >= starts[:, :1]) & (rows < starts[:, :1] + patch)        # B x H
    inside_cols = (cols >= starts[:, 1:]) & (cols < starts[:, 1:] + patch)        # B x W
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]
