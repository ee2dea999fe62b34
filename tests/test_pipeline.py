"""Runs over many images: bad inputs, resuming, sharding, interruption, full disks."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
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
        lines = [line for line in err.splitlines() if name in line]
        assert len(lines) == 1 and lines[0] == f"gradcam: error: {errors[name]}", (name, lines)
    assert "no images in this folder" in errors["void"]
    assert sum(line.startswith("gradcam: error: ") for line in err.splitlines()) == len(expected) + 1
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
    from gradcam_cli import runner
    real, calls = runner._write_image, []

    def interrupted(*args: object) -> dict:
        record = real(*args)
        for press in range(presses if not calls else 0):
            time.sleep(0.5 * press)
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(args)
        return record
    monkeypatch.setattr(runner, "_write_image", interrupted)
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
    summaries = sorted(str(p) for p in (tmp_path / "o").rglob("summary.json"))
    assert code == 130 and f"{len(summaries)} done, 0 skipped, 0 failed, interrupted" in err
    assert sorted(json.loads(line)["summary"] for line in out.splitlines()) == summaries  # all told
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
    prefix, suffix = "gradcam: error: cannot write ", ": No space left on device"
    (line,) = [line for line in err.splitlines() if line.startswith("gradcam: error: ")]
    assert code == 1 and line.startswith(prefix) and line.endswith(suffix), err
    named = Path(line[len(prefix):-len(suffix)])  # the file that could not be written
    assert named.is_relative_to(tmp_path / "o") and named.suffix in (".png", ".json"), named
    assert not [p for p in (tmp_path / "o").rglob("*") if p.is_file()]


def test_image_list_from_stdin(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gradcam_cli.cli import main
    image = make_image(tmp_path / "a.png")
    result = CliRunner().invoke(main, [*BASE, "--image-list", "-", "--output-dir", str(tmp_path / "o")],
                                input=f"{image}\n")
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "ok"


def run_folder(tmp_path: Path, *paths: Path) -> tuple[int, list[dict], list[str]]:
    """classify over ``paths``: exit code, JSON records, and the stderr lines other than the
    default-layer and preprocessing notes."""
    argv = [*BASE, "--output-dir", str(tmp_path / "out")]
    for path in paths:
        argv += ["--image-path", str(path)]
    code, out, err = run(*argv)
    notes = ("gradcam: target layer", "gradcam: preprocessing ")
    lines = [line for line in err.splitlines() if not line.startswith(notes)]
    return code, [json.loads(line) for line in out.splitlines()], lines


def test_input_names_that_are_not_utf8_are_processed(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    good = [make_image(folder / name) for name in ("a.png", os.fsdecode(b"x_\xff.jpg"), "z.png")]
    (folder / os.fsdecode(b"y_\xfe.jpg")).write_text("not an image")
    code, records, lines = run_folder(tmp_path, folder)
    assert code == 1 and [Path(r["image"]).name for r in records] == sorted(os.listdir(folder))
    done = sorted(Path(r["image"]).name for r in records if r["status"] == "ok")
    assert done == sorted(g.name for g in good)
    assert len(lines) == 2 and "y_\\udcfe.jpg': not an image" in lines[0]
    assert lines[1].startswith("gradcam: 3 done, 0 skipped, 1 failed")


def test_input_thin_image_fails_alone_in_one_line(tmp_path: Path) -> None:
    thin = tmp_path / "thin.png"
    Image.new("RGB", (60000, 1)).save(thin)
    assert thin.stat().st_size < 1000
    code, records, lines = run_folder(tmp_path, thin, make_image(tmp_path / "after.png"))
    assert code == 1 and [r["status"] for r in records] == ["error", "ok"]
    assert "60000x1 pixels" in records[0]["error"] and "too many pixels" in records[0]["error"]
    assert lines == [f"gradcam: error: {records[0]['error']}", lines[1]]
    assert lines[1].startswith("gradcam: 1 done, 0 skipped, 1 failed")


def test_input_fifo_is_an_error_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    rescued = threading.Event()

    def rescue() -> None:
        """Open the FIFO's writing end if the run still blocks on it, so the test can end."""
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            rescued.set()
        except OSError:  # no reader: nobody is blocked on it
            pass
    timer = threading.Timer(30, rescue)
    timer.start()
    try:
        code, records, lines = run_folder(tmp_path, make_image(tmp_path / "a.png"), fifo,
                                          make_image(tmp_path / "b.png"))
    finally:
        timer.cancel()
    assert not rescued.is_set(), "the run blocked on the FIFO"
    assert code == 1 and [r["status"] for r in records] == ["ok", "error", "ok"]
    assert lines[0] == (f"gradcam: error: {fifo}: not a regular file (a folder, FIFO, socket or device); "
                        "give an image file")
    assert len(lines) == 2 and lines[1].startswith("gradcam: 2 done, 0 skipped, 1 failed")


