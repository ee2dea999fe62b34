"""Decoding images of every common kind to RGB, naming outputs, writing atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_cli import GradcamError, InputError, UsageError
from gradcam_cli.io import atomic_write, image_id, load_image, prepare_output_dir

from .conftest import make_image


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".bmp", ".webp"])
def test_formats_decode_to_rgb(tmp_path: Path, suffix: str) -> None:
    image = load_image(make_image(tmp_path / f"x{suffix}"))
    assert image.mode == "RGB" and image.size == (64, 48)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_modes_convert_to_rgb(tmp_path: Path, mode: str) -> None:
    suffix = ".jpg" if mode == "CMYK" else ".png"
    image = load_image(make_image(tmp_path / f"x{suffix}", mode))
    assert image.mode == "RGB" and image.size == (64, 48)


def test_sixteen_bit_scales_to_eight(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(load_image(path)).min() == 255


def test_transparent_palette_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    image.save(path, transparency=1)
    assert np.asarray(load_image(path)).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


def test_colour_order_is_rgb(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("content,reason", [(b"", "not an image"), (b"hello", "not an image")])
def test_bad_files_are_one_input_error(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(InputError, match=reason):
        load_image(path)


def test_truncated_jpeg_is_an_input_error(tmp_path: Path) -> None:
    path = make_image(tmp_path / "t.jpg")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match=r"t\.jpg"):
        load_image(path)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_image_ids_differ_for_same_name_in_other_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "dog.jpg", tmp_path / "b" / "dog.jpg"
    assert image_id(a) != image_id(b)
    assert image_id(a).startswith("dog-") and image_id(a) == image_id(a)


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "map.png"
    atomic_write(target, b"old")

    def full(*_a: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.replace", full)
    with pytest.raises(GradcamError, match=r"map\.png: No space left on device"):
        atomic_write(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["map.png"]


def test_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "results"
    file.write_text("x")
    with pytest.raises(UsageError, match="existing file"):
        prepare_output_dir(file)
    assert prepare_output_dir(tmp_path / "new" / "dir").is_dir()


def test_unwritable_output_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.access", lambda *_a: False)  # root writes anywhere, so simulate
    with pytest.raises(UsageError, match="not writable"):
        prepare_output_dir(tmp_path)
