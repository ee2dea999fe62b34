"""Time gradcam's classify maps against captum and against the bare model, in one run.

    python benchmarks/bench_classify.py [--arch resnet50] [--repeats 5] [--threads 2]

Prints medians after a warm-up (model loading excluded) and the ratios gradcam / reference.
"""

from __future__ import annotations

import argparse

import torch
from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam, Saliency
from common import cpu_model, median_time, memory_in_child, report_memory
from torchvision.models import get_model

from gradcam_cli import explain
from gradcam_cli.models import default_layer
from gradcam_cli.preprocess import Preprocess


def floor(model: torch.nn.Module, x: torch.Tensor, classes: list[int], backwards: int) -> None:
    """The least any tool can do: one forward pass and ``backwards`` input-gradient passes."""
    xi = x.clone().requires_grad_(True)
    logits = model(xi)
    for i in range(backwards):
        torch.autograd.grad(logits[0, classes[i % len(classes)]], xi, retain_graph=True)


def floor_cam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The least a Grad-CAM of the top class can cost: one forward pass keeping the layer's
    output, one gradient of the top logit to it."""
    kept = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.setdefault("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return torch.autograd.grad(logits[0, int(logits[0].argmax())], kept["a"])[0]


def captum_five(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, classes: list[int]) -> None:
    """captum computing the same five maps for each class."""
    for c in classes:
        captum_maps(model, layer, x, c)


def captum_maps(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor,
                c: int) -> dict[str, torch.Tensor]:
    """captum's versions of gradcam's five maps for class ``c``, by gradcam's method names."""
    return {"vanilla": Saliency(model).attribute(x, target=c, abs=False),
            "guided": GuidedBackprop(model).attribute(x, target=c),
            "deconv": Deconvolution(model).attribute(x, target=c),
            "gradcam": captum_gradcam(model, layer, x, c),
            "guided-gradcam": GuidedGradCam(model, layer).attribute(x, target=c,
                                                                    interpolate_mode="bilinear")}


def captum_gradcam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, c: int) -> torch.Tensor:
    """captum's Grad-CAM upsampled to the input, as gradcam returns it."""
    cam = LayerGradCam(model, layer).attribute(x, target=c, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = get_model(args.arch, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    layer_name = default_layer(args.arch, model, Preprocess((args.size,) * 2, (0.5,) * 3, (0.5,) * 3))
    layer = dict(model.named_modules())[layer_name]
    classes = model(x).topk(3).indices[0].tolist()

    tasks = {
        "floor: 1 forward + 9 backward": lambda: floor(model, x, classes, 9),
        "gradcam: top-3, five maps": lambda: explain(model, x, layer_name, topk=3),
        "captum: top-3, five maps": lambda: captum_five(model, layer, x, classes),
        "floor: forward + gradient to the layer": lambda: floor_cam(model, layer, x),
        "gradcam: Grad-CAM top-1": lambda: explain(model, x, layer_name, topk=1, methods=["gradcam"]),
        "captum: LayerGradCam top-1": lambda: captum_gradcam(model, layer, x, classes[0]),
    }
    if args.memory_of:
        report_memory(tasks[args.memory_of])
        return
    rows = {name: median_time(task, args.repeats) for name, task in tasks.items()}
    same = ["--arch", args.arch, "--size", str(args.size), "--threads", str(args.threads)]
    memory = {name: memory_in_child(__file__, [*same, "--memory-of", name]) for name in tasks}
    ours = explain(model, x, layer_name, class_ids=classes[:1]).maps
    theirs = captum_maps(model, layer, x, classes[0])
    diffs = {m: float((ours[m][0, 0] / ours[m][0, 0].abs().max()
                       - theirs[m][0].detach() / theirs[m][0].detach().abs().max()).abs().max())
             for m in theirs}

    print(f"{args.arch} at {args.size}, layer {layer_name}, {args.threads} threads, "
          f"median of {args.repeats} (torch {torch.__version__}; {cpu_model()})")
    for name, seconds in rows.items():
        print(f"  {name:<34} {seconds:7.3f} s   memory added {memory[name]:6.0f} MB")
    five = rows["gradcam: top-3, five maps"]
    versus_captum = five / rows["captum: top-3, five maps"]
    print(f"  ratio five maps gradcam/captum      {versus_captum:.2f}  (target <= 0.40)")
    print(f"  ratio five maps gradcam/floor       {five / rows['floor: 1 forward + 9 backward']:.2f}")
    cam = rows["gradcam: Grad-CAM top-1"] / rows["captum: LayerGradCam top-1"]
    print(f"  ratio Grad-CAM gradcam/captum       {cam:.2f}  (target <= 1.00)")
    least = rows["gradcam: Grad-CAM top-1"] / rows["floor: forward + gradient to the layer"]
    print(f"  ratio Grad-CAM gradcam/floor        {least:.2f}  (target <= 1.05)")
    held = memory["gradcam: top-3, five maps"] / max(memory["captum: top-3, five maps"], 1)
    print(f"  ratio memory added five maps gradcam/captum {held:.2f}")
    print("  max |difference| vs captum, each map divided by its largest magnitude: "
          + ", ".join(f"{m} {d:.1e}" for m, d in diffs.items()))


if __name__ == "__main__":
    main()
