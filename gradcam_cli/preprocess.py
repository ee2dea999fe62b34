"""One value for everything between an image file and the model's input tensor.

``Preprocess`` says which pixels the model sees (``model_pixels``: resize, crop, channels) and
how they become numbers (``to_tensor``: scale to [0, 1], subtract the mean, divide by the
std). Overlays are drawn on ``model_pixels`` and object masks go through ``mask_pixels``, the
same geometry with nearest-neighbour resizing, so maps, overlays and pointing-game truth
share every pixel.

Resizing (``resize``):

- ``"shorter"``: scale the image, keeping its aspect, so that its shorter side is
  ``resize_to`` pixels, or more when that would not cover the input size; then crop.
  For a square input size this is exactly torchvision's ``Resize(resize_to)`` followed by
  ``CenterCrop``. With ``crop="none"`` the image is scaled just enough to cover the input
  size, and must then fit it (its aspect must be the input size's).
- ``"squash"``: resize to the input size, ignoring the aspect (nothing is cropped).
- ``"none"``: keep the image's pixels; with ``crop="center"`` it must be at least the input
  size, with ``crop="none"`` exactly it.

An image that cannot be brought to the input size this way is an ``InputError`` naming both
sizes; it never comes out padded or distorted without being asked.

``channels=1`` (a grayscale model): the resized, cropped pixels are converted to gray by PIL's
luma weights (0.299 R + 0.587 G + 0.114 B, as torchvision's ``Grayscale``) and the model takes
a 1xHxW tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from .choices import CROPS, INTERPOLATIONS, RESIZES
from .errors import ArgumentError, ArgumentTypeError, InputError, quoted, unknown
from .io import MAX_PIXELS
from .layout import probe

SIDECAR_SUFFIX = ".preprocess.json"  # model.pt -> model.preprocess.json


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input; every field is checked when the value is made."""

    input_size: tuple[int, int]          # (height, width) of the model's input
    mean: tuple[float, ...]              # one value per channel
    std: tuple[float, ...]
    resize: str = "shorter"
    resize_to: int | None = None         # "shorter": the shorter side before cropping
    crop: str = "center"
    channels: int = 3
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        """Refuse any field that would give a wrong or undefined input, naming it."""
        size = tuple(self.input_size) if isinstance(self.input_size, (tuple, list)) else None
        if size is None or len(size) != 2 or not all(_is_count(v) for v in size):
            raise ArgumentError("input_size", _listed(self.input_size),
                                "two positive integers: height, width")
        if size[0] * size[1] > MAX_PIXELS:
            raise ArgumentError("input_size", _listed(size), f"{size[0] * size[1]:,} pixels, more "
                                f"than the limit of {MAX_PIXELS:,}")
        object.__setattr__(self, "input_size", size)
        for name, choices in (("resize", RESIZES), ("crop", CROPS), ("interpolation", INTERPOLATIONS)):
            if getattr(self, name) not in choices:
                raise unknown(name, getattr(self, name), choices)
        if self.channels not in (1, 3):
            raise ArgumentError("channels", self.channels, "1 (grayscale model) or 3 (RGB)")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
                raise ArgumentTypeError(name, values, "a sequence of numbers, one per channel")
            if len(values) != self.channels:
                raise ArgumentError(name, _listed(values), f"{len(values)} values for a "
                                    f"{self.channels}-channel model; give one per channel")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ArgumentError(name, _listed(values), "every value must be a finite number")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(s <= 0 for s in self.std):
            raise ArgumentError("std", _listed(self.std), "every value must be positive")
        if self.resize == "shorter" and self.resize_to is None:
            object.__setattr__(self, "resize_to", min(size))
        if self.resize_to is not None and not _is_count(self.resize_to):
            raise ArgumentError("resize_to", self.resize_to, "a positive number of pixels")

    @property
    def mode(self) -> TF.InterpolationMode:
        """The interpolation as torchvision names it."""
        return TF.InterpolationMode(self.interpolation)

    def with_options(self, **changes: object) -> Preprocess:
        """A copy with some fields changed (None leaves a field as it is); a new input size
        keeps the resize-to-crop ratio (256/224 stays 256/224) unless ``resize_to`` is given."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown_keys = set(changes) - {f.name for f in fields(self)}
        if unknown_keys:
            name = sorted(unknown_keys)[0]
            raise unknown("preprocess", name, [f.name for f in fields(self)], "preprocessing field")
        if "input_size" in changes:
            changes["input_size"] = size = _pair(changes["input_size"])
            if "resize_to" not in changes and self.resize_to is not None and _is_pair(size):
                changes["resize_to"] = round(min(size) * self.resize_to / min(self.input_size))
        if changes.get("channels") == 1 and self.channels == 3:
            for name in ("mean", "std"):
                changes.setdefault(name, _gray(getattr(self, name)))
        return replace(self, **changes)

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) an image of ``size`` (width, height) has after resizing, before the
        crop; an image that cannot give the input size is an InputError naming both sizes."""
        (h, w), (width, height) = self.input_size, size
        if self.resize == "squash":
            return w, h
        if self.resize == "none":
            out = size
        elif self.crop == "none":
            s = max(h / height, w / width)
            out = (round(width * s), round(height * s))
        else:
            out = _shorter(size, self._covering(size))
        if out[0] * out[1] > MAX_PIXELS:
            raise InputError(f"{width}x{height} pixels: resized for the model it would be "
                             f"{out[0]}x{out[1]}, too many pixels (the limit is {MAX_PIXELS:,}); "
                             "crop it to a less elongated shape")
        if self.crop == "none" and out != (w, h):
            raise InputError(f"{width}x{height} pixels: does not fit the input size {h}x{w} (height x "
                             f"width) without cropping; allow a centre crop, or squash it")
        if out[0] < w or out[1] < h:
            raise InputError(f"{width}x{height} pixels: smaller than the input size {h}x{w} (height "
                             "x width) and resizing is off; allow resizing")
        return out

    def _covering(self, size: tuple[int, int]) -> int:
        """The shorter side to resize to: ``resize_to``, or the least length whose resized
        image (as torchvision's ``Resize`` computes it) covers the input size."""
        h, w = self.input_size
        shorter = max(self.resize_to, math.floor(min(size) * max(h / size[1], w / size[0])))
        while not _covers(_shorter(size, shorter), (w, h)):
            shorter += 1
        return shorter

    def model_pixels(self, image: Image.Image) -> Image.Image:
        """The exact pixels the model sees (mode RGB, or L for a one-channel model)."""
        pixels = self._geometry(image, self.mode)
        return pixels.convert("L") if self.channels == 1 else pixels

    def mask_pixels(self, mask: Image.Image) -> Image.Image:
        """An object mask at the original size, brought to the model's pixels with the image's
        geometry and nearest-neighbour resizing, so it stays binary."""
        return self._geometry(mask, TF.InterpolationMode.NEAREST)

    def scale(self, size: tuple[int, int]) -> tuple[float, float]:
        """How many model pixels one original pixel becomes, across and down, for an image of
        ``size`` (width, height); the two differ only when squashing."""
        width, height = self.resized_size(size)
        return width / size[0], height / size[1]

    def crop_origin(self, size: tuple[int, int]) -> tuple[int, int]:
        """(left, top) of the crop in the resized image of an image of ``size`` (width, height),
        where torchvision's ``center_crop`` takes it (half the excess, rounded to even)."""
        width, height = self.resized_size(size)
        h, w = self.input_size
        return round((width - w) / 2.0), round((height - h) / 2.0)

    def to_tensor(self, pixels: Image.Image) -> torch.Tensor:
        """Normalise ``model_pixels`` into the CxHxW float tensor the model takes."""
        return TF.normalize(TF.pil_to_tensor(pixels).float().div_(255), self.mean, self.std)

    def describe(self) -> str:
        """One line saying what is done to every image, for the log (the sizes are height x width)."""
        steps = {("shorter", "center"): [f"shorter side to {self.resize_to}", "centre crop"],
                 ("shorter", "none"): ["scaled to cover the input size, no crop"],
                 ("none", "center"): ["no resizing", "centre crop"],
                 ("none", "none"): ["no resizing or cropping (images must have the input size)"]}
        said = ["squashed to the input size"] if self.resize == "squash" else steps[self.resize, self.crop]
        if self.resize != "none":
            said.append(self.interpolation)
        height, width = self.input_size
        return (f"{height}x{width} (height x width): {', '.join(said)}, mean {_listed(self.mean)}, "
                f"std {_listed(self.std)}, {self.channels} channel{'s' * (self.channels > 1)}")

    def to_dict(self) -> dict:
        """Plain JSON values, as recorded in summary.json and read back by ``from_dict``."""
        values = asdict(self)
        values["input_size"] = list(self.input_size)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    def _geometry(self, image: Image.Image, mode: TF.InterpolationMode) -> Image.Image:
        """Resize and crop ``image`` to the input size."""
        width, height = self.resized_size(image.size)
        if (width, height) != image.size:
            image = TF.resize(image, [height, width], interpolation=mode, antialias=True)
        return TF.center_crop(image, list(self.input_size)) if image.size != self.input_size[::-1] else image


