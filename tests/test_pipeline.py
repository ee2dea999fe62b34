"""Runs over many images: bad inputs, resuming, sharding, interruption, full disks."""

from __future__ import annotations

import json
import os
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import make_image
from .test_cli import run

BASE = ["classify", "--arch", "resnet18", "--weights", "none", "--topk", "1",
        "--method", "gradcam", "--json", "--batch-size", "3"]


def huge_png(path: Path, side: int = 40000) -> Path:
    """A tiny file whose header claims side x side pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def bad_inputs(folder: Path) -> dict[str, str]:
    """Files that must each fail alone with a clear reason; name → expected words."""
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    good = make_image(folder / "source.jpg")
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    good.unlink()
    (folder / "text.jpg").write_text("just text")
    huge_png(folder / "bomb.png")
    return {"empty.jpg": "not an image", "truncated.jpg": "cannot decode", "text.jpg": "not an image",
            "bomb.png": "too many pixels", "missing.png": "no such file"}


def odd_but_good(folder: Path) -> list[Path]:
    """Images in unusual modes and sizes that must all be explained."""
    folder.mkdir()
    deep = folder / "deep16.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(deep)
    palette = make_image(folder / "palette.png", "P")
    Image.open(palette).save(folder / "palette_t.png", transparency=0)
    return [deep, make_image(folder / "cmyk.jpg", "CMYK"), folder / "palette_t.png",
            make_image(folder / "one.png", size=(1, 1)), make_image(folder / "gray.bmp", "L")]


def test_each_bad_input_fails_alone_with_one_line(tmp_path: Path) -> None:
    expected = bad_inputs(tmp_path / "bad")
    good = odd_but_good(tmp_path / "good")
    (tmp_path / "void").mkdir()
    args = [str(tmp_path / "bad"), str(tmp_path / "bad" / "missing.png"), str(tmp_path / "void"),
            *map(str, good)]
    argv = [*BASE, "--output-dir", str(tmp_path / "out")]
    for a in args:
        argv += ["--image-path", a]
    code, out, err = run(*argv)
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    errors = {Path(r["image"]).name: r["error"] for r in records if r["status"] == "error"}
    for name, words in expected.items():
        assert words in errors[name], (name, errors[name])
        assert sum(name in line for line in err.splitlines()) == 1
    assert "no images in this folder" in errors["void"]
    done = sorted(Path(r["image"]).name for r in records if r["status"] == "ok")
    assert done == sorted(g.name for g in good)
    assert f"{len(good)} done, 0 skipped, {len(expected) + 1} failed" in err


def test_unreadable_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = make_image(tmp_path / "secret.png")
    real_open = Image.open

    def guarded(path: object, *a: object, **k: object) -> Image.Image:
        if Path(str(path)).name == "secret.png":  # root reads anything, so simulate the mode bits
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr("gradcam_cli.io.Image.open", guarded)
    code, _, err = run(*BASE, "--image-path", str(secret), "--output-dir", str(tmp_path / "o"))
    assert code == 1 and "secret.png: not readable (permission denied)" in err


def test_skip_existing_resumes_and_same_names_do_not_collide(tmp_path: Path) -> None:
    a, b = make_image(tmp_path / "x" / "dog.png"), make_image(tmp_path / "y" / "dog.png")
    out = str(tmp_path / "out")
    code, first, _ = run(*BASE, "--image-path", str(tmp_path), "--output-dir", out)
    assert code == 0
    summaries = {json.loads(line)["summary"] for line in first.splitlines()}
    assert len(summaries) == 2  # two dog.png in different folders, two output folders
    code, second, err = run(*BASE, "--image-path", str(a), "--image-path", str(b),
                            "--output-dir", out, "--skip-existing")
    assert code == 0 and "0 done, 2 skipped" in err
    assert [json.loads(line)["status"] for line in second.splitlines()] == ["skipped", "skipped"]


def test_shards_union_equals_unsharded_run(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        make_image(folder / f"{i}.png")
    whole = run(*BASE, "--image-path", str(folder), "--output-dir", str(tmp_path / "w"))[1]
    parts = [run(*BASE, "--image-path", str(folder), "--shard", f"{i}/2",
                 "--output-dir", str(tmp_path / "w"))[1] for i in (1, 2)]
    images = [sorted(json.loads(line)["image"] for line in text.splitlines()) for text in parts]
    assert not set(images[0]) & set(images[1])
    assert sorted(images[0] + images[1]) == sorted(json.loads(line)["image"] for line in whole.splitlines())


def run_with_ctrl_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, presses: int,
                    images: int = 8) -> tuple[int, str, str]:
    """Run classify over a folder in batches of 4, pressing Ctrl-C ``presses`` times (half a
    second apart: signals sent together arrive as one) once the first image is written."""
    folder = tmp_path / "imgs"
    for i in range(images):
        make_image(folder / f"{i}.png")
    from gradcam_cli import pipeline
    real, calls = pipeline._write_image, []

    def interrupted(*args: object) -> dict:
        record = real(*args)
        for press in range(presses if not calls else 0):
            time.sleep(0.5 * press)
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(args)
        return record
    monkeypatch.setattr(pipeline, "_write_image", interrupted)
    return run(*BASE, "--image-path", str(folder), "--output-dir", str(tmp_path / "o"),
               "--batch-size", "4", "--json")


def test_ctrl_c_stops_cleanly_with_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_with_ctrl_c(tmp_path, monkeypatch, presses=1, images=12)
    done = len(out.splitlines())
    # the batch being written finishes, and the one explained beside it; no later batch starts
    assert code == 130 and f"{done} done, 0 skipped, 0 failed, interrupted" in err
    assert done in (4, 8)
    assert not list((tmp_path / "o").rglob("*.tmp"))


def test_second_ctrl_c_stops_at_once_without_partial_files(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_with_ctrl_c(tmp_path, monkeypatch, presses=2)
    assert code == 130 and "0 done, 0 skipped, 0 failed, interrupted" in err and out == ""
    grids = list((tmp_path / "o").rglob("grid.png"))
    assert grids and all((g.parent / "summary.json").is_file() for g in grids)  # whole images only
    assert not list((tmp_path / "o").rglob("*.tmp"))


def test_full_disk_is_a_clear_error_without_partial_files(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_a: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.replace", full)
    code, _, err = run(*BASE, "--image-path", str(make_image(tmp_path / "a.png")),
                       "--output-dir", str(tmp_path / "o"))
    assert code == 1 and "No space left on device" in err
    assert not [p for p in (tmp_path / "o").rglob("*") if p.is_file()]


def test_image_list_from_stdin(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gradcam_cli.cli import main
    image = make_image(tmp_path / "a.png")
    result = CliRunner().invoke(main, [*BASE, "--image-list", "-", "--output-dir", str(tmp_path / "o")],
                                input=f"{image}\n")
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "ok"
