"""Model loading: architecture name → network, class names, preprocessing and target layers.

The name's prefix picks the source (``sources``): a torchvision name, ``timm/NAME``,
``hf/PATH_OR_ID`` or ``module:PACKAGE.MODULE:FACTORY``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .engine import evaluating, logits_of
from .errors import ArgumentError, unknown
from .layout import Layout, probe
from .preprocess import Preprocess, check_input, from_dict, read_changes, read_preprocess, sidecar
from .sources import Source, build, seeded
from .sources.checkpoint import (
    CHECKPOINT_SUFFIXES,
    file_sha256,
    is_checkpoint,
    load_checkpoint,
    read_checkpoint,
)
from .sources.torchvision import ARCHITECTURES, DETECTORS, SEGMENTERS, build_detector, build_segmenter

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_SUFFIXES",
    "DETECTORS",
    "SEGMENTERS",
    "LoadedModel",
    "file_sha256",
    "load_detector",
    "load_embedder",
    "load_model",
    "load_segmenter",
    "read_checkpoint",
    "read_labels",
]
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class LoadedModel:
    """A classifier ready to explain: network, class names, preprocessing and provenance."""

    arch: str
    module: nn.Module
    categories: list[str]
    preprocess: Preprocess
    weights: str
    weights_sha256: str | None = None  # a checkpoint's digest: same path, other file, other maps
    head: str = "classifier"           # or the embedding head that replaced it

    @property
    def folder_name(self) -> str:
        """``arch`` as one path component: torchvision names as they are; a name with a slash,
        colon or ``..`` (timm/…, hf/PATH, module:…) made safe, with a digest of the original so
        two names never share a folder."""
        safe = re.sub(r"[^A-Za-z0-9_-]+", "_", self.arch).strip("_") or "model"
        if safe == self.arch:
            return safe
        return f"{safe}-{hashlib.sha256(self.arch.encode()).hexdigest()[:8]}"

    def batch(self, crops: list) -> torch.Tensor:
        """Crops (as ``preprocess.model_pixels`` gives them) as one input batch on the model's
        device; to a GPU from pinned memory without blocking, so the copy is queued behind the
        work already sent and the CPU goes on."""
        x = torch.stack([self.preprocess.to_tensor(crop) for crop in crops])
        device = next(self.module.parameters()).device
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True)
        return x.to(device)

    def fingerprint(self) -> dict:
        """What about the model determines its maps and their labels, as plain JSON values."""
        names = hashlib.sha256("\n".join(self.categories).encode()).hexdigest()
        return {"arch": self.arch, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "head": self.head, "classes_sha256": names, "preprocess": self.preprocess.to_dict()}


def load_model(arch: str, weights: str = "DEFAULT", num_classes: int | None = None,
               labels: str | Path | None = None, unsafe_load: bool = False,
               device: str | torch.device = "cpu",
               preprocess: Mapping[str, object] | None = None) -> LoadedModel:
    """Build a classifier by name (see ``sources``) with DEFAULT/none/checkpoint weights (and
    torchvision's enum names).

    Preprocessing is the source's default (the weights' own ``transforms()``, timm's data
    config, the Hugging Face image processor); a checkpoint's own ``model.preprocess.json``
    beside it changes that, and ``preprocess`` (Preprocess field names to values) changes the
    result. A source without a default (``module:``) needs a complete one from either.
    """
    return _loaded(arch, build(arch, weights, num_classes, unsafe_load), weights, labels, device, preprocess)


def _loaded(arch: str, source: Source, weights: str, labels: str | Path | None, device: str | torch.device,
            preprocess: Mapping[str, object] | None) -> LoadedModel:
    """A built network in eval mode on ``device``, with its class names (``labels`` first, else
    the source's when they fit its outputs) and its preprocessing, checked against it."""
    module = source.module.eval().to(device)
    outputs = _output_size(module)
    names = source.categories if source.categories and len(source.categories) == outputs else None
    categories = read_labels(labels, outputs) if labels else names or [f"class {i}" for i in range(outputs)]
    own = _preprocessing(arch, source, weights, dict(preprocess or {}))
    check_input(module, own)
    return LoadedModel(arch, module, categories, own, source.weights, source.weights_sha256)


def _preprocessing(arch: str, source: Source, weights: str, changes: dict[str, object]) -> Preprocess:
    """The source's default, then a checkpoint's sidecar JSON, then ``changes``; without a
    default, the sidecar or the changes must give input_size, mean and std."""
    own = source.preprocess
    if is_checkpoint(weights) and sidecar(weights).is_file():
        own = read_preprocess(sidecar(weights), own)
    changes = {k: v for k, v in changes.items() if v is not None}
    if own is not None:
        return own.with_options(**changes)
    if not {"input_size", "mean", "std"} <= set(changes):
        raise ArgumentError("arch", arch, f"{source.missing}; give a preprocessing file, a "
                            "model.preprocess.json beside the checkpoint, or at least input_size, "
                            "mean and std")
    return from_dict(changes)


def load_embedder(arch: str, weights: str = "DEFAULT", embedding_dim: int | None = None,
                  unsafe_load: bool = False, device: str | torch.device = "cpu",
                  preprocess: Mapping[str, object] | None = None) -> LoadedModel:
    """A classifier used as an embedding network, its head (the last linear layer) replaced.

    With ``embedding_dim`` the head becomes a linear map to that many dimensions, and a
    checkpoint holds the whole metric-learning network, as its trainer saved it; without it
    the head becomes the identity and the penultimate features are the embedding.
    """
    if embedding_dim is None:
        model = load_model(arch, weights, unsafe_load=unsafe_load, preprocess=preprocess)
        _replace_head(model.module, lambda _old: nn.Identity())
    else:
        if not (is_checkpoint(weights) or weights.lower() == "none"):
            raise ArgumentError("embedding_dim", embedding_dim, "needs the trained embedding network's "
                                "checkpoint as weights, or weights 'none'")
        beside = sidecar(weights) if is_checkpoint(weights) else None
        own = read_changes(beside) if beside is not None and beside.is_file() else {}
        model = load_model(arch, "none", preprocess={**own, **(preprocess or {})})
        with seeded():
            _replace_head(model.module, lambda old: nn.Linear(old.in_features, embedding_dim))
        if weights.lower() != "none":
            model.weights = str(weights)
            model.weights_sha256 = load_checkpoint(model.module, weights, unsafe_load)
    model.module.eval().to(device)
    model.categories = []
    model.head = "identity" if embedding_dim is None else f"linear to {embedding_dim}"
    return model


def _replace_head(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Swap the network's last linear layer for ``make(old)``."""
    heads = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ArgumentError("arch", type(module).__name__, "has no linear head to turn into an embedding")
    parent, _, attr = heads[-1].rpartition(".")
    owner = find_layer(module, parent) if parent else module
    setattr(owner, attr, make(getattr(owner, attr)))


def _output_size(module: nn.Module) -> int:
    """Number of classes the head produces, read from its last linear or conv layer."""
    for layer in reversed(list(module.modules())):
        if isinstance(layer, nn.Linear):
            return layer.out_features
        if isinstance(layer, nn.Conv2d):
            return layer.out_channels
    raise ArgumentError("arch", type(module).__name__, "has no linear or convolutional head")


def read_labels(path: str | Path, outputs: int) -> list[str]:
    """Read one class name per line, checking the count against the model's head."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ArgumentError("labels", str(path), f"cannot read ({exc.strerror})") from exc
    if len(names) != outputs:
        raise ArgumentError("labels", str(path), f"{len(names)} names for a head of {outputs} classes")
    return names


def find_layer(module: nn.Module, name: str, argument: str = "layer") -> nn.Module:
    """Look a layer up by dotted name, refusing an empty name, and unknown names with the
    closest matches; errors name the caller's ``argument``."""
    layers = dict(module.named_modules())
    if not name:
        raise ArgumentError(argument, name, "an empty layer name; name a module as `gradcam layers` "
                                            "lists them")
    if name not in layers:
        raise unknown(argument, name, [n for n in layers if n], "layer")
    return layers[name]


def layer_layout(module: nn.Module, name: str, example: torch.Tensor, argument: str = "layer") -> Layout:
    """The layout of a layer's output for inputs shaped like ``example``, refusing a layer
    whose output has no spatial grid, or a 1x1 one, since every map there would be uniform."""
    find_layer(module, name, argument)
    probed = probe(module, example).get(name)
    hint = "; choose a layer listed by `gradcam layers`"
    if probed is None:
        raise ArgumentError(argument, name, f"it produced no tensor in the forward pass{hint}")
    shape, layout = probed
    if layout is None:
        raise ArgumentError(argument, name, f"its output, of shape {shape}, has no spatial grid that "
                                            f"follows the input's size{hint}")
    if layout.grid == (1, 1):
        raise ArgumentError(argument, name, f"its output, of shape {shape}, has a 1x1 grid at this "
                                            f"input size, so every map would be uniform{hint}")
    return layout


def blank_input(module: nn.Module, preprocess: Preprocess) -> torch.Tensor:
    """A batch of one zero image of the model's input size and channels on the module's
    device, for probe forwards."""
    return torch.zeros(1, preprocess.channels, *preprocess.input_size,
                       device=next(module.parameters()).device)


def _grids(module: nn.Module, preprocess: Preprocess) -> list[tuple[str, tuple[int, ...], Layout]]:
    """Layers (pools aside) whose output has a grid of more than one position at the model's
    input size, with their output shapes and layouts, in the order they finish."""
    modules, probed = dict(module.named_modules()), probe(module, blank_input(module, preprocess))
    return [(name, shape, layout) for name, (shape, layout) in probed.items()
            if name and layout and layout.grid != (1, 1) and not isinstance(modules[name], _POOLS)]


def spatial_layers(module: nn.Module, preprocess: Preprocess) -> list[tuple[str, tuple[int, ...]]]:
    """List layers with a spatial output and their output shapes, in the order they finish."""
    return [(name, shape) for name, shape, _ in _grids(module, preprocess)]


def stage_layers(arch: str, module: nn.Module, preprocess: Preprocess) -> list[str]:
    """The network's stages: at the shallowest nesting depth whose blocks span at least three
    grid sizes, the last block to finish at each size (ResNet: layer1..layer4; Swin:
    features.1, .3, .5, .7). Without such blocks (VGG), the same over layers of any kind. For
    a token model (ViT, DeiT), whose grid never changes, the default layer's counterpart in the
    blocks ending each quarter (the same name but for the block's number)."""
    grids = _grids(module, preprocess)
    if _token_model(module, grids):
        default = _token_default(module, preprocess, grids)
        blocks = _siblings(default, [name for name, _, _ in grids])
        picks = [blocks[max(0, len(blocks) * q // 4 - 1)] for q in (1, 2, 3, 4)]
        return list(dict.fromkeys(picks))
    layers = [(name, layout.grid) for name, _, layout in grids]
    modules = dict(module.named_modules())
    deepest = max(name.count(".") for name, _ in layers)
    for blocks_only in (True, False):
        for depth in range(deepest + 1):
            last = {grid: name for name, grid in layers if name.count(".") == depth
                    and (not blocks_only or any(True for _ in modules[name].children()))}
            if len(last) >= 3:
                return list(last.values())
    return list({grid: name for name, grid in layers}.values())


def default_layer(arch: str, module: nn.Module, preprocess: Preprocess) -> str:
    """The last block (a module with children) with a spatial output, or a LayerNorm after it
    on a grid (Swin's ``norm``). A LayerNorm ignores any scaling of its input at each position,
    so the block that feeds it alone has Σ_k G·A = 0 everywhere: HiResCAM there is rounding
    noise. For a token model (ViT, DeiT, register-token ViTs), the last LayerNorm whose patch
    tokens still get a gradient (the last block's first one when a class token is classified)."""
    grids = _grids(module, preprocess)
    if not grids:
        raise ArgumentError("arch", arch, "has no layer with a spatial output; name a layer")
    if _token_model(module, grids):
        return _token_default(module, preprocess, grids)
    return _blocks(module, grids)[-1]


def _blocks(module: nn.Module, grids: list[tuple[str, tuple[int, ...], Layout]]) -> list[str]:
    """Grid layers that are blocks (modules with children) or LayerNorms; all of them if none is."""
    modules = dict(module.named_modules())
    layers = [name for name, _, _ in grids]
    return [name for name in layers if isinstance(modules[name], nn.LayerNorm)
            or any(True for _ in modules[name].children())] or layers


def _token_model(module: nn.Module, grids: list[tuple[str, tuple[int, ...], Layout]]) -> bool:
    """Whether the last block on a grid holds tokens (NxTxC), as in a vision transformer."""
    last = _blocks(module, grids)[-1]
    return next(layout for name, _, layout in grids if name == last).kind == "tokens"


def _token_default(module: nn.Module, preprocess: Preprocess,
                   grids: list[tuple[str, tuple[int, ...], Layout]]) -> str:
    """The last LayerNorm (else the last layer) of tokens whose patch positions get a gradient."""
    reaching = _reaching_patches(module, preprocess, grids)
    modules = dict(module.named_modules())
    norms = [name for name in reaching if isinstance(modules[name], nn.LayerNorm)]
    if not reaching:
        raise ArgumentError("arch", type(module).__name__, "no token layer gets a gradient at its patch "
                            "positions; name a layer")
    return (norms or reaching)[-1]


def _reaching_patches(module: nn.Module, preprocess: Preprocess,
                      grids: list[tuple[str, tuple[int, ...], Layout]]) -> list[str]:
    """Token layers whose patch tokens (prefix tokens aside) get a gradient, by one forward and
    backward pass on a seeded random image: after the last block's attention only the class
    token reaches a class-token head, so later layers have none there. The score is a random
    projection of the head's input (of the logits when there is no linear head), so a head
    started at zero (torchvision's ViT) or a LayerNorm's invariances cannot hide a path."""
    layouts = {name: layout for name, _, layout in grids if layout.kind == "tokens"}
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m: nn.Module, _i: object, out: object) -> object:
            kept[name] = out
            return out.clone()  # an in-place op downstream must not change what we keep
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in module.named_modules() if n in layouts]
    if linears:
        handles.append(linears[-1].register_forward_pre_hook(lambda _m, args: kept.update(head=args[0])))
    try:
        with seeded(), evaluating(module), torch.enable_grad():
            logits = logits_of(module(torch.randn_like(blank_input(module, preprocess))))
            head = kept.get("head", logits).float()
            score = (head * torch.randn_like(head)).sum()
            names = [n for n in layouts if n in kept]
            grads = torch.autograd.grad(score, [kept[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [n for n, g in zip(names, grads, strict=True)
            if g is not None and bool(g[:, layouts[n].prefix:].abs().amax() > 0)]


def _siblings(name: str, layers: list[str]) -> list[str]:
    """The layers named like ``name`` but for one number (the same layer in every block), in
    the order given; the number that varies is the one matching the most layers."""
    best = [name]
    for number in re.finditer(r"\d+", name):
        pattern = re.escape(name[:number.start()]) + r"\d+" + re.escape(name[number.end():])
        found = [layer for layer in layers if re.fullmatch(pattern, layer)]
        best = found if len(found) > len(best) else best
    return best


def load_segmenter(arch: str, weights: str = "DEFAULT", num_classes: int | None = None,
                   labels: str | Path | None = None, unsafe_load: bool = False,
                   device: str | torch.device = "cpu",
                   preprocess: Mapping[str, object] | None = None) -> LoadedModel:
    """A torchvision segmentation network by name (``SEGMENTERS``), loaded as ``load_model``
    loads a classifier; its forward returns the per-pixel class logits ``out`` (NxCxHxW)."""
    return _loaded(arch, build_segmenter(arch, weights, num_classes, unsafe_load), weights, labels, device,
                   preprocess)


def load_detector(arch: str, weights: str = "DEFAULT", num_classes: int | None = None,
                  labels: str | Path | None = None, unsafe_load: bool = False,
                  device: str | torch.device = "cpu") -> LoadedModel:
    """A torchvision detector by name (``DETECTORS``) in eval mode on ``device``; it takes a
    list of 3xHxW [0, 1] images and returns per image a dict of ``boxes``, ``labels`` and
    ``scores``. ``preprocess`` describes its own transform (the shorter side it resizes to,
    its mean and std) and is never applied by gradcam."""
    source = build_detector(arch, weights, num_classes, unsafe_load)
    module = source.module.eval().to(device)
    classes = num_classes or len(source.categories)
    names = source.categories if len(source.categories) == classes else [f"class {i}" for i in range(classes)]
    categories = read_labels(labels, classes) if labels else names
    transform = module.transform
    side = transform.fixed_size[0] if transform.fixed_size else transform.min_size[-1]  # eval: the last
    own = Preprocess((side, side), tuple(transform.image_mean), tuple(transform.image_std), resize="none",
                     crop="none")
    return LoadedModel(arch, module, categories, own, source.weights, source.weights_sha256, head="detector")
