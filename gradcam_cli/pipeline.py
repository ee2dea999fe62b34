"""`classify` as a library call: images in, maps explained in batches, files and records out.

Output layout, one folder per image and model/layer (names sort by rank)::

    <output-dir>/<image-stem>-<hash8>/<arch>@<layer>/
        grid.png                      rows: classes; columns: crop and maps
        summary.json                  the record yielded for this image
        r1-c0285-egyptian_cat/        one folder per explained class, by rank
            vanilla.png guided.png deconv.png gradcam.png guided-gradcam.png
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .explain import Explanation, explain
from .io import atomic_write, image_id, json_bytes, load_image, png_bytes, prepare_output_dir, slug
from .methods import METHODS
from .models import LoadedModel, default_layer, find_layer
from .render import grid_png, map_image


def resolve_layer(model: LoadedModel, layer: str | None) -> str:
    """The layer to explain: the user's (checked) or the architecture's default."""
    name = layer or default_layer(model.arch, model.module, model.preprocess.crop)
    find_layer(model.module, name)
    return name


def classify(model: LoadedModel, images: Sequence[str | Path], output_dir: str | Path = "results",
             layer: str | None = None, topk: int = 3, class_ids: Sequence[int] = (),
             methods: Sequence[str] = METHODS, batch_size: int = 8) -> Iterator[dict]:
    """Explain each image's top-k (or chosen) classes; yield one record per image, in order.

    A record has ``status`` "ok" (with classes, probabilities and files written) or "error"
    (with the reason); one bad image never stops the others.
    """
    out = prepare_output_dir(Path(output_dir))
    layer = resolve_layer(model, layer)
    device = next(model.module.parameters()).device
    for start in range(0, len(images), batch_size):
        loaded: list[tuple[str | Path, Image.Image] | dict] = []
        for path in images[start:start + batch_size]:
            try:
                loaded.append((path, model.preprocess.crop_image(load_image(path))))
            except InputError as exc:
                loaded.append({"image": str(path), "status": "error", "error": str(exc)})
        good = [item for item in loaded if isinstance(item, tuple)]
        if good:
            batch = torch.stack([model.preprocess.to_tensor(crop) for _, crop in good]).to(device)
            result = explain(model.module, batch, layer, topk, class_ids, methods)
        done = iter(range(len(good)))
        for item in loaded:
            if isinstance(item, dict):
                yield item
            else:
                yield _write_image(model, item[0], np.asarray(item[1]), result, next(done), out)


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
    atomic_write(folder / "grid.png", grid_png(["input", *methods], rows))
    atomic_write(folder / "summary.json", json_bytes(record))
    return record
