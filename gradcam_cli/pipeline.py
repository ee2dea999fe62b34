"""`classify` as a library call: images in, maps explained in batches, files and records out.

Output layout, one folder per image and model/layer (names sort by rank)::

    <output-dir>/<image-stem>-<hash8>/<arch>@<layer>/
        grid.png                      rows: classes; columns: crop and maps
        summary.json                  the record yielded for this image
        r1-c0285-egyptian_cat/        one folder per explained class, by rank
            vanilla.png guided.png deconv.png gradcam.png guided-gradcam.png
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .explain import Explanation, explain
from .inputs import BadInput
from .io import atomic_write, image_id, json_bytes, load_image, png_bytes, prepare_output_dir, slug
from .methods import DEFAULT_METHODS
from .models import LoadedModel, default_layer, find_layer
from .render import grid_image, map_image


def resolve_layer(model: LoadedModel, layer: str | None) -> str:
    """The layer to explain: the user's (checked) or the architecture's default."""
    name = layer or default_layer(model.arch, model.module, model.preprocess.crop)
    find_layer(model.module, name)
    return name


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
    ``stop`` is asked after each batch: when it says yes, the images after that batch are
    not started (how the CLI turns Ctrl-C into a clean stop). ``progress`` shows Score-CAM's
    and Ablation-CAM's per-image progress bars.
    """
    out = prepare_output_dir(Path(output_dir))
    layer = resolve_layer(model, layer)
    device = next(model.module.parameters()).device
    todo = []
    for item in images:
        done = _existing(out, model.arch, layer, item) if skip_existing else None
        todo.append(done or item)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for batch in _prefetch(model, todo, batch_size):
            good = [item for item in batch if isinstance(item, tuple)]
            result = None
            if good:
                x = torch.stack([model.preprocess.to_tensor(crop) for _, crop in good]).to(device)
                result = explain(model.module, x, layer, topk, class_ids, methods, batch_size, progress)
            written = writer.submit(_write_batch, model, batch, result, out)
            if pending:
                yield from pending.result()
            pending = written
            if stop():
                break
        if pending:
            yield from pending.result()


def _write_batch(model: LoadedModel, batch: list[Loaded], result: Explanation | None,
                 out: Path) -> list[dict]:
    """Write the files of a batch's explained images; pass error and skip records through."""
    index = iter(range(len(batch)))
    return [item if isinstance(item, dict)
            else _write_image(model, item[0], np.asarray(item[1]), result, next(index), out)
            for item in batch]


def _existing(out: Path, arch: str, layer: str, item: Item) -> dict | None:
    """A "skipped" record when an earlier run left this image's summary and every file in it."""
    if isinstance(item, BadInput):
        return None
    summary = out / image_id(item) / f"{arch}@{layer}" / "summary.json"
    try:
        record = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    files = [record["grid"], *(f for c in record["classes"] for f in c["maps"].values())]
    if all(Path(f).is_file() for f in files):
        return {"image": str(item), "status": "skipped", "summary": str(summary)}
    return None


def _load(model: LoadedModel, item: Item | dict) -> Loaded:
    """Decode and crop one image, or turn its failure into an error record."""
    if isinstance(item, dict):
        return item
    if isinstance(item, BadInput):
        return {"image": item.path, "status": "error", "error": item.reason}
    try:
        return Path(item), model.preprocess.crop_image(load_image(item))
    except InputError as exc:
        return {"image": str(item), "status": "error", "error": str(exc)}


def _prefetch(model: LoadedModel, items: Sequence[Item | dict],
              batch_size: int) -> Iterator[list[Loaded]]:
    """Yield decoded batches, decoding the next one in a background thread meanwhile."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in [*batches, None]:
            ready = pending.result() if pending else None
            pending = pool.submit(lambda b: [_load(model, i) for i in b], batch) if batch else None
            if ready is not None:
                yield ready


def _write_image(model: LoadedModel, path: str | Path, crop: np.ndarray, result: Explanation,
                 i: int, out: Path) -> dict:
    """Write one image's per-map PNGs, grid and summary; return its record."""
    folder = out / image_id(path) / f"{model.arch}@{result.layer}"
    methods = list(result.maps)
    width = len(str(len(model.categories) - 1))
    classes, rows = [], []
    for k, class_id in enumerate(result.classes[i].tolist()):
        name, probability = model.categories[class_id], float(result.probabilities[i, class_id])
        pictures = [map_image(m, result.maps[m][i, k], crop) for m in methods]
        class_dir = folder / f"r{k + 1}-c{class_id:0{width}d}-{slug(name)}"
        files = {m: str(atomic_write(class_dir / f"{m}.png", png_bytes(p)))
                 for m, p in zip(methods, pictures)}
        classes.append({"rank": k + 1, "class_id": class_id, "name": name,
                        "probability": round(probability, 6), "maps": files})
        rows.append((f"{name}\np = {probability:.3f}", [crop, *pictures]))
    record = {"image": str(path), "status": "ok", "arch": model.arch, "weights": model.weights,
              "layer": result.layer, "input_size": list(crop.shape[:2]),
              "relu_gates": result.gates, "classes": classes,
              "grid": str(folder / "grid.png"), "summary": str(folder / "summary.json")}
    atomic_write(folder / "grid.png", png_bytes(grid_image(["input", *methods], rows)))
    atomic_write(folder / "summary.json", json_bytes(record))
    return record
