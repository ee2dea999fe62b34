"""Memory mid-run: resident memory of a folder run, sampled while the pipeline is full.

    python benchmarks/bench_memory.py [--images 1000] [--arch resnet18] [--batch-size 16]
                                      [--size 96x80] [--collect]

Runs ``classify`` (top-1, Grad-CAM) over distinct generated PNGs, reads the resident memory
after every record and prints it every 100 images with the growth since image 100, glibc's
heap figures (``mallinfo2``) beside it, then images/s and CPU time per image after image 100.
``--collect`` also calls ``memory.collect_garbage()`` after each batch, from the consumer's
side (what the batch loop does once it calls it); the run is otherwise untouched.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

from gradcam_cli import classify, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the generated data lives in tests/
from gradcam_cli.memory import collect_garbage
from tests.scenes import distinct_images

EVERY = 100


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: sizes in bytes, summed over all arenas."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks",
                                                     "keepcost")]


def heap_mb() -> tuple[float, float] | None:
    """glibc's heap in MB: (taken from the system, in use), or None off glibc."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return info.arena / 2**20, info.uordblks / 2**20


def resident_mb() -> float:
    """This process's resident memory in MB, from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    """Run, sample and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", default="96x80", help="width x height of the generated images")
    parser.add_argument("--collect", action="store_true",
                        help="call memory.collect_garbage() after each batch")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    model = load_model(args.arch, "none")
    rows, start, cpu = [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        paths = distinct_images(Path(tmp), args.images, (width, height))
        records = classify(model, paths, Path(tmp) / "out", topk=1, methods=["gradcam"],
                           batch_size=args.batch_size)
        for n, record in enumerate(records, start=1):
            assert record["status"] == "ok", record
            if args.collect and n % args.batch_size == 0:
                collect_garbage()
            if n % EVERY == 0:
                rows.append((n, resident_mb(), heap_mb()))
            if n == EVERY:
                start, cpu = time.perf_counter(), sum(os.times()[:2])
        seconds, cpu = time.perf_counter() - start, sum(os.times()[:2]) - cpu
    print(f"{args.arch}, {args.images} distinct {args.size} images, batch {args.batch_size}, top-1 "
          f"Grad-CAM{', collect_garbage after each batch' if args.collect else ''}")
    print("  image   RSS MB  growth   heap MB  in use MB")
    for n, rss, heap in rows:
        system, used = heap or (float("nan"), float("nan"))
        print(f"  {n:5d}  {rss:7.1f}  {rss - rows[0][1]:+6.1f}  {system:8.1f}  {used:9.1f}")
    later = [rss for _, rss, _ in rows]
    print(f"  largest growth since image {EVERY}: {max(later) - later[0]:+.1f} MB; full collections "
          f"{gc.get_stats()[2]['collections']} (since start-up)")
    done = args.images - EVERY
    print(f"  after image {EVERY}: {done / seconds:.1f} img/s, {cpu / done * 1000:.0f} ms CPU per image")


if __name__ == "__main__":
    main()
