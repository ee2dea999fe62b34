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
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from .errors import ArgumentError, ArgumentTypeError, InputError, unknown
from .io import MAX_PIXELS

RESIZES = ("shorter", "squash", "none")
CROPS = ("center", "none")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
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
        if size is None or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise ArgumentError("input_size", self.input_size, "two positive integers: height, width")
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
                raise ArgumentError(name, tuple(values), f"{len(values)} values for a "
                                    f"{self.channels}-channel model; give one per channel")
            if not all(math.isfinite(float(v)) for v in values):
                raise ArgumentError(name, tuple(values), "every value must be a finite number")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(s <= 0 for s in self.std):
            raise ArgumentError("std", self.std, "every value must be positive")
        if self.resize == "shorter" and self.resize_to is None:
            object.__setattr__(self, "resize_to", min(size))
        if self.resize_to is not None and (not isinstance(self.resize_to, int) or self.resize_to < 1):
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
        if "input_size" in changes and "resize_to" not in changes and self.resize_to is not None:
            size = _pair(changes["input_size"])
            changes["resize_to"] = round(min(size) * self.resize_to / min(self.input_size))
        if changes.get("channels") == 1 and "mean" not in changes and len(self.mean) == 3:
            changes["mean"], changes["std"] = _gray(self.mean), _gray(self.std)
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
            s = max(self.resize_to / min(size), h / height, w / width)
            out = _shorter(size, self.resize_to) if s == self.resize_to / min(size) else (
                math.ceil(width * s), math.ceil(height * s))
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

    def to_tensor(self, pixels: Image.Image) -> torch.Tensor:
        """Normalise ``model_pixels`` into the CxHxW float tensor the model takes."""
        return TF.normalize(TF.pil_to_tensor(pixels).float().div_(255), self.mean, self.std)

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
    """Read a preprocessing JSON file (complete, or changes on top of ``base``)."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ArgumentError("preprocess", str(path), f"cannot read ({exc.strerror})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArgumentError("preprocess", str(path), f"not valid JSON ({exc})") from exc
    return from_dict(values, base)


def sidecar(checkpoint: str | Path) -> Path:
    """Where a checkpoint's own preprocessing lives: model.pt -> model.preprocess.json."""
    path = Path(checkpoint)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def _pair(size: object) -> tuple[int, int]:
    """(height, width) from one number (square) or two."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 1:
        return size[0], size[0]
    return tuple(size) if isinstance(size, (tuple, list)) else size


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
