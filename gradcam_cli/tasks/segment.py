"""`segment`: explain a semantic segmentation network (torchvision's FCN, DeepLabV3, LR-ASPP)
class by class.

The model's output ``out`` holds per-pixel class logits z_c(p) at the input's size. For each
class c explained in an image, the scalar is pytorch-grad-cam's ``SemanticSegmentationTarget``:

    S_c = Σ_p z_c(p) · M_c(p),   M_c = the pixels predicted as c (argmax over classes),

or, with a region, M_c = the region for every class (a box in the original image's pixels, or
a mask file of the image's size, brought to the model's input by the image's own resize and
crop). The classes are those predicted at some pixel (inside the region, when there is one),
largest first, or the given ones; a given class predicted nowhere is skipped with a note in the
record, and an image left with no class fails alone. One forward pass per batch, then one
backward pass per class rank serves every gradient map.

Output layout, one folder per image::

    <output-dir>/<image-stem>-<hash8>/<arch>@<layer>-segment/
        grid.png                      rows: classes (the crop with the class's predicted mask
                                      outlined, the region too), then each map
        summary.json
        r1-c15-person/                one folder per explained class, by rank
            mask.png gradcam.png …    its predicted mask (white inside) and its maps
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import ArgumentError, ArgumentTypeError, InputError, quoted
from ..explanation import Explanation, explain_layers
from ..io import atomic_write, png_bytes, slug
from ..methods import DEFAULT_METHODS, REGISTRY
from ..models import LoadedModel, blank_input, file_sha256, layer_layout
from ..preprocess import Preprocess
from ..render import grid_image, map_image
from ..runner import Item, Loaded, Task, run
from ..targets import Target
from . import check_methods as check_task_methods
from . import chosen_classes

# One forward pass and backward passes of the masked sum: the gradient maps and Eigen-CAM.
SEGMENT_METHODS = tuple(m.name for m in REGISTRY if m.needs in
                        ("input-gradient", "layer-gradient", "guided-and-layer-gradient", "layer"))
MASK_COLOUR, REGION_COLOUR = (255, 255, 0), (0, 255, 255)  # outlines in the grid: yellow, cyan


def check_methods(methods: Sequence[str]) -> None:
    """Refuse methods that need perturbed or path passes, which segmentation does not run."""
    check_task_methods(methods, SEGMENT_METHODS, "segmentation")


def segment_layer(model: LoadedModel, layer: str | None) -> str:
    """The layer to explain: by default the backbone's last stage, the features the head reads
    (ResNet: backbone.layer4; MobileNetV3: backbone.16, LR-ASPP's high-level input); a given
    layer is checked as for classify."""
    if layer is None:
        last = list(model.module.backbone.named_children())[-1][0]
        return f"backbone.{last}"
    layer_layout(model.module, layer, blank_input(model.module, model.preprocess))
    return layer


@dataclass(frozen=True)
class Region:
    """Where every class's logits are summed instead of its predicted mask: a ``box``
    (x0, y0, x1, y1: the pixels x0 ≤ x < x1, y0 ≤ y < y1 of the original image) or a mask
    file (``path``; nonzero = inside) of the image's size."""

    box: tuple[int, int, int, int] | None = None
    path: str | None = None
    inside: np.ndarray | None = field(default=None, compare=False, repr=False)  # the file's mask
    sha256: str | None = None

    def settings(self) -> dict:
        """What determines the region, for the resume check."""
        return {"box": list(self.box)} if self.box else {"mask": self.path, "mask_sha256": self.sha256}

    def pixels(self, path: Path, size: tuple[int, int], preprocess: Preprocess) -> np.ndarray:
        """The region in the model's input pixels (HxW bool), through the image's own resize and
        crop with nearest-neighbour resizing; an empty one fails the image (InputError)."""
        original = self._original(path, size)
        inside = np.asarray(preprocess.mask_pixels(original)) > 0
        if not inside.any():
            where = "the model's input (the crop cuts it away)" if np.asarray(original).any() else "the image"
            raise InputError(f"{quoted(path)}: the region covers no pixel of {where}; it is explained "
                             "nowhere")
        return inside

    def _original(self, path: Path, size: tuple[int, int]) -> Image.Image:
        """The region at the original image's ``size`` (width, height), as an L image."""
        if self.box is not None:
            mask = Image.new("L", size, 0)
            x0, y0, x1, y1 = self.box
            ImageDraw.Draw(mask).rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
            return mask
        height, width = self.inside.shape
        if (width, height) != size:
            raise InputError(f"{quoted(path)}: {size[0]}x{size[1]} pixels, but the region mask "
                             f"{quoted(self.path)} is {width}x{height}; give a mask of the image's size")
        return Image.fromarray(self.inside.astype(np.uint8) * 255)


def region_of(box: Sequence[int] | None = None, mask: str | Path | None = None) -> Region | None:
    """Check a region box (four integers x0, y0, x1, y1 with x0 < x1, y0 < y1, none negative)
    or read a region mask file, once, before any image; None: the predicted masks."""
    if box is not None and mask is not None:
        raise ArgumentError("region_mask", str(mask), "give a region box or a region mask, not both")
    if box is not None:
        values = tuple(box) if isinstance(box, (tuple, list)) else None
        if values is None or len(values) != 4 or not all(isinstance(v, int) for v in values):
            raise ArgumentTypeError("region", box, "four integers x0,y0,x1,y1")
        x0, y0, x1, y1 = values
        if min(values) < 0 or x0 >= x1 or y0 >= y1:
            raise ArgumentError("region", ",".join(map(str, values)), "needs 0 <= x0 < x1 and 0 <= y0 < y1 "
                                "(pixels of the original image; x1 and y1 are just outside)")
        return Region(box=values)
    if mask is None:
        return None
    try:
        with Image.open(mask) as image:
            values = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise ArgumentError("region_mask", str(mask), f"cannot read it as an image ({exc})") from exc
    inside = values.any(axis=2) if values.ndim == 3 else values != 0
    return Region(path=str(mask), inside=inside, sha256=file_sha256(Path(mask)))


@dataclass
class SegmentTarget(Target):
    """A batch's explained classes and masks: ``labels`` (NxHxW) is the predicted class per
    pixel, ``region`` (NxHxW, or None) the region that replaces each class's mask; ``table``
    (NxC) holds every class's masked logit sum, ``pixels`` (NxC) its predicted pixels (inside
    the region when there is one); per image, the given classes ``skipped`` and why an image
    has nothing left (``failed``)."""

    labels: torch.Tensor | None = None
    region: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    skipped: list[list[int]] = field(default_factory=list)
    failed: list[str | None] = field(default_factory=list)

    def score(self, outputs: torch.Tensor, image: int | None = None) -> torch.Tensor:
        """NxK masked logit sums of a batch's outputs (NxCxHxW); a padded rank repeats the
        image's first class. Perturbed copies of one ``image`` are not used here."""
        if image is not None:
            raise ValueError("segmentation targets score whole batches, not perturbed copies")
        chosen = self.chosen.where(self.chosen >= 0, self.chosen[:, :1])
        sums = []
        for k in range(chosen.shape[1]):
            c = chosen[:, k]
            logits = outputs.gather(1, c[:, None, None, None].expand(-1, 1, *outputs.shape[2:]))[:, 0]
            mask = self.region if self.region is not None else self.labels == c[:, None, None]
            sums.append((logits * mask.to(logits.dtype)).sum(dim=(1, 2)))
        return torch.stack(sums, dim=1)


def segment_target(outputs: torch.Tensor, class_ids: Sequence[int] = (),
                   region: torch.Tensor | None = None) -> SegmentTarget:
    """The classes to explain per image (the given ones, or those predicted at some pixel, most
    pixels first) and every class's masked logit sum, from the batch's outputs (NxCxHxW)."""
    n, classes = outputs.shape[:2]
    labels = outputs.argmax(dim=1)
    flat = labels.flatten(1)
    inside = torch.ones_like(labels) if region is None else region
    weight = inside.flatten(1).to(outputs.dtype)
    pixels = outputs.new_zeros(n, classes).scatter_add_(1, flat, weight)
    if region is None:
        picked = outputs.gather(1, labels[:, None]).flatten(1)
        table = outputs.new_zeros(n, classes).scatter_add_(1, flat, picked)
    else:
        table = torch.einsum("nchw,nhw->nc", outputs, region.to(outputs.dtype))
    rows, skipped, failed = [], [], []
    for i in range(n):
        present = [c for c in class_ids if pixels[i, c] > 0] if class_ids else \
            sorted((c for c in range(classes) if pixels[i, c] > 0), key=lambda c: (-float(pixels[i, c]), c))
        skipped.append([c for c in class_ids if c not in present])
        failed.append(None if present else "none of the given classes is predicted at any pixel"
                      + (" of the region" if region is not None else ""))
        rows.append(present or [int(pixels[i].argmax())])  # a real score, so the batch's passes run
    width = max(len(class_ids), *map(len, rows))
    chosen = torch.tensor([[*r, *[-1] * (width - len(r))] for r in rows], device=outputs.device)
    return SegmentTarget(table, chosen, labels=labels, region=region, pixels=pixels,
                         skipped=skipped, failed=failed)


def outline(crop: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], width: int) -> np.ndarray:
    """The crop (HxWx3) with the border of ``mask`` (HxW bool) drawn ``width`` pixels wide inside
    it: the mask's pixels less than ``width`` steps (4-neighbours) from a pixel outside it or
    from the crop's edge."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    drawn = crop.copy()
    drawn[mask & ~inner] = colour
    return drawn


@dataclass(frozen=True)
class SegmentInput:
    """One decoded image: the crop the model sees, and the region in its pixels (or None)."""

    crop: Image.Image
    region: np.ndarray | None


@dataclass
class SegmentJob(Task):
    """segment: per image, a row per class with its predicted mask and maps."""

    model: LoadedModel
    layer: str
    methods: Sequence[str]
    class_ids: tuple[int, ...] = ()
    region: Region | None = None

    def __post_init__(self) -> None:
        """The output sub-folder: <arch>@<layer>-segment."""
        self.tag = f"{self.model.folder_name}@{self.layer}-segment"

    def settings(self, path: Path) -> dict:
        """Model, layer, methods, classes and region: what determines an image's files."""
        return {"task": self.tag, "model": self.model.fingerprint(), "layers": [self.layer],
                "methods": list(self.methods), "class_ids": list(self.class_ids),
                "region": self.region.settings() if self.region else None}

    def decode(self, path: Path, image: Image.Image) -> SegmentInput:
        """The crop the model sees and the region in its pixels; an empty region fails here."""
        preprocess = self.model.preprocess
        region = self.region.pixels(path, image.size, preprocess) if self.region else None
        return SegmentInput(preprocess.model_pixels(image), region)

    def explain(self, batch: list[Loaded]) -> tuple[Explanation, SegmentTarget]:
        """The batch's maps, from one forward pass, and the classes and masks they explain."""
        device = next(self.model.module.parameters()).device
        x = torch.stack([self.model.preprocess.to_tensor(item.data.crop) for item in batch]).to(device)
        region = (torch.stack([torch.from_numpy(item.data.region) for item in batch]).to(device)
                  if self.region else None)
        made: list[SegmentTarget] = []

        def choose(outputs: torch.Tensor) -> SegmentTarget:
            made.append(segment_target(outputs, self.class_ids, region))
            return made[-1]
        (result,) = explain_layers(self.model.module, x, [self.layer], methods=self.methods, target=choose)
        return result, made[0]

    def files(self, record: dict) -> list[str]:
        """The grid, and every class's mask and maps."""
        return [record["grid"], *(f for c in record["classes"] for f in [c["mask"], *c["maps"].values()])]

    def write(self, item: Loaded, results: tuple[Explanation, SegmentTarget], i: int, folder: Path) -> dict:
        """Write one image's masks, maps and grid; return its record's fields."""
        result, target = results
        reason = target.failed[i] or result.errors[i]
        if reason:
            raise InputError(f"{quoted(item.path)}: {reason}")
        crop, region = np.asarray(item.data.crop), item.data.region
        width = max(1, round(min(crop.shape[:2]) / 160))  # outlines: 1 px at 160 px, 3 px at 520
        shown = crop if region is None else outline(crop, region, REGION_COLOUR, width)
        classes, rows = [], []
        for k in range(result.classes.shape[1]):
            if result.classes[i, k] >= 0:  # past this image's classes: -1
                entry, mask, pictures = self._write_class(folder, result, target, i, k, crop)
                classes.append(entry)
                rows.append((_label(entry), [outline(shown, mask, MASK_COLOUR, width), *pictures]))
        atomic_write(folder / "grid.png", png_bytes(grid_image(["input", *self.methods], rows)))
        why = "predicted at no pixel" + (" of the region" if region is not None else "")
        names = self.model.categories
        skipped = [{"class_id": c, "name": names[c], "reason": why} for c in target.skipped[i]]
        return {"arch": self.model.arch, "weights": self.model.weights, "layer": self.layer,
                "preprocess": self.model.preprocess.to_dict(), "input_size": list(crop.shape[:2]),
                "relu_gates": result.gates, "region": self.region.settings() if self.region else None,
                "classes": classes, "skipped_classes": skipped, "grid": str(folder / "grid.png")}

    def _write_class(self, folder: Path, result: Explanation, target: SegmentTarget, i: int, k: int,
                     crop: np.ndarray) -> tuple[dict, np.ndarray, list[np.ndarray]]:
        """Write rank ``k``'s mask and maps for image ``i``; its record entry, mask and maps' pictures."""
        names, class_id = self.model.categories, int(result.classes[i, k])
        labels = target.labels[i].cpu().numpy()
        mask = labels == class_id
        class_dir = folder / f"r{k + 1}-c{class_id:0{len(str(len(names) - 1))}d}-{slug(names[class_id])}"
        pictures = [map_image(m, result.maps[m][i, k], crop) for m in self.methods]
        files = {m: str(atomic_write(class_dir / f"{m}.png", png_bytes(p)))
                 for m, p in zip(self.methods, pictures, strict=True)}
        white = np.repeat(mask[..., None], 3, axis=2).astype(np.uint8) * 255
        share = {} if target.region is None else \
            {"region_share": round(float(target.pixels[i, class_id] / target.region[i].sum()), 6)}
        entry = {"rank": k + 1, "class_id": class_id, "name": names[class_id],
                 "pixel_share": round(int(mask.sum()) / labels.size, 6), **share,
                 "score": round(float(target.table[i, class_id]), 6),
                 "mask": str(atomic_write(class_dir / "mask.png", png_bytes(white))), "maps": files}
        return entry, mask, pictures


