"""`classify` and `compare_layers` as library calls: images in, explained in batches, files
and records out.

Output layout, one folder per image and model/layer (names sort by rank)::

    <output-dir>/<image-stem>-<hash8>/<arch>@<layer>/          classify
        grid.png                      rows: classes; columns: crop and maps
        summary.json                  the record yielded for this image
        r1-c0285-egyptian_cat/        one folder per explained class, by rank
            vanilla.png guided.png deconv.png gradcam.png guided-gradcam.png
    <output-dir>/<image-stem>-<hash8>/<arch>@layers/           compare-layers
        grid.png                      rows: class x layer; columns: crop and methods
        summary.json
        r1-c0285-egyptian_cat/layer1/gradcam.png …
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ArgumentError, InputError, quoted, unknown
from .explanation import Explanation, explain_layers
from .io import atomic_write, load_image, png_bytes, slug
from .methods import CAM_METHODS, DEFAULT_METHODS, REGISTRY_BY_NAME, method_of
from .methods import overlay as heat_map
from .models import LoadedModel, blank_input, default_layer, file_sha256, layer_layout, stage_layers
from .outputs import OVERLAYS
from .outputs.maps import Arrays, check_save_maps, listed
from .outputs.overlay import original_overlay
from .paths import completeness_field, with_normalisation
from .proxies import Candidates
from .refine import fuse, fuse_needs
from .render import CAM_ALPHA, COLORMAP, check_colours, grid_image, map_image
from .runner import Engine, Item, Loaded, Task, run
from .settings import MethodSettings, check_settings
from .targets import Chooser, ClassTargets, class_targets, proxy_targets


def resolve_layer(model: LoadedModel, layer: str | None) -> str:
    """The layer to explain: the architecture's default for None, else the user's, refused
    when empty, unknown, or without a spatial grid of more than one position."""
    if layer is None:
        return default_layer(model.arch, model.module, model.preprocess)
    layer_layout(model.module, layer, blank_input(model.module, model.preprocess))
    return layer


def resolve_layers(model: LoadedModel, layers: Sequence[str] = ()) -> list[str]:
    """The layers to compare: the architecture's stages when none are given, else the user's,
    each checked as by ``resolve_layer``."""
    if not layers:
        return stage_layers(model.arch, model.module, model.preprocess)
    example = blank_input(model.module, model.preprocess)
    for name in layers:
        layer_layout(model.module, name, example, "layers")
    return list(layers)


def resolve_fused(model: LoadedModel, layer: str | None, layers: Sequence[str], how: str | None) -> list[str]:
    """classify's layers: one (``layer``, or the default), or two or more ``layers`` whose CAMs
    are fused into one map (``how``: mean or max); each checked as by ``resolve_layer``."""
    if layers and layer is not None:
        raise ArgumentError("layers", ",".join(layers), "give one target layer or several to fuse, not both")
    if len(layers) == 1:
        raise ArgumentError("layers", layers[0], "one layer is not fused: name two or more, or give it as "
                            "the target layer")
    if how is not None and not layers:
        raise ArgumentError("fuse", how, "fuses several layers' maps: name two or more layers")
    return resolve_layers(model, layers) if layers else [resolve_layer(model, layer)]


def classify(model: LoadedModel, images: Sequence[Item], output_dir: str | Path = "results",
             layer: str | None = None, topk: int = 3, class_ids: Sequence[int] = (),
             methods: Sequence[str] = DEFAULT_METHODS, batch_size: int = 8,
             skip_existing: bool = False, stop: Callable[[], bool] = lambda: False,
             progress: bool = False, class_names: Sequence[str] = (),
             targets: str | Path | Mapping[str, Sequence[int | str]] | None = None,
             score: str | None = None, negative: bool = False,
             settings: MethodSettings | None = None, layers: Sequence[str] = (),
             save_maps: str = "none", overlay: str = "crop", colormap: str = COLORMAP,
             alpha: float = CAM_ALPHA, engine: Engine | None = None) -> Iterator[dict]:
    """Explain each image's top-k (or chosen) classes; yield one record per image, in order.

    The classes: the top-k by logit, or ``class_ids`` and ``class_names`` (names resolved
    against ``model.categories`` here, before any image), or each image's own (``targets``:
    "folder" for its parent folder's name, a CSV file ``image,class`` or a mapping image ->
    classes; an image without classes fails alone). Each is reported by ``score`` ("softmax";
    "sigmoid" for multi-label heads; "logit"; default softmax, sigmoid for a one-output head)
    and explained through its logit z, or -z with ``negative`` (``targets.class_targets``).

    A record's ``status`` is "ok" (classes, probabilities, files written), "skipped"
    (``skip_existing`` and an earlier run with the same settings left all its files) or
    "error" (the reason); one bad image never stops the others (``runner.run``). ``stop`` is
    asked after each batch: when it says yes, the batches under way are written and no other
    is started (how the CLI turns Ctrl-C into a clean stop). ``progress`` shows Score-CAM's,
    Ablation-CAM's and occlusion's per-image progress bars; ``settings`` holds the settings
    of the methods that take any (``explain``). With two or more ``layers`` each CAM is one map
    fused from theirs (``settings.cam.fuse``: mean, the default, or max; ``refine.fuse``).

    ``save_maps`` ("npy", "npz") also writes the float32 maps (``outputs.maps``); ``overlay``
    "original" draws each CAM's file over the original photo at its size (the grid stays the
    crop's; ``outputs.overlay``); ``colormap`` (any matplotlib colour map) and ``alpha`` (the
    heat map's weight, 0..1) colour every CAM overlay. ``engine`` runs the batches elsewhere
    (``cluster.RayEngine``). compare_layers and embed take the same.
    """
    outputs = Outputs(save_maps, overlay, colormap, alpha)
    settings = check_settings(settings)
    chosen = resolve_fused(model, layer, layers, settings.cam.fuse)
    if len(chosen) > 1 and settings.cam.fuse is None:
        settings = replace(settings, cam=replace(settings.cam, fuse="mean"))
    classes = class_targets(model.categories, methods, topk, class_ids, class_names, targets, score, negative)
    job = Job(model, chosen, methods, by_layer=False, tag=f"{model.folder_name}@{'+'.join(chosen)}",
              target=classes.chooser, classes=classes, batch_size=batch_size, progress=progress,
              method_settings=settings, outputs=outputs)
    return run(job, images, output_dir, batch_size, skip_existing, stop, engine)


def compare_layers(model: LoadedModel, images: Sequence[Item], output_dir: str | Path = "results",
                   layers: Sequence[str] = (), topk: int = 1, class_ids: Sequence[int] = (),
                   methods: Sequence[str] = ("gradcam",), batch_size: int = 8,
                   skip_existing: bool = False, stop: Callable[[], bool] = lambda: False,
                   progress: bool = False, class_names: Sequence[str] = (),
                   targets: str | Path | Mapping[str, Sequence[int | str]] | None = None,
                   score: str | None = None, negative: bool = False,
                   settings: MethodSettings | None = None, save_maps: str = "none",
                   overlay: str = "crop", colormap: str = COLORMAP,
                   alpha: float = CAM_ALPHA, engine: Engine | None = None) -> Iterator[dict]:
    """Like ``classify``, with a row per layer (default: the stages) for each explained class.

    Only methods that depend on the layer make sense here; one forward and one backward pass
    per class serve the gradient CAMs of every layer.
    """
    outputs = Outputs(save_maps, overlay, colormap, alpha)
    flat = [m for m in methods if m in REGISTRY_BY_NAME and not REGISTRY_BY_NAME[m].layered]
    if flat:
        raise ArgumentError("methods", flat[0], "does not depend on the layer; choose CAM methods "
                            f"({', '.join(CAM_METHODS)}) or guided-gradcam")
    classes = class_targets(model.categories, methods, topk, class_ids, class_names, targets, score, negative)
    job = Job(model, resolve_layers(model, layers), methods, by_layer=True, tag=f"{model.folder_name}@layers",
              target=classes.chooser, classes=classes, batch_size=batch_size, progress=progress,
              method_settings=check_settings(settings), outputs=outputs)
    return run(job, images, output_dir, batch_size, skip_existing, stop, engine)


def embed(model: LoadedModel, images: Sequence[Item], candidates: Candidates,
          output_dir: str | Path = "results", layer: str | None = None, layers: Sequence[str] = (),
          topk: int = 3, methods: Sequence[str] = DEFAULT_METHODS, similarity: str = "dot",
          batch_size: int = 8, skip_existing: bool = False,
          stop: Callable[[], bool] = lambda: False, progress: bool = False,
          settings: MethodSettings | None = None, save_maps: str = "none", overlay: str = "crop",
          colormap: str = COLORMAP, alpha: float = CAM_ALPHA,
          engine: Engine | None = None) -> Iterator[dict]:
    """Explain each query's similarity to its top-k ``candidates`` (proxies or references).

    The explained score is y·p (``similarity="dot"``, as in Bachhawat 2024) or cos(y, p) of
    the query's embedding y and the candidate p; rows are candidates, ranked by similarity.
    With ``layers`` the rows are candidate x layer, as in ``compare_layers``.
    """
    outputs = Outputs(save_maps, overlay, colormap, alpha)
    names = resolve_layers(model, layers) if layers else [resolve_layer(model, layer)]
    bind = proxy_targets(similarity, topk)  # checks both before any image is read

    def target(paths: list[Path]) -> Chooser:
        return bind(*candidates.for_images(paths))
    where = "layers" if layers else names[0]
    job = Job(model, names, methods, by_layer=bool(layers), tag=f"{model.folder_name}@{where}-embed",
              target=target, batch_size=batch_size, progress=progress, names=candidates.names,
              method_settings=check_settings(settings), outputs=outputs,
              extra={"topk": topk, "similarity": similarity, "candidates": _candidates_digest(candidates)})
    return run(job, images, output_dir, batch_size, skip_existing, stop, engine)


def _candidates_digest(candidates: Candidates) -> str:
    """A digest of what queries are compared with: names, kind and vectors."""
    digest = hashlib.sha256("\n".join([candidates.kind, *candidates.names]).encode())
    digest.update(candidates.vectors.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Outputs:
    """What is written beside the grid and how CAMs are drawn; every field checked when made."""

    save_maps: str = "none"      # raw float32 maps: none, npy or npz (outputs.maps)
    overlay: str = "crop"        # CAM files over the crop, or over the original photo
    colormap: str = COLORMAP     # any matplotlib colour map
    alpha: float = CAM_ALPHA     # the heat map's weight

    def __post_init__(self) -> None:
        """Refuse an unknown format, overlay or colour map, or an alpha outside 0..1."""
        check_save_maps(self.save_maps)
        if self.overlay not in OVERLAYS:
            raise unknown("overlay", self.overlay, OVERLAYS)
        check_colours(self.colormap, self.alpha)

    def settings(self) -> dict:
        """The fields not at their defaults, for the records' settings (a default run's records
        stay as they were, and so do their resume checks)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


