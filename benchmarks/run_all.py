"""Every benchmark in one run: gradcam against pytorch-grad-cam, torchcam, captum and the bare
model, with ratios gradcam / peer.

    pip install -e '.[bench]'
    python benchmarks/run_all.py [--repeats 3] [--threads 2] [--quick]

Prints the machine, then: start-up time of `gradcam --help` against importing each peer;
the CAM methods against pytorch-grad-cam and torchcam (bench_cams.py); classify's five maps
for the top 3 against captum and the bare model (bench_classify.py); folder throughput
(bench_folder.py); occlusion against captum's ``Occlusion`` and the floor (bench_occlusion.py).
``--quick`` leaves out Score-CAM, uses fewer images and one occlusion round, for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from common import cpu_model, median_time

HERE = Path(__file__).resolve().parent
PEER_IMPORTS = {"pytorch-grad-cam": "import pytorch_grad_cam",
                "torchcam": "import torchcam.methods", "captum": "import captum.attr",
                "torch alone": "import torch"}


def machine() -> str:
    """CPU, cores and the versions of everything measured."""
    packages = []
    for name in ("gradcam", "torch", "torchvision", "grad-cam", "torchcam", "captum"):
        try:
            packages.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            packages.append(f"{name} (not installed)")
    python = f"Python {platform.python_version()}"
    return f"{cpu_model()}, {os.cpu_count()} cores, {python}; " + ", ".join(packages)


def wall(command: list[str], repeats: int) -> float:
    """Median wall time of running ``command`` to completion (after one warm-up run, so every
    command starts with the files it imports in the page cache)."""
    return median_time(lambda: subprocess.run(command, check=True, capture_output=True), repeats)


def startup(repeats: int) -> None:
    """`gradcam --help` against the time a peer's users wait for its import."""
    script = shutil.which("gradcam") or str(Path(sys.executable).parent / "gradcam")
    ours = wall([script, "--help"], repeats)
    print(f"start-up, median of {repeats}: gradcam --help {ours:.2f} s")
    for peer, statement in PEER_IMPORTS.items():
        theirs = wall([sys.executable, "-c", statement], repeats)
        print(f"  python -c '{statement}' ({peer}) {theirs:.2f} s   ratio {ours / theirs:.2f}")


def run(script: str, *args: str) -> None:
    """Run one benchmark script, its output going straight to ours, headed by the CPU it ran on."""
    print(f"\n$ python benchmarks/{script} {' '.join(args)}    # on {cpu_model()}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    common = ["--threads", str(args.threads)]
    print(machine())
    startup(max(args.repeats, 5))
    methods = "gradcam,gradcam++,ablationcam" if args.quick else "gradcam,gradcam++,scorecam,ablationcam"
    run("bench_cams.py", *common, "--repeats", str(args.repeats), "--methods", methods)
    run("bench_classify.py", *common, "--repeats", str(max(args.repeats, 5)))
    run("bench_folder.py", *common, "--images", "40" if args.quick else "200")
    run("bench_occlusion.py", *common, "--repeats", "1" if args.quick else str(args.repeats))


if __name__ == "__main__":
    main()
