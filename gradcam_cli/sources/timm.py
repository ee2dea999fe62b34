"""timm models (``timm/NAME``): ``timm.create_model(NAME, pretrained=False, num_classes=...)``;
preprocessing from timm's data config, class names from its ImageNet metadata."""

from __future__ import annotations

import math

from torch import nn

from ..errors import ArgumentError, unknown
from ..preprocess import Preprocess
from . import Source, needs, no_pretrained_with_num_classes, seeded
from .checkpoint import is_checkpoint, load_checkpoint


def build(name: str, weights: str, num_classes: int | None, unsafe_load: bool) -> Source:
    """Build ``name`` with random (``none``), pretrained (``DEFAULT``) or checkpoint weights."""
    timm = needs("timm", "timm", f"timm/{name}")
    if not timm.is_model(name):
        raise unknown("arch", f"timm/{name}", [f"timm/{n}" for n in timm.list_models()], "timm model")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    digest = None
    if is_checkpoint(weights) or weights.lower() == "none":
        with seeded():
            module = timm.create_model(name, pretrained=False, **extra)
        if weights.lower() != "none":
            digest = load_checkpoint(module, weights, unsafe_load)
    elif weights == "DEFAULT":
        no_pretrained_with_num_classes(num_classes)
        module = _download(timm, name)
    else:
        raise unknown("weights", weights, ["DEFAULT", "none"], f"weights for timm/{name} (or a "
                      "checkpoint path; a pretrained tag goes in the name, as timm/resnet18.a1_in1k)")
    preprocess, missing = _preprocess(timm, module)
    if weights == "DEFAULT":  # the tag it resolves to, which a timm release may change
        cfg = module.pretrained_cfg
        weights = f"DEFAULT ({cfg.get('architecture', name)}.{cfg.get('tag')})"
    return Source(module, _categories(timm, module), preprocess, weights, digest, missing)


def _download(timm: object, name: str) -> nn.Module:
    """timm's pretrained weights, a failed download turned into instructions."""
    try:
        return timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError) as exc:  # no network, no cached file, no weights for the name
        raise ArgumentError(
            "weights", "DEFAULT", f"cannot get timm/{name}'s pretrained weights ({exc}); offline? give "
            "a checkpoint file as the weights, put the weights in the Hugging Face cache "
            "(HF_HOME sets it) or TORCH_HOME's hub/checkpoints, or use the weights 'none' for random "
            "weights") from exc


def _categories(timm: object, module: nn.Module) -> list[str] | None:
    """The ImageNet class descriptions of the model's label set, if timm knows it."""
    subset = timm.data.infer_imagenet_subset(module)
    return list(timm.data.ImageNetInfo(subset).label_descriptions()) if subset else None


def _preprocess(timm: object, module: nn.Module) -> tuple[Preprocess | None, str]:
    """timm's eval transform as a Preprocess: shorter side to floor(size / crop_pct), then a centre
    crop ("center"), or a plain resize ("squash" with crop_pct 1); other modes it cannot express."""
    config = timm.data.resolve_model_data_config(module)
    channels, height, width = config["input_size"]
    mode, pct = config.get("crop_mode") or "center", config.get("crop_pct") or 0.875
    common = {"mean": config["mean"], "std": config["std"], "channels": channels,
              "interpolation": config["interpolation"]}
    if mode == "center" and height == width:
        return Preprocess((height, width), resize_to=math.floor(height / pct), **common), ""
    if mode == "squash" and pct == 1:
        return Preprocess((height, width), resize="squash", **common), ""
    return None, (f"timm's preprocessing for this model (crop_mode {mode}, crop_pct {pct}, input "
                  f"{height}x{width}) is not one gradcam reproduces")
