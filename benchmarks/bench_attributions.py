"""Integrated Gradients and SmoothGrad: gradcam against captum, time, memory and maps.

    python benchmarks/bench_attributions.py [--arch resnet50] [--size 224] [--threads 2]
                                            [--repeats 3] [--steps 32] [--samples 25]
                                            [--batch-size 32]

Integrated Gradients with --steps points (gausslegendre, both tools' default; a zero
baseline) against captum's ``IntegratedGradients`` with the same ``internal_batch_size``
(for one image and 32 steps captum's default runs all points at once, which is the same);
SmoothGrad of the signed
input gradient over --samples noisy copies against captum's ``NoiseTunnel(Saliency(abs=False))``
(all copies in one batch, captum's default), for the top-1 class of one random-weight image.
Times come from one process that runs the tools in turn, --repeats rounds after a warm-up of
each, and keeps each tool's minimum: on a shared machine the load then changes for all tools
alike. Memory comes from one fresh process per tool and one call: the process's peak resident
memory and the part the explanation adds (peak during the call minus the resident memory
before it).

The floor is the same forward and backward passes and nothing else, at this machine's best
throughput: the model's inference copy (batch norms folded, channels-last, frozen weights),
the batch built in one step, one ``torch.autograd.grad`` per batch. The maps are compared
with captum's in the same run: Integrated Gradients exactly (same baseline and points), and
SmoothGrad by its correlation with captum's (different noise).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from common import added_memory

TASKS = ("integrated-gradients", "smoothgrad")
TOOLS = ("gradcam", "captum", "floor")


def workload(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, int]:
    """The random-weight model, the fixed input every worker explains, and its top-1 class."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)().eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        return model, x, int(model(x).argmax())


def run_gradcam(model: torch.nn.Module, x: torch.Tensor, c: int, args: argparse.Namespace,
                task: str) -> torch.Tensor:
    """gradcam's map: Integrated Gradients from a zero baseline, or smoothed vanilla backprop."""
    from gradcam_cli import explain
    from gradcam_cli.paths import PathSettings, SmoothSettings
    from gradcam_cli.settings import MethodSettings
    if task == "integrated-gradients":
        settings = MethodSettings(ig=PathSettings(ig_steps=args.steps, black=(0.0, 0.0, 0.0)))
        method = "integrated-gradients"
    else:
        settings, method = MethodSettings(smooth=SmoothSettings(samples=args.samples)), "vanilla"
    result = explain(model, x, "layer4", class_ids=[c], methods=[method], batch_size=args.batch_size,
                     settings=settings)
    return result.maps[method][0, 0]


def run_captum(model: torch.nn.Module, x: torch.Tensor, c: int, args: argparse.Namespace,
               task: str) -> torch.Tensor:
    """captum's map with the same points, batch and noise level."""
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
    if task == "integrated-gradients":
        return IntegratedGradients(model).attribute(x, torch.zeros_like(x), target=c, n_steps=args.steps,
                                                    method="gausslegendre",
                                                    internal_batch_size=args.batch_size)[0]
    sigma = 0.15 * float(x.max() - x.min())
    return NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=args.samples,
                                                  stdevs=sigma, target=c, abs=False)[0]


def run_floor(model: torch.nn.Module, x: torch.Tensor, c: int, args: argparse.Namespace,
              task: str) -> torch.Tensor:
    """The same passes and nothing else, on the inference copy (made once, outside the timing)."""
    fast = FAST["copy"] if "copy" in FAST else FAST.setdefault("copy", _fast_copy(model))
    count = args.steps if task == "integrated-gradients" else args.samples
    total = torch.zeros_like(x)
    for start in range(0, count, args.batch_size):
        n = min(args.batch_size, count - start)
        batch = (x.expand(n, -1, -1, -1) * torch.rand(n, 1, 1, 1)).contiguous(
            memory_format=torch.channels_last).requires_grad_(True)
        (grads,) = torch.autograd.grad(fast(batch)[:, c].sum(), batch)
        total += grads.sum(0, keepdim=True)
    return total[0]


FAST: dict[str, torch.nn.Module] = {}


def _fast_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The inference copy with frozen weights."""
    from gradcam_cli.perturb import inference_copy
    return inference_copy(model).requires_grad_(False)


RUNNERS: dict[str, Callable] = {"gradcam": run_gradcam, "captum": run_captum, "floor": run_floor}


def worker(args: argparse.Namespace) -> None:
    """One tool's memory for one call in this process (printed), and its map saved."""
    torch.set_num_threads(args.threads)
    model, x, c = workload(args)
    run = RUNNERS[args.worker]
    if args.worker == "floor":  # the copy is made once, outside the measurement
        FAST["copy"] = _fast_copy(model)
    with added_memory() as added:
        attribution = run(model, x, c, args, args.task)
    np.save(args.out, attribution.detach().numpy())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak_mb, "added_mb": added["mb"]}))


def timer(args: argparse.Namespace) -> None:
    """Every tool's minimum time on one task, the tools run in turn in this process."""
    torch.set_num_threads(args.threads)
    model, x, c = workload(args)
    times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    for tool in TOOLS:
        RUNNERS[tool](model, x, c, args, args.task)  # warm-up (and the floor's copy)
    for _ in range(args.repeats):
        for tool in TOOLS:
            start = time.perf_counter()
            RUNNERS[tool](model, x, c, args, args.task)
            times[tool].append(time.perf_counter() - start)
    print(json.dumps({tool: min(values) for tool, values in times.items()}))


def measure(tool: str, task: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one worker process (``tool``, or "timer" for every tool's time) and read its result line."""
    command = [sys.executable, __file__, "--worker", tool, "--task", task, "--out", str(out),
               "--arch", args.arch, "--size", str(args.size), "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--steps", str(args.steps),
               "--samples", str(args.samples), "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(task: str, ours: np.ndarray, theirs: np.ndarray) -> str:
    """How close the maps are: the largest difference relative to captum's largest value for
    Integrated Gradients, the correlation for SmoothGrad (whose noise differs)."""
    if task == "integrated-gradients":
        return f"max diff {np.abs(ours - theirs).max() / np.abs(theirs).max():.1e} of max"
    return f"correlation {np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--worker", choices=(*TOOLS, "timer"), help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (timer if args.worker == "timer" else worker)(args)
        return
    print(f"{args.arch}, {args.size}x{args.size}, {args.threads} threads, batch {args.batch_size}, "
          f"{args.steps} steps, {args.samples} samples, min of {args.repeats}; ratio = gradcam / other")
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            results = {tool: measure(tool, task, args, Path(tmp) / f"{tool}.npy") for tool in TOOLS}
            seconds = measure("timer", task, args, Path(tmp) / "unused.npy")
            for tool, result in results.items():
                result["seconds"] = seconds[tool]
            ours = results["gradcam"]
            for tool, result in results.items():
                line = (f"  {task:<21} {tool:<8} {result['seconds']:7.2f} s  peak RSS "
                        f"{result['peak_mb']:5.0f} MB  added {result['added_mb']:5.0f} MB")
                if tool != "gradcam":
                    line += (f"   ratios: time {ours['seconds'] / result['seconds']:.3f}  peak "
                             f"{ours['peak_mb'] / result['peak_mb']:.2f}  added "
                             f"{ours['added_mb'] / max(result['added_mb'], 1):.2f}")
                if tool == "captum":
                    line += "   " + agreement(task, np.load(Path(tmp) / "gradcam.npy"),
                                              np.load(Path(tmp) / "captum.npy"))
                print(line, flush=True)


if __name__ == "__main__":
    main()