def from_dict(values: dict, base: Preprocess | None = None) -> Preprocess:
    """A Preprocess from ``to_dict`` values, or from a partial dict on top of ``base``."""
    if not isinstance(values, dict):
        raise ArgumentTypeError("preprocess", values, "a JSON object of preprocessing fields")
    if base is not None:
        return base.with_options(**values)
    missing = [k for k in ("input_size", "mean", "std") if k not in values]
    if missing:
        raise ArgumentError("preprocess", values, f"needs {', '.join(missing)}")
    known = {f.name for f in fields(Preprocess)}
    extra = sorted(set(values) - known)
    if extra:
        raise unknown("preprocess", extra[0], sorted(known), "preprocessing field")
    values = dict(values, input_size=_pair(values["input_size"]))
    return Preprocess(**values)


def read_preprocess(path: str | Path, base: Preprocess | None = None) -> Preprocess:
    """Read a preprocessing JSON file (complete, or changes on top of ``base``); any problem
    with it, a field's included, is said naming the file."""
    values = read_changes(path)
    try:
        return from_dict(values, base)
    except ArgumentError as exc:
        raise in_file(exc, path) from exc


def read_changes(path: str | Path) -> dict:
    """The fields a preprocessing JSON file sets (an object of Preprocess field names), their
    values unchecked until applied; unreadable files and unknown fields are refused."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ArgumentError("preprocess", str(path), f"cannot read ({exc.strerror})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArgumentError("preprocess", str(path), f"not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ArgumentError("preprocess", str(path), "not a JSON object of preprocessing fields")
    known = [f.name for f in fields(Preprocess)]
    extra = sorted(set(values) - set(known))
    if extra:
        raise in_file(unknown("preprocess", extra[0], known, "preprocessing field"), path)
    return values


def in_file(error: ArgumentError, path: str | Path) -> ArgumentError:
    """A field's error said as a problem of the file that gave the field."""
    field = "field" if error.argument == "preprocess" else error.argument
    return ArgumentError("preprocess", str(path), f"{field} {quoted(error.value)}: {error.problem}")


