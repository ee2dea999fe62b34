"""`segment`: the masked logit sum checked by hand, Grad-CAM against pytorch-grad-cam's
SemanticSegmentationTarget, and the command end to end (random weights, small inputs)."""

from __future__ import annotations

import json
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from PIL import Image
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
from torch import nn

from gradcam_cli.cli import main
from gradcam_cli.errors import ArgumentError, InputError
from gradcam_cli.explanation import explain_layers
from gradcam_cli.models import SEGMENTERS, load_segmenter
from gradcam_cli.preprocess import Preprocess
from gradcam_cli.render import GAP, LABEL_WIDTH, TITLE_HEIGHT
from gradcam_cli.tasks.segment import SEGMENT_METHODS, outline, region_of, segment_target

from .conftest import make_image

FAST = "lraspp_mobilenet_v3_large"  # the quickest torchvision segmenter
SIZE = 64
BASE = ["segment", "--arch", FAST, "--weights", "none", "--no-cuda", "--input-size", str(SIZE)]


class TinySegmenter(nn.Module):
    """Two convolutions at full resolution returning {"out": logits}, as torchvision's do."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(self.features(x))}


def out_only(net: nn.Module) -> nn.Module:
    """The network with its forward returning ``out``, by the test's own hook."""
    net.register_forward_hook(lambda _m, _i, output: output["out"])
    return net.eval()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("with_region", [False, True])
def test_gradcam_of_the_masked_logit_sum_by_hand(with_region: bool) -> None:
    """Classes, scalars and Grad-CAM from the definition: S_c = Σ_p z_c(p) M_c(p), M_c the
    pixels predicted as c (or a region), α_k = mean of dS/dA^k, ReLU(Σ_k α_k A^k); the layer
    keeps the input's size, so no upsampling is involved."""
    torch.manual_seed(0)
    net, x = out_only(TinySegmenter()), torch.randn(2, 3, 12, 12)
    region = torch.zeros(2, 12, 12, dtype=torch.bool)
    region[:, 2:7, 3:10] = True
    made = []
    (result,) = explain_layers(net, x, ["features"], methods=["gradcam"],
                               target=lambda out: made.append(segment_target(
                                   out, region=region if with_region else None)) or made[-1])
    acts = net.features(x)
    logits = net.head(acts)
    labels = logits.argmax(dim=1)
    for i in range(2):
        counts = np.bincount(labels[i][region[i]].numpy() if with_region else labels[i].flatten().numpy(),
                             minlength=3)
        expected = sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))
        assert result.classes[i][result.classes[i] >= 0].tolist() == expected
        for k, c in enumerate(expected):
            mask = region[i] if with_region else labels[i] == c
            score = (logits[i, c] * mask).sum()
            assert float(made[0].table[i, c]) == pytest.approx(float(score.detach()), rel=1e-5)
            (grads,) = torch.autograd.grad(score, acts, retain_graph=True)
            alpha = grads[i].mean(dim=(1, 2))
            cam = F.relu((alpha[:, None, None] * acts[i]).sum(dim=0)).detach()
            assert torch.allclose(result.maps["gradcam"][i, k, 0], cam, rtol=0, atol=1e-5)


