"""Checkpoints: state dicts from .safetensors or torch files, read as data (``weights_only``),
with pickled code refused unless the caller allows it, and loaded with every mismatch listed."""

from __future__ import annotations

import hashlib
import pickle
import pickletools
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ArgumentError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_checkpoint(weights: str) -> bool:
    """Tell a checkpoint path from a weights enum name."""
    return Path(weights).suffix in CHECKPOINT_SUFFIXES or "/" in weights or Path(weights).is_file()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
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


def load_checkpoint(module: nn.Module, weights: str, unsafe_load: bool) -> str:
    """Load a checkpoint file into ``module``; its SHA-256, recorded so that another file under
    the same path is never taken for the same model."""
    load_state(module, read_checkpoint(Path(weights), unsafe_load), weights)
    return file_sha256(Path(weights))
