"""`detect`: explain every detection of a torchvision detector, one row per box.

The explained scalar of detection d (box b_d, label l_d) is pytorch-grad-cam's
``FasterRCNNBoxScoreTarget`` for that one box, with the label checked first:

    S_d = s_j + IoU(b_d, b_j),   j = the box of label l_d with the largest IoU with b_d
                                 (0 when that IoU is at most 0.5, or no box has the label)

where s_j and b_j are the model's score and box, functions of the image. pytorch-grad-cam takes
the box of largest IoU among all labels and then needs its label to match: single-stage
detectors (RetinaNet, FCOS, SSD) often give one box to several classes, and its target is then
0 for all but the first, a blank map. In the forward pass that found d, j = d and the IoU is at
its maximum 1, where its gradient is exactly 0 (``torchvision.ops.box_iou``'s min and max split
a tie evenly), so the gradient maps explain the class score s_d; the IoU term only matters where
the boxes move, which is why pytorch-grad-cam has it.

One forward pass per image keeps the target layer's output and the graph; one backward pass per
detection gives its gradients at the layer (and at the input, for the gradient maps). The
default layer is ``backbone``: the FPN's outputs for the R-CNNs, RetinaNet and FCOS, the
extractor's feature maps for SSD and SSDlite, an ordered dict of maps at several strides. A CAM
at such a layer is folded into one map: each level's CAM (the method applied to that level's
activations and gradients, ReLU'd and upsampled bilinearly), summed over levels. A detection's
score reaches only the level its box was pooled from (R-CNNs) or its anchor lies on (one-stage
detectors), so a gradient CAM is that level's map; Eigen-CAM, which needs no gradient, adds
every level's. A layer with one tensor output is explained as in ``classify``.

The detector's own transform resizes and normalises the image and pads the batch to a multiple
of 32 at the bottom and right; feature maps are of that padded batch. Maps are upsampled to the
padded size, the padding cut off and the rest resized to the original image, so boxes, maps and
pictures are in the original image's pixels (pytorch-grad-cam stretches the padded map over the
image, shifting it by up to the padding's share: 22 of 448 columns for a 4:3 photo at 320).

The model's own threshold for its detections is lowered to ``score_threshold`` for the pass
when it is higher (and restored), so the threshold given is the one that counts; the RPN's is
left alone (``thresholded``).

Output layout, one folder per image::

    <output-dir>/<image-stem>-<hash8>/<arch>@<layer>-detect/
        grid.png                  a row per detection: the image with its box, then each map
        summary.json
        d1-c18-dog/gradcam.png …  each detection's maps at the image's size, its box drawn
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torch import nn
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from ..engine import ForwardPass, evaluating
from ..errors import ArgumentError, ArgumentTypeError
from ..io import atomic_write, png_bytes, slug
from ..layout import Layout
from ..methods import CAM_MAPS, GRADIENT_METHODS, cam, guided_gradcam
from ..models import LoadedModel, find_layer
from ..render import grid_image, map_image
from ..runner import Item, Loaded, Task, run
from . import check_methods as check_task_methods
from . import chosen_classes

DETECT_METHODS = (*GRADIENT_METHODS, *CAM_MAPS, "eigencam", "guided-gradcam")
DETECT_DEFAULT = ("gradcam", "eigencam")  # one backward pass per detection (Eigen-CAM needs none)
IOU_THRESHOLD = 0.5     # pytorch-grad-cam's: a box must overlap the explained one more than this
GRID_SIDE = 480         # pixels: the longer side of a picture in the grid (files keep the image's)
BOX_COLOUR = (0, 255, 0)
THRESHOLDS = ("score_thresh",)  # the attribute torchvision's detectors (or their RoIHeads) keep it in


def check_methods(methods: Sequence[str]) -> None:
    """Refuse methods that need perturbed or path passes, which detection does not run."""
    check_task_methods(methods, DETECT_METHODS, "detection")


def detect_layer(model: LoadedModel, layer: str | None) -> str:
    """The layer to explain: ``backbone`` (all the feature maps the heads read) by default."""
    name = layer or "backbone"
    find_layer(model.module, name)
    return name


def detector_layers(model: LoadedModel) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The backbone's layers with spatial outputs (one map, or an FPN's dict of maps) and their
    shapes (CxHxW each) for a blank image at the detector's size, in the order they finish."""
    found: list[tuple[str, list[tuple[int, ...]]]] = []

    def note(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            try:
                maps = levels(out)
            except ArgumentTypeError:
                return
            if all(m.dim() == 4 for m in maps):
                found.append((name, [tuple(m.shape[1:]) for m in maps]))
        return hook
    named = [(n, m) for n, m in model.module.named_modules() if n == "backbone" or n.startswith("backbone.")]
    handles = [m.register_forward_hook(note(n)) for n, m in named]
    try:
        with evaluating(model.module), torch.no_grad():
            model.module([torch.zeros(3, *model.preprocess.input_size)])
    finally:
        for handle in handles:
            handle.remove()
    return found


def box_score(output: dict[str, torch.Tensor], box: torch.Tensor, label: int) -> torch.Tensor:
    """S for one explained ``box`` of ``label`` (see the module's doc): the score plus the IoU of
    the model's box of that label that overlaps it most, or 0 below the IoU threshold."""
    same = (output["labels"] == label).nonzero()[:, 0]
    if len(same) == 0:
        return output["scores"].new_zeros(())
    ious = box_iou(box[None].to(output["boxes"]), output["boxes"][same])[0]
    best = ious.argmax()
    if ious[best] <= IOU_THRESHOLD:
        return output["scores"].new_zeros(())
    return ious[best] + output["scores"][same[best]]


def levels(output: object) -> list[torch.Tensor]:
    """A layer output's feature maps: the tensor itself, or a dict's (FPN) in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict) and output and all(isinstance(v, torch.Tensor) for v in output.values()):
        return list(output.values())
    raise ArgumentTypeError("layer", type(output).__name__, "a layer whose output is a tensor or a "
                            "dict of tensors (the FPN's)")


@contextmanager
def thresholded(module: nn.Module, threshold: float) -> Iterator[None]:
    """Lower the detector's own score threshold for its detections to ``threshold`` for a pass,
    if it is higher. Not the RPN's: more proposals would give the heads new boxes that can
    suppress, by NMS, a detection the model reports; a lower final threshold only adds boxes
    below the ones it reports (NMS keeps the higher score, the count is cut by score)."""
    owners = [(m, name, getattr(m, name)) for m in module.modules() for name in THRESHOLDS
              if isinstance(getattr(m, name, None), float) and not isinstance(m, RegionProposalNetwork)]
    try:
        for m, name, value in owners:
            setattr(m, name, min(value, threshold))
        yield
    finally:
        for m, name, value in owners:
            setattr(m, name, value)


@dataclass
class Detections:
    """One image's explained detections and their maps ({method: DxCxhxw}, D detections): a
    CAM at the size the detector resized the image to (a 12-megapixel photo's map would be
    48 MB a detection at the photo's size), an input-gradient map at the image's own size;
    ``map`` gives either at the image's size."""

    boxes: torch.Tensor     # Dx4, x0 y0 x1 y1 in the image's pixels
    labels: list[int]
    scores: list[float]
    explained: list[float]  # S_d
    maps: dict[str, torch.Tensor]
    size: tuple[int, int]   # the image's height and width

    def map(self, method: str, d: int) -> torch.Tensor:
        """Detection ``d``'s map of ``method`` at the image's size (CxHxW), resized bilinearly."""
        values = self.maps[method][d:d + 1]
        if tuple(values.shape[-2:]) != self.size:
            values = F.interpolate(values, size=self.size, mode="bilinear", align_corners=False)
        return values[0]


def explain_detections(module: nn.Module, image: torch.Tensor, layer: str, methods: Sequence[str],
                       score_threshold: float = 0.5, max_detections: int = 10,
                       class_ids: Sequence[int] = ()) -> Detections:
    """Detect in one 3xHxW [0, 1] ``image``, keep the detections at or above ``score_threshold``
    (of ``class_ids`` if given, best first, at most ``max_detections``) and compute ``methods``'
    maps of each from one forward pass and one backward pass per detection."""
    kept: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: object, out: object) -> object:
        # a map after frozen weights (pretrained detectors' first layers) and an input without
        # grad has no graph: it becomes a leaf that does, so the backward passes reach it
        maps = [m.detach().requires_grad_() if torch.is_grad_enabled() and not m.requires_grad else m
                for m in levels(out)]
        kept.extend(maps)
        copies = [m.clone() for m in maps]  # an in-place op downstream must not change what is kept
        return copies[0] if isinstance(out, torch.Tensor) else type(out)(zip(out.keys(), copies, strict=True))

    sizes: list[ImageSize] = []

    def frame(_m: nn.Module, _i: object, out: tuple) -> None:
        images = out[0]  # the transform's ImageList: the padded batch, each image's resized size
        sizes.append(ImageSize(tuple(images.tensors.shape[-2:]), tuple(images.image_sizes[0])))

    handles = [find_layer(module, layer).register_forward_hook(keep),
               module.transform.register_forward_hook(frame)]
    try:
        graph = any(m != "eigencam" for m in methods)  # Eigen-CAM alone needs no backward pass
        with evaluating(module), thresholded(module, score_threshold), torch.set_grad_enabled(graph):
            x = image.detach().requires_grad_(graph and _input_gradient(methods))
            output = module([x])[0]
    finally:
        for handle in handles:
            handle.remove()
    chosen = _chosen(output, score_threshold, max_detections, class_ids)
    root = torch.cat([output["scores"].flatten(), output["boxes"].flatten()])  # for the ReLU gates
    fp = ForwardPass(x, root, {})
    rows = [_maps(fp, kept, sizes[0], output, d, methods) for d in chosen]
    if "eigencam" in methods and rows:  # class-agnostic: one map for every detection
        eigen = folded("eigencam", kept, None, sizes[0])
        for _, row in rows:
            row["eigencam"] = eigen
    maps = {m: torch.cat([r[1][m] for r in rows]) if rows else x.new_zeros(0, 1, *x.shape[1:])
            for m in methods}
    return Detections(output["boxes"][chosen].detach(), output["labels"][chosen].tolist(),
                      output["scores"][chosen].tolist(), [r[0] for r in rows], maps, tuple(x.shape[1:]))


def _chosen(output: dict[str, torch.Tensor], threshold: float, most: int,
            class_ids: Sequence[int]) -> list[int]:
    """The detections to explain: score at least ``threshold``, of the classes, best first."""
    order = output["scores"].argsort(descending=True, stable=True).tolist()
    wanted = set(class_ids)
    return [d for d in order if output["scores"][d] >= threshold
            and (not wanted or int(output["labels"][d]) in wanted)][:most]


def _maps(fp: ForwardPass, kept: list[torch.Tensor], size: ImageSize, output: dict[str, torch.Tensor],
          d: int, methods: Sequence[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """Detection ``d``'s S and maps (each 1xCxHxW): one plain backward pass to the layer (and the
    input for vanilla backprop) and one more per other backward rule a method needs; Eigen-CAM,
    the same for every detection, is made once by the caller."""
    score = box_score(output, output["boxes"][d].detach(), int(output["labels"][d]))
    vanilla = "vanilla" in methods
    layered = any(m in CAM_MAPS or m == "guided-gradcam" for m in methods)
    plain = _gradients(fp, score, "plain", [fp.inputs] * vanilla + kept * layered)  # one pass for both
    grads = plain[vanilla:]
    maps: dict[str, torch.Tensor] = {}
    for m in methods:
        if m in GRADIENT_METHODS:
            ruled = plain if m == "vanilla" else _gradients(fp, score, GRADIENT_METHODS[m], [fp.inputs])
            maps[m] = ruled[0][None]
        elif m in CAM_MAPS:
            maps[m] = folded(m, kept, grads, size)
    if "guided-gradcam" in methods:
        guided = maps["guided"] if "guided" in maps else _gradients(fp, score, "guided", [fp.inputs])[0][None]
        gradcam = maps["gradcam"] if "gradcam" in maps else folded("gradcam", kept, grads, size)
        at_input = F.interpolate(gradcam, size=guided.shape[-2:], mode="bilinear", align_corners=False)
        maps["guided-gradcam"] = guided_gradcam(guided, at_input)
    return float(score.detach()), maps


def _input_gradient(methods: Sequence[str]) -> bool:
    """Whether a method needs the gradient at the input (then the whole network backpropagates)."""
    return any(m in GRADIENT_METHODS or m == "guided-gradcam" for m in methods)


def _gradients(fp: ForwardPass, score: torch.Tensor, rule: str,
               wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    """dS/d``wrt`` under a backward rule, detached; zeros when S does not depend on the image
    (no box of the label left above the IoU threshold)."""
    if not wrt:
        return []
    if not score.requires_grad:
        return [torch.zeros_like(t) for t in wrt]
    return [g.detach() for g in fp.gradients(score, rule, wrt)]


def folded(method: str, activations: list[torch.Tensor], gradients: list[torch.Tensor] | None,
           size: ImageSize) -> torch.Tensor:
    """A CAM over several feature maps: each one's CAM (ReLU'd, upsampled to the padded batch
    the maps are of), summed, with the padding cut off: the map of the resized image."""
    total = None
    for level, acts in enumerate(activations):
        layout = Layout("nchw", tuple(acts.shape[-2:]))
        grads = None if gradients is None else gradients[level]
        one = cam(method, acts.detach(), grads, size.padded, layout)
        total = one if total is None else total + one
    return total[..., :size.resized[0], :size.resized[1]]


@dataclass(frozen=True)
class ImageSize:
    """Where a detector's maps lie: the ``padded`` batch they are of and the ``resized`` image
    at its top left (each height, width)."""

    padded: tuple[int, int]
    resized: tuple[int, int]



@dataclass
class DetectJob(Task):
    """detect: per image, a row per detection with its box and maps."""

    model: LoadedModel
    layer: str
    methods: Sequence[str]
    score_threshold: float = 0.5
    max_detections: int = 10
    class_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """The output sub-folder: <arch>@<layer>-detect."""
        self.tag = f"{self.model.folder_name}@{self.layer}-detect"

    def settings(self, path: Path) -> dict:
        """Model, layer, methods, threshold, count and classes: what determines an image's files."""
        return {"task": self.tag, "model": self.model.fingerprint(), "layers": [self.layer],
                "methods": list(self.methods), "score_threshold": self.score_threshold,
                "max_detections": self.max_detections, "class_ids": list(self.class_ids)}

    def decode(self, path: Path, image: Image.Image) -> Image.Image:
        """The image as it is: the detector's own transform resizes and normalises it."""
        return image

    def explain(self, batch: list[Loaded]) -> list[Detections]:
        """Each image's detections and maps (one forward pass per image: sizes differ)."""
        device = next(self.model.module.parameters()).device
        return [explain_detections(self.model.module, TF.to_tensor(item.data).to(device), self.layer,
                                   self.methods, self.score_threshold, self.max_detections, self.class_ids)
                for item in batch]

    def files(self, record: dict) -> list[str]:
        """The grid and every detection's maps."""
        return [record["grid"], *(f for d in record["detections"] for f in d["maps"].values())]

    def write(self, item: Loaded, results: list[Detections], i: int, folder: Path) -> dict:
        """Write one image's per-detection maps and grid; return its record's fields."""
        found, photo = results[i], np.asarray(item.data)
        names, rows, detections = self.model.categories, [], []
        width = len(str(len(names) - 1))
        for d, box in enumerate(found.boxes.tolist()):
            label, score = found.labels[d], found.scores[d]
            name = names[label] if label < len(names) else f"class {label}"
            where = folder / f"d{d + 1}-c{label:0{width}d}-{slug(name)}"
            pictures = [drawn_box(map_image(m, found.map(m, d), photo), box) for m in self.methods]
            files = {m: str(atomic_write(where / f"{m}.png", png_bytes(p)))
                     for m, p in zip(self.methods, pictures, strict=True)}
            detections.append({"rank": d + 1, "class_id": label, "name": name, "score": round(score, 6),
                               "box": [round(v, 2) for v in box], "explained": round(found.explained[d], 6),
                               "maps": files})
            shown = [_small(drawn_box(photo, box)), *map(_small, pictures)]
            rows.append((f"{name}\nscore = {score:.3f}", shown))
        if not rows:
            rows = [(f"no detection\nscore ≥ {self.score_threshold:g}", [_small(photo)])]
        columns = ["input", *(self.methods if detections else [])]
        atomic_write(folder / "grid.png", png_bytes(grid_image(columns, rows)))
        return {"arch": self.model.arch, "weights": self.model.weights, "layer": self.layer,
                "image_size": list(photo.shape[:2]), "score_threshold": self.score_threshold,
                "detections": detections, "grid": str(folder / "grid.png")}


def drawn_box(picture: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The picture (HxWx3, or HxW gray) with ``box`` (x0, y0, x1, y1) outlined."""
    image = Image.fromarray(picture).convert("RGB")
    line = max(1, round(max(image.size) / 300))
    ImageDraw.Draw(image).rectangle([round(v) for v in box], outline=BOX_COLOUR, width=line)
    return np.asarray(image)


def _small(picture: np.ndarray) -> np.ndarray:
    """A picture scaled for the grid: its longer side at most ``GRID_SIDE`` pixels."""
    height, width = picture.shape[:2]
    scale = min(1.0, GRID_SIDE / max(height, width))
    if scale == 1.0:
        return picture
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR))


def detect(model: LoadedModel, images: Sequence[Item], output_dir: str | Path = "results",
           layer: str | None = None, methods: Sequence[str] = DETECT_DEFAULT, score_threshold: float = 0.5,
           max_detections: int = 10, class_ids: Sequence[int] = (), class_names: Sequence[str] = (),
           batch_size: int = 8, skip_existing: bool = False, stop: Callable[[], bool] = lambda: False,
           progress: bool = False) -> Iterator[dict]:
    """Explain each image's detections (score ≥ ``score_threshold``, best first, at most
    ``max_detections``, of ``class_ids``/``class_names`` if given) with ``methods``; yield one
    record per image, in order (``runner.run``: folders, resume, stop). ``model`` comes from
    ``models.load_detector``."""
    check_methods(methods)
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) \
            or not 0 <= score_threshold <= 1:
        raise ArgumentError("score_threshold", score_threshold, "a score from 0 to 1")
    if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
        raise ArgumentError("max_detections", max_detections, "a positive integer")
    ids = chosen_classes(model.categories, class_ids, class_names)
    job = DetectJob(model, detect_layer(model, layer), tuple(methods), float(score_threshold), max_detections,
                    ids)
    return run(job, images, output_dir, batch_size, skip_existing, stop)

