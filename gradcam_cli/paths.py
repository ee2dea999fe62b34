"""Integrated Gradients (Sundararajan et al. 2017) and SmoothGrad (Smilkov et al. 2017): input
gradients gathered along a path from a baseline to the image, or over noisy copies of it.

Integrated Gradients: attribution = (x - x') * Σ_j w_j dS/dx at x' + α_j (x - x'), with
captum's step positions α_j and weights w_j (``rule``):

- ``gausslegendre`` (the default, as captum's): Gauss-Legendre nodes and weights mapped from
  [-1, 1] to [0, 1];
- ``riemann-trapezoid`` (captum's ``riemann_trapezoid``): α evenly spaced over [0, 1], each
  weight 1/n, the two ends halved (so the weights sum to 1 - 1/n, as captum's do, and the
  completeness error keeps about 1/n of the score difference whatever the model).

Completeness says Σ attributions = S(x) - S(x'); the difference (the completeness error) is
reported per image and class, so a user sees whether ``steps`` suffice.

SmoothGrad: each map averaged over N copies x + ε, ε ~ N(0, sigma²), sigma = ``noise`` x (max - min)
of the image (Smilkov's noise level, 0.15 by default); ``smoothgrad-sq`` averages the squared
maps and ``vargrad`` takes their variance (E[m²] - E[m]²), as captum's ``NoiseTunnel`` does.
The noise comes from a generator seeded by ``noise_seed`` for each image, so a rerun gives the
same bytes and an image's maps do not depend on the images batched with it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import nn

from .choices import IG_BASELINES, IG_RULES, SMOOTH_TYPES
from .engine import evaluating, forward_pass, run_model
from .errors import ArgumentError, ArgumentTypeError, unknown
from .metrics import baseline_of
from .perturb import chunks, inference_copy
from .targets import Target

if TYPE_CHECKING:
    from .preprocess import Preprocess
    from .settings import MethodSettings

# The maps SmoothGrad applies to: those computed by backward passes from the input itself.
SMOOTHED_NEEDS = ("input-gradient", "layer-gradient", "guided-and-layer-gradient")
MapsOf = Callable[[torch.Tensor, torch.Tensor], dict[Hashable, torch.Tensor]]
T = TypeVar("T")


def _positive(value: object) -> bool:
    """A positive int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class PathSettings:
    """Integrated Gradients: path points (``ig_steps``), the baseline x' (``ig_baseline``:
    black, a blurred copy, or the image's mean colour) and the quadrature ``ig_rule``.

    ``black`` is a black pixel in the model's normalised space, (0 - mean) / std per channel;
    ``classify`` and ``evaluate`` fill it from the model's preprocessing. A caller of
    ``explain`` asking for the black baseline gives it (``with_normalisation``).
    """

    ig_steps: int = 32
    ig_baseline: str = "black"
    ig_rule: str = "gausslegendre"
    black: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        """Check every field once, naming it."""
        if not _positive(self.ig_steps):
            raise ArgumentError("ig_steps", self.ig_steps, "a positive integer (points on the path)")
        if self.ig_baseline not in IG_BASELINES:
            raise unknown("ig_baseline", self.ig_baseline, IG_BASELINES)
        if self.ig_rule not in IG_RULES:
            raise unknown("ig_rule", self.ig_rule, IG_RULES)
        if self.ig_rule == "riemann-trapezoid" and self.ig_steps < 2:
            raise ArgumentError("ig_steps", self.ig_steps, "the trapezoid rule needs at least 2 points")
        if self.black is not None:
            if isinstance(self.black, (str, bytes)) or not isinstance(self.black, Sequence) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.black):
                raise ArgumentTypeError("black", self.black, "one number per channel, e.g. (-2.1, -2, -1.8)")
            object.__setattr__(self, "black", tuple(float(v) for v in self.black))

    def with_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> PathSettings:
        """These settings with ``black`` from the model's normalisation."""
        return replace(self, black=tuple((0 - m) / s for m, s in zip(mean, std, strict=True)))

    def points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The path positions α and weights w, as captum's ``approximation_methods`` make them."""
        n = self.ig_steps
        if self.ig_rule == "gausslegendre":
            nodes, weights = np.polynomial.legendre.leggauss(n)
            return torch.tensor(0.5 * (1 + nodes)).float(), torch.tensor(0.5 * weights).float()
        weights = torch.full((n,), 1 / n, dtype=torch.float64)
        weights[[0, -1]] /= 2
        return torch.linspace(0, 1, n), weights.float()

    def used_by(self, methods: Sequence[str]) -> bool:
        """Whether these settings shape any of ``methods``' maps."""
        return "integrated-gradients" in methods

    def to_dict(self) -> dict:
        """The settings as a record and the resume check keep them."""
        return {**asdict(self), "black": None if self.black is None else list(self.black)}


