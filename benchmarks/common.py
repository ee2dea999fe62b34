"""Measuring helpers shared by the benchmark scripts: the CPU, median wall time and added memory."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (ratios differ between CPU kinds: every table says which it is)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")),
                platform.processor() or platform.machine())


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def status(field: str) -> float:
    """A memory figure from /proc/self/status (Linux), in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) / 1024


@contextmanager
def added_memory() -> Iterator[dict[str, float]]:
    """Measure the peak resident memory inside the block minus the resident memory before it:
    what the work itself adds, torch and the model excluded. The result is in ``["mb"]``."""
    result = {}
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    yield result
    result["mb"] = status("VmHWM") - before


def report_memory(fn: Callable[[], object]) -> None:
    """Run ``fn`` once and print the memory it added as a JSON line (a child's answer)."""
    with added_memory() as added:
        fn()
    print(json.dumps({"mb": added["mb"]}))


# glibc's malloc keeps freed blocks below its (adaptive) mmap threshold for reuse, so the
# resident peak of the same task varied by 2x between runs (72-186 MB); with every block above
# 64 kB mapped and unmapped on its own, the peak follows the live tensors to within 1 MB.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def memory_in_child(script: str, args: list[str]) -> float:
    """The memory one task adds, measured in a fresh interpreter running ``script args`` (so
    that no task profits from memory an earlier one left to the allocator) under ``EXACT_MALLOC``."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, **EXACT_MALLOC})
    return json.loads(done.stdout.strip().splitlines()[-1])["mb"]
