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

import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from .errors import InputError, UsageError
from .explanation import Explanation, explain_layers
from .inputs import BadInput
from .io import atomic_write, image_id, json_bytes, load_image, png_bytes, prepare_output_dir, slug
from .methods import CAM_METHODS, DEFAULT_METHODS, GRADIENT_METHODS
from .models import LoadedModel, default_layer, find_layer, stage_layers
from .proxies import Candidates
from .render import grid_image, map_image
from .targets import SIMILARITIES, Chooser, top_proxies


def resolve_layer(model: LoadedModel, layer: str | None) -> str:
    """The layer to explain: the user's (checked) or the architecture's default."""
    name = layer or default_layer(model.arch, model.module, model.preprocess.crop)
    find_layer(model.module, name)
    return name


def resolve_layers(model: LoadedModel, layers: Sequence[str] = ()) -> list[str]:
    """The layers to compare: the user's (checked) or the architecture's stages."""
    names = list(layers) or stage_layers(model.arch, model.module, model.preprocess.crop)
    for name in names:
        find_layer(model.module, name)
    return names


Item = Union[str, Path, BadInput]
Loaded = Union[tuple[Path, Image.Image], dict]


def classify(model: LoadedModel, images: Sequence[Item], output_dir: str | Path = "results",
             layer: str | None = None, topk: int = 3, class_ids: Sequence[int] = (),
             methods: Sequence[str] = DEFAULT_METHODS, batch_size: int = 8,
             skip_existing: bool = False, stop: Callable[[], bool] = lambda: False,
             progress: bool = False) -> Iterator[dict]:
    """Explain each image's top-k (or chosen) classes; yield one record per image, in order.

    A record's ``status`` is "ok" (classes, probabilities, files written), "skipped"
    (``skip_existing`` and its outputs are all there) or "error" (the reason); one bad image
    never stops the others. Images are decoded in a background thread one batch ahead, and a
    batch's files are rendered and written in another thread while the next batch is
    explained; at most three batches are in memory at once, whatever the number of images.
    ``stop`` is asked after each batch: when it says yes, the batches under way are written
    and no other is started (how the CLI turns Ctrl-C into a clean stop). ``progress`` shows Score-CAM's
    and Ablation-CAM's per-image progress bars.
    """
    chosen = resolve_layer(model, layer)
    job = Job([chosen], topk, class_ids, methods, by_layer=False, tag=f"{model.arch}@{chosen}")
    return _run(model, images, Path(output_dir), job, batch_size, skip_existing, stop, progress)


def compare_layers(model: LoadedModel, images: Sequence[Item], output_dir: str | Path = "results",
                   layers: Sequence[str] = (), topk: int = 1, class_ids: Sequence[int] = (),
                   methods: Sequence[str] = ("gradcam",), batch_size: int = 8,
                   skip_existing: bool = False, stop: Callable[[], bool] = lambda: False,
                   progress: bool = False) -> Iterator[dict]:
    """Like ``classify``, with a row per layer (default: the stages) for each explained class.

    Only methods that depend on the layer make sense here; one forward and one backward pass
    per class serve the gradient CAMs of every layer.
    """
    flat = [m for m in methods if m in GRADIENT_METHODS]
    if flat:
        raise UsageError(f"--method {flat[0]} does not depend on the layer; choose CAM methods "
                         f"({', '.join(CAM_METHODS)}) or guided-gradcam")
    job = Job(resolve_layers(model, layers), topk, class_ids, methods, by_layer=True,
              tag=f"{model.arch}@layers")
    return _run(model, images, Path(output_dir), job, batch_size, skip_existing, stop, progress)


@dataclass(frozen=True)
class Job:
    """What to explain for every image, where its files go, and how candidates are named."""

    layers: list[str]
    topk: int
    class_ids: Sequence[int]
    methods: Sequence[str]
    by_layer: bool
    tag: str                                           # the image's output sub-folder
    names: Sequence[str] | None = None                 # candidates; None: the model's classes
    value: str = "probability"                         # what a row's number is
    target: Callable[[list[Path]], Chooser] | None = None  # None: top-k classes

    def folder(self, out: Path, image: Item) -> Path:
        """The image's output folder for this job."""
        return out / image_id(image) / self.tag


def embed(model: LoadedModel, images: Sequence[Item], candidates: Candidates,
          output_dir: str | Path = "results", layer: str | None = None, layers: Sequence[str] = (),
          topk: int = 3, methods: Sequence[str] = DEFAULT_METHODS, similarity: str = "dot",
          batch_size: int = 8, skip_existing: bool = False,
          stop: Callable[[], bool] = lambda: False, progress: bool = False) -> Iterator[dict]:
    """Explain each query's similarity to its top-k ``candidates`` (proxies or references).

    The explained score is y·p (``similarity="dot"``, as in Bachhawat 2024) or cos(y, p) of
    the query's embedding y and the candidate p; rows are candidates, ranked by similarity.
    With ``layers`` the rows are candidate x layer, as in ``compare_layers``.
    """
    names = resolve_layers(model, layers) if layers else [resolve_layer(model, layer)]
    if similarity not in SIMILARITIES:
        raise UsageError(f"--similarity {similarity}: choose from {', '.join(SIMILARITIES)}")

    def target(paths: list[Path]) -> Chooser:
        vectors, valid = candidates.for_images(paths)
        return top_proxies(vectors, similarity, topk, valid)
    where = "layers" if layers else names[0]
    job = Job(names, topk, (), methods, by_layer=bool(layers), tag=f"{model.arch}@{where}-embed",
              names=candidates.names, value="similarity", target=target)
    return _run(model, images, Path(output_dir), job, batch_size, skip_existing, stop, progress)


