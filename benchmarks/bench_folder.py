"""Folder throughput: gradcam classify (top-1, Grad-CAM only) against the bare model.

    python benchmarks/bench_folder.py [--images 200] [--batch-size 8] [--threads 2]

The bare model does one forward and one backward pass per image in batches of the same
size; gradcam also decodes, renders and writes every file. Prints images/s and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import memory_in_child, report_memory
from PIL import Image

from gradcam_cli import classify, load_model


def make_folder(folder: Path, count: int) -> list[Path]:
    """Write ``count`` distinct 320x240 JPEGs of smooth noise."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(small).resize((320, 240), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def bare(module: torch.nn.Module, count: int, batch_size: int, size: int) -> float:
    """Seconds for forward + backward of ``count`` random images in batches."""
    start = time.perf_counter()
    for i in range(0, count, batch_size):
        x = torch.randn(min(batch_size, count - i), 3, size, size, requires_grad=True)
        logits = module(x)
        torch.autograd.grad(logits.max(dim=1).values.sum(), x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-of", choices=["bare", "gradcam"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.arch, "none")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(Path(tmp), args.images)
        tasks = {"bare": lambda: bare(model.module.eval(), args.images, args.batch_size,
                                      model.preprocess.input_size[0]),
                 "gradcam": lambda: list(classify(model, paths, Path(tmp) / "out", topk=1,
                                                  methods=["gradcam"], batch_size=args.batch_size))}
        if args.memory_of:
            report_memory(tasks[args.memory_of])
            return
        bare(model.module.eval(), args.batch_size, args.batch_size, model.preprocess.input_size[0])  # warm-up
        base = tasks["bare"]()
        start = time.perf_counter()
        records = tasks["gradcam"]()
        ours = time.perf_counter() - start
    assert all(r["status"] == "ok" for r in records)
    same = ["--arch", args.arch, "--images", str(args.images), "--batch-size", str(args.batch_size),
            "--threads", str(args.threads)]
    memory = {name: memory_in_child(__file__, [*same, "--memory-of", name]) for name in tasks}
    print(f"{args.arch}, {args.images} images, batch {args.batch_size}, {args.threads} threads")
    print(f"  bare forward+backward  {args.images / base:6.1f} img/s")
    print(f"  gradcam classify       {args.images / ours:6.1f} img/s (decode, explain, render, write)")
    print(f"  ratio gradcam/bare     {base / ours:.2f}  (target >= 0.80)")
    print(f"  memory added (each in a fresh process): bare {memory['bare']:.0f} MB, gradcam "
          f"{memory['gradcam']:.0f} MB, ratio {memory['gradcam'] / max(memory['bare'], 1):.2f}")


if __name__ == "__main__":
    main()
