"""CAM methods: gradcam against pytorch-grad-cam and torchcam, time, memory and maps.

    python benchmarks/bench_cams.py [--arch resnet18] [--layer layer4] [--size 224]
                                    [--threads 2] [--repeats 3] [--batch-size 32]
                                    [--methods gradcam,gradcam++,scorecam,ablationcam]

Grad-CAM, Grad-CAM++, Score-CAM and Ablation-CAM (torchcam has no Ablation-CAM). Each
measurement runs in a fresh process. Memory is reported twice: the process's peak
resident memory (torch, the model and the interpreter included), and the part the
explanation itself adds: the peak during the calls (VmHWM after resetting it through
/proc/self/clear_refs) minus the resident memory just before them. Times are medians of
--repeats runs (at least 10 for the gradient methods, which take a fraction of a second),
each explaining the top-1 class of one random-weight image and upsampling the map to the
input, with the same batch size for every tool. The maps are compared with gradcam's in the
same run (maximum difference after min-max normalisation). pytorch-grad-cam's Score-CAM
upsamples its masks with align_corners=True where gradcam uses align_corners=False (README,
"Where gradcam differs from peers"); here it is switched to align_corners=False so that the
maps are comparable, which does not change its cost.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from common import added_memory

METHODS = ("gradcam", "gradcam++", "scorecam", "ablationcam")
PEERS = ("pytorch-grad-cam", "torchcam")
FAST = ("gradcam", "gradcam++")


def workload(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The random-weight model and fixed input every worker explains."""
    torch.manual_seed(0)
    return getattr(torchvision.models, args.arch)().eval(), torch.randn(1, 3, args.size, args.size)


def run_gradcam(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace,
                method: str) -> tuple[np.ndarray, int]:
    """gradcam's map for the top-1 class."""
    from gradcam_cli import explain
    result = explain(model, x, args.layer, topk=1, methods=[method], batch_size=args.batch_size)
    return result.maps[method][0, 0, 0].numpy(), int(result.classes[0, 0])


def run_reference(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace,
                  method: str) -> tuple[np.ndarray, int]:
    """pytorch-grad-cam's map for the top-1 class (Score-CAM masks upsampled as gradcam's)."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    torch.nn.UpsamplingBilinear2d = lambda size: torch.nn.Upsample(size=size, mode="bilinear",
                                                                   align_corners=False)
    from gradcam_cli.models import find_layer
    with torch.no_grad():
        class_id = int(model(x).argmax())
    kind = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "scorecam": pgc.ScoreCAM,
            "ablationcam": pgc.AblationCAM}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with kind(model=model, target_layers=[find_layer(model, args.layer)]) as cam:
            cam.batch_size = args.batch_size
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0], class_id


def run_torchcam(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace,
                 method: str) -> tuple[np.ndarray, int]:
    """torchcam's map for the top-1 class, upsampled bilinearly to the input."""
    from torchcam.methods import GradCAM, GradCAMpp, ScoreCAM
    kind = {"gradcam": GradCAM, "gradcam++": GradCAMpp, "scorecam": ScoreCAM}[method]
    options = {"batch_size": args.batch_size} if method == "scorecam" else {}
    with kind(model, target_layer=args.layer, input_shape=tuple(x.shape[1:]), **options) as extractor:
        scores = model(x)
        class_id = int(scores.argmax())
        cam = extractor(class_id, scores)[0]
    size = tuple(x.shape[-2:])
    cam = torch.nn.functional.interpolate(cam[None], size=size, mode="bilinear", align_corners=False)
    return cam[0, 0].detach().numpy(), class_id


RUNNERS = {"gradcam": run_gradcam, "pytorch-grad-cam": run_reference, "torchcam": run_torchcam}


def supported(tool: str, method: str) -> bool:
    """Whether ``tool`` has ``method`` (torchcam has no Ablation-CAM)."""
    return not (tool == "torchcam" and method == "ablationcam")


def worker(args: argparse.Namespace) -> None:
    """Time one tool on one method in this process; print seconds, peak RSS and save the map."""
    torch.set_num_threads(args.threads)
    model, x = workload(args)
    run = RUNNERS[args.worker]
    with added_memory() as added:
        times = []
        for _ in range(max(args.repeats, 10) if args.method in FAST else args.repeats):
            start = time.perf_counter()
            cam, class_id = run(model, x, args, args.method)
            times.append(time.perf_counter() - start)
    np.save(args.out, cam)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": statistics.median(times), "peak_mb": peak_mb,
                      "added_mb": added["mb"], "class": class_id}))


def measure(tool: str, method: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one worker process and read its result line."""
    command = [sys.executable, __file__, "--worker", tool, "--method", method, "--out", str(out),
               "--arch", args.arch, "--layer", args.layer, "--size", str(args.size),
               "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def normalised(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]."""
    a = a - a.min()
    return a / a.max() if a.max() > 0 else a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--worker", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{args.arch} @ {args.layer}, {args.size}x{args.size}, {args.threads} threads, "
          f"batch {args.batch_size}, median of {args.repeats} (gradient methods: of 10); "
          "ratio = gradcam / peer")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            ours = measure("gradcam", method, args, Path(tmp) / "gradcam.npy")
            print(f"  {method:<12} gradcam            {ours['seconds']:7.3f} s  peak RSS "
                  f"{ours['peak_mb']:5.0f} MB  added {ours['added_mb']:5.0f} MB")
            for peer in PEERS:
                if not supported(peer, method):
                    print(f"  {method:<12} {peer:<18} (no such method)")
                    continue
                ref = measure(peer, method, args, Path(tmp) / "peer.npy")
                diff = np.abs(normalised(np.load(Path(tmp) / "gradcam.npy"))
                              - normalised(np.load(Path(tmp) / "peer.npy"))).max()
                print(f"  {method:<12} {peer:<18} {ref['seconds']:7.3f} s  peak RSS "
                      f"{ref['peak_mb']:5.0f} MB  added {ref['added_mb']:5.0f} MB   ratios: time "
                      f"{ours['seconds'] / ref['seconds']:.3f}  peak "
                      f"{ours['peak_mb'] / ref['peak_mb']:.2f}  added "
                      f"{ours['added_mb'] / max(ref['added_mb'], 1):.2f}   max map diff {diff:.1e}"
                      f"{'' if ours['class'] == ref['class'] else '  (different classes!)'}")


if __name__ == "__main__":
    main()