@dataclass(frozen=True)
class SmoothSettings:
    """SmoothGrad: ``samples`` noisy copies per image (0: off), the noise level sigma / (max - min)
    (``noise``), the aggregate (``smooth_type``) and the seed of each image's noise."""

    samples: int = 0
    noise: float = 0.15
    smooth_type: str = "smoothgrad"
    noise_seed: int = 0

    def __post_init__(self) -> None:
        """Check every field once, naming it."""
        if not (self.samples == 0 or _positive(self.samples)):
            raise ArgumentError("samples", self.samples, "a positive number of noisy copies (0: off)")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not self.noise > 0:
            raise ArgumentError("noise", self.noise, "a positive fraction of the image's range, e.g. 0.15")
        if self.smooth_type not in SMOOTH_TYPES:
            raise unknown("smooth_type", self.smooth_type, SMOOTH_TYPES)
        if isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int) or self.noise_seed < 0:
            raise ArgumentError("noise_seed", self.noise_seed, "a non-negative integer")

    def used_by(self, methods: Sequence[str]) -> bool:
        """Whether smoothing is on and shapes any of ``methods``' maps."""
        return self.samples > 0 and any(m in smoothed_methods() for m in methods)

    def to_dict(self) -> dict:
        """The settings as a record and the resume check keep them."""
        return asdict(self)


def smoothed_methods() -> tuple[str, ...]:
    """The methods whose maps SmoothGrad averages: the backprop maps and gradient CAMs."""
    from .methods import REGISTRY
    return tuple(m.name for m in REGISTRY if m.needs in SMOOTHED_NEEDS)


def unsmoothed(methods: Sequence[str], settings: SmoothSettings) -> list[str]:
    """The methods whose maps come from the clean input's backward passes: all but the input
    gradients that SmoothGrad replaces (gradient CAMs keep theirs, to tell a dead layer)."""
    from .methods import GRADIENT_METHODS
    smoothed = set(smoothed_methods()) if settings.used_by(methods) else set()
    return [m for m in methods if not (m in smoothed and m in GRADIENT_METHODS)]


def on_gradient_copy(module: nn.Module, work: Callable[[nn.Module], T]) -> T:
    """``work`` run on the model's inference copy (batch norms folded, channels-last) with
    frozen weights, made for many input-gradient passes: the same gradients to float rounding,
    in about 3/4 of the time and memory of the model itself (no batch-norm passes to store or
    run back); the copy is freed on return."""
    fast = inference_copy(module).requires_grad_(False)
    try:
        return work(fast)
    finally:  # a torch.fx copy sits in reference cycles: free it now, not later
        del fast
        gc.collect()


def with_normalisation(settings: MethodSettings, preprocess: Preprocess) -> MethodSettings:
    """``settings`` with Integrated Gradients' black baseline from the model's normalisation."""
    return replace(settings, ig=settings.ig.with_normalisation(preprocess.mean, preprocess.std))


def rows_of(target: Target, rows: torch.Tensor) -> Target:
    """The target of a batch whose row b is a copy of image ``rows[b]``: its scores are Bx K."""
    rows = rows.to(target.chosen.device)
    proxies = None if target.proxies is None else target.proxies[rows]
    return replace(target, chosen=target.chosen[rows], proxies=proxies)


def baselines(inputs: torch.Tensor, settings: PathSettings) -> torch.Tensor:
    """Each image's baseline x', in the model's input space."""
    if settings.ig_baseline != "black":
        return torch.stack([baseline_of(image, settings.ig_baseline) for image in inputs])
    if settings.black is None:
        raise ArgumentError("ig_baseline", "black", "needs the model's normalisation: pass "
                            "PathSettings(...).with_normalisation(mean, std), or baseline blur or mean")
    if len(settings.black) != inputs.shape[1]:
        raise ArgumentError("black", list(settings.black), f"{len(settings.black)} values for "
                            f"{inputs.shape[1]} input channels")
    black = torch.tensor(settings.black, dtype=inputs.dtype, device=inputs.device)
    return black[None, :, None, None].expand_as(inputs).clone()


