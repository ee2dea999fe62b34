"""`evaluate` as a library call: records, tables, plots, bad inputs, and a trained network
whose Grad-CAM must point at the object that decides its class."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from gradcam_cli.evaluation import averages, evaluate, write_summary
from gradcam_cli.models import LoadedModel
from gradcam_cli.preprocess import Preprocess
from gradcam_cli.truth import Truth, read_truth

from .scenes import resnet10, scenes, train_resnet10, write_scenes

SIZE, SIDE = 64, 16
CLASSES = ["square", "plus", "x", "corner"]


def as_model(net: torch.nn.Module) -> LoadedModel:
    """Wrap a network taking SIZE x SIZE images in [0, 1] as a LoadedModel."""
    preprocess = Preprocess((SIZE, SIZE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return LoadedModel("resnet", net.eval(), CLASSES, preprocess, "test")


def test_records_tables_and_plots(tmp_path: Path) -> None:
    images, _, where = scenes(3, torch.Generator().manual_seed(1), size=SIZE, side=SIDE)
    paths = write_scenes(tmp_path / "in", images, where)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    model = as_model(torchvision.models.resnet18(num_classes=4))
    items = [*paths, tmp_path / "in" / "broken.png"]
    records = list(evaluate(model, items, tmp_path / "out", layer="layer3", topk=2,
                            methods=["gradcam", "vanilla"], steps=5,
                            truth=Truth(mask_dir=tmp_path / "in" / "masks"), batch_size=2))
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "error"]
    assert "broken.png" in records[-1]["error"]
    first = records[0]["classes"][0]
    curve = first["metrics"]["gradcam"]["deletion_curve"]
    assert len(curve) == 6 and curve[0] == pytest.approx(first["probability"], abs=1e-5)
    assert set(first["metrics"]["vanilla"]) >= {"pointing_hit", "energy", "insertion_auc"}
    table = write_summary(records, tmp_path / "out", "t")
    rows = list(csv.DictReader((tmp_path / "out" / "evaluate-t.csv").open()))
    assert len(rows) == 3 * 2 * 2  # images x classes x methods
    drops = [float(r["confidence_drop"]) for r in rows if r["method"] == "gradcam"]
    assert table["gradcam"]["confidence_drop"] == pytest.approx(np.mean(drops), abs=1e-5)
    saved = json.loads((tmp_path / "out" / "evaluate-t.json").read_text())
    assert saved["averages"].keys() == {"gradcam", "vanilla"}
    for name in ("evaluate-t-curves.png", Path(records[0]["curves"])):
        assert Image.open(tmp_path / "out" / name).size[0] > 400
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_missing_mask_and_boxes(tmp_path: Path) -> None:
    images, _, where = scenes(2, torch.Generator().manual_seed(2), size=SIZE, side=SIDE)
    paths = write_scenes(tmp_path, images, where)
    (tmp_path / "masks" / paths[1].name).unlink()
    model = as_model(torchvision.models.resnet18(num_classes=4))
    records = list(evaluate(model, paths, tmp_path / "out", methods=["gradcam"], steps=2,
                            truth=Truth(mask_dir=tmp_path / "masks")))
    assert records[0]["status"] == "ok" and records[1]["status"] == "error"
    assert "no mask" in records[1]["error"]
    r, c = where[0].tolist()
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({paths[0].name: [[c, r, c + SIDE, r + SIDE]]}))
    truth = read_truth(None, str(boxes))
    (record,) = evaluate(model, paths[:1], tmp_path / "out", methods=["gradcam"], steps=2,
                         truth=truth)
    by_box = record["classes"][0]["metrics"]["gradcam"]
    assert by_box["energy"] == records[0]["classes"][0]["metrics"]["gradcam"]["energy"]


def test_trained_network_points_at_the_deciding_object(tmp_path: Path) -> None:
    """Train a resnet10 for 150 steps (~30 s) on generated scenes in which only a 16 px
    object at a random place decides the class, beside two random patterns just as
    conspicuous; evaluate Grad-CAM at layer2 on 40 new scenes with the objects' masks and no
    pointing tolerance.

    Seeds are fixed, so the numbers are the same on every run. Measured: accuracy 1.0,
    pointing game 0.875 and energy 0.37 (the object is 6% of the image), against 0.125 and
    0.08 for the same network with random weights, which points at whichever pattern it
    happens to like. The test asks for 0.7 and 0.25, and for at least 0.4 more pointing
    than the random network.

    The randomisation test on three of the scenes shows Adebayo et al.'s result: once only
    the head (fc) is re-initialised, guided backprop's maps keep their ranks (Spearman 0.98,
    0.99, 0.99 measured) while Grad-CAM's mostly do not (-0.67, -0.66, 0.97); asked: guided
    >= 0.9 on average and at least 0.4 above Grad-CAM (measured 1.1)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = train_resnet10(150, g, SIZE, SIDE)
    images, _, where = scenes(40, g, size=SIZE, side=SIDE, distractors=2)
    paths = write_scenes(tmp_path, images, where)
    scores = {}
    for name, model in (("trained", net), ("random", resnet10())):
        records = evaluate(as_model(model), paths, tmp_path / name, layer="layer2",
                           methods=["gradcam"], steps=2, truth=Truth(mask_dir=tmp_path / "masks"),
                           tolerance=0, batch_size=20)
        scores[name] = averages(list(records))["gradcam"]
    trained, random = scores["trained"], scores["random"]
    assert trained["pointing_hit"] >= 0.7 and trained["energy"] >= 0.25, scores
    assert trained["pointing_hit"] - random["pointing_hit"] >= 0.4, scores
    records = list(evaluate(as_model(net), paths[:3], tmp_path / "sanity", layer="layer2",
                            methods=["gradcam", "guided"], steps=2, sanity=True))
    head = [r["sanity"][0] for r in records]
    assert all(step["layer"] == "fc" for step in head)
    mean = {m: np.mean([step["spearman"][f"{r['classes'][0]['class_id']}/{m}"]
                        for step, r in zip(head, records, strict=True)]) for m in ("gradcam", "guided")}
    assert mean["guided"] >= 0.9 and mean["guided"] - mean["gradcam"] >= 0.4, mean


