"""Occlusion sensitivity: gradcam against captum's ``Occlusion`` and against the floor, in one run.

    python benchmarks/bench_occlusion.py [--arch resnet50] [--size 224] [--patch 32] [--stride 16]
                                         [--batch-size 8] [--threads 2] [--repeats 3]

One random-weight image, its top-1 class, fill zero (captum's default baseline). Measured
interleaved (one run of every task per round, so load from other processes hits all alike),
each the minimum over ``--repeats`` rounds after a warm-up:

- captum ``Occlusion`` with its defaults (``perturbations_per_eval=1``) and with
  ``perturbations_per_eval`` = gradcam's batch size;
- gradcam (``explain(..., methods=["occlusion"])``: the model's own fx graph, weights shared, the
  layers a window changes only locally reused), and the same with reuse off (full passes);
- the floor: as many full forward passes of the inference copy as there are windows (plus the
  unoccluded one), at the best of batch sizes 8, 16 and 32.

Memory added by each task is measured in a fresh process (benchmarks/common.py). The maps are
compared with captum's in the same run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from captum.attr import Occlusion
from common import memory_in_child, report_memory
from torchvision.models import get_model

from gradcam_cli import explain, local
from gradcam_cli import occlusion as O
from gradcam_cli.perturb import inference_copy
from gradcam_cli.settings import MethodSettings


def captum(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, c: int,
           per_eval: int) -> torch.Tensor:
    """captum's occlusion map of class ``c`` (one channel; its windows span all channels)."""
    return Occlusion(model).attribute(x, sliding_window_shapes=(3, args.patch, args.patch),
                                      strides=(3, args.stride, args.stride), baselines=0.0, target=c,
                                      perturbations_per_eval=per_eval)[0, :1]


def ours(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, reuse: bool) -> torch.Tensor:
    """gradcam's occlusion map of the top-1 class, with or without reuse."""
    settings = MethodSettings(occlusion=O.OcclusionSettings(patches=(args.patch,), stride=args.stride))
    saving, local.MIN_SAVING = local.MIN_SAVING, local.MIN_SAVING if reuse else 2.0  # 2: never pays
    try:
        result = explain(model, x, args.layer, topk=1, methods=["occlusion"], settings=settings,
                         batch_size=args.batch_size)
    finally:
        local.MIN_SAVING = saving
    return result.maps["occlusion"][0, 0]


def windows(args: argparse.Namespace) -> int:
    """How many windows slide over the input."""
    side = len(O._anchors(args.size, args.patch, args.stride))
    return side * side


def floor_passes(fast: torch.nn.Module, x: torch.Tensor, count: int, batch: int) -> None:
    """``count`` forward passes of the inference copy, ``batch`` at a time, plus the unoccluded one."""
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast(x)
        for start in range(0, count, batch):
            fast(x.expand(min(batch, count - start), -1, -1, -1).clone())


def best_batch(fast: torch.nn.Module, x: torch.Tensor) -> int:
    """The batch size of the highest throughput of the inference copy (of 8, 16, 32)."""
    per_image = {}
    for batch in (8, 16, 32):
        floor_passes(fast, x, batch, batch)
        start = time.perf_counter()
        floor_passes(fast, x, 2 * batch, batch)
        per_image[batch] = (time.perf_counter() - start) / (2 * batch)
    return min(per_image, key=per_image.get)


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--layer", default="layer4", help="any layer: occlusion does not depend on it")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--floor-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = get_model(args.arch, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        c = int(model(x).argmax())
    count, fast = windows(args), inference_copy(model)
    floor_batch = args.floor_batch or best_batch(fast, x)
    tasks = {
        "captum, defaults (1 per eval)": lambda: captum(model, x, args, c, 1),
        f"captum, {args.batch_size} per eval": lambda: captum(model, x, args, c, args.batch_size),
        "gradcam": lambda: ours(model, x, args, reuse=True),
        "gradcam, reuse off": lambda: ours(model, x, args, reuse=False),
        f"floor: {count + 1} passes of the inference copy, batch {floor_batch}":
            lambda: floor_passes(fast, x, count, floor_batch),
    }
    if args.memory_of:
        report_memory(tasks[args.memory_of])
        return
    print(f"{args.arch} {args.size}x{args.size}, patch {args.patch} stride {args.stride} ({count} windows), "
          f"fill zero, batch {args.batch_size}, {args.threads} threads; min of {args.repeats} interleaved "
          "rounds after a warm-up", flush=True)
    difference = (ours(model, x, args, True) - captum(model, x, args, c, args.batch_size)).abs().max()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(args.repeats):
        for name, task in tasks.items():
            times[name].append(timed(task))
    same = ["--arch", args.arch, "--layer", args.layer, "--size", str(args.size), "--patch", str(args.patch),
            "--stride", str(args.stride), "--batch-size", str(args.batch_size),
            "--threads", str(args.threads), "--floor-batch", str(floor_batch)]
    best = {name: min(t) for name, t in times.items()}
    memory = {name: 0.0 if args.no_memory else memory_in_child(__file__, [*same, "--memory-of", name])
              for name in tasks}
    for name in tasks:
        print(f"  {name:<48} {best[name]:7.2f} s  (all: {', '.join(f'{t:.2f}' for t in times[name])})"
              f"  added {memory[name]:5.0f} MB")
    names = list(tasks)
    gradcam = best["gradcam"]
    print(f"ratios gradcam / captum defaults {gradcam / best[names[0]]:.2f}, / captum same batch "
          f"{gradcam / best[names[1]]:.2f}, / reuse off {gradcam / best[names[3]]:.2f}, "
          f"/ floor {gradcam / best[names[4]]:.2f}; memory / captum defaults "
          f"{memory['gradcam'] / max(memory[names[0]], 1):.2f}, / captum same batch "
          f"{memory['gradcam'] / max(memory[names[1]], 1):.2f}")
    print(f"map: largest difference from captum's {float(difference):.2e} "
          f"(largest value {float(captum(model, x, args, c, args.batch_size).abs().max()):.2e})")


if __name__ == "__main__":
    main()