def test_region_box_goes_through_the_resize_and_crop(tmp_path: Path) -> None:
    """A 192x128 image resized to 96x64 and centre-cropped to 64x64 (16 columns cut each side):
    the box x 64..128, y 32..96 becomes rows and columns 16..48 of the input."""
    preprocess = Preprocess((64, 64), (0.5,) * 3, (0.5,) * 3, resize_to=64)
    expected = np.zeros((64, 64), dtype=bool)
    expected[16:48, 16:48] = True
    assert (region_of((64, 32, 128, 96)).pixels(tmp_path / "a.png", (192, 128), preprocess) == expected).all()
    same = Preprocess((128, 192), (0.5,) * 3, (0.5,) * 3, resize="none", crop="none")
    exact = np.zeros((128, 192), dtype=bool)
    exact[32:96, 64:128] = True  # x0 <= x < x1, y0 <= y < y1
    assert (region_of((64, 32, 128, 96)).pixels(tmp_path / "a.png", (192, 128), same) == exact).all()
    with pytest.raises(InputError, match="crop cuts it away"):
        region_of((0, 0, 20, 128)).pixels(tmp_path / "a.png", (192, 128), preprocess)
    with pytest.raises(InputError, match="no pixel of the image"):
        region_of((200, 0, 300, 10)).pixels(tmp_path / "a.png", (192, 128), preprocess)
    mask = np.zeros((128, 192), dtype=np.uint8)
    mask[32:96, 64:128] = 7  # any nonzero value is inside
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inside = region_of(mask=tmp_path / "mask.png").pixels(tmp_path / "a.png", (192, 128), preprocess)
    assert (inside == expected).all()


def test_outline_draws_the_mask_border_inside_it() -> None:
    crop = np.zeros((10, 10, 3), dtype=np.uint8)
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:8, 3:9] = True
    drawn = outline(crop, mask, (255, 255, 0), 1)
    border = mask.copy()
    border[3:7, 4:8] = False  # the interior, one pixel in from each side
    assert (drawn[border] == (255, 255, 0)).all() and (drawn[~border] == 0).all()


class OutWrapper(nn.Module):
    """pytorch-grad-cam's tutorial wrapper: the segmentation model's ``out``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def normalised(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]."""
    a = a - a.min()
    return a / a.max()


@pytest.mark.parametrize("arch", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_gradcam_equals_pytorch_grad_cam(arch: str) -> None:
    """The two largest predicted classes of a random input, each against pytorch-grad-cam's
    GradCAM with SemanticSegmentationTarget(class, its predicted mask) on a fresh torchvision
    model holding the same weights, after the same min-max normalisation."""
    model = load_segmenter(arch, "none", preprocess={"input_size": (32, 32)})
    reference = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=21)
    reference.load_state_dict(model.module.state_dict())
    wrapped = OutWrapper(reference).eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        labels = wrapped(x).argmax(dim=1)[0].numpy()
    counts = np.bincount(labels.flatten())
    largest = sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))[:2]
    (result,) = explain_layers(model.module, x, ["backbone.layer4"], methods=["gradcam"],
                               target=lambda out: segment_target(out, largest))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pgc.GradCAM(model=wrapped, target_layers=[reference.backbone.layer4]) as cam:
            for k, c in enumerate(largest):
                target = SemanticSegmentationTarget(c, np.float32(labels == c))
                theirs = cam(input_tensor=x, targets=[target])[0]
                ours = result.maps["gradcam"][0, k, 0].numpy()
                assert int(result.classes[0, k]) == c and ours.max() > 0
                assert np.abs(normalised(ours) - normalised(theirs)).max() < 1e-5, (arch, c)


def command(weights: Path) -> list[str]:
    """``segment`` on the test's model with these weights."""
    return ["segment", "--arch", FAST, "--weights", str(weights), "--no-cuda", "--input-size", str(SIZE)]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A test image, a checkpoint of the model whose two class heads are drawn at full scale
    without bias (torchvision's random heads predict one class everywhere), and by hand its
    predicted labels (HxW) and logits (CxHxW) at the test's input size."""
    folder = tmp_path_factory.mktemp("seg")
    image = make_image(folder / "a.png", size=(160, 128))
    torch.manual_seed(0)
    net = torchvision.models.get_model(FAST, weights=None, weights_backbone=None, num_classes=21).eval()
    for head in (net.classifier.low_classifier, net.classifier.high_classifier):
        nn.init.normal_(head.weight, std=1.0)
        nn.init.zeros_(head.bias)
    weights = folder / "varied.pt"
    torch.save(net.state_dict(), weights)
    # the weights' transforms at 64 px: shorter side to 64, centre crop, ImageNet's mean and std
    preprocess = Preprocess((SIZE, SIZE), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), resize_to=SIZE)
    with torch.no_grad():
        logits = net(preprocess.to_tensor(preprocess.model_pixels(Image.open(image)))[None])["out"]
    return image, weights, logits[0].argmax(dim=0).numpy(), logits[0].numpy()


