"""Model loading: architecture name → network, class names, preprocessing and target layers."""

from __future__ import annotations

import hashlib
import pickle
import pickletools
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from .errors import ArgumentError, unknown
from .layout import Layout, probe
from .preprocess import Preprocess, read_preprocess, sidecar

ARCHITECTURES: tuple[str, ...] = tuple(sorted(list_models(module=torchvision.models)))
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
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

    def fingerprint(self) -> dict:
        """What about the model determines its maps and their labels, as plain JSON values."""
        names = hashlib.sha256("\n".join(self.categories).encode()).hexdigest()
        return {"arch": self.arch, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "head": self.head, "classes_sha256": names, "preprocess": self.preprocess.to_dict()}


def load_model(arch: str, weights: str = "DEFAULT", num_classes: int | None = None,
               labels: str | Path | None = None, unsafe_load: bool = False,
               device: str | torch.device = "cpu",
               preprocess: Mapping[str, object] | None = None) -> LoadedModel:
    """Build a torchvision classifier by name with DEFAULT/enum/none/checkpoint weights.

    Preprocessing follows the chosen weights' own ``transforms()`` (resnet50's V1 weights
    resize to 256, V2 to 232); random weights and checkpoints take the DEFAULT weights'. A
    checkpoint's own ``model.preprocess.json`` beside it changes that, and ``preprocess``
    (Preprocess field names to values) changes the result.
    """
    if arch not in ARCHITECTURES:
        raise unknown("arch", arch, ARCHITECTURES, "architecture")
    enum = get_model_weights(arch)
    chosen, digest = enum.DEFAULT, None
    if _is_checkpoint(weights):
        module = _build(arch, num_classes or len(enum.DEFAULT.meta["categories"]))
        _load_state(module, read_checkpoint(Path(weights), unsafe_load), weights)
        source, digest = str(weights), file_sha256(Path(weights))
    elif weights.lower() == "none":
        module = _build(arch, num_classes or len(enum.DEFAULT.meta["categories"]))
        source = "none"
    else:
        if weights not in enum.__members__:
            raise unknown("weights", weights, [*enum.__members__, "none"], f"weights for {arch}")
        if num_classes is not None:
            raise ArgumentError("num_classes", num_classes,
                                "applies only to weights='none' or a checkpoint")
        chosen = enum[weights]
        module = _download(arch, chosen)
        source = chosen.name
    module.eval().to(device)
    outputs = _output_size(module)
    categories = read_labels(labels, outputs) if labels else _default_categories(chosen, outputs)
    own = _preprocess(chosen, module)
    if digest is not None and sidecar(weights).is_file():
        own = read_preprocess(sidecar(weights), own)
    return LoadedModel(arch, module, categories, own.with_options(**(preprocess or {})), source, digest)


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
        if not (_is_checkpoint(weights) or weights.lower() == "none"):
            raise ArgumentError("embedding_dim", embedding_dim, "needs the trained embedding network's "
                                "checkpoint as weights, or weights 'none'")
        model = load_model(arch, "none", preprocess=preprocess)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _replace_head(model.module, lambda old: nn.Linear(old.in_features, embedding_dim))
        if weights.lower() != "none":
            _load_state(model.module, read_checkpoint(Path(weights), unsafe_load), weights)
            model.weights, model.weights_sha256 = str(weights), file_sha256(Path(weights))
    model.module.eval().to(device)
    model.categories = []
    model.head = "identity" if embedding_dim is None else f"linear to {embedding_dim}"
    return model


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_head(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Swap the network's last linear layer for ``make(old)``."""
    heads = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ArgumentError("arch", type(module).__name__, "has no linear head to turn into an embedding")
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
        raise ArgumentError(
            "weights", weights.name, f"cannot download {arch}'s weights ({exc}); offline? give a "
            f"checkpoint file as the weights, put {weights.url} at {cache} (TORCH_HOME sets the "
            "cache), or use the weights 'none' for random weights") from exc


def read_checkpoint(path: Path, unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file, refusing pickled code by default."""
    if not path.is_file():
        raise ArgumentError("weights", str(path), "no such checkpoint file")
    if path.stat().st_size == 0:
        raise ArgumentError("weights", str(path), "not a readable checkpoint (the file is empty)")
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path, unsafe_load)
    while isinstance(state, dict) and any(k in state for k in ("state_dict", "model")):
        state = state.get("state_dict", state.get("model"))
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise ArgumentError("weights", str(path), f"holds a {type(state).__name__}, not a state dict")
    odd = next(((k, v) for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise ArgumentError("weights", str(path),
                            f"holds {odd[0]}: {type(odd[1]).__name__}, not a tensor; not a state dict")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file (data only: nothing in it can run)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ArgumentError("weights", str(path), "reading .safetensors needs: pip install "
                            "safetensors") from exc
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArgumentError("weights", str(path), f"not a readable safetensors file ({exc})") from exc


def _read_torch(path: Path, unsafe_load: bool) -> object:
    """A torch file's content, read with ``weights_only`` unless ``unsafe_load``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as exc:
        names = _pickled_globals(path)
        if names is None:
            raise ArgumentError("weights", str(path), "not a readable checkpoint (neither a torch "
                                "file nor a pickle)") from exc
        raise ArgumentError("weights", str(path),
                            f"refused, the file holds Python objects that could run code "
                            f"({', '.join(names[:3])}); if you trust it, allow unsafe_load") from exc
    except (RuntimeError, EOFError, OSError, ValueError, IndexError) as exc:
        raise ArgumentError("weights", str(path),
                            f"not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def _pickled_globals(path: Path) -> list[str] | None:
    """The Python objects a pickle (plain, or torch's zip) would import, read without running it;
    None when the file is no pickle at all."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        ops = list(pickletools.genops(data))
    except (ValueError, StopIteration, OSError, zipfile.BadZipFile, EOFError):
        return None
    names, strings = [], []
    for op, arg, _ in ops:
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(str(arg))
        elif op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
    return list(dict.fromkeys(names)) or ["objects of unknown kind"]


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load a state dict, listing every missing, unexpected and mis-shaped key on failure."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ArgumentError("weights", path, f"does not fit this architecture (another number of "
                            f"classes?): {shown}")
    module.load_state_dict(state)


def _output_size(module: nn.Module) -> int:
    """Number of classes the head produces, read from its last linear or conv layer."""
    for layer in reversed(list(module.modules())):
        if isinstance(layer, nn.Linear):
            return layer.out_features
        if isinstance(layer, nn.Conv2d):
            return layer.out_channels
    raise ArgumentError("arch", type(module).__name__, "has no linear or convolutional head")


def _default_categories(weights: torchvision.models.WeightsEnum, outputs: int) -> list[str]:
    """The weights' class names when the head has their size, else numbers."""
    names = weights.meta["categories"] or []  # feature-only weights (vgg16's) have none
    return list(names) if len(names) == outputs else [f"class {i}" for i in range(outputs)]


def read_labels(path: str | Path, outputs: int) -> list[str]:
    """Read one class name per line, checking the count against the model's head."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ArgumentError("labels", str(path), f"cannot read ({exc.strerror})") from exc
    if len(names) != outputs:
        raise ArgumentError("labels", str(path), f"{len(names)} names for a head of {outputs} classes")
    return names


def _preprocess(weights: torchvision.models.WeightsEnum, module: nn.Module) -> Preprocess:
    """Preprocessing from the weights' transforms, sized to the model (ViT fixes its input)."""
    t = weights.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    size = getattr(module, "image_size", crop)
    if size != crop:
        crop, resize = size, round(size * resize / crop)
    return Preprocess((crop, crop), tuple(t.mean), tuple(t.std), resize_to=resize,
                      interpolation=t.interpolation.value)


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
    features.1, .3, .5, .7). Without such blocks (VGG), the same over layers of any kind; for
    ViT, whose grid never changes, the first LayerNorm of the blocks ending each quarter."""
    if arch.startswith("vit_"):
        depth = len(module.encoder.layers)
        return [f"encoder.layers.encoder_layer_{depth * q // 4 - 1}.ln_1" for q in (1, 2, 3, 4)]
    layers = [(name, layout.grid) for name, _, layout in _grids(module, preprocess)]
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
    noise. For ViT, the last encoder block's first LayerNorm, since its patch tokens are the
    last to get a gradient."""
    if arch.startswith("vit_"):
        return f"encoder.layers.encoder_layer_{len(module.encoder.layers) - 1}.ln_1"
    layers = [name for name, _, _ in _grids(module, preprocess)]
    modules = dict(module.named_modules())
    blocks = [name for name in layers
              if isinstance(modules[name], nn.LayerNorm) or any(True for _ in modules[name].children())]
    if not layers:
        raise ArgumentError("arch", arch, "has no layer with a spatial output; name a layer")
    return (blocks or layers)[-1]
