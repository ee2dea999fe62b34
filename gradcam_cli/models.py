"""Model loading: architecture name → network, class names, preprocessing and target layers."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from .engine import evaluating
from .errors import UsageError, unknown
from .layout import grid_size, is_spatial

ARCHITECTURES: tuple[str, ...] = tuple(sorted(list_models(module=torchvision.models)))
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Preprocess:
    """Resize, centre-crop and normalisation, as torchvision's weights define them."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: TF.InterpolationMode

    def crop_image(self, image: Image.Image, nearest: bool = False) -> Image.Image:
        """Return the exact crop the model sees, for the overlays to be drawn on; ``nearest``
        resizes an object mask with the same geometry, keeping it binary."""
        how = TF.InterpolationMode.NEAREST if nearest else self.interpolation
        return TF.center_crop(TF.resize(image, [self.resize], interpolation=how, antialias=True),
                              [self.crop])

    def scale(self, size: tuple[int, int]) -> float:
        """How many crop pixels one pixel of an image of ``size`` (width, height) becomes."""
        return self.resize / min(size)

    def to_tensor(self, crop: Image.Image) -> torch.Tensor:
        """Normalise a crop into the 3xHxW float tensor the model takes."""
        return TF.normalize(TF.pil_to_tensor(crop).float().div_(255), self.mean, self.std)


@dataclass
class LoadedModel:
    """A classifier ready to explain: network, class names, preprocessing and provenance."""

    arch: str
    module: nn.Module
    categories: list[str]
    preprocess: Preprocess
    weights: str


def load_model(arch: str, weights: str = "DEFAULT", num_classes: int | None = None,
               labels: str | Path | None = None, unsafe_load: bool = False,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Build a torchvision classifier by name with DEFAULT/enum/none/checkpoint weights."""
    if arch not in ARCHITECTURES:
        raise unknown("arch", arch, ARCHITECTURES, "architecture")
    enum = get_model_weights(arch)
    if _is_checkpoint(weights):
        module = _build(arch, num_classes or len(enum.DEFAULT.meta["categories"]))
        _load_state(module, read_checkpoint(Path(weights), unsafe_load), weights)
        source = str(weights)
    elif weights.lower() == "none":
        module = _build(arch, num_classes or len(enum.DEFAULT.meta["categories"]))
        source = "none"
    else:
        if weights not in enum.__members__:
            raise unknown("weights", weights, [*enum.__members__, "none"], f"weights for {arch}")
        if num_classes is not None:
            raise UsageError("--num-classes only applies to --weights none or a checkpoint")
        module = _download(arch, enum[weights])
        source = enum[weights].name
    module.eval().to(device)
    outputs = _output_size(module, enum.DEFAULT.meta["categories"])
    categories = read_labels(labels, outputs) if labels else _default_categories(enum, outputs)
    return LoadedModel(arch, module, categories, _preprocess(enum.DEFAULT, module), source)


def load_embedder(arch: str, weights: str = "DEFAULT", embedding_dim: int | None = None,
                  unsafe_load: bool = False, device: str | torch.device = "cpu") -> LoadedModel:
    """A classifier used as an embedding network, its head (the last linear layer) replaced.

    With ``embedding_dim`` the head becomes a linear map to that many dimensions, and a
    checkpoint holds the whole metric-learning network, as its trainer saved it; without it
    the head becomes the identity and the penultimate features are the embedding.
    """
    if embedding_dim is None:
        model = load_model(arch, weights, unsafe_load=unsafe_load)
        _replace_head(model.module, lambda _old: nn.Identity())
    else:
        if not (_is_checkpoint(weights) or weights.lower() == "none"):
            raise UsageError("--embedding-dim needs --weights CHECKPOINT (the trained embedding "
                             "network) or --weights none")
        model = load_model(arch, "none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _replace_head(model.module, lambda old: nn.Linear(old.in_features, embedding_dim))
        if weights.lower() != "none":
            _load_state(model.module, read_checkpoint(Path(weights), unsafe_load), weights)
            model.weights = str(weights)
    model.module.eval().to(device)
    model.categories = []
    return model


def _replace_head(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Swap the network's last linear layer for ``make(old)``."""
    heads = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise UsageError("this architecture has no linear head to turn into an embedding")
    parent, _, attr = heads[-1].rpartition(".")
    owner = find_layer(module, parent) if parent else module
    setattr(owner, attr, make(getattr(owner, attr)))


def _is_checkpoint(weights: str) -> bool:
    """Tell a checkpoint path from a weights enum name."""
    return Path(weights).suffix in CHECKPOINT_SUFFIXES or "/" in weights or Path(weights).is_file()


def _build(arch: str, num_classes: int) -> nn.Module:
    """Build a randomly initialised network; deterministic so that runs repeat exactly.

    torchvision starts some heads at zero (ViT), which would make every logit constant and
    every map blank; those are drawn at random instead (a checkpoint overwrites them anyway).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        extra = {"init_weights": True} if arch in ("googlenet", "inception_v3") else {}
        module = get_model(arch, weights=None, num_classes=num_classes, **extra)
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and not layer.weight.any():
                nn.init.trunc_normal_(layer.weight, std=0.02)
        return module


def _download(arch: str, weights: torchvision.models.WeightsEnum) -> nn.Module:
    """Build with pretrained weights, turning a failed download into instructions."""
    try:
        return get_model(arch, weights=weights)
    except OSError as exc:  # URLError, socket and HTTP errors are all OSErrors
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise UsageError(
            f"cannot download {arch} weights {weights.name} ({exc}); offline? pass --weights PATH "
            f"to a checkpoint, put {weights.url} at {cache} (TORCH_HOME sets the cache), "
            "or use --weights none for random weights") from exc


def read_checkpoint(path: Path, unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file, refusing pickled code by default."""
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise UsageError("reading .safetensors needs: pip install safetensors") from exc
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"--weights {path}: refused, the file holds Python objects that could run code; "
            "if you trust it, add --unsafe-load") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise UsageError(f"--weights {path}: not a readable checkpoint ({exc})") from exc
    while isinstance(state, dict) and any(k in state for k in ("state_dict", "model")):
        state = state.get("state_dict", state.get("model"))
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise UsageError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load a state dict, listing every missing, unexpected and mis-shaped key on failure."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UsageError(f"--weights {path} does not fit this architecture "
                         f"(--num-classes?): {shown}")
    module.load_state_dict(state)