def integrated_gradients(module: nn.Module, inputs: torch.Tensor, target: Target, settings: PathSettings,
                         batch_size: int = 32, progress: bool = False,
                         outputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NxKxCxHxW attributions for every image's K explained scores, and the NxK completeness
    errors; the path points of all images run ``batch_size`` at a time, one forward and K
    backward passes per batch, on the model's gradient copy (``on_gradient_copy``).
    ``outputs``: the model's outputs for ``inputs`` when the caller has them (S(x))."""
    x = inputs.detach()
    base = baselines(x, settings)
    totals, (start, end) = on_gradient_copy(module, lambda fast: (
        _path_gradients(fast, x, base, target, settings, batch_size, progress),
        _scores(fast, base, target, batch_size, x, outputs)))
    attributions = (totals * (x - base)).transpose(0, 1)
    return attributions, attributions.flatten(2).sum(2) - (end - start)


def _path_gradients(fast: nn.Module, x: torch.Tensor, base: torch.Tensor, target: Target,
                    settings: PathSettings, batch_size: int, progress: bool) -> torch.Tensor:
    """KxNxCxHxW: Σ_j w_j dS/dx at every path point of every image, for its K scores."""
    alphas, weights = settings.points()
    n, steps, k = len(x), settings.ig_steps, target.chosen.shape[1]
    totals = torch.zeros((k, *x.shape), dtype=torch.float32, device=x.device)
    for chunk in chunks(torch.arange(n * steps), batch_size, "integrated gradients", progress):
        rows, j = chunk // steps, chunk % steps
        alpha, weight = (t[j].to(x.device)[:, None, None, None] for t in (alphas, weights))
        points = (base[rows] + alpha * (x[rows] - base[rows])).contiguous(memory_format=torch.channels_last)
        with forward_pass(fast, points, {}) as fp:
            scores = rows_of(target, rows).score(fp.logits)
            for r in range(k):
                (grads,) = fp.gradients(scores[:, r].sum(), "plain", [fp.inputs])
                totals[r].index_add_(0, rows.to(x.device), grads.float() * weight)
    return totals


def _scores(module: nn.Module, base: torch.Tensor, target: Target, batch_size: int, x: torch.Tensor,
            outputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """NxK S(x') and S(x) for every image's explained scores: S(x) from ``outputs`` when given,
    else run with the baselines, ``batch_size`` images at a time."""
    inputs = base if outputs is not None else torch.cat([base, x])
    rows = torch.arange(len(x)).repeat(len(inputs) // len(x))
    with torch.inference_mode(), evaluating(module):
        scores = torch.cat([rows_of(target, rows[chunk]).score(run_model(
            module, inputs[chunk].contiguous(memory_format=torch.channels_last))).float()
            for chunk in torch.arange(len(inputs)).split(max(1, batch_size))])
    if outputs is not None:
        return scores, target.score(outputs).float()
    return scores[:len(x)], scores[len(x):]


def noise_of(image: torch.Tensor, settings: SmoothSettings) -> torch.Tensor:
    """``samples`` x CxHxW noise for one image: N(0, sigma²), sigma = noise x (max - min) of the image,
    from a generator seeded by ``noise_seed`` (the same noise for a rerun)."""
    generator = torch.Generator().manual_seed(settings.noise_seed)
    sigma = settings.noise * float(image.max() - image.min())
    eps = torch.randn((settings.samples, *image.shape), generator=generator, dtype=torch.float32)
    return (eps * sigma).to(image)


def smooth(maps_of: MapsOf, inputs: torch.Tensor, settings: SmoothSettings, batch_size: int = 32,
           progress: bool = False) -> dict[Hashable, torch.Tensor]:
    """Per key of ``maps_of``, N x … maps: each image's SmoothGrad aggregate over its noisy
    copies. ``maps_of(copies, rows)`` gives, per key, the maps of a batch whose row b is a
    noisy copy of image ``rows[b]``."""
    per_image = [smooth_image(maps_of, image + noise_of(image, settings), i, settings.smooth_type,
                              batch_size, progress) for i, image in enumerate(inputs.detach())]
    return {key: torch.stack([maps[key] for maps in per_image]) for key in per_image[0]}


def smooth_image(maps_of: MapsOf, copies: torch.Tensor, i: int, kind: str, batch_size: int = 32,
                 progress: bool = False) -> dict[Hashable, torch.Tensor]:
    """Per key, the aggregate (``kind``) of image ``i``'s maps over its noisy ``copies``, run
    ``batch_size`` at a time."""
    sums: dict[Hashable, torch.Tensor] = {}
    squares: dict[Hashable, torch.Tensor] = {}
    for chunk in chunks(torch.arange(len(copies)), batch_size, "smoothgrad", progress):
        for key, maps in maps_of(copies[chunk], torch.full_like(chunk, i)).items():
            maps = maps.detach().float()
            sums[key] = maps.sum(0) + sums.get(key, 0)
            squares[key] = (maps * maps).sum(0) + squares.get(key, 0)
    count = len(copies)
    if kind == "smoothgrad":
        return {key: total / count for key, total in sums.items()}
    if kind == "smoothgrad-sq":
        return {key: total / count for key, total in squares.items()}
    return {key: squares[key] / count - (sums[key] / count) ** 2 for key in sums}  # vargrad


def completeness_field(completeness: torch.Tensor | None, i: int, k: int) -> dict:
    """A class record's completeness error (Σ attributions - score difference), when
    Integrated Gradients ran."""
    return {} if completeness is None else {"completeness_error": round(float(completeness[i, k]), 6)}
