"""Targets from the command line: class names, per-image classes from a CSV or from folders,
the reported score and the explained side, with resnet18's random weights (ImageNet names)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights

from gradcam_cli.models import load_model

from .conftest import make_image
from .test_cli import run

CATEGORIES = ResNet18_Weights.DEFAULT.meta["categories"]
TENCH, GOLDFISH, SHARK = 0, 1, 2
BASE = ["--arch", "resnet18", "--weights", "none", "--no-cuda", "--layer", "layer4", "--json"]


def records(out: str) -> dict[str, dict]:
    """The JSON lines of a run by image file name."""
    return {Path(r["image"]).name: r for r in map(json.loads, out.splitlines())}


def error_lines(err: str) -> list[str]:
    """The error lines on stderr (other lines say what preprocessing or layer a run uses)."""
    return [line for line in err.splitlines() if line.startswith("gradcam: error:")]


@cache
def random_resnet18() -> torch.nn.Module:
    """gradcam's random resnet18 (seeded: the same network as every run's)."""
    return load_model("resnet18", "none").module


def predicted_by_torchvision(image: Path) -> int:
    """The top-1 class of gradcam's random resnet18 on torchvision's own preprocessing."""
    module = random_resnet18()
    with torch.no_grad():
        x = ResNet18_Weights.DEFAULT.transforms()(Image.open(image).convert("RGB"))
        return int(module(x[None]).argmax())


def test_targets_csv_gives_each_image_its_own_classes(tmp_path: Path) -> None:
    """Rows by file name or relative path, classes by id or name (case aside), several rows
    for several classes; an image missing from the file fails alone, with one clear line."""
    a = make_image(tmp_path / "in" / "a.png")
    b = make_image(tmp_path / "in" / "sub" / "b.png", size=(48, 64))
    c = make_image(tmp_path / "in" / "c.png", size=(40, 40))
    table = tmp_path / "targets.csv"
    table.write_text("image,class\na.png,Goldfish\nsub/b.png,2\nsub/b.png,tench\n")
    code, out, err = run("classify", *BASE, "--image-path", str(tmp_path / "in"), "--method", "gradcam",
                         "--targets", str(table), "--output-dir", str(tmp_path / "o"))
    assert code == 1, err
    got = records(out)
    assert [k["class_id"] for k in got["a.png"]["classes"]] == [GOLDFISH]
    assert [k["class_id"] for k in got["b.png"]["classes"]] == [SHARK, TENCH]
    assert [k["name"] for k in got["b.png"]["classes"]] == ["great white shark", "tench"]
    for path, name in ((a, "a.png"), (b, "b.png")):
        predicted = got[name]["predicted"]
        assert predicted["class_id"] == predicted_by_torchvision(path)
        assert predicted["name"] == CATEGORIES[predicted["class_id"]] and 0 < predicted["score"] < 1
    assert got["c.png"]["status"] == "error"
    (line,) = error_lines(err)
    assert str(c) in line and "no row for it in the targets file" in line


def test_targets_folder_explains_each_image_as_its_parent_folder(tmp_path: Path) -> None:
    """ImageFolder layout: the folder names the class; an unknown folder fails that image alone,
    with the closest class names; compare-layers and evaluate take the same option (three
    commands: ~7 s here, more while each start-up probes layouts)."""
    make_image(tmp_path / "in" / "goldfish" / "x.png")
    make_image(tmp_path / "in" / "great_white_shark" / "y.png", size=(50, 70))
    make_image(tmp_path / "in" / "tenchh" / "z.png")
    common = [*BASE, "--image-path", str(tmp_path / "in"), "--targets", "folder", "--method", "gradcam"]
    code, out, err = run("classify", *common, "--output-dir", str(tmp_path / "o"))
    assert code == 1, err
    got = records(out)
    assert [k["class_id"] for k in got["x.png"]["classes"]] == [GOLDFISH]
    assert [k["class_id"] for k in got["y.png"]["classes"]] == [SHARK]
    assert got["z.png"]["status"] == "error" and "did you mean tench" in got["z.png"]["error"]
    assert "predicted" in got["x.png"]
    one = [a if a != str(tmp_path / "in") else str(tmp_path / "in" / "great_white_shark") for a in common]
    code, out, err = run("compare-layers", *[a for a in one if a not in ("--layer", "layer4")],
                         "--layers", "layer3,layer4", "--output-dir", str(tmp_path / "c"))
    assert code == 0 and [k["class_id"] for k in records(out)["y.png"]["classes"]] == [SHARK], err
    one = [a if a != str(tmp_path / "in") else str(tmp_path / "in" / "goldfish") for a in common]
    code, out, err = run("evaluate", *one, "--steps", "2", "--output-dir", str(tmp_path / "e"))
    got = records(out)
    assert code == 0 and [k["class_id"] for k in got["x.png"]["classes"]] == [GOLDFISH], err
    truth = predicted_by_torchvision(tmp_path / "in" / "goldfish" / "x.png")
    assert got["x.png"]["predicted"]["class_id"] == truth


def test_class_names_resolve_once_and_unknown_names_suggest_close_ones(photo: Path, tmp_path: Path) -> None:
    """--class-name, repeatable, beside --class-id; exact first, then case-insensitive when that
    is unambiguous (ImageNet has both "Cardigan", the corgi, and "cardigan", the sweater)."""
    args = ["classify", *BASE, "--image-path", str(photo), "--method", "gradcam",
            "--output-dir", str(tmp_path)]
    code, out, err = run(*args, "--class-id", "5", "--class-name", "Tench", "--class-name", "cardigan")
    assert code == 0, err
    assert [c["class_id"] for c in json.loads(out)["classes"]] == [5, TENCH, CATEGORIES.index("cardigan")]
    for name, message in (("tenchh", "--class-name tenchh: unknown class name; did you mean tench"),
                          ("CARDIGAN", "--class-name CARDIGAN: ambiguous, classes 264 (Cardigan) and 474 "
                                       "(cardigan); give the exact name or its id")):
        code, out, err = run(*args, "--class-name", name)
        assert code == 2 and out == "" and len(error_lines(err)) == 1, err
        assert error_lines(err)[0].startswith(f"gradcam: error: {message}"), err


@pytest.mark.parametrize("extra,message", [
    (["--targets", "folder", "--class-id", "3"],
     "--targets folder: gives each image its own classes; leave out the class ids and names"),
    (["--targets", "folder", "--topk", "2"],
     "--topk 2: --targets gives each image its own classes; leave out --topk"),
    (["--score", "softmax", "--num-classes", "1"],
     "--score softmax: a one-output head's softmax is always 1; use sigmoid (a binary classifier) "
     "or logit (regression)"),
    (["--negative", "--method", "gradcam,ablationcam"],
     "--negative True: Ablation-CAM divides by the explained score, so its map does not change "
     "with the side; leave out ablationcam"),
    (["--targets", "MISSING"], "--targets MISSING: cannot read"),
    (["--targets", "BADROW"], "--targets BADROW: line 2: class 1000 outside 0..999"),
    (["--targets", "BADNAME"], "--targets BADNAME: line 2: unknown class 'goldfishh'; did you mean goldfish"),
])
def test_target_options_that_cannot_work_together_exit_2(photo: Path, tmp_path: Path, extra: list[str],
                                                        message: str) -> None:
    (tmp_path / "BADROW").write_text("a.png,1\na.png,1000\n")
    (tmp_path / "BADNAME").write_text("image,class\na.png,goldfishh\n")
    extra = [str(tmp_path / a) if a in ("MISSING", "BADROW", "BADNAME") else a for a in extra]
    code, out, err = run("classify", *BASE, "--image-path", str(photo), "--output-dir", str(tmp_path / "o"),
                         *extra)
    shown = message.replace("MISSING", str(tmp_path / "MISSING")).replace("BADROW", str(tmp_path / "BADROW"))
    shown = shown.replace("BADNAME", str(tmp_path / "BADNAME"))
    assert code == 2 and out == "", err
    assert len(error_lines(err)) == 1 and error_lines(err)[0].startswith(f"gradcam: error: {shown}"), err


def test_one_output_head_defaults_to_sigmoid_and_negative_reports_the_other_side(tmp_path: Path) -> None:
    """A one-output checkpoint: the default top-k is its one output, scored by sigmoid;
    --negative explains -z and reports 1 - sigmoid(z), with the other maps' signs."""
    torch.manual_seed(1)
    net = load_model("resnet18", "none", num_classes=1).module
    torch.nn.init.normal_(net.fc.weight, std=0.5)
    checkpoint = tmp_path / "binary.pt"
    torch.save(net.state_dict(), checkpoint)
    image = make_image(tmp_path / "a.png")
    args = ["classify", *BASE[:2], "--weights", str(checkpoint), "--num-classes", "1", *BASE[4:],
            "--image-path", str(image), "--method", "gradcam"]
    code, out, err = run(*args, "--output-dir", str(tmp_path / "p"))
    assert code == 0, err
    positive = json.loads(out)
    code, out, err = run(*args, "--class-id", "0", "--negative", "--output-dir", str(tmp_path / "n"))
    assert code == 0, err
    negative = json.loads(out)
    with torch.no_grad():
        x = ResNet18_Weights.DEFAULT.transforms()(Image.open(image).convert("RGB"))
        z = net.eval()(x[None])[0, 0]
    (p,), (n,) = positive["classes"], negative["classes"]
    assert p["score_kind"] == n["score_kind"] == "sigmoid"
    assert not positive["negative"] and negative["negative"]
    assert p["score"] == pytest.approx(torch.sigmoid(z).item(), abs=1e-5)
    assert n["score"] == pytest.approx(1 - torch.sigmoid(z).item(), abs=1e-5)
    assert Image.open(p["maps"]["gradcam"]).tobytes() != Image.open(n["maps"]["gradcam"]).tobytes()


def test_resume_redoes_an_image_whose_own_targets_changed(tmp_path: Path) -> None:
    """Per-image classes are part of the image's settings: another row for it redoes it, a row
    for another image does not."""
    a, b = make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png", size=(40, 56))
    table = tmp_path / "t.csv"
    args = ["classify", *BASE, "--image-path", str(a), "--image-path", str(b), "--method", "gradcam",
            "--targets", str(table), "--output-dir", str(tmp_path / "o"), "--skip-existing"]
    table.write_text("a.png,1\nb.png,2\n")
    assert [r["status"] for r in records(run(*args)[1]).values()] == ["ok", "ok"]
    table.write_text("a.png,1\nb.png,3\n")
    assert {k: r["status"] for k, r in records(run(*args)[1]).items()} == {"a.png": "skipped", "b.png": "ok"}
