"""Every method on the localisation test's trained network: the README's evaluation table.

    python benchmarks/faithfulness.py [--steps 150] [--images 40] [--only gradcam,occlusion]

Trains the ResNet with one block per stage of tests/test_evaluation.py (150 Adam steps on
64x64 scenes where only a 16 px object decides the class, beside two equally conspicuous
random patterns; fixed seeds, ~30 s), then runs `evaluate` on new scenes with their object
masks, no pointing tolerance and 20 curve steps at layer2, once per row below, then Grad-CAM
with random weights as the floor (every row with ``--random``). Prints a Markdown table:
pointing game, energy, deletion and insertion AUC, Average Drop, and seconds per image (for
the trained network), rows in the order listed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the generated data lives in tests/
from gradcam_cli.evaluation import averages, evaluate
from gradcam_cli.models import LoadedModel
from gradcam_cli.occlusion import OcclusionSettings
from gradcam_cli.paths import PathSettings, SmoothSettings
from gradcam_cli.preprocess import Preprocess
from gradcam_cli.refine import CamSettings
from gradcam_cli.rise import RiseSettings
from gradcam_cli.settings import MethodSettings
from gradcam_cli.truth import Truth
from tests.scenes import resnet10, scenes, train_resnet10, write_scenes

SIZE, SIDE, LAYER = 64, 16, "layer2"

# (label, method, its settings): one evaluate run each
ROWS: list[tuple[str, str, MethodSettings]] = [
    ("Grad-CAM", "gradcam", MethodSettings()),
    ("Grad-CAM++", "gradcam++", MethodSettings()),
    ("XGrad-CAM", "xgradcam", MethodSettings()),
    ("Layer-CAM", "layercam", MethodSettings()),
    ("HiResCAM", "hirescam", MethodSettings()),
    ("EigenGrad-CAM", "eigengradcam", MethodSettings()),
    ("Eigen-CAM", "eigencam", MethodSettings()),
    ("Score-CAM", "scorecam", MethodSettings()),
    ("Ablation-CAM", "ablationcam", MethodSettings()),
    ("Grad-CAM, --eigen-smooth", "gradcam", MethodSettings(cam=CamSettings(eigen_smooth=True))),
    ("Grad-CAM, --aug-smooth", "gradcam", MethodSettings(cam=CamSettings(aug_smooth=True))),
    ("Grad-CAM, --smooth 25", "gradcam", MethodSettings(smooth=SmoothSettings(samples=25))),
    ("FullGrad", "fullgrad", MethodSettings()),
    ("occlusion, patch 8, stride 4", "occlusion", MethodSettings(occlusion=OcclusionSettings((8,), 4))),
    ("occlusion, patch 16, stride 8", "occlusion", MethodSettings(occlusion=OcclusionSettings((16,), 8))),
    ("RISE, 4000 masks, cell 8", "rise", MethodSettings(rise=RiseSettings(cell=8))),
    ("vanilla backprop", "vanilla", MethodSettings()),
    ("vanilla, --smooth 25 (SmoothGrad)", "vanilla", MethodSettings(smooth=SmoothSettings(samples=25))),
    ("integrated gradients, 32 steps, black", "integrated-gradients", MethodSettings()),
    ("integrated gradients, 32 steps, blur", "integrated-gradients",
     MethodSettings(ig=PathSettings(ig_baseline="blur"))),
    ("guided backprop", "guided", MethodSettings()),
    ("guided Grad-CAM", "guided-gradcam", MethodSettings()),
]


def as_model(net: torch.nn.Module) -> LoadedModel:
    """The network as gradcam loads a model: 64x64 inputs in [0, 1], four classes."""
    preprocess = Preprocess((SIZE, SIZE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return LoadedModel("resnet10", net.eval(), ["square", "plus", "x", "corner"], preprocess, "bench")


def measure(model: LoadedModel, paths: list[Path], out: Path, method: str,
            settings: MethodSettings) -> tuple[dict, float]:
    """One evaluate run: the method's averages and the seconds per image."""
    start = time.perf_counter()
    records = list(evaluate(model, paths, out, layer=LAYER, methods=[method], steps=20,
                            truth=Truth(mask_dir=paths[0].parent / "masks"), tolerance=0,
                            batch_size=20, settings=settings))
    seconds = (time.perf_counter() - start) / len(paths)
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"{method}: {failed[0].get('error')}")
    return next(iter(averages(records).values())), seconds


def main() -> None:
    """Train, evaluate every row on the trained and the random network, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--images", type=int, default=40, help="scenes evaluated")
    parser.add_argument("--only", default="", help="methods to run, comma-separated (default: all rows)")
    parser.add_argument("--random", action="store_true", help="every row with random weights too")
    args = parser.parse_args()
    only = {m for m in args.only.split(",") if m}
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    trained = as_model(train_resnet10(args.steps, g, SIZE, SIDE))
    images, _, where = scenes(args.images, g, size=SIZE, side=SIDE, distractors=2)
    torch.manual_seed(1)
    random = as_model(resnet10())
    print("| method | pointing game | energy | deletion AUC | insertion AUC | Average Drop % | s/image |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_scenes(Path(tmp) / "scenes", images, where, SIDE)
        for prefix, model in (("", trained), ("random weights: ", random)):
            for i, (label, method, settings) in enumerate(ROWS):
                if (only and method not in only) or (prefix and not args.random and label != "Grad-CAM"):
                    continue
                row, seconds = measure(model, paths, Path(tmp) / f"{prefix[:6]}{i}", method, settings)
                timing = f"{seconds:.3f}" if not prefix else ""
                print(f"| {prefix}{label} | {row['pointing_hit']:.3f} | {row['energy']:.3f} | "
                      f"{row['deletion_auc']:.3f} | {row['insertion_auc']:.3f} | "
                      f"{row['confidence_drop']:.1f} | {timing} |", flush=True)


if __name__ == "__main__":
    main()
