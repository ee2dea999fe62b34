"""Detection: gradcam's per-detection maps against pytorch-grad-cam's tutorial pipeline, in one run.

    python benchmarks/bench_detect.py [--arch fasterrcnn_resnet50_fpn] [--size 480,640]
                                      [--detections 5] [--threads 2] [--repeats 3]

One random-weight image, its best ``--detections`` detections (score threshold 0: random heads
score low), the time to explain all of them, each the median of ``--repeats`` after a warm-up:

- Grad-CAM of each detection at ``backbone.body.layer4`` (a tensor: pytorch-grad-cam records no
  gradient at ``backbone``'s dict). gradcam: ``explain_detections`` (one forward pass, one
  backward pass per detection). pytorch-grad-cam: its tutorial's steps, a forward pass to find
  the boxes, then one ``GradCAM`` call with ``FasterRCNNBoxScoreTarget`` per detection (each a
  forward and a backward pass).
- Eigen-CAM at ``backbone`` (the FPN maps). gradcam: ``explain_detections`` with eigencam (one
  forward pass). pytorch-grad-cam: the tutorial's forward pass, then one ``EigenCAM`` call with
  ``fasterrcnn_reshape_transform`` for all boxes.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from common import median_time
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform

from gradcam_cli.models import load_detector
from gradcam_cli.tasks.detect import explain_detections


def theirs_gradcam(model: torch.nn.Module, x: torch.Tensor, count: int) -> None:
    """The tutorial's pipeline with Grad-CAM: detect, then one GradCAM call per detection."""
    with torch.no_grad():
        output = model([x])[0]
    with GradCAM(model=model, target_layers=[model.backbone.body.layer4]) as cam:
        for d in range(count):
            target = FasterRCNNBoxScoreTarget([int(output["labels"][d])], [output["boxes"][d].numpy()])
            cam(input_tensor=x[None], targets=[target])


def theirs_eigencam(model: torch.nn.Module, x: torch.Tensor, count: int) -> None:
    """The tutorial's pipeline: detect, then one EigenCAM call over the FPN for all boxes."""
    with torch.no_grad():
        output = model([x])[0]
    targets = [FasterRCNNBoxScoreTarget(output["labels"][:count].tolist(), output["boxes"][:count].numpy())]
    with EigenCAM(model=model, target_layers=[model.backbone],
                  reshape_transform=fasterrcnn_reshape_transform) as cam:
        cam(input_tensor=x[None], targets=targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="fasterrcnn_resnet50_fpn")
    parser.add_argument("--size", default="480,640", help="height,width of the image")
    parser.add_argument("--detections", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    height, width = map(int, args.size.split(","))
    ours = load_detector(args.arch, "none").module
    reference = copy.deepcopy(ours)
    reference.roi_heads.score_thresh = 0.0  # as gradcam's --score-threshold 0 does for its pass
    x = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    n = args.detections
    rows = {
        f"Grad-CAM at layer4, {n} detections": (
            lambda: explain_detections(ours, x, "backbone.body.layer4", ["gradcam"], 0.0, n),
            lambda: theirs_gradcam(reference, x, n)),
        f"Eigen-CAM at the FPN, {n} detections": (
            lambda: explain_detections(ours, x, "backbone", ["eigencam"], 0.0, n),
            lambda: theirs_eigencam(reference, x, n)),
    }
    print(f"{args.arch}, random weights, a {height}x{width} image, {args.threads} threads; median of "
          f"{args.repeats} after a warm-up")
    for name, (gradcam, peer) in rows.items():
        mine, other = median_time(gradcam, args.repeats), median_time(peer, args.repeats)
        print(f"  {name:<40} gradcam {mine:6.2f} s  pytorch-grad-cam {other:6.2f} s  "
              f"ratio {mine / other:.2f}")


if __name__ == "__main__":
    main()
