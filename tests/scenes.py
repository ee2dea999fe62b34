"""Generated scenes for trained-network tests: one object, whose pattern alone decides the
class, at a random place on a cluttered random background."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATTERN = 10  # side of the drawn patterns, in pixels


def object_shapes(side: int = PATTERN) -> torch.Tensor:
    """Four white-on-black patterns (hollow square, plus, X, corner), scaled to ``side``."""
    s = torch.zeros(4, PATTERN, PATTERN)
    s[0, 1:-1, 1:-1] = 1
    s[0, 3:-3, 3:-3] = 0
    s[1, 4:6, :] = 1
    s[1, :, 4:6] = 1
    diagonal = torch.arange(PATTERN)
    s[2, diagonal, diagonal] = 1
    s[2, diagonal, PATTERN - 1 - diagonal] = 1
    s[3, :2, :] = 1
    s[3, :, :2] = 1
    return F.interpolate(s[:, None], size=(side, side), mode="nearest")[:, 0]


def scenes(n: int, g: torch.Generator, classes: torch.Tensor | None = None, size: int = 40,
           side: int = PATTERN, distractors: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` scenes of ``size`` pixels with objects of ``side`` pixels: images (Nx3xHxW in
    [0, 1]), classes, and each object's top-left corner (row, column). ``distractors`` adds
    that many random white-on-black patterns, as conspicuous as the object but never
    deciding the class, drawn first so the object lies on top."""
    background = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(size, size),
                               mode="bilinear", align_corners=False)
    x = 0.6 * background + 0.2 * torch.rand(n, 3, size, size, generator=g)
    classes = torch.randint(0, 4, (n,), generator=g) if classes is None else classes
    where = torch.randint(0, size - side, (n, 2), generator=g)
    shapes = object_shapes(side)
    for i in range(n):
        for _ in range(distractors):
            r, c = torch.randint(0, size - side, (2,), generator=g).tolist()
            noise = (torch.rand(1, 1, PATTERN // 2, PATTERN // 2, generator=g) < 0.4).float()
            x[i, :, r:r + side, c:c + side] = F.interpolate(noise, size=(side, side))[0, 0]
    for i, (r, c) in enumerate(where.tolist()):
        x[i, :, r:r + side, c:c + side] = shapes[classes[i]]
    return x, classes, where
