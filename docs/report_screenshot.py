"""The README's picture of index.html: a 20-image run of random-weight resnet18 on generated
images (one of them broken, to show a failure), shot by headless Chromium.

    python docs/report_screenshot.py            # writes docs/report.png
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from gradcam_cli import classify, load_model

HERE = Path(__file__).resolve().parent


def scene(path: Path, seed: int) -> Path:
    """A 160x120 picture of a few seeded shapes on a seeded background."""
    rng = random.Random(seed)
    image = Image.new("RGB", (160, 120), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y, w, h = rng.randrange(120), rng.randrange(80), rng.randrange(20, 60), rng.randrange(20, 60)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
    image.save(path)
    return path


def main() -> None:
    """Run, then shoot the page at 1400x1000 with every thumbnail in view loaded."""
    work = Path(tempfile.mkdtemp(prefix="gradcam-report-"))
    (work / "photos").mkdir()
    images = [scene(work / "photos" / f"scene_{i:02d}.png", i) for i in range(19)]
    broken = work / "photos" / "photo_broken.png"  # first by name: the failure in view
    broken.write_bytes(b"\x89PNG truncated")
    model = load_model("resnet18", weights="none")
    for record in classify(model, [*images, broken], work / "results", topk=2,
                           methods=["vanilla", "guided", "gradcam", "guided-gradcam"]):
        print(record["status"], record["image"], file=sys.stderr)
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000", "--virtual-time-budget=5000",
                    f"--screenshot={HERE / 'report.png'}", (work / "results" / "index.html").as_uri()],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(HERE / "report.png")


if __name__ == "__main__":
    main()
