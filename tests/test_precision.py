"""--precision: the explained forward passes under autocast, the maps in float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcam_cli.errors import ArgumentError
from gradcam_cli.explanation import explain
from gradcam_cli.paths import PathSettings
from gradcam_cli.precision import Precision
from gradcam_cli.rise import RiseSettings
from gradcam_cli.settings import MethodSettings

from .conftest import make_image
from .test_cli import run

BF16 = MethodSettings(precision=Precision("bf16"))
SIZE = (40, 56)  # not square: a swapped axis would show


def net() -> nn.Module:
    """Two convolutions, a ReLU, pooling and a linear head over three classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()


def gradcam_under_autocast(model: nn.Module, x: torch.Tensor, layer: nn.Module,
                           class_id: int) -> torch.Tensor:
    """Grad-CAM by its definition, from the activations and gradients of a forward pass run by
    hand under bfloat16 autocast, computed in float64."""
    kept = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.setdefault("a", out))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(logits[:, class_id].sum(), kept["a"])
    acts, grads = kept["a"].double(), grads.double()
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))
    return F.interpolate(cam[:, None], size=SIZE, mode="bilinear", align_corners=False)


def test_bf16_gradcam_is_the_definition_on_autocast_activations_and_gradients() -> None:
    model, x = net(), torch.randn(2, 3, *SIZE)
    expected = gradcam_under_autocast(model, x, model[2], class_id=1).detach()
    got = explain(model, x, "2", class_ids=[1], methods=["gradcam"], settings=BF16).maps["gradcam"][:, 0]
    fp32 = explain(model, x, "2", class_ids=[1], methods=["gradcam"]).maps["gradcam"][:, 0]
    scale = float(expected.abs().max())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * scale)
    assert (fp32.double() - expected).abs().max() > 1e-3 * scale  # bf16 really ran: fp32 differs


PASSES = {  # a method of every family that runs its own forward passes
    "vanilla": MethodSettings(),
    "scorecam": MethodSettings(),
    "ablationcam": MethodSettings(),
    "occlusion": MethodSettings(),
    "rise": MethodSettings(rise=RiseSettings(n_masks=64, cell=8)),
    "integrated-gradients": MethodSettings(ig=PathSettings(ig_baseline="blur", ig_steps=8)),
}


@pytest.mark.parametrize("method", PASSES)
def test_bf16_runs_every_family_in_bf16_and_returns_float32_maps(method: str) -> None:
    model, x = net(), torch.randn(1, 3, *SIZE)
    seen: list[torch.dtype] = []
    handle = model[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        reduced = explain(model, x, "2", class_ids=[0], methods=[method],
                          settings=MethodSettings(**{**vars(PASSES[method]), "precision": Precision("bf16")}))
    finally:
        handle.remove()
    full = explain(model, x, "2", class_ids=[0], methods=[method], settings=PASSES[method])
    got, expected = reduced.maps[method], full.maps[method]
    assert got.dtype == torch.float32 and got.shape == expected.shape
    difference = float((got - expected).abs().max() / expected.abs().max())
    alike = float(F.cosine_similarity(got.flatten(), expected.flatten(), dim=0))
    assert difference > 1e-5 and alike > 0.95, (difference, alike)  # the fp32 map, computed in bf16
    assert torch.bfloat16 in seen


def test_fp32_is_unchanged_and_float64_models_stay_exact() -> None:
    model, x = net().double(), torch.randn(1, 3, *SIZE, dtype=torch.float64)
    result = explain(model, x, "2", class_ids=[0], methods=["vanilla"], settings=MethodSettings())
    assert result.maps["vanilla"].dtype == torch.float64


def test_fp16_on_the_cpu_is_refused_naming_precision() -> None:
    with pytest.raises(ArgumentError) as caught:
        explain(net(), torch.randn(1, 3, *SIZE), "2", methods=["gradcam"],
                settings=MethodSettings(precision=Precision("fp16")))
    assert caught.value.argument == "precision" and "CUDA" in caught.value.problem


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ArgumentError, match="precision"):
        Precision("int8")


CLASSIFY = ["classify", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", "64",
            "--method", "gradcam", "--topk", "1", "--json"]


def test_cli_fp16_on_the_cpu_is_one_line_naming_the_option(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png")
    code, out, err = run(*CLASSIFY, "--precision", "fp16", "--image-path", str(image),
                         "--output-dir", str(tmp_path / "o"))
    assert code == 2 and not out
    assert [line for line in err.splitlines() if "error" in line] == \
        ["gradcam: error: --precision fp16: runs on CUDA only, and this model is on the cpu; "
         "use bf16 on the CPU"]


def test_cli_precision_is_a_setting_of_the_record_and_of_resuming(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png")
    args = [*CLASSIFY, "--image-path", str(image), "--output-dir", str(tmp_path / "o")]
    code, out, _ = run(*args, "--precision", "bf16")
    record = json.loads(out)
    assert code == 0 and record["settings"]["precision"] == {"precision": "bf16"}
    assert json.loads(run(*args, "--precision", "bf16", "--skip-existing")[1])["status"] == "skipped"
    again = json.loads(run(*args, "--skip-existing")[1])  # fp32 now: explained again
    assert again["status"] == "ok" and "precision" not in again["settings"]
