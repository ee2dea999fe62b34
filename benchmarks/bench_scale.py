"""Throughput at scale: a folder of generated images through `gradcam classify`, in one process
and on a local Ray cluster with 1, 2 and 4 workers, against the bare model (README: On a cluster).

    python benchmarks/bench_scale.py [--images 2000] [--arch resnet18] [--size 224] [--workers 1,2,4]

Every run is the command line on the same folder (Grad-CAM of the top class, batch 8, PNGs and
summaries written), each into a fresh output folder. For each: images per second over the run
(from the first record to the last, so start-up is apart) and over the whole command, and the
peak memory of the command's process tree (proportional set size, so pages shared between
Ray's processes count once), sampled every 0.2 s. The bare model is one forward and one
backward pass to the target layer per batch of 8, in this process with the machine's threads:
the most any engine could reach. Ratios are to the single-process run, all in one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_model
from PIL import Image
from torchvision.models import get_model


def write_images(folder: Path, count: int, size: int) -> Path:
    """``count`` different PNGs of smooth noise, ``size`` px square (about 1 ms each)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.png")
    return folder


def tree_pss(root: int) -> float:
    """The proportional set size of ``root`` and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in rollup if line.startswith("Pss:")), 0) / 1024
    return total


def timed_run(argv: list[str]) -> dict[str, float]:
    """Run a command, sampling its tree's memory; seconds in all, between its first and last
    record, the records and the peak memory."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_pss(process.pid))
            time.sleep(0.2)
    sampler = threading.Thread(target=sample)
    sampler.start()
    stamps = [time.perf_counter() for _line in process.stdout]
    process.wait()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit code {process.returncode}")
    total = time.perf_counter() - start
    return {"total": total, "run": stamps[-1] - stamps[0], "records": len(stamps), "peak": peak[0]}


def bare_throughput(arch: str, size: int, seconds: float = 20.0) -> float:
    """Images per second of one forward and one backward pass to the layer Grad-CAM uses, batch 8."""
    torch.manual_seed(0)
    model = get_model(arch, weights=None).eval()
    layer = dict(model.named_modules())["layer4"]
    x = torch.randn(8, 3, size, size)
    kept = {}
    layer.register_forward_hook(lambda _m, _i, out: kept.__setitem__("a", out))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        logits = model(x)
        torch.autograd.grad(logits.max(dim=1).values.sum(), kept["a"])
        count += len(x)
    return count / (time.perf_counter() - start)


def main() -> None:
    """Write the folder, run every configuration, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    gradcam = str(Path(sys.executable).parent / "gradcam")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_images(Path(tmp) / "images", args.images, args.size)
        common = [gradcam, "classify", "--arch", args.arch, "--weights", "none", "--method", "gradcam",
                  "--topk", "1", "--batch-size", "8", "--json", "--quiet", "--image-path", str(folder)]
        runs = {"one process": timed_run([*common, "--output-dir", f"{tmp}/single"])}
        for n in [int(w) for w in args.workers.split(",")]:
            share = (os.cpu_count() or 1) / n  # the machine's CPUs split between the workers
            runs[f"Ray, {n} worker{'s' * (n > 1)}, {share:g} CPU each"] = timed_run(
                [*common, "--output-dir", f"{tmp}/ray{n}", "--ray", "--workers", str(n),
                 "--cpus-per-worker", f"{share:g}"])
    bare = bare_throughput(args.arch, args.size)
    single = runs["one process"]
    print(f"{cpu_model()}, {os.cpu_count()} cores; {args.images} images, {args.arch} at {args.size}, "
          f"Grad-CAM top-1, batch 8; torch {torch.__version__}\n")
    print("| run | images/s (run) | images/s (whole command) | peak memory | run / one process | "
          "run / bare model |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        rate, whole = r["records"] / r["run"], r["records"] / r["total"]
        print(f"| {name} | {rate:.1f} | {whole:.1f} | {r['peak']:.0f} MB | "
              f"{rate / (single['records'] / single['run']):.2f} | {rate / bare:.2f} |")
    print(f"| bare model: forward + backward to layer4 | {bare:.1f} | | | | 1.00 |")


if __name__ == "__main__":
    main()
