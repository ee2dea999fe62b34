"""The user's own network (``module:PACKAGE.MODULE:FACTORY``): the named module is imported (naming
it is the user's opt-in to running its code) and ``FACTORY(num_classes=n)``, or ``FACTORY()``
without a number of classes, builds the network; a checkpoint then gives its weights. It has
no default preprocessing: a sidecar JSON or the caller's preprocessing gives it."""

from __future__ import annotations

import importlib
import os
import sys

from torch import nn

from ..errors import ArgumentError
from . import Source, seeded
from .checkpoint import is_checkpoint, load_checkpoint


def build(spec: str, weights: str, num_classes: int | None, unsafe_load: bool) -> Source:
    """Call the factory that ``spec`` (``PACKAGE.MODULE:FACTORY``) names, then load ``weights``:
    a checkpoint path, or DEFAULT/none for the network as the factory returns it."""
    arch = f"module:{spec}"
    factory = _factory(spec, arch)
    with seeded():
        try:
            module = factory() if num_classes is None else factory(num_classes=num_classes)
        except Exception as exc:  # the user's code: any failure is reported as its own
            raise ArgumentError("arch", arch, f"the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ArgumentError("arch", arch, f"the factory returned a {type(module).__name__}, not a "
                                          "torch.nn.Module")
    digest = None
    if is_checkpoint(weights):
        digest = load_checkpoint(module, weights, unsafe_load)
    elif weights.lower() not in ("none", "default"):
        raise ArgumentError("weights", weights, f"for {arch}: a checkpoint path, or none/DEFAULT for the "
                                                "network as the factory builds it")
    return Source(module, None, None, weights, digest, "has no default preprocessing")


def _factory(spec: str, arch: str) -> object:
    """Import the module and look the factory up; each way that fails is one line."""
    path, colon, name = spec.partition(":")
    if not colon or not path or not name or ":" in name:
        raise ArgumentError("arch", arch, "give module:PACKAGE.MODULE:FACTORY, e.g. module:mynets.cnn:build")
    folder = os.getcwd()
    added = folder not in sys.path
    if added:
        sys.path.append(folder)  # the current folder, as `python -m` has it, after everything else
    try:
        source = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        raise ArgumentError("arch", arch, f"no module {exc.name} to import (run from the folder that "
                                          "holds it, or put it on PYTHONPATH)") from exc
    except Exception as exc:  # the user's module failed while it was imported
        raise ArgumentError("arch", arch, f"importing {path} raised {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(folder)
    factory = getattr(source, name, None)
    if factory is None:
        raise ArgumentError("arch", arch, f"{path} has no attribute {name}")
    if not callable(factory):
        raise ArgumentError("arch", arch, f"{path}.{name} is a {type(factory).__name__}, not callable")
    return factory
