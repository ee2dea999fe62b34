"""`detect`: the explained box score and its maps checked by hand on tiny detectors built from
torchvision's classes, Grad-CAM against pytorch-grad-cam's FasterRCNNBoxScoreTarget, and the
command end to end (random weights, small images)."""

from __future__ import annotations

import copy
import json
import urllib.error
import warnings
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from gradcam_cli.errors import ArgumentError
from gradcam_cli.layout import Layout
from gradcam_cli.methods import cam
from gradcam_cli.models import DETECTORS, load_detector
from gradcam_cli.tasks.detect import box_score, explain_detections

from .conftest import make_image
from .test_cli import run

FAST = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the quickest torchvision detector
BASE = ["detect", "--arch", FAST, "--weights", "none", "--no-cuda", "--score-threshold", "0",
        "--max-detections", "2", "--json"]


class TwoLevels(nn.Module):
    """A backbone with two feature maps (strides 4 and 8) in an ordered dict, as an FPN's."""

    out_channels = 6

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        first = self.first(x)
        return OrderedDict([("0", first), ("1", self.second(first))])


def tiny_detector(levels: int) -> FasterRCNN:
    """A Faster R-CNN at 64 px with a one-map (a Sequential) or two-map backbone, seeded."""
    torch.manual_seed(0)
    if levels == 1:
        backbone = nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1), nn.ReLU())
        backbone.out_channels = 6
    else:
        backbone = TwoLevels()
    names = [str(i) for i in range(levels)]
    anchors = AnchorGenerator(sizes=((16, 32),) * levels, aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    return FasterRCNN(backbone, num_classes=4, min_size=64, max_size=96, rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(names, 4, 2), representation_size=32).eval()


def by_hand(net: FasterRCNN, x: torch.Tensor) -> tuple[dict, list[torch.Tensor], torch.Tensor]:
    """The detector's output with every score kept, its backbone's maps and the input that
    requires grad: the reference pass, with the test's own hook and threshold."""
    kept: list[torch.Tensor] = []
    handle = net.backbone.register_forward_hook(
        lambda _m, _i, out: kept.extend([out] if isinstance(out, torch.Tensor) else out.values()))
    saved, net.roi_heads.score_thresh = net.roi_heads.score_thresh, 0.0
    try:
        x = x.clone().requires_grad_(True)
        output = net([x])[0]
    finally:
        handle.remove()
        net.roi_heads.score_thresh = saved
    return output, kept, x


def hand_gradcam(maps: list[torch.Tensor], grads: list[torch.Tensor], padded: tuple[int, int],
                 resized: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM by its definition at each map, upsampled to the ``padded`` batch the maps were
    computed on and summed over the maps; the padding cut off (the ``resized`` image is its top
    left) and the rest brought back to the image's ``size``."""
    total = torch.zeros(1, 1, *padded)
    for a, g in zip(maps, grads, strict=True):
        cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a.detach()).sum(dim=1, keepdim=True))
        total += F.interpolate(cam, size=padded, mode="bilinear", align_corners=False)
    image = total[..., :resized[0], :resized[1]]
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)[0, 0]


def test_box_score_takes_the_best_box_of_the_label() -> None:
    """S = score + IoU of the same-label box overlapping most; an identical box of another
    label listed first (single-stage detectors give one box several classes) is passed over,
    where pytorch-grad-cam's target would give 0."""
    output = {"boxes": torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.], [0., 0., 10., 5.]]),
              "labels": torch.tensor([1, 2, 2]), "scores": torch.tensor([0.9, 0.6, 0.8])}
    box = torch.tensor([0., 0., 10., 10.])
    assert float(box_score(output, box, 2)) == pytest.approx(0.6 + 1.0)
    assert float(box_score(output, torch.tensor([0., 0., 10., 6.]), 2)) == pytest.approx(0.8 + 50 / 60)
    assert float(box_score(output, box, 3)) == 0.0  # no box of the label
    assert float(box_score(output, torch.tensor([0., 0., 10., 2.]), 1)) == 0.0  # IoU 0.2 <= 0.5
    theirs = FasterRCNNBoxScoreTarget([2], [box.numpy()])(output)
    assert float(theirs) == 0.0  # the reference's argmax lands on label 1's identical box


