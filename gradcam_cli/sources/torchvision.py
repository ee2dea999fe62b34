"""torchvision classifiers by name, with DEFAULT, enum, none (random) or checkpoint weights; class
names and preprocessing from the chosen weights' own metadata and ``transforms()``."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from ..errors import ArgumentError, unknown
from ..preprocess import Preprocess
from . import Source, no_pretrained_with_num_classes, seeded
from .checkpoint import file_sha256, is_checkpoint, load_checkpoint, load_state, read_checkpoint

ARCHITECTURES: tuple[str, ...] = tuple(sorted(list_models(module=torchvision.models)))


def build(arch: str, weights: str, num_classes: int | None, unsafe_load: bool) -> Source:
    """Build a torchvision classifier; random weights and checkpoints take the DEFAULT weights'
    names and preprocessing (resnet50's V1 weights resize to 256, V2 to 232)."""
    if arch not in ARCHITECTURES:
        raise unknown("arch", arch, ARCHITECTURES, "architecture")
    enum = get_model_weights(arch)
    chosen, digest = enum.DEFAULT, None
    if is_checkpoint(weights):
        module = random_network(arch, num_classes or len(enum.DEFAULT.meta["categories"]))
        source, digest = str(weights), load_checkpoint(module, weights, unsafe_load)
    elif weights.lower() == "none":
        module = random_network(arch, num_classes or len(enum.DEFAULT.meta["categories"]))
        source = "none"
    else:
        chosen = named_weights(arch, weights, num_classes)
        module, source = download(arch, chosen), chosen.name
    names = chosen.meta["categories"] or None  # feature-only weights (vgg16's) have none
    return Source(module, names and list(names), _preprocess(chosen, module), source, digest)


def named_weights(arch: str, weights: str, num_classes: int | None) -> torchvision.models.WeightsEnum:
    """The weights enum member ``weights`` of ``arch`` (a pretrained head fixes the classes, so
    ``num_classes`` must not be given)."""
    enum = get_model_weights(arch)
    if weights not in enum.__members__:
        raise unknown("weights", weights, [*enum.__members__, "none"], f"weights for {arch}")
    no_pretrained_with_num_classes(num_classes)
    return enum[weights]


def random_network(arch: str, num_classes: int) -> nn.Module:
    """Build a randomly initialised network; deterministic so that runs repeat exactly.

    torchvision starts some heads at zero (ViT), which would make every logit constant and
    every map blank; those are drawn at random instead (a checkpoint overwrites them anyway).
    """
    with seeded():
        extra = {"init_weights": True} if arch in ("googlenet", "inception_v3") else {}
        module = get_model(arch, weights=None, num_classes=num_classes, **extra)
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and not layer.weight.any():
                nn.init.trunc_normal_(layer.weight, std=0.02)
        return module


def download(arch: str, weights: torchvision.models.WeightsEnum) -> nn.Module:
    """Build with pretrained weights, turning a failed download into instructions."""
    try:
        return get_model(arch, weights=weights)
    except OSError as exc:  # URLError, socket and HTTP errors are all OSErrors
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise ArgumentError(
            "weights", weights.name, f"cannot download {arch}'s weights ({exc}); offline? give a "
            f"checkpoint file as the weights, put {weights.url} at {cache} (TORCH_HOME sets the "
            "cache), or use the weights 'none' for random weights") from exc


def _preprocess(weights: torchvision.models.WeightsEnum, module: nn.Module) -> Preprocess:
    """Preprocessing from the weights' transforms, sized to the model (ViT fixes its input)."""
    t = weights.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    size = getattr(module, "image_size", crop)
    if size != crop:
        crop, resize = size, round(size * resize / crop)
    return Preprocess((crop, crop), tuple(t.mean), tuple(t.std), resize_to=resize,
                      interpolation=t.interpolation.value)


SEGMENTERS: tuple[str, ...] = tuple(sorted(list_models(module=torchvision.models.segmentation)))


def build_segmenter(arch: str, weights: str, num_classes: int | None, unsafe_load: bool) -> Source:
    """Build a torchvision segmentation network (FCN, DeepLabV3, LR-ASPP) as ``build`` builds a
    classifier; its forward returns only the per-pixel class logits ``out`` and its auxiliary
    head (``aux``, a training aid) is removed, since it is never explained."""
    if arch not in SEGMENTERS:
        raise unknown("arch", arch, SEGMENTERS, "segmentation architecture")
    enum = get_model_weights(arch)
    chosen, digest = enum.DEFAULT, None
    classes = num_classes or len(enum.DEFAULT.meta["categories"])
    if is_checkpoint(weights):
        state = read_checkpoint(Path(weights), unsafe_load)
        module = random_segmenter(arch, classes, any(k.startswith("aux_classifier.") for k in state))
        load_state(module, state, weights)
        source, digest = str(weights), file_sha256(Path(weights))
    elif weights.lower() == "none":
        module, source = random_segmenter(arch, classes), "none"
    else:
        chosen = named_weights(arch, weights, num_classes)
        module, source = download(arch, chosen), chosen.name
    if getattr(module, "aux_classifier", None) is not None:
        module.aux_classifier = None
    module.register_forward_hook(_out_only)
    return Source(module, list(chosen.meta["categories"]), _segment_preprocess(chosen), source, digest)


def random_segmenter(arch: str, num_classes: int, aux: bool = False) -> nn.Module:
    """A randomly initialised segmentation network (its backbone random too: nothing is
    downloaded), from a fixed seed; ``aux``: with the auxiliary head a checkpoint may hold
    (LR-ASPP has none)."""
    with seeded():
        extra = {"aux_loss": True} if aux and not arch.startswith("lraspp") else {}
        return get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes, **extra)


def _out_only(_module: nn.Module, _inputs: object, output: dict) -> torch.Tensor:
    """A forward hook: torchvision's segmentation output {"out": …, "aux": …} -> ``out``."""
    return output["out"]


def _segment_preprocess(weights: torchvision.models.WeightsEnum) -> Preprocess:
    """The weights' transforms (shorter side to 520, mean, std) with a square centre crop of
    that size, so that images of any shape batch together."""
    t = weights.transforms()
    size = t.resize_size[0]
    return Preprocess((size, size), tuple(t.mean), tuple(t.std), resize_to=size,
                      interpolation=t.interpolation.value)


DETECTORS: tuple[str, ...] = tuple(sorted(list_models(module=torchvision.models.detection)))


def build_detector(arch: str, weights: str, num_classes: int | None, unsafe_load: bool) -> Source:
    """Build a torchvision detector (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite)
    as ``build`` builds a classifier. Its own transform resizes and normalises a [0, 1] image
    and maps the boxes back to the image's pixels, so ``Source.preprocess`` is None."""
    if arch not in DETECTORS:
        raise unknown("arch", arch, DETECTORS, "detection architecture")
    chosen, digest = get_model_weights(arch).DEFAULT, None
    classes = num_classes or len(chosen.meta["categories"])
    if is_checkpoint(weights):
        module = random_detector(arch, classes)
        source, digest = str(weights), load_checkpoint(module, weights, unsafe_load)
    elif weights.lower() == "none":
        module, source = random_detector(arch, classes), "none"
    else:
        chosen = named_weights(arch, weights, num_classes)
        module, source = download(arch, chosen), chosen.name
    return Source(module, list(chosen.meta["categories"]), None, source, digest)


def random_detector(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised detector, its backbone random too (nothing is downloaded), from a
    fixed seed."""
    with seeded():
        return get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes)