def check_input(module: nn.Module, preprocess: Preprocess) -> None:
    """Refuse, before any image is read, an input the model cannot take: another number of
    channels than its first convolution's, or a size it refuses (torchvision's ViT runs at
    its own size only). The forward pass is the probe that deciding layouts needs anyway."""
    device = next(module.parameters(), torch.empty(0)).device
    example = torch.zeros(1, preprocess.channels, *preprocess.input_size, device=device)
    try:
        probe(module, example)
    except Exception as exc:  # whatever the model raises: say it, naming the option
        cause = exc.__cause__ if isinstance(exc, ArgumentError) and exc.__cause__ else exc
        first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None and first.in_channels != preprocess.channels:
            raise ArgumentError("channels", preprocess.channels, "the model cannot take it: its first "
                                f"convolution takes {first.in_channels} channels") from exc
        said = (str(cause).strip().splitlines() or [""])[0]
        raise ArgumentError("input_size", _listed(preprocess.input_size),
                            f"the model refuses a {'x'.join(map(str, example.shape[1:]))} input "
                            f"({type(cause).__name__}: {said}); give the size it was made for") from exc


def sidecar(checkpoint: str | Path) -> Path:
    """Where a checkpoint's own preprocessing lives: model.pt -> model.preprocess.json."""
    path = Path(checkpoint)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def _pair(size: object) -> object:
    """(height, width) from one number (square) or two; anything else as it is, for the check."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 1:
        return size[0], size[0]
    return tuple(size) if isinstance(size, (tuple, list)) else size


def _is_count(value: object) -> bool:
    """A positive integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_pair(size: object) -> bool:
    """Two positive integers."""
    return isinstance(size, tuple) and len(size) == 2 and all(map(_is_count, size))


def _listed(values: object) -> object:
    """Numbers as a flag takes them (0.5,0.5), for messages; anything else as it is."""
    if isinstance(values, (tuple, list)) and all(isinstance(v, (int, float)) for v in values):
        return ",".join(f"{v:g}" for v in values)
    return values


def _covers(size: tuple[int, int], needed: tuple[int, int]) -> bool:
    """Whether (width, height) ``size`` is at least ``needed`` along both sides."""
    return size[0] >= needed[0] and size[1] >= needed[1]


def _shorter(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(shorter): the longer side is truncated."""
    width, height = size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _gray(values: tuple[float, ...]) -> tuple[float, ...]:
    """An RGB normalisation's value for a grayscale model, by the luma weights PIL converts with."""
    r, g, b = values
    return (0.299 * r + 0.587 * g + 0.114 * b,)