@dataclass
class Job(Task):
    """classify, compare-layers and embed: maps for chosen candidates, written as a grid."""

    model: LoadedModel
    layers: list[str]
    methods: Sequence[str]
    by_layer: bool
    tag: str                                           # the image's output sub-folder
    target: Callable[[list[Path]], Chooser]            # a batch's paths -> what each image explains
    classes: ClassTargets | None = None                # a classifier's classes; None: embed's candidates
    batch_size: int = 8                                # perturbed copies per pass
    progress: bool = False
    names: Sequence[str] | None = None                 # candidates; None: the model's classes
    extra: dict = field(default_factory=dict)          # further settings (embed's candidates)
    method_settings: MethodSettings = field(default_factory=MethodSettings)
    outputs: Outputs = field(default_factory=Outputs)

    def __post_init__(self) -> None:
        """Integrated Gradients' black baseline from the model's normalisation."""
        self.method_settings = with_normalisation(self.method_settings, self.model.preprocess)

    def settings(self, path: Path) -> dict:
        """Model, layers, methods (with their settings) and candidates: what determines an
        image's files."""
        own = self.classes.settings(path) if self.classes else {}
        return {"task": self.tag, "model": self.model.fingerprint(), "layers": self.layers,
                "methods": list(self.methods), **self.method_settings.to_dict(self.methods),
                **own, **self.extra, **self.outputs.settings()}

    def decode(self, path: Path, image: Image.Image) -> Image.Image:
        """The crop the model sees; an image without classes of its own fails here, alone."""
        if self.classes:
            self.classes.check(path)
        return self.model.preprocess.model_pixels(image)

    @property
    def fused(self) -> str | None:
        """How classify fuses its layers' CAMs into one map; None: one layer, or a row per layer."""
        return None if self.by_layer or len(self.layers) < 2 else self.method_settings.cam.fuse

    def explain(self, batch: list[Loaded]) -> list[Explanation]:
        """One explanation per layer for the batch, from shared passes (one, fused, when fusing)."""
        x = self.model.batch([item.data for item in batch])
        how = self.fused
        results = explain_layers(self.model.module, x, self.layers,
                                 methods=[*self.methods, *fuse_needs(self.methods)] if how else self.methods,
                                 batch_size=self.batch_size, progress=self.progress,
                                 target=self.target([item.path for item in batch]),
                                 settings=self.method_settings)
        if how is None:
            return results
        names = [n for n in results[0].maps if method_of(n).name in self.methods]
        return [replace(results[0], maps=fuse([r.maps for r in results], how, names),
                        layer=f"{how} of {', '.join(self.layers)}")]

    def arrays(self, results: list[Explanation], i: int, name: str) -> np.ndarray:
        """Image ``i``'s ``name`` maps as float32, layers x classes x C x H x W (``cluster``)."""
        return np.stack([r.maps[name][i].detach().float().cpu().numpy() for r in results])

    def files(self, record: dict) -> list[str]:
        """The grid, every map file and the raw maps."""
        return [record["grid"], *(f for c in record["classes"] for f in _paths(c["maps"])), *listed(record)]

    def write(self, item: Loaded, results: list[Explanation], i: int, folder: Path) -> dict:
        """Write one image's per-map PNGs, raw maps and grid; return its record's fields."""
        crop, first = np.asarray(item.data), results[0]
        if first.errors[i]:
            raise InputError(f"{item.path}: {first.errors[i]}")
        methods, names = list(first.maps), self.names or self.model.categories
        originals = self.outputs.overlay == "original" and any(map(heat_map, methods))
        photo = self._original(item) if originals else None
        arrays = Arrays(self.outputs.save_maps, folder) if self.outputs.save_maps != "none" else None
        width = len(str(len(names) - 1))
        classes, rows = [], []
        for k, class_id in enumerate(first.classes[i].tolist()):
            if class_id < 0:
                continue  # past this image's own classes
            name, value = names[class_id], float(first.scores[i, class_id])
            if not math.isfinite(value):
                continue  # not a candidate for this image (its own side of a pair, or itself)
            class_dir = folder / f"r{k + 1}-c{class_id:0{width}d}-{slug(name)}"
            maps = {}
            for result in results:
                where = class_dir / result.layer if self.by_layer else class_dir
                files, pictures = self._map_files(result, i, k, where, crop, photo)
                maps.update({result.layer: files} if self.by_layer else files)
                label = f"{name}\n{self._symbol()} = {value:.3f}" + \
                    (f"\n{result.layer}" if self.by_layer or self.fused else "")
                rows.append((label, [crop, *pictures]))
            raw = {m: arrays.add(class_dir, m, _stacked(results, m, i, k)) for m in methods} if arrays else {}
            classes.append({"rank": k + 1, "class_id": class_id, "name": name,
                            **self._score_fields(value), **completeness_field(first.completeness, i, k),
                            "maps": maps, **({"arrays": raw} if arrays else {})})
        if not rows:
            raise InputError(f"{item.path}: no candidate to compare with (only itself, or its own side)")
        where = {"layers": self.layers} if self.by_layer else {"layer": first.layer}
        if self.fused:
            where = {"layers": self.layers, "fuse": self.fused}
        atomic_write(folder / "grid.png", png_bytes(grid_image(["input", *methods], rows)))
        return {"arch": self.model.arch, "weights": self.model.weights, **where,
                "preprocess": self.model.preprocess.to_dict(),
                "input_size": list(crop.shape[:2]), "relu_gates": first.gates,
                **self._predicted(first, i), "classes": classes, "grid": str(folder / "grid.png"),
                **(arrays.finish() if arrays else {})}

    def _map_files(self, result: Explanation, i: int, k: int, where: Path, crop: np.ndarray,
                   photo: Image.Image | None) -> tuple[dict[str, str], list[np.ndarray]]:
        """One row's map PNGs ({method: path}) and its grid pictures (on the crop); a CAM's file
        is drawn over the original ``photo`` instead when there is one."""
        files, pictures = {}, []
        for m, values in ((m, result.maps[m][i, k]) for m in result.maps):
            picture = map_image(m, values, crop, self.outputs.colormap, self.outputs.alpha)
            drawn = original_overlay(values, photo, self.model.preprocess, self.outputs.colormap,
                                     self.outputs.alpha) if photo is not None and heat_map(m) else picture
            files[m] = str(atomic_write(where / f"{m}.png", png_bytes(drawn)))
            pictures.append(picture)
        return files, pictures

    def _original(self, item: Loaded) -> Image.Image:
        """The photo decoded again for overlays at its own size (kept from decoding, three
        batches of full-size photos would be in memory); an image whose file changed since it
        was explained fails alone."""
        image = load_image(item.path)
        try:
            same = file_sha256(item.path) == item.digest
        except OSError:
            same = False
        if not same:
            raise InputError(f"{quoted(item.path)}: changed since it was explained; run it again")
        return image

    def _symbol(self) -> str:
        """How a row's number is labelled in the grid: p, logit, 1-p, -logit; s (similarity)."""
        if self.classes is None:
            return "s"
        scoring = self.classes.scoring
        symbol = "logit" if scoring.kind == "logit" else "p"
        return ("-logit" if symbol == "logit" else "1-p") if scoring.negative else symbol

    def _score_fields(self, value: float) -> dict:
        """A class's number in its record: score and its kind (with "probability" for a softmax
        score, as records had it); a candidate's similarity."""
        if self.classes is None:
            return {"similarity": round(value, 6)}
        kind = self.classes.scoring.kind
        return {"score": round(value, 6), "score_kind": kind,
                **({"probability": round(value, 6)} if kind == "softmax" else {})}

    def _predicted(self, result: Explanation, i: int) -> dict:
        """A classifier's side and top-1 class (beside the explained ones: did the model agree?)."""
        if self.classes is None or result.predicted is None:
            return {}
        class_id, value = result.predicted[i]
        return {"negative": self.classes.scoring.negative,
                "predicted": {"class_id": class_id, "name": self.model.categories[class_id],
                              "score": round(value, 6)}}


def _stacked(results: list[Explanation], method: str, i: int, k: int) -> np.ndarray:
    """One class's raw map: its rows (one per layer, or one) as N x C x H x W float32."""
    return np.stack([r.maps[method][i, k].detach().float().cpu().numpy() for r in results])


def _paths(maps: dict) -> Iterator[str]:
    """The file paths in a record's ``maps``, nested by layer or not."""
    for value in maps.values():
        yield from (_paths(value) if isinstance(value, dict) else [value])
