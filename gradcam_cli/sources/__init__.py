"""Model sources: a name given as ``arch`` becomes a network with its class names, default
preprocessing and provenance.

- ``NAME``: a torchvision classifier (``sources.torchvision``);
- ``timm/NAME``: any timm model (``sources.timm``; needs ``pip install 'gradcam[timm]'``);
- ``hf/PATH_OR_ID``: a Hugging Face image classifier (``sources.hf``; ``gradcam[hf]``);
- ``module:PACKAGE.MODULE:FACTORY``: the user's own network (``sources.module``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ArgumentError
from ..preprocess import Preprocess

PREFIXES = {"timm/": "timm", "hf/": "hf", "module:": "module"}


@dataclass
class Source:
    """What a source makes of a name: the network, its class names (None: numbers), its
    default preprocessing (None: the caller must give one, ``missing`` says why) and provenance."""

    module: nn.Module
    categories: list[str] | None
    preprocess: Preprocess | None
    weights: str
    weights_sha256: str | None = None
    missing: str = ""


def build(arch: str, weights: str, num_classes: int | None, unsafe_load: bool) -> Source:
    """Dispatch ``arch`` on its prefix to the source that builds it."""
    for prefix, name in PREFIXES.items():
        if arch.startswith(prefix):
            source = importlib.import_module(f".{name}", __name__)
            return source.build(arch[len(prefix):], weights, num_classes, unsafe_load)
    from . import torchvision
    return torchvision.build(arch, weights, num_classes, unsafe_load)


def needs(package: str, extra: str, arch: str) -> object:
    """Import an optional package, or say which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ArgumentError("arch", arch, f"needs {package}: pip install 'gradcam[{extra}]'") from exc


@contextmanager
def seeded() -> Iterator[None]:
    """Random initialisation from a fixed seed, so random-weight runs repeat exactly, without
    touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def no_pretrained_with_num_classes(num_classes: int | None) -> None:
    """Pretrained weights come with their own head: a number of classes is refused."""
    if num_classes is not None:
        raise ArgumentError("num_classes", num_classes, "applies only to weights='none' or a checkpoint")
