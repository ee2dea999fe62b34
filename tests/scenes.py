"""Generated data for tests and benchmarks: scenes in which one object, whose pattern alone
decides the class, lies at a random place on a cluttered random background; the small ResNet
trained on them; and folders of distinct images for long runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.resnet import BasicBlock, ResNet

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


def resnet10(num_classes: int = 4) -> torch.nn.Module:
    """torchvision's ResNet with one basic block per stage: resnet18's layout at about half its
    cost (also the factory ``--arch module:tests.scenes:resnet10`` builds)."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def train_resnet10(steps: int, g: torch.Generator, size: int, side: int,
                   normalise: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.nn.Module:
    """A resnet10 trained with Adam on scenes with two distractors each, fed ``normalise(x)``;
    batch norm statistics are then re-estimated on fresh scenes (Adam's last steps leave the
    running averages behind the weights)."""
    net = resnet10()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        x, y, _ = scenes(32, g, size=size, side=side, distractors=2)
        loss = F.cross_entropy(net(normalise(x)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for _ in range(10):
            net(normalise(scenes(32, g, size=size, side=side, distractors=2)[0]))
    return net.eval()


def distinct_images(folder: Path, count: int, size: tuple[int, int] = (96, 80)) -> list[Path]:
    """Write ``count`` different PNGs of smooth noise (width x height ``size``), as a real folder
    holds (about 1 ms each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        paths.append(folder / f"img{i:05d}.png")
        small.resize(size, Image.BILINEAR).save(paths[-1], compress_level=1)
    return paths


def write_scenes(folder: Path, images: torch.Tensor, where: torch.Tensor, side: int = 16) -> list[Path]:
    """Save scenes as PNGs and masks of their ``side``-pixel objects (same names) under
    ``folder``/masks."""
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, (r, c)) in enumerate(zip(images, where.tolist(), strict=True)):
        path = folder / f"scene{i:02d}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        mask = np.zeros(image.shape[-2:], dtype=np.uint8)
        mask[r:r + side, c:c + side] = 255
        Image.fromarray(mask).save(folder / "masks" / path.name)
        paths.append(path)
    return paths
