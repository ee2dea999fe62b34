"""Decoding images of every common kind to RGB, naming outputs, writing atomically."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_cli import GradcamError, InputError
from gradcam_cli.errors import ArgumentError
from gradcam_cli.io import MAX_PIXELS, atomic_write, image_id, load_image, prepare_output_dir
from gradcam_cli.preprocess import Preprocess

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
    with pytest.raises(ArgumentError, match="existing file") as error:
        prepare_output_dir(file)
    assert error.value.argument == "output_dir" and error.value.value == str(file)
    assert prepare_output_dir(tmp_path / "new" / "dir").is_dir()


def test_unwritable_output_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.access", lambda *_a: False)  # root writes anywhere, so simulate
    with pytest.raises(ArgumentError, match="not writable") as error:
        prepare_output_dir(tmp_path)
    assert error.value.argument == "output_dir"


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG holding only its header (1-bit gray, no pixel data): cheap to claim any size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_pixel_limit_is_pillows_default_and_its_edge_is_exact(tmp_path: Path) -> None:
    limit = 1024 * 1024 * 1024 // 4 // 3  # Pillow's documented default MAX_IMAGE_PIXELS
    assert MAX_PIXELS == limit == 89_478_485
    with pytest.raises(InputError) as at_limit:  # accepted; then fails for want of pixel data
        load_image(png_header(tmp_path / "edge.png", limit, 1))
    assert "too many pixels" not in str(at_limit.value) and "cannot decode" in str(at_limit.value)
    with pytest.raises(InputError, match=r"over\.png: refused, too many pixels .*89,478,485"):
        load_image(png_header(tmp_path / "over.png", limit + 1, 1))


def test_pixel_limit_holds_whatever_pillows_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # an application may switch Pillow's off
    with pytest.raises(InputError, match="too many pixels"):
        load_image(png_header(tmp_path / "over.png", MAX_PIXELS + 1, 1))


def test_thin_image_is_refused_before_resizing() -> None:
    preprocess = Preprocess((224, 224), (0.5,) * 3, (0.5,) * 3, resize_to=256)
    # resized so its shorter side is 256, 60000x1 would be (60000 * 256)x256 pixels
    with pytest.raises(InputError, match=r"^60000x1 pixels: .*15360000x256.*too many pixels"):
        preprocess.model_pixels(Image.new("RGB", (60000, 1)))
    assert preprocess.model_pixels(Image.new("RGB", (600, 2))).size == (224, 224)


def test_resize_limit_edge_is_exact() -> None:
    widest = MAX_PIXELS // (256 * 256)  # w x 1 becomes (256 w) x 256
    preprocess = Preprocess((224, 224), (0.5,) * 3, (0.5,) * 3, resize_to=256)
    assert preprocess.resized_size((widest, 1)) == (256 * widest, 256)
    with pytest.raises(InputError, match="too many pixels"):
        preprocess.resized_size((widest + 1, 1))


def test_image_id_of_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / os.fsdecode(b"x_\xff.jpg")
    raw = bytes(tmp_path.resolve()) + b"/x_\xff.jpg"
    assert image_id(path) == "x-" + hashlib.sha1(raw).hexdigest()[:8]
    plain = tmp_path / "dög.jpg"  # valid UTF-8 names keep their ids, so --skip-existing still works
    digest = hashlib.sha1(str(plain.resolve()).encode("utf-8")).hexdigest()[:8]
    assert image_id(plain) == f"d_g-{digest}"


def load_or_hang(path: Path, seconds: float = 10) -> tuple[str, bool]:
    """load_image's error on ``path``, and whether it had to be rescued from blocking on a FIFO
    (by opening the FIFO's writing end, so a hanging reader sees the end of the file)."""
    outcome: list[str] = []

    def attempt() -> None:
        try:
            load_image(path)
            outcome.append("decoded")
        except InputError as exc:
            outcome.append(str(exc))
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(seconds)
    rescued = thread.is_alive()
    if rescued:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
    return outcome[0], rescued


def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    message, rescued = load_or_hang(fifo)
    assert not rescued, f"load_image blocked on the FIFO ({message})"
    assert message.startswith(f"{fifo}: not a regular file")


@pytest.mark.parametrize("values,expected", [
    ([[0.0, 0.5], [1.0, float("nan")]], [[0, 128], [255, 0]]),          # 0..1: scaled by 255
    ([[-5.0, 100.4], [300.0, float("nan")]], [[0, 100], [255, 0]]),      # else 0..255, clipped
    ([[0.0, 2.0], [float("inf"), float("-inf")]], [[0, 2], [255, 0]]),
])
def test_float_tiff_is_scaled(tmp_path: Path, values: list, expected: list) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array(values, dtype=np.float32)).save(path)
    assert Image.open(path).mode == "F"
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (2, 2, 3) and (rgb == np.array(expected)[..., None]).all(), rgb[..., 0]


def test_names_in_messages_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad\nname.jpg"
    path.write_text("just text")
    with pytest.raises(InputError) as error:
        load_image(path)
    assert "\n" not in str(error.value) and "bad\\nname.jpg" in str(error.value)
    with pytest.raises(InputError, match=r"'.*/gone\\nhere\.png': no such file"):
        load_image(tmp_path / "gone\nhere.png")


def test_write_failure_names_the_file_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_a: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.replace", full)
    with pytest.raises(GradcamError) as error:
        atomic_write(tmp_path / "odd\ndir" / "map.png", b"data")
    assert "\n" not in str(error.value) and "odd\\ndir/map.png': No space left" in str(error.value)
