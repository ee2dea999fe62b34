"""Model-parameter randomisation test (Adebayo et al. 2018), cascading from the top.

The network is split into blocks (``randomisation_units``); a copy has its blocks
re-initialised one after another from the logits down, and after each block the maps are
computed again and compared with the trained model's by Spearman rank correlation. A map that
stays correlated while the weights that decide the class are gone does not explain the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy

import torch
from torch import nn

from .engine import evaluating

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
SHARE = 0.25  # a block holding more than this share of the parameters is split further
SEED = 20180000  # block i is drawn with SEED + i: fixed, and unlike seeds a model is built with


def randomisation_units(module: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The blocks randomised one at a time, ordered as the forward pass first runs them.

    Starting from the model, containers and any module holding more than a quarter of all
    parameters are split into their children (ResNet: conv1, bn1, each residual block, the
    blocks of layer4 split into their layers, fc); a split module's own parameters (ViT's class
    token, position embedding) form a block named after it.
    """
    total = sum(p.numel() for p in module.parameters())
    units: list[tuple[str, nn.Module]] = []

    def split(name: str, m: nn.Module) -> None:
        big = sum(p.numel() for p in m.parameters()) > SHARE * total
        children = [(n, c) for n, c in m.named_children() if _has_parameters(c)]
        if not children or not (m is module or isinstance(m, CONTAINERS) or big):
            units.append((name, m))
            return
        if _has_parameters(m, recurse=False):
            units.append((name or "(model)", _Own(m)))
        for child_name, child in children:
            split(f"{name}.{child_name}" if name else child_name, child)

    split("", module)
    order = _first_call(module, example)
    return sorted(units, key=lambda unit: order.get(_hooked(unit[1]), len(order)))


def _has_parameters(m: nn.Module, recurse: bool = True) -> bool:
    """Whether the module (with its children, unless not ``recurse``) holds any parameter."""
    return next(m.parameters(recurse=recurse), None) is not None


class _Own(nn.Module):
    """Stands for a split module's own parameters (not its children's)."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self.owner = [owner]  # a list, so the owner is not registered as a child

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Only the owner's direct parameters."""
        return self.owner[0].parameters(recurse=False)


def _hooked(unit: nn.Module) -> nn.Module:
    """The module whose call marks the unit's place in the forward pass."""
    return unit.owner[0] if isinstance(unit, _Own) else unit


def _first_call(module: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """The order in which each module is first called in one forward pass."""
    order: dict[nn.Module, int] = {}

    def seen(m: nn.Module, _inputs: object) -> None:
        order.setdefault(m, len(order))

    hooks = [m.register_forward_pre_hook(seen) for m in module.modules()]
    try:
        with torch.no_grad(), evaluating(module):
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def randomise(unit: nn.Module, seed: int) -> None:
    """Re-initialise a block: each layer with its own initialiser (``reset_parameters``),
    parameters of no such layer redrawn from a normal with their current spread."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        covered = set()
        for layer in [] if isinstance(unit, _Own) else unit.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
                covered.update(id(p) for p in layer.parameters(recurse=False))
        for p in unit.parameters():
            if id(p) not in covered:
                spread = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.02
                p.copy_(torch.randn_like(p) * spread)


def cascade(module: nn.Module, example: torch.Tensor,
            maps: Callable[[nn.Module], dict[str, torch.Tensor]],
            compare: Callable[[torch.Tensor, torch.Tensor], float | None],
            units: Sequence[tuple[str, nn.Module]] | None = None
            ) -> list[tuple[str, dict[str, float | None]]]:
    """Randomise a copy's blocks from the top down; after each, ``compare`` every map of
    ``maps(copy)`` with the trained model's. Returns (block, {method: score}) in that order.
    The model itself is never changed; each block has a fixed seed, so runs repeat."""
    original = maps(module)
    copy = deepcopy(module)
    names = dict((id(m), n) for n, m in module.named_modules())
    copied = dict(copy.named_modules())
    steps = []
    for position, (name, unit) in enumerate(reversed(units or randomisation_units(module, example))):
        target = copied[names[id(_hooked(unit))]]
        randomise(_Own(target) if isinstance(unit, _Own) else target, SEED + position)
        now = maps(copy)
        steps.append((name, {m: compare(original[m], now[m]) for m in original}))
    return steps
