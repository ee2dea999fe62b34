"""RISE (Petsiuk et al. 2018): the explained score averaged over many randomly masked copies of
the image, each pixel weighted by how visible it was.

Masks (section 3 of the paper): a grid of ⌈H/c⌉ x ⌈W/c⌉ cells for a cell size c (so a
non-square input has cells along both sides), each cell on with probability p; the grid is
upsampled bilinearly (half-pixel centres, edges held) to (⌈H/c⌉+1)·c x (⌈W/c⌉+1)·c and cropped
to HxW at a random shift in [0, c) along each axis, so masks are smooth and not aligned with
the grid. The random numbers come from a ``torch.Generator`` seeded by ``seed``, drawn in one
order (every grid's cells, then every mask's two shifts), so every image and every run gets the
same masks whatever the batch size; the small grids are drawn at once, the full-size masks are
made ``batch_size`` at a time.

A masked copy is I_i = B + M_i ⊙ (I - B), B the ``background``: ``zero`` (default) is zero in
the model's normalised input space, i.e. I ⊙ M_i on the normalised tensor, which is what the
paper's released code computes (the paper's figures describe black pixels, which after
normalisation are -mean/std, not zero); ``mean`` the image's mean colour and ``blur`` a blurred
copy, as occlusion's fills and evaluate's baselines.

The saliency is the paper's Monte Carlo sum S(λ) = Σ_i f(I_i) M_i(λ) / (p·N), f the explained
score (a logit, -z, or a similarity, as for every method here, where the paper uses a class
probability), minus the mean score f̄ of the masked copies. Subtracting that one constant
changes neither the picture nor any pixel ranking, but a logit's offset would otherwise decide
the map's sign: gradcam's map is positive where showing λ gives more than the average masked
copy, like occlusion's drop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .choices import OCCLUSION_FILLS as BACKGROUNDS
from .engine import run_model
from .errors import ArgumentError, ArgumentTypeError, unknown
from .metrics import baseline_of
from .perturb import chunks
from .targets import Target


@dataclass(frozen=True)
class RiseSettings:
    """How many masks (``n_masks``), their cell size in pixels of the model's input (``cell``),
    the chance a cell is shown (``probability``), the seed of their generator and what hidden
    pixels become (``background``: zero in the normalised space, the image's mean colour, or a
    blurred copy). The defaults are the paper's for a ResNet-50 at 224: 4000 masks, 7x7 cells
    of 32 px, p = 0.5."""

    n_masks: int = 4000
    cell: int = 32
    probability: float = 0.5
    seed: int = 0
    background: str = "zero"

    def __post_init__(self) -> None:
        """Check every field once, naming it."""
        if not _integer(self.n_masks) or self.n_masks < 1:
            raise ArgumentError("n_masks", self.n_masks, "a positive integer (masked copies per image)")
        if not _integer(self.cell) or self.cell < 1:
            raise ArgumentError("cell", self.cell, "a positive integer (pixels of the model's input)")
        if isinstance(self.probability, bool) or not isinstance(self.probability, (int, float)):
            raise ArgumentTypeError("probability", self.probability, "a number between 0 and 1")
        if not 0 < self.probability < 1:  # NaN fails too
            raise ArgumentError("probability", self.probability, "strictly between 0 and 1 (the "
                                "chance a cell is shown; 0 or 1 give masks that are all alike)")
        object.__setattr__(self, "probability", float(self.probability))
        if not _integer(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise ArgumentError("seed", self.seed, "an integer from 0 to 2**63 - 1")
        if self.background not in BACKGROUNDS:
            raise unknown("background", self.background, BACKGROUNDS)

    def used_by(self, methods: Sequence[str]) -> bool:
        """Whether these settings shape any of ``methods``' maps."""
        return "rise" in methods

    def to_dict(self) -> dict:
        """The settings as a record and the resume check keep them."""
        return asdict(self)


def _integer(value: object) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def draw(settings: RiseSettings, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded random part of every mask for an HxW input: Nx⌈H/c⌉x⌈W/c⌉ grids of cells
    (true: shown) and Nx2 shifts (rows, columns) in [0, c)."""
    height, width = size
    if settings.cell >= min(height, width):
        raise ArgumentError("cell", settings.cell, f"as large as the input ({height}x{width}): masks "
                            f"need two cells or more per side; choose at most {min(height, width) - 1}")
    generator = torch.Generator().manual_seed(settings.seed)
    cells = (settings.n_masks, math.ceil(height / settings.cell), math.ceil(width / settings.cell))
    grids = torch.rand(cells, generator=generator) < settings.probability
    shifts = torch.randint(0, settings.cell, (settings.n_masks, 2), generator=generator)
    return grids, shifts


def masks_of(grids: torch.Tensor, shifts: torch.Tensor, cell: int, size: tuple[int, int]) -> torch.Tensor:
    """Bx1xHxW masks in [0, 1]: each grid of h x w cells upsampled bilinearly to (h+1)·c x
    (w+1)·c and cropped to HxW at its shift, as R·G·Cᵀ with R and C the cropped rows of
    bilinear upsampling's weights along each side (bilinear is separable; clamped because
    float rounding reaches 1 + 1e-7)."""
    rows = _crops_of_upsampling(grids.shape[1], cell, size[0])[shifts[:, 0]]     # B x H x h
    cols = _crops_of_upsampling(grids.shape[2], cell, size[1])[shifts[:, 1]]     # B x W x w
    return (rows @ grids.float() @ cols.transpose(1, 2)).clamp_(0, 1)[:, None]


def _crops_of_upsampling(cells: int, cell: int, length: int) -> torch.Tensor:
    """c x length x cells: for each shift s in [0, c), rows s..s+length of the weights that
    upsample ``cells`` values linearly (half-pixel centres, edges held) to (cells+1)·c."""
    weights = F.interpolate(torch.eye(cells)[None], size=(cells + 1) * cell, mode="linear",
                            align_corners=False)[0].T                              # (cells+1)·c x cells
    return torch.stack([weights[s:s + length] for s in range(cell)])


def rise_maps(fast: nn.Module, inputs: torch.Tensor, target: Target, settings: RiseSettings,
              drawn: tuple[torch.Tensor, torch.Tensor], batch_size: int, progress: bool) -> torch.Tensor:
    """NxKx1xHxW maps of every image's K explained scores from the masks ``draw`` gave;
    ``fast`` is the model's inference copy, one set of masked copies per image serves all K."""
    size = (inputs.shape[-2], inputs.shape[-1])
    grids, shifts = drawn
    inputs = inputs.detach().contiguous(memory_format=torch.channels_last)
    backgrounds = torch.stack([baseline_of(image, settings.background) for image in inputs])
    k = target.chosen.shape[1]
    sums = torch.zeros(len(inputs), k, *size, dtype=torch.float64, device=inputs.device)
    totals = torch.zeros(len(inputs), k, dtype=torch.float64, device=inputs.device)
    with torch.inference_mode():
        for chunk in chunks(torch.arange(settings.n_masks), batch_size, "rise", progress):
            masks = masks_of(grids[chunk], shifts[chunk], settings.cell, size).to(inputs.device)
            for i, (image, background) in enumerate(zip(inputs, backgrounds, strict=True)):
                copies = torch.lerp(background[None], image[None], masks)
                scores = target.score(run_model(fast, copies), i).float()     # B x K
                sums[i] += (scores.T @ masks.flatten(1)).view(k, *size).double()
                totals[i] += scores.sum(dim=0).double()
    mean = totals / settings.n_masks
    return (sums / (settings.probability * settings.n_masks) - mean[:, :, None, None]).float()[:, :, None]