def test_cli_writes_masks_maps_grid_and_record(predicted: tuple, tmp_path: Path) -> None:
    """Every predicted class, most pixels first, with its mask, maps, share and masked logit
    sum as computed by hand; a broken file beside it in the batch fails alone (exit 1)."""
    image, weights, labels, logits = predicted
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    code, out, err = run(*command(weights), "--image-path", str(image), "--image-path", str(broken),
                         "--batch-size", "2", "--output-dir", str(tmp_path / "o"),
                         "--method", "gradcam,vanilla", "--json")
    record, bad = map(json.loads, out.splitlines())
    assert code == 1 and bad["status"] == "error" and "broken.png" in bad["error"]
    assert "target layer backbone.16" in err
    assert record["status"] == "ok" and record["layer"] == "backbone.16"
    assert record["input_size"] == [SIZE, SIZE]
    counts = np.bincount(labels.flatten(), minlength=21)
    expected = sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))
    assert len(expected) >= 3 and [c["class_id"] for c in record["classes"]] == expected
    for rank, c in enumerate(record["classes"], 1):
        mask = np.asarray(Image.open(c["mask"]))[..., 0] > 0
        assert (mask == (labels == c["class_id"])).all()
        assert c["rank"] == rank and c["pixel_share"] == round(counts[c["class_id"]] / SIZE**2, 6)
        assert c["score"] == pytest.approx(float(logits[c["class_id"]][mask].sum()), rel=1e-4, abs=1e-3)
        assert set(c["maps"]) == {"gradcam", "vanilla"}
        assert all(Image.open(f).size == (SIZE, SIZE) for f in c["maps"].values())
    grid = Image.open(record["grid"])
    assert grid.size == (LABEL_WIDTH + 3 * (SIZE + GAP), TITLE_HEIGHT + len(expected) * (SIZE + GAP))
    assert record["settings"]["region"] is None and record["skipped_classes"] == []
    assert Path(record["summary"]).is_file()


def test_cli_classes_region_resume_and_nothing_left(predicted: tuple, tmp_path: Path) -> None:
    """A given class predicted nowhere is skipped with a note; a region is part of the settings
    (a resume redoes the image, then skips it); an image left with no class fails alone."""
    image, weights, labels, logits = predicted
    # 160x128 -> shorter side 64: 80x64, centre crop from column 8: the box 0,0,96,64 is rows 0..32,
    # columns 0..40 of the input
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[:32, :40] = True
    present = int(np.bincount(labels[inside]).argmax())
    absent = next(c for c in range(21) if not (labels == c).any())
    common = [*command(weights), "--image-path", str(image), "--output-dir", str(tmp_path / "o"),
              "--method", "gradcam", "--json", "--skip-existing", "--class-id", str(present)]
    code, out, _ = run(*common, "--class-id", str(absent))
    first = json.loads(out)
    assert code == 0 and [c["class_id"] for c in first["classes"]] == [present]
    assert first["skipped_classes"] == [{"class_id": absent, "name": first["skipped_classes"][0]["name"],
                                         "reason": "predicted at no pixel"}]
    code, out, _ = run(*common, "--class-id", str(absent), "--region", "0,0,96,64")
    record = json.loads(out)
    assert code == 0 and record["status"] == "ok" and record["settings"]["region"] == {"box": [0, 0, 96, 64]}
    assert record["skipped_classes"][0]["reason"] == "predicted at no pixel of the region"
    assert record["classes"][0]["score"] == pytest.approx(float(logits[present][inside].sum()), rel=1e-4)
    assert record["classes"][0]["region_share"] == round((labels[inside] == present).mean(), 6)
    code, out, _ = run(*common, "--class-id", str(absent), "--region", "0,0,96,64")
    assert code == 0 and json.loads(out)["status"] == "skipped"
    code, out, err = run(*common[:-2], "--class-id", str(absent))
    assert code == 1 and json.loads(out)["status"] == "error"
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [f"gradcam: error: {image}: none of the given classes is predicted at any pixel"]