def _output_size(module: nn.Module, categories: list[str]) -> int:
    """Number of classes the head produces, read from its last linear or conv layer."""
    for layer in reversed(list(module.modules())):
        if isinstance(layer, nn.Linear):
            return layer.out_features
        if isinstance(layer, nn.Conv2d):
            return layer.out_channels
    return len(categories)


def _default_categories(enum: type, outputs: int) -> list[str]:
    """ImageNet names from the weights metadata when the head is ImageNet's, else numbers."""
    names = enum.DEFAULT.meta["categories"]
    return list(names) if len(names) == outputs else [f"class {i}" for i in range(outputs)]


def read_labels(path: str | Path, outputs: int) -> list[str]:
    """Read one class name per line, checking the count against the model's head."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"--labels {path}: cannot read ({exc.strerror})") from exc
    if len(names) != outputs:
        raise UsageError(f"--labels {path}: {len(names)} names for a head of {outputs} classes")
    return names


def _preprocess(weights: torchvision.models.WeightsEnum, module: nn.Module) -> Preprocess:
    """Preprocessing from the weights' transforms, sized to the model (ViT fixes its input)."""
    t = weights.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    size = getattr(module, "image_size", crop)
    if size != crop:
        crop, resize = size, round(size * resize / crop)
    return Preprocess(resize, crop, tuple(t.mean), tuple(t.std), t.interpolation)


def find_layer(module: nn.Module, name: str) -> nn.Module:
    """Look a layer up by dotted name, refusing unknown names with the closest matches."""
    layers = dict(module.named_modules())
    if not name or name not in layers:
        raise unknown("layer", name, [n for n in layers if n])
    return layers[name]


def spatial_layers(module: nn.Module, size: int) -> list[tuple[str, tuple[int, ...]]]:
    """List layers with a spatial output, in the order they finish, by one probe forward."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and name not in shapes and is_spatial(out.shape):
                shapes[name] = tuple(out.shape)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in module.named_modules()
               if n and not isinstance(m, _POOLS)]
    device = next(module.parameters()).device
    try:
        with evaluating(module), torch.no_grad():
            module(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    return list(shapes.items())


def stage_layers(arch: str, module: nn.Module, size: int) -> list[str]:
    """The network's stages: at the shallowest nesting depth whose blocks span at least three
    grid sizes, the last block to finish at each size (ResNet: layer1..layer4; Swin:
    features.1, .3, .5, .7). Without such blocks (VGG), the same over layers of any kind; for
    ViT, whose grid never changes, the first LayerNorm of the blocks ending each quarter."""
    if arch.startswith("vit_"):
        depth = len(module.encoder.layers)
        return [f"encoder.layers.encoder_layer_{depth * q // 4 - 1}.ln_1" for q in (1, 2, 3, 4)]
    layers = spatial_layers(module, size)
    modules = dict(module.named_modules())
    deepest = max(name.count(".") for name, _ in layers)
    for blocks_only in (True, False):
        for depth in range(deepest + 1):
            last = {grid_size(shape): name for name, shape in layers if name.count(".") == depth
                    and (not blocks_only or any(True for _ in modules[name].children()))}
            if len(last) >= 3:
                return list(last.values())
    return list({grid_size(shape): name for name, shape in layers}.values())


def default_layer(arch: str, module: nn.Module, size: int) -> str:
    """The last block (a module with children) with a spatial output; for ViT, the last
    encoder block's first LayerNorm, since its patch tokens are the last to get a gradient."""
    if arch.startswith("vit_"):
        return f"encoder.layers.encoder_layer_{len(module.encoder.layers) - 1}.ln_1"
    layers = [name for name, _ in spatial_layers(module, size)]
    modules = dict(module.named_modules())
    blocks = [name for name in layers if any(True for _ in modules[name].children())]
    if not layers:
        raise UsageError(f"{arch} has no layer with a spatial output; pass --layer")
    return (blocks or layers)[-1]