def _label(entry: dict) -> str:
    """A class's row label in the grid: name, pixel share, explained masked logit sum."""
    return f"{entry['name']}\n{entry['pixel_share']:.1%} of pixels\nΣ logit = {entry['score']:.4g}"


def segment(model: LoadedModel, images: Sequence[Item], output_dir: str | Path = "results",
            layer: str | None = None, class_ids: Sequence[int] = (), class_names: Sequence[str] = (),
            region: Sequence[int] | None = None, region_mask: str | Path | None = None,
            methods: Sequence[str] = DEFAULT_METHODS, batch_size: int = 8, skip_existing: bool = False,
            stop: Callable[[], bool] = lambda: False, progress: bool = False) -> Iterator[dict]:
    """Explain each image's predicted classes (or ``class_ids`` and ``class_names``) with
    ``methods``; yield one record per image, in order (``runner.run``: folders, resume, stop).

    ``model`` is a segmentation network from ``load_segmenter``. Each class's scalar sums its
    logits over the pixels predicted as it, or over ``region`` (x0, y0, x1, y1 in the original
    image's pixels) or ``region_mask`` (an image file of each image's size, nonzero inside).
    """
    check_methods(methods)
    ids = chosen_classes(model.categories, class_ids, class_names)
    job = SegmentJob(model, segment_layer(model, layer), tuple(methods), ids, region_of(region, region_mask))
    return run(job, images, output_dir, batch_size, skip_existing, stop)
