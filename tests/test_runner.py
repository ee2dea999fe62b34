"""The one batch loop: resume only what the same settings made, per-image failures, aborts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import get_model

from gradcam_cli import classify
from gradcam_cli.errors import GradcamError
from gradcam_cli.explanation import ZeroGradientError, explain
from gradcam_cli.models import LoadedModel
from gradcam_cli.preprocess import Preprocess

from .conftest import make_image
from .test_cli import run

CLASSIFY = ["classify", "--arch", "resnet18", "--no-cuda", "--method", "gradcam", "--json"]


def statuses(out: str) -> list[str]:
    return [json.loads(line)["status"] for line in out.splitlines()]


@pytest.mark.parametrize("change", [
    ["--topk", "2"], ["--class-id", "5"], ["--method", "layercam"], ["--weights", "CHECKPOINT"],
])
def test_resume_redoes_an_image_when_a_setting_changed(tmp_path: Path, change: list[str]) -> None:
    image = make_image(tmp_path / "a.png")
    checkpoint = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(get_model("resnet18").state_dict(), checkpoint)
    base = [*CLASSIFY, "--image-path", str(image), "--output-dir", str(tmp_path / "o"), "--topk", "1"]
    args = [*base[:2], "resnet18", *base[3:], "--weights", "none"]
    assert statuses(run(*args)[1]) == ["ok"]
    assert statuses(run(*args, "--skip-existing")[1]) == ["skipped"]
    changed = [str(checkpoint) if a == "CHECKPOINT" else a for a in change]
    if changed[0] == "--weights":
        args = args[:-2]
    code, out, err = run(*args, *changed, "--skip-existing")
    assert code == 0 and statuses(out) == ["ok"], err
    assert statuses(run(*args, *changed, "--skip-existing")[1]) == ["skipped"]


def test_resume_redoes_an_image_whose_file_changed(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png")
    args = [*CLASSIFY, "--weights", "none", "--topk", "1", "--image-path", str(image),
            "--output-dir", str(tmp_path / "o"), "--skip-existing"]
    assert statuses(run(*args)[1]) == ["ok"]
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    assert statuses(run(*args)[1]) == ["ok"]


@pytest.mark.parametrize("change", [["--tolerance", "3"], ["--boxes", "OTHER"], ["--steps", "3"]])
def test_evaluate_resume_compares_every_setting(tmp_path: Path, change: list[str]) -> None:
    image = make_image(tmp_path / "a.png")
    boxes, other = tmp_path / "boxes.csv", tmp_path / "other.csv"
    boxes.write_text("image,x0,y0,x1,y1\na.png,1,1,20,20\n")
    other.write_text("image,x0,y0,x1,y1\na.png,30,10,60,40\n")
    args = ["evaluate", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--steps", "2",
            "--method", "gradcam", "--json", "--image-path", str(image), "--boxes", str(boxes),
            "--output-dir", str(tmp_path / "o"), "--skip-existing"]
    assert statuses(run(*args)[1]) == ["ok"]
    assert statuses(run(*args)[1]) == ["skipped"]
    changed = [str(other) if a == "OTHER" else a for a in change]
    if changed[0] == "--boxes":
        args = [a for a in args if a != str(boxes) and a != "--boxes"]
    assert statuses(run(*args, *changed)[1]) == ["ok"]


def test_embed_resume_compares_the_similarity(tmp_path: Path) -> None:
    query, reference = make_image(tmp_path / "q.png"), make_image(tmp_path / "r.png", size=(40, 60))
    args = ["embed", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--method", "gradcam",
            "--json", "--image-path", str(query), "--reference", str(reference),
            "--output-dir", str(tmp_path / "o"), "--skip-existing"]
    assert statuses(run(*args)[1]) == ["ok", "ok"]
    assert statuses(run(*args)[1]) == ["skipped", "skipped"]
    assert statuses(run(*args, "--similarity", "cosine")[1]) == ["ok", "ok"]


class Gate(nn.Module):
    """x → 1x1 conv summing the channels → ReLU → mean → linear: an image whose pixels are
    all below the normalisation's mean has every ReLU closed, so no gradient reaches ``conv``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def gate_model() -> LoadedModel:
    preprocess = Preprocess((16, 16), (0.5,) * 3, (0.5,) * 3)
    return LoadedModel("gate", Gate().eval(), ["open", "shut"], preprocess, "none")