def _run(model: LoadedModel, images: Sequence[Item], output_dir: Path, job: Job, batch_size: int,
         skip_existing: bool, stop: Callable[[], bool], progress: bool) -> Iterator[dict]:
    """Batches through ``explain_layers``, each batch written in a thread beside the next."""
    out = prepare_output_dir(output_dir)
    device = next(model.module.parameters()).device
    todo = []
    for item in images:
        done = _existing(out, job, item) if skip_existing else None
        todo.append(done or item)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for batch in prefetch(todo, batch_size, partial(load_item, decode=partial(_cropped, model))):
            good = [item for item in batch if isinstance(item, tuple)]
            results = []
            if good:
                x = torch.stack([model.preprocess.to_tensor(crop) for _, crop in good]).to(device)
                target = job.target([path for path, _ in good]) if job.target else None
                results = explain_layers(model.module, x, job.layers, job.topk, job.class_ids,
                                         job.methods, batch_size, progress, target)
            written = writer.submit(_write_batch, model, batch, results, out, job)
            if pending:
                yield from pending.result()
            pending = written
            if stop():
                break
        if pending:
            yield from pending.result()


def _write_batch(model: LoadedModel, batch: list[Loaded], results: list[Explanation],
                 out: Path, job: Job) -> list[dict]:
    """Write the files of a batch's explained images; pass error and skip records through."""
    index = iter(range(len(batch)))
    return [item if isinstance(item, dict)
            else _write_image(model, item[0], np.asarray(item[1]), results, next(index), out, job)
            for item in batch]


def _existing(out: Path, job: Job, item: Item) -> dict | None:
    """A "skipped" record when an earlier run of the same job left this image's summary and
    every file it lists."""
    if isinstance(item, BadInput):
        return None
    summary = job.folder(out, item) / "summary.json"
    try:
        record = json.loads(summary.read_text())
        maps = record["classes"][0]["maps"]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    same = (list(maps) == job.layers and all(set(m) == set(job.methods) for m in maps.values())
            if job.by_layer else set(maps) == set(job.methods))
    files = [record["grid"], *(f for c in record["classes"] for f in _paths(c["maps"]))]
    if same and all(Path(f).is_file() for f in files):
        return {"image": str(item), "status": "skipped", "summary": str(summary)}
    return None


def _paths(maps: dict) -> Iterator[str]:
    """The file paths in a record's ``maps``, nested by layer or not."""
    for value in maps.values():
        yield from (_paths(value) if isinstance(value, dict) else [value])


def load_item(item: Item | dict, decode: Callable[[Path, Image.Image], tuple]) -> tuple | dict:
    """``decode(path, image)`` of one input; a skip record passes through and any failure
    becomes an error record, so one bad image never stops the others."""
    if isinstance(item, dict):
        return item
    if isinstance(item, BadInput):
        return {"image": item.path, "status": "error", "error": item.reason}
    try:
        return decode(Path(item), load_image(item))
    except InputError as exc:
        return {"image": str(item), "status": "error", "error": str(exc)}


def _cropped(model: LoadedModel, path: Path, image: Image.Image) -> tuple[Path, Image.Image]:
    """The image's path and the crop the model sees."""
    return path, model.preprocess.crop_image(image)


def prefetch(items: Sequence[Item | dict], batch_size: int,
             load: Callable[[Item | dict], Loaded]) -> Iterator[list[Loaded]]:
    """Yield batches of ``load``ed items, loading the next batch in a background thread."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in [*batches, None]:
            ready = pending.result() if pending else None
            pending = pool.submit(lambda b: [load(i) for i in b], batch) if batch else None
            if ready is not None:
                yield ready


def _write_image(model: LoadedModel, path: str | Path, crop: np.ndarray,
                 results: list[Explanation], i: int, out: Path, job: Job) -> dict:
    """Write one image's per-map PNGs, grid and summary; return its record."""
    folder = job.folder(out, path)
    first = results[0]
    methods = list(first.maps)
    names = job.names or model.categories
    width = len(str(len(names) - 1))
    letter = job.value[0]
    classes, rows = [], []
    for k, class_id in enumerate(first.classes[i].tolist()):
        name, value = names[class_id], float(first.scores[i, class_id])
        if not math.isfinite(value):
            continue  # not a candidate for this image (its own side of a pair, or itself)
        class_dir = folder / f"r{k + 1}-c{class_id:0{width}d}-{slug(name)}"
        maps = {}
        for result in results:
            pictures = [map_image(m, result.maps[m][i, k], crop) for m in methods]
            where = class_dir / result.layer if job.by_layer else class_dir
            files = {m: str(atomic_write(where / f"{m}.png", png_bytes(p)))
                     for m, p in zip(methods, pictures)}
            maps.update({result.layer: files} if job.by_layer else files)
            label = f"{name}\n{letter} = {value:.3f}" + (f"\n{result.layer}" if job.by_layer else "")
            rows.append((label, [crop, *pictures]))
        classes.append({"rank": k + 1, "class_id": class_id, "name": name,
                        job.value: round(value, 6), "maps": maps})
    if not rows:
        return {"image": str(path), "status": "error",
                "error": f"{path}: no candidate to compare with (only itself, or its own side)"}
    where = {"layers": job.layers} if job.by_layer else {"layer": first.layer}
    record = {"image": str(path), "status": "ok", "arch": model.arch, "weights": model.weights,
              **where, "input_size": list(crop.shape[:2]), "relu_gates": first.gates,
              "classes": classes, "grid": str(folder / "grid.png"),
              "summary": str(folder / "summary.json")}
    atomic_write(folder / "grid.png", png_bytes(grid_image(["input", *methods], rows)))
    atomic_write(folder / "summary.json", json_bytes(record))
    return record