@pytest.mark.parametrize(("args", "flag"), [
    (["--region", "1,2,3"], "--region 1,2,3: four non-negative integers"),
    (["--region", "5,0,5,9"], "--region 5,0,5,9: needs 0 <= x0 < x1"),
    (["--region", "0,0,4,4", "--region-mask", "m.png"], "--region-mask m.png: give a region box"),
    (["--region-mask", "missing.png"], "--region-mask missing.png: cannot read"),
    (["--method", "scorecam"], "--method scorecam: not available for segmentation"),
    (["--arch", "deeplabv3_resnet5"], "--arch deeplabv3_resnet5: unknown segmentation architecture; did"),
])
def test_cli_usage_errors_are_one_line(tmp_path: Path, args: list[str], flag: str) -> None:
    image = make_image(tmp_path / "a.png")
    code, out, err = run(*BASE, "--image-path", str(image), "--output-dir", str(tmp_path / "o"), *args)
    assert code == 2 and out == "" and err.startswith(f"gradcam: error: {flag}") and err.count("\n") == 1


@pytest.mark.sweep
@pytest.mark.parametrize("arch", SEGMENTERS)
def test_every_segmenter_end_to_end(arch: str, tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png", size=(120, 100))
    code, out, err = run("segment", "--arch", arch, "--weights", "none", "--no-cuda", "--input-size", "64",
                         "--image-path", str(image), "--output-dir", str(tmp_path / "o"), "--json",
                         "--method", ",".join(SEGMENT_METHODS))
    record = json.loads(out)
    assert code == 0 and record["status"] == "ok", err
    for c in record["classes"]:
        assert set(c["maps"]) == set(SEGMENT_METHODS) and all(Path(f).is_file() for f in c["maps"].values())


def test_checkpoint_with_an_auxiliary_head(tmp_path: Path) -> None:
    """A checkpoint saved with the auxiliary head loads (the head is then dropped), its weights
    in place and its digest recorded."""
    net = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None,
                                       num_classes=3, aux_loss=True)
    path = tmp_path / "seg.pt"
    torch.save(net.state_dict(), path)
    model = load_segmenter("deeplabv3_mobilenet_v3_large", str(path), num_classes=3,
                           preprocess={"input_size": (64, 64)})
    assert torch.equal(model.module.classifier[4].weight, net.classifier[4].weight)
    assert model.module.aux_classifier is None and model.weights_sha256 is not None
    assert model.categories == ["class 0", "class 1", "class 2"]


def test_layers_marks_the_segment_default() -> None:
    code, out, _ = run("layers", "--arch", FAST, "--input-size", "64")
    marked = [line.split()[1] for line in out.splitlines() if line.startswith("*")]
    assert code == 0 and marked == ["backbone.16"]


def test_architectures_lists_the_segmenters_for_the_segment_task() -> None:
    """`architectures --task segment` lists what `segment --arch` accepts, and only that."""
    code, out, _ = run("architectures", "--task", "segment")
    assert code == 0 and out.split() == list(SEGMENTERS)
    assert "resnet50" in run("architectures")[1].split() and "fcn_resnet50" not in run("architectures")[1]


def test_failed_download_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_a: object, **_k: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(ArgumentError) as info:
        load_segmenter(FAST)
    message = str(info.value)
    assert info.value.argument == "weights" and "lraspp_mobilenet_v3_large-d234d4ea.pth" in message
    assert "checkpoint file" in message and "TORCH_HOME" in message and "'none'" in message
