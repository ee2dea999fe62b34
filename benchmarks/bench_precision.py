"""bf16 against fp32, per method, on the localisation test's trained network (README: Precision).

    python benchmarks/bench_precision.py [--images 40] [--only gradcam,scorecam] [--precision bf16]

Trains the resnet10 of benchmarks/faithfulness.py (same seeds, same scenes), then for every
row of its table explains the scenes in fp32 and in the reduced precision and prints:

- the largest difference of the min-max normalised maps (each map scaled to [0, 1], as it is
  drawn), over every image and pixel, and the mean over images of the per-image largest;
- how often the explained top-1 class changed (near-tied logits rounded differently);
- the pointing game, deletion and insertion AUC of each precision's maps (``evaluate``, whose
  curves always score in fp32, so only the maps differ);
- the time of the reduced run over the fp32 run (``evaluate`` seconds per image, one pair).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_model
from faithfulness import LAYER, ROWS, SIDE, SIZE, as_model, measure

from gradcam_cli.explanation import explain
from gradcam_cli.paths import with_normalisation
from gradcam_cli.precision import Precision
from tests.scenes import scenes, train_resnet10, write_scenes


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each image's map (channels summed, as drawn) scaled to [0, 1]."""
    flat = maps.float().sum(dim=-3).flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return (flat - low) / (high - low).clamp_min(1e-12)


def main() -> None:
    """Train once, then per row: map differences, class changes, metrics and time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="scenes explained")
    parser.add_argument("--only", default="", help="methods to run, comma-separated (default: all rows)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    args = parser.parse_args()
    only = {m for m in args.only.split(",") if m}
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = as_model(train_resnet10(150, g, SIZE, SIDE))
    images, _, where = scenes(args.images, g, size=SIZE, side=SIDE, distractors=2)
    low = Precision(args.precision)
    print(f"{cpu_model()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.images} scenes; {args.precision} vs fp32\n")
    print("| method | largest map difference | mean per image | top-1 changed | pointing game fp32 → "
          f"{args.precision} | deletion | insertion | time {args.precision} / fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_scenes(Path(tmp) / "scenes", images, where, SIDE)
        for i, (label, method, settings) in enumerate(ROWS):
            if only and method not in only:
                continue
            settings = with_normalisation(settings, model.preprocess)  # as the commands do
            reduced = replace(settings, precision=low)
            full = explain(model.module, images, LAYER, topk=1, methods=[method], settings=settings,
                           batch_size=20)
            half = explain(model.module, images, LAYER, topk=1, methods=[method], settings=reduced,
                           batch_size=20)
            name = next(iter(full.maps))
            gap = (normalised(full.maps[name][:, 0]) - normalised(half.maps[name][:, 0])).abs().amax(1)
            changed = int((full.classes[:, 0] != half.classes[:, 0]).sum())
            a, ta = measure(model, paths, Path(tmp) / f"fp32-{i}", method, settings)
            b, tb = measure(model, paths, Path(tmp) / f"low-{i}", method, reduced)
            ratio = tb / ta
            print(f"| {label} | {float(gap.max()):.4f} | {float(gap.mean()):.4f} | {changed}/{len(images)} | "
                  f"{a['pointing_hit']:.3f} → {b['pointing_hit']:.3f} | "
                  f"{a['deletion_auc']:.3f} → {b['deletion_auc']:.3f} | "
                  f"{a['insertion_auc']:.3f} → {b['insertion_auc']:.3f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