def test_input_newline_in_a_name_keeps_its_error_on_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad\nname.jpg"
    bad.write_text("just text")
    code, records, lines = run_folder(tmp_path, bad, make_image(tmp_path / "good.png"))
    assert code == 1 and [r["status"] for r in records] == ["error", "ok"]
    assert records[0]["image"] == str(bad)
    assert lines[0] == f"gradcam: error: {str(bad)!r}: not an image file (JPEG, PNG, BMP, WebP expected)"
    assert len(lines) == 2 and lines[1].startswith("gradcam: 1 done, 0 skipped, 1 failed")


def plant_temporary(folder: Path, name: str, age: float) -> Path:
    """A leftover of the atomic writer (``.<name>.<random>.tmp``), last modified ``age`` s ago."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"half a file")
    os.utime(path, (time.time() - age,) * 2)
    return path


def test_cli_sigterm_finishes_the_batches_under_way_and_exits_143(tmp_path: Path) -> None:
    import subprocess
    import sys
    for i in range(24):
        make_image(tmp_path / "imgs" / f"{i:02d}.png")
    out = tmp_path / "o"
    plant_temporary(out / "old-0123abcd" / "resnet18@layer4", ".grid.png.k3_x9q2z.tmp", 3600)
    argv = [sys.executable, "-m", "gradcam_cli", *BASE, "--no-cuda", "--batch-size", "2",
            "--image-path", str(tmp_path / "imgs"), "--output-dir", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.rglob("summary.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    records = [json.loads(line) for line in stdout.splitlines()]
    assert process.returncode == 143, stderr
    assert 0 < len(records) < 24 and all(r["status"] == "ok" for r in records)
    assert stderr.splitlines()[-1].startswith(f"gradcam: {len(records)} done, 0 skipped, 0 failed, "
                                              "interrupted")
    folders = {out.joinpath(*p.relative_to(out).parts[:2]) for p in out.rglob("*.png")}
    assert {Path(r["summary"]).parent for r in records} == folders  # whole images only
    assert not list(out.rglob("*.tmp"))  # the stale one removed at the start, none left


def test_cli_start_removes_only_stale_temporaries_of_this_tool(tmp_path: Path) -> None:
    out = tmp_path / "o"
    stale = plant_temporary(out / "a-0123abcd" / "resnet18@layer4", ".summary.json.abcd1234.tmp", 3600)
    fresh = plant_temporary(out / "b-0123abcd", ".grid.png.wxyz_987.tmp", 0)  # a concurrent shard's
    video = plant_temporary(out / "c-0123abcd", ".gradcam.mp4.k2_9zq0x.tmp.mp4", 3600)  # a video's writer
    foreign = plant_temporary(out, ".notes.tmp", 3600)  # not a name the atomic writer makes
    code, _, err = run(*BASE, "--image-path", str(make_image(tmp_path / "a.png")),
                       "--output-dir", str(out))
    assert code == 0, err
    assert not stale.exists() and not video.exists() and fresh.exists() and foreign.exists()
    assert "removed 2 temporary files left by an interrupted run" in err