@pytest.mark.parametrize("levels", [1, 2])
def test_maps_of_a_detection_by_hand(levels: int) -> None:
    """Each detection's S is its score + 1 (its own box), and its gradient is the score's (the
    IoU's is 0 at its maximum): Grad-CAM (each map's, summed when the backbone gives two), and
    vanilla backprop equal autograd of the score on a non-square image. The detector resizes the
    48x64 image to 64x85 and pads it to 64x96 (a multiple of 32): the maps are of the padded
    batch, so the padding is cut off before they are brought to the image's size."""
    net = tiny_detector(levels)
    x = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1))
    found = explain_detections(net, x, "backbone", ["gradcam", "vanilla", "eigencam", "guided-gradcam"],
                               score_threshold=0.0, max_detections=3)
    guided = explain_detections(net, x, "backbone", ["guided"], score_threshold=0.0, max_detections=3)
    for k in range(3):  # guided backprop times Grad-CAM at the image's size
        product = guided.maps["guided"][k] * found.map("gradcam", k)
        assert torch.allclose(found.maps["guided-gradcam"][k], product)
    assert not torch.allclose(guided.maps["guided"], found.maps["vanilla"])
    output, kept, xx = by_hand(net, x)
    assert len(found.labels) == 3 and found.maps["gradcam"].shape == (3, 1, 64, 85)  # the resized image
    order = output["scores"].argsort(descending=True, stable=True)[:3].tolist()
    for k, d in enumerate(order):
        assert torch.allclose(found.boxes[k], output["boxes"][d].detach())
        assert found.explained[k] == pytest.approx(float(output["scores"][d].detach()) + 1.0, abs=1e-6)
        *grads, gx = torch.autograd.grad(output["scores"][d], [*kept, xx], retain_graph=True)
        expected = hand_gradcam(kept, grads, (64, 96), (64, 85), (48, 64))
        assert expected.max() > 0
        assert torch.allclose(found.map("gradcam", k)[0], expected, atol=1e-5 * float(expected.max()))
        assert torch.allclose(found.maps["vanilla"][k], gx, atol=1e-6 * float(gx.abs().max()))
    # Eigen-CAM needs no gradient: every map counts (a box's gradient reaches only the map its
    # box was pooled from), so it shows the fold: each map's own Eigen-CAM, summed
    each = [cam("eigencam", a.detach(), None, (64, 96), Layout("nchw", tuple(a.shape[-2:]))) for a in kept]
    assert all(float(e.max()) > 0 for e in each)
    eigen = F.interpolate(sum(each)[..., :64, :85], size=(48, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(found.map("eigencam", 0), eigen, atol=1e-6 * float(eigen.max()))


def test_the_detector_is_left_as_it_was() -> None:
    """Its own score threshold is lowered for the pass and restored; no hook stays behind."""
    net = tiny_detector(1)
    explain_detections(net, torch.rand(3, 64, 64), "backbone", ["gradcam"], score_threshold=0.0)
    assert net.roi_heads.score_thresh == 0.05
    assert not any(m._forward_hooks for m in net.modules())


def test_gradcam_equals_pytorch_grad_cam_with_its_box_target() -> None:
    """fasterrcnn_resnet50_fpn (random weights, run at 256x384 to be quick): Grad-CAM at
    ``backbone``, the FPN's maps folded, for the six best detections, against pytorch-grad-cam's
    GradCAM with FasterRCNNBoxScoreTarget over the same maps as tensor layers (the FPN's
    ``layer_blocks``; at ``backbone``'s dict it records no gradient and fails) on a copy of the
    model, after the same min-max normalisation. Its multi-layer mean of each layer's
    normalised map equals the fold because a detection's gradient reaches one level. The image
    is the detector's own size, a multiple of 32: no resize, no padding (which pytorch-grad-cam
    stretches over the image and gradcam cuts off)."""
    net = load_detector("fasterrcnn_resnet50_fpn", "none").module
    net.transform.min_size, net.transform.max_size = (256,), 384
    reference = copy.deepcopy(net)
    reference.roi_heads.score_thresh = 0.0
    x = torch.rand(3, 256, 384, generator=torch.Generator().manual_seed(2))
    found = explain_detections(net, x, "backbone", ["gradcam"], score_threshold=0.0, max_detections=6)
    differences = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pgc.GradCAM(model=reference, target_layers=list(reference.backbone.fpn.layer_blocks)) as cam:
            for k in range(6):
                target = FasterRCNNBoxScoreTarget([found.labels[k]], [found.boxes[k].numpy()])
                theirs = cam(input_tensor=x[None], targets=[target])[0]
                ours = found.map("gradcam", k)[0].numpy()
                assert theirs.shape == ours.shape and ours.max() > 0
                differences.append(float(np.abs(normalised(ours) - normalised(theirs)).max()))
    assert max(differences) < 1e-4, differences


def normalised(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]."""
    a = a - a.min()
    return a / a.max()


def test_cli_writes_maps_grid_and_record_and_resumes(tmp_path: Path) -> None:
    """Two detections of a non-square image, boxes in its pixels, every file there; a broken
    file beside it fails alone (exit 1); a second run with --skip-existing skips the image."""
    image = make_image(tmp_path / "a.png", size=(160, 120))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "o"
    code, stdout, err = run(*BASE, "--image-path", str(image), "--image-path", str(broken),
                            "--method", "gradcam,eigencam,vanilla", "--output-dir", str(out))
    assert code == 1, err
    good, bad = (json.loads(line) for line in stdout.splitlines())
    assert bad["status"] == "error" and str(broken) in bad["error"]
    assert good["status"] == "ok" and good["image_size"] == [120, 160] and len(good["detections"]) == 2
    for d in good["detections"]:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
        assert set(d["maps"]) == {"gradcam", "eigencam", "vanilla"}
        for path in d["maps"].values():
            assert Image.open(path).size == (160, 120)
    assert Image.open(good["grid"]).size[1] > 2 * 120  # a title and a row per detection
    page = (out / "index.html").read_text()  # the run's page lists each detection with its maps
    for d in good["detections"]:
        assert f">{d['name']}</span>" in page
        assert f'href="{quote(str(Path(d["maps"]["gradcam"]).relative_to(out)))}"' in page
    code, stdout, _ = run(*BASE, "--image-path", str(image), "--method", "gradcam,eigencam,vanilla",
                          "--output-dir", str(out), "--skip-existing")
    assert code == 0 and json.loads(stdout)["status"] == "skipped"


def test_cli_class_filter_and_threshold(tmp_path: Path) -> None:
    """--class-id keeps only that class's detections; a threshold above every score leaves an
    image explained with no detection (not a failure)."""
    image = make_image(tmp_path / "a.png", size=(96, 96))
    code, stdout, err = run(*BASE, "--image-path", str(image), "--output-dir", str(tmp_path / "o"))
    assert code == 0, err
    label = json.loads(stdout)["detections"][1]["class_id"]
    code, stdout, err = run(*BASE, "--image-path", str(image), "--output-dir", str(tmp_path / "p"),
                            "--class-id", str(label))
    assert code == 0 and {d["class_id"] for d in json.loads(stdout)["detections"]} == {label}, err
    code, stdout, err = run(*BASE[:-5], "--image-path", str(image), "--output-dir", str(tmp_path / "q"),
                            "--score-threshold", "0.99", "--json")
    record = json.loads(stdout)
    assert code == 0 and record["detections"] == [] and Path(record["grid"]).is_file(), err


@pytest.mark.parametrize(("args", "said"), [
    (["--input-size", "64"], "No such option '--input-size'"),
    (["--method", "scorecam"], "--method scorecam: not available for detection"),
    (["--arch", "resnet18"], "--arch resnet18: unknown detection architecture"),
])
def test_cli_usage_errors_are_one_line(tmp_path: Path, args: list[str], said: str) -> None:
    image = make_image(tmp_path / "a.png")
    code, _, err = run(*BASE, "--image-path", str(image), "--output-dir", str(tmp_path / "o"), *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"gradcam: error: {said}"), err


def test_library_refuses_bad_arguments_naming_them() -> None:
    from gradcam_cli.tasks.detect import detect
    model = load_detector(FAST, "none")
    for name, value in (("score_threshold", 1.5), ("max_detections", 0), ("class_ids", [91])):
        with pytest.raises(ArgumentError) as error:
            detect(model, [], **{name: value})
        assert error.value.argument == name


@pytest.mark.sweep
@pytest.mark.parametrize("arch", DETECTORS)
def test_every_detector_end_to_end(arch: str, tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png", size=(128, 96))
    code, stdout, err = run("detect", "--arch", arch, "--weights", "none", "--no-cuda", "--score-threshold",
                            "0", "--max-detections", "1", "--json", "--image-path", str(image),
                            "--output-dir", str(tmp_path / "o"), "--method", "gradcam,eigencam,vanilla")
    assert code == 0, err
    (detection,) = json.loads(stdout)["detections"]
    assert all(Path(p).is_file() for p in detection["maps"].values())


def test_checkpoint_with_its_own_classes(tmp_path: Path) -> None:
    """A detector checkpoint with 3 classes loads into its own head (weights in place, digest
    recorded, numbered class names); one of another head size is refused naming --weights."""
    torch.manual_seed(3)
    net = torchvision.models.get_model(FAST, weights=None, weights_backbone=None, num_classes=3)
    path = tmp_path / "det.pt"
    torch.save(net.state_dict(), path)
    model = load_detector(FAST, str(path), num_classes=3)
    head = model.module.roi_heads.box_predictor.cls_score.weight
    assert torch.equal(head, net.roi_heads.box_predictor.cls_score.weight) and model.weights_sha256
    assert model.categories == ["class 0", "class 1", "class 2"]
    with pytest.raises(ArgumentError) as error:
        load_detector(FAST, str(path))  # COCO's 91 classes: the head does not fit
    assert error.value.argument == "weights"


def test_failed_download_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_a: object, **_k: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(ArgumentError) as info:
        load_detector(FAST)
    message = str(info.value)
    assert info.value.argument == "weights" and "checkpoint file" in message and "'none'" in message


def test_only_the_final_threshold_is_lowered() -> None:
    """The detections' own threshold (RoIHeads') is lowered for the pass; the RPN's is not:
    more proposals would give the heads new boxes that can suppress, by NMS, a detection the
    model reports, so the boxes explained would not be the model's."""
    net = load_detector(FAST, "none").module
    seen = {}
    handle = net.roi_heads.register_forward_pre_hook(
        lambda _m, _i: seen.update(rpn=net.rpn.score_thresh, heads=net.roi_heads.score_thresh))
    try:
        explain_detections(net, torch.rand(3, 64, 64), "backbone", ["gradcam"], score_threshold=0.0)
    finally:
        handle.remove()
    assert seen == {"rpn": 0.05, "heads": 0.0}
    assert (net.rpn.score_thresh, net.roi_heads.score_thresh) == (0.05, 0.05)


def test_a_layer_after_frozen_weights_still_gets_its_gradient() -> None:
    """Pretrained torchvision detectors freeze their first layers (requires_grad False): a CAM
    at such a layer, asked for without an input-gradient map, equals the one computed beside
    vanilla backprop (whose input gradient puts the layer in the graph anyway)."""
    net = tiny_detector(1)
    net.backbone[0].requires_grad_(False)
    x = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1))
    alone = explain_detections(net, x, "backbone.0", ["gradcam"], score_threshold=0.0, max_detections=2)
    beside = explain_detections(net, x, "backbone.0", ["gradcam", "vanilla"], score_threshold=0.0,
                                max_detections=2)
    assert float(beside.maps["gradcam"].max()) > 0
    assert torch.allclose(alone.maps["gradcam"], beside.maps["gradcam"])
