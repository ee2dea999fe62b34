"""Hugging Face image classifiers (``hf/PATH_OR_ID``): ``AutoModelForImageClassification`` from a
``save_pretrained`` folder or the hub (never with remote code), preprocessing from its
``AutoImageProcessor``, class names from ``id2label``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..errors import ArgumentError
from ..preprocess import Preprocess
from . import Source, needs, no_pretrained_with_num_classes, seeded
from .checkpoint import file_sha256, is_checkpoint, load_checkpoint

RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's numbers, as processors store them


def build(name: str, weights: str, num_classes: int | None, unsafe_load: bool) -> Source:
    """Load the model saved at ``name`` (a folder or a hub id) with its own (``DEFAULT``), random
    (``none``) or checkpoint weights."""
    arch = f"hf/{name}"
    transformers = needs("transformers", "hf", arch)
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ArgumentError("arch", arch, "this folder holds no model saved by save_pretrained (no "
                                          "config.json)")
    config = _read(lambda: transformers.AutoConfig.from_pretrained(name, trust_remote_code=False), arch)
    digest = None
    if weights == "DEFAULT":
        no_pretrained_with_num_classes(num_classes)
        module = _read(lambda: transformers.AutoModelForImageClassification.from_pretrained(
            name, trust_remote_code=False), arch)
        digest = _saved_sha256(Path(name)) if Path(name).is_dir() else getattr(config, "_commit_hash", None)
    elif is_checkpoint(weights) or weights.lower() == "none":
        if num_classes is not None:
            config.num_labels = num_classes
        with seeded():
            module = _read(lambda: transformers.AutoModelForImageClassification.from_config(
                config, trust_remote_code=False), arch)
        if weights.lower() != "none":
            digest = load_checkpoint(module, weights, unsafe_load)
    else:
        raise ArgumentError("weights", weights, f"for {arch}: DEFAULT (the saved weights), none or a "
                                                "checkpoint path")
    names = [str(module.config.id2label[i]) for i in range(module.config.num_labels)]
    preprocess, missing = _preprocess(transformers, name)
    return Source(module, names, preprocess, weights, digest, missing)


def _saved_sha256(folder: Path) -> str:
    """One SHA-256 over a saved folder's config and weight files, so that a folder saved again
    with other weights is another model (for ``skip_existing``)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def _read(load: object, arch: str) -> object:
    """Call a transformers loader, its failures turned into one line saying what to do."""
    try:
        return load()
    except ValueError as exc:  # a config of a type that is no image classifier, or none at all
        raise ArgumentError("arch", arch, f"not a Hugging Face image-classification model "
                                          f"({str(exc).splitlines()[0]})") from exc
    except OSError as exc:
        if Path(arch[3:]).is_dir():
            raise ArgumentError("arch", arch, f"this folder holds no model saved by save_pretrained "
                                              f"({str(exc).splitlines()[0]})") from exc
        raise ArgumentError("arch", arch, "not a folder, and not in the Hugging Face cache nor reachable "
                                          "on the hub (offline?); save the model with save_pretrained "
                                          "into a folder and give hf/FOLDER, or set HF_HOME to the "
                                          "cache that holds it") from exc


def _preprocess(transformers: object, name: str) -> tuple[Preprocess | None, str]:
    """The image processor's steps as a Preprocess, or None and why when it has none or does
    something a Preprocess cannot express."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError):
        return None, "has no image processor (preprocessor_config.json)"
    get = partial(getattr, processor)
    resample = RESAMPLE.get(int(get("resample", 2)))
    rescaled = not get("do_rescale", True) or abs(float(get("rescale_factor", 1 / 255)) * 255 - 1) > 1e-6
    normalise = get("do_normalize", True)
    geometry = _geometry(type(processor).__name__, get) if get("do_resize", True) else None
    if geometry is None or resample is None or rescaled:
        return None, (f"its image processor ({type(processor).__name__}: {processor.to_dict()}) "
                      "does something gradcam's preprocessing does not reproduce")
    return Preprocess(mean=tuple(get("image_mean", None)) if normalise else (0.0,) * 3,
                      std=tuple(get("image_std", None)) if normalise else (1.0,) * 3,
                      interpolation=resample, **geometry), ""


def _geometry(kind: str, get: Callable[[str, object], object]) -> dict | None:
    """Input size, resize and crop from the processor's size, crop_size and crop_pct."""
    size, crop = dict(get("size", None) or {}), get("crop_size", None)
    crop = (crop["height"], crop["width"]) if crop and get("do_center_crop", False) else None
    if "height" in size and "width" in size:
        squash = (size["height"], size["width"])
        return {"input_size": squash, "resize": "squash"} if crop in (None, squash) else None
    edge = size.get("shortest_edge")
    if edge is None or set(size) != {"shortest_edge"}:
        return None
    if kind.startswith("ConvNext") and get("crop_pct", None) is not None:  # ConvNeXt's own rule
        if edge >= 384:
            return {"input_size": (edge, edge), "resize": "squash"}
        return {"input_size": (edge, edge), "resize_to": int(edge / get("crop_pct", None))}
    if crop is not None and get("crop_pct", None) is None:
        return {"input_size": crop, "resize_to": edge}
    return None