def test_skip_existing_reuses_earlier_numbers_only_for_the_same_settings(tmp_path: Path) -> None:
    images, _, where = scenes(2, torch.Generator().manual_seed(3), size=SIZE, side=SIDE)
    paths = write_scenes(tmp_path, images, where)
    model = as_model(torchvision.models.resnet18(num_classes=4))
    first = list(evaluate(model, paths, tmp_path / "out", methods=["gradcam"], steps=3))
    again = list(evaluate(model, paths, tmp_path / "out", methods=["gradcam"], steps=3,
                          skip_existing=True))
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    assert averages(again) == averages(first)  # the table still covers the skipped images
    Path(first[1]["curves"]).unlink()  # a missing file, or other settings: evaluated again
    redone = list(evaluate(model, paths, tmp_path / "out", methods=["gradcam"], steps=3,
                           skip_existing=True))
    assert [r["status"] for r in redone] == ["skipped", "ok"]
    other = list(evaluate(model, paths, tmp_path / "out", methods=["gradcam"], steps=4,
                          skip_existing=True))
    assert [r["status"] for r in other] == ["ok", "ok"]


def test_unknown_baseline_is_refused_before_any_image(tmp_path: Path) -> None:
    model = as_model(resnet10())
    with pytest.raises(ValueError, match=r"^baseline='blurr': unknown baseline; did you mean blur\?"):
        evaluate(model, [tmp_path / "missing.png"], tmp_path / "out", baseline="blurr")
    assert not (tmp_path / "out").exists()