def test_zero_gradient_fails_only_that_image() -> None:
    bright, dark = torch.ones(1, 3, 4, 4), -torch.ones(1, 3, 4, 4)
    result = explain(Gate(), torch.cat([bright, dark]), "conv", topk=1, methods=["gradcam"])
    assert result.errors[0] is None and "gradient is zero" in result.errors[1]
    with pytest.raises(ZeroGradientError, match="layer='conv'") as info:
        explain(Gate(), torch.cat([dark, dark]), "conv", topk=1, methods=["gradcam"])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_zero_gradient_image_is_its_own_error_in_a_run(tmp_path: Path, batch_size: int) -> None:
    images = [tmp_path / f"{i}.png" for i in range(3)]
    for path, value in zip(images, (255, 0, 255), strict=True):
        Image.new("RGB", (16, 16), (value,) * 3).save(path)
    records = list(classify(gate_model(), images, tmp_path / "o", layer="conv", topk=1,
                            methods=["gradcam"], batch_size=batch_size))
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "gradient is zero" in records[1]["error"] and "1.png" in records[1]["error"]


def test_zero_gradient_in_the_first_batch_is_a_usage_error_before_any_file(tmp_path: Path) -> None:
    images = [tmp_path / f"{i}.png" for i in range(2)]
    for path, value in zip(images, (0, 255), strict=True):
        Image.new("RGB", (16, 16), (value,) * 3).save(path)
    with pytest.raises(ZeroGradientError):
        list(classify(gate_model(), images, tmp_path / "o", layer="conv", topk=1,
                      methods=["gradcam"], batch_size=1))
    assert not [p for p in (tmp_path / "o").rglob("*") if p.is_file()]


def test_output_error_reports_every_image_written_before_it(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full at the fifth summary (image 4, in the second batch of three): every image whose
    files are complete is reported, in order, then the error; images 4 and 5 are not."""
    images = [make_image(tmp_path / "in" / f"{i}.png") for i in range(8)]
    from gradcam_cli import io
    real, summaries = io.os.replace, []

    def replace(src: str, dst: str) -> None:
        if str(dst).endswith("summary.json"):
            summaries.append(dst)
            if len(summaries) == 5:
                raise OSError(28, "No space left on device")
        real(src, dst)
    monkeypatch.setattr(io.os, "replace", replace)
    model = gate_model()
    got = []
    with pytest.raises(GradcamError, match="No space left"):
        for record in classify(model, images, tmp_path / "o", layer="conv", topk=1,
                               methods=["gradcam"], batch_size=3):
            got.append(record)
    on_disk = {p.parent.parent.name.split("-")[0] for p in (tmp_path / "o").rglob("summary.json")}
    reported = [Path(r["image"]).stem for r in got]
    assert reported == sorted(on_disk) and {"0", "1", "2", "3"} <= on_disk
    assert not {"4", "5"} & on_disk


@pytest.mark.parametrize("arch", ["hf/../../escape", "timm/vit_small", "module:pkg.mod:make"])
def test_outputs_stay_one_folder_deep_whatever_the_arch_name(tmp_path: Path, arch: str) -> None:
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (255, 255, 255)).save(image)
    model = gate_model()
    model.arch = arch
    (record,) = classify(model, [image], tmp_path / "out", layer="conv", topk=1, methods=["gradcam"])
    out = (tmp_path / "out").resolve()
    files = [p.resolve() for p in tmp_path.rglob("*") if p.is_file() and p != image]
    assert files and all(p.is_relative_to(out) for p in files), files
    folders = {p.relative_to(out).parts[:2] for p in files  # (image folder, model@layer folder)
               if p != out / "index.html"}                  # beside the folder's own page
    assert len(folders) == 1, folders
    (_, tag), = folders
    assert re.fullmatch(r"[A-Za-z0-9._-]+@conv", tag) and ".." not in tag, tag
    assert record["arch"] == arch
