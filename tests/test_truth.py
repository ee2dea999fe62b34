"""Ground truth for the pointing games: boxes and mask folders, and how bad ones are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradcam_cli import InputError
from gradcam_cli.errors import ArgumentError
from gradcam_cli.truth import Truth, read_truth

from .conftest import make_image
from .test_cli import run


def boxes_file(folder: Path, name: str, text: str) -> str:
    """Write a boxes file and return its path as the CLI would get it."""
    path = folder / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("row,words", [
    ("a.jpg,nan,0,10,10", "line 3 (a.jpg): x0 is not a finite number"),
    ("a.jpg,0,0,inf,10", "line 3 (a.jpg): x1 is not a finite number"),
    ("a.jpg,10,0,10,10", "line 3 (a.jpg): empty box, x1 must be greater than x0"),
    ("a.jpg,0,5,10,2", "line 3 (a.jpg): empty box, y1 must be greater than y0"),
])
def test_csv_boxes_that_are_not_boxes_are_bad_truth(tmp_path: Path, row: str, words: str) -> None:
    path = boxes_file(tmp_path, "boxes.csv", f"image,x0,y0,x1,y1\nb.jpg,0,0,4,4\n{row}\n")
    with pytest.raises(ArgumentError) as error:
        read_truth(None, path)
    assert isinstance(error.value, ValueError)
    assert (error.value.argument, error.value.value) == ("boxes", path)
    assert words in error.value.problem, error.value.problem


@pytest.mark.parametrize("boxes,words", [
    ([[0, 0, 4, 4], [1, 2, 3, float("nan")]], "box 2 of a.jpg: y1 is not a finite number"),
    ([[5, 0, 1, 4]], "box 1 of a.jpg: empty box, x1 must be greater than x0"),
    ([[0, 0, 4]], "box 1 of a.jpg: needs four numbers x0, y0, x1, y1"),
])
def test_json_boxes_that_are_not_boxes_are_bad_truth(tmp_path: Path, boxes: list, words: str) -> None:
    path = boxes_file(tmp_path, "boxes.json", json.dumps({"a.jpg": boxes}))  # NaN is written bare
    with pytest.raises(ArgumentError, match="boxes=") as error:
        read_truth(None, path)
    assert words in error.value.problem, error.value.problem


def test_good_boxes_make_the_mask(tmp_path: Path) -> None:
    path = boxes_file(tmp_path, "b.csv", "image,x0,y0,x1,y1\na.jpg,1,0,3,2\n")
    mask = np.asarray(read_truth(None, path).mask_for(Path("x/a.jpg"), (4, 3)))
    assert mask.tolist() == [[0, 255, 255, 0], [0, 255, 255, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("masks,boxes,argument", [
    ("MASKS", "BOXES", "masks"), ("MISSING", None, "masks"), (None, "MISSING", "boxes"),
    (None, "MALFORMED", "boxes"),
])
def test_unusable_truth_names_its_python_argument(tmp_path: Path, masks: str | None, boxes: str | None,
                                                  argument: str) -> None:
    given = {"MASKS": str(tmp_path), "BOXES": boxes_file(tmp_path, "b.csv", "image,x0,y0,x1,y1\n"),
             "MISSING": str(tmp_path / "none"),
             "MALFORMED": boxes_file(tmp_path, "m.csv", "name,left\na.jpg,3\n")}
    with pytest.raises(ArgumentError) as error:
        read_truth(given.get(masks), given.get(boxes))
    assert error.value.argument == argument


def test_missing_truth_messages_quote_the_names(tmp_path: Path) -> None:
    odd = Path("odd\nname.jpg")
    for truth in (Truth(mask_dir=tmp_path), Truth(boxes={"other.jpg": [[0, 0, 1, 1]]})):
        with pytest.raises(InputError) as error:
            truth.mask_for(odd, (4, 4))
        assert "\n" not in str(error.value) and "odd\\nname.jpg" in str(error.value)


def test_evaluate_refuses_boxes_with_nan_in_one_line(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png", size=(64, 64))
    for row in ("a.png,nan,0,10,10", "a.png,20,0,10,10"):
        boxes = boxes_file(tmp_path, "boxes.csv", f"image,x0,y0,x1,y1\n{row}\n")
        code, out, err = run("evaluate", "--arch", "resnet18", "--weights", "none", "--steps", "2",
                             "--method", "gradcam", "--image-path", str(image), "--boxes", boxes,
                             "--output-dir", str(tmp_path / "out"))
        assert (code, out) == (2, ""), err
        assert err.splitlines() == [err.strip()]
        assert err.startswith(f"gradcam: error: --boxes {boxes}: line 2 (a.png): ")
