"""Explaining video: clips generated here (a moving square that brightens frame by frame), a
tiny network whose Grad-CAM is the square, and the written MP4 and JSON lines checked against
hand computations."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote

import cv2
import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from gradcam_cli.models import LoadedModel
from gradcam_cli.outputs.overlay import HATCH
from gradcam_cli.outputs.video import classify_video
from gradcam_cli.preprocess import Preprocess

from .conftest import make_image
from .test_cli import run

HEIGHT, WIDTH, FPS, SIDE, ROW = 96, 128, 10.0, 16, 60  # the square: SIDE px, top row ROW


def write_clip(path: Path, frames: int = 23, fourcc: str = "mp4v",
               size: tuple[int, int] = (HEIGHT, WIDTH)) -> Path:
    """A clip of a square moving 4 px right per frame on a dark background, brighter each frame."""
    height, width = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (width, height))
    for i in range(frames):
        frame = np.full((height, width, 3), 30, np.uint8)
        left = 4 * (i % 25) + 4
        frame[ROW:ROW + SIDE, left:left + SIDE] = 140 + 4 * (i % 25)
        writer.write(frame)
    writer.release()
    return path


def decoded(path: Path) -> tuple[list[np.ndarray], float]:
    """Every frame of a video as RGB arrays, and its frame rate, read by OpenCV directly."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def tiny_model(size: tuple[int, int] = (HEIGHT, WIDTH), resize: str = "none",
               crop: str = "none") -> LoadedModel:
    """conv (the channels' mean) -> global mean s -> logits (s + 4, -s): class "bright" wins on
    these dark frames, and its Grad-CAM at conv is relu(conv) (positive weights)."""
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 1, 1, bias=False), pool=nn.AdaptiveAvgPool2d(1),
                                    flat=nn.Flatten(), fc=nn.Linear(1, 2)))
    with torch.no_grad():
        net.conv.weight.fill_(1 / 3)
        net.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net.fc.bias.copy_(torch.tensor([4.0, 0.0]))
    preprocess = Preprocess(size, (0.5,) * 3, (0.25,) * 3, resize=resize, crop=crop)
    return LoadedModel("tiny", net.eval(), ["bright", "dark"], preprocess, "test")


def normalised(frame: np.ndarray) -> np.ndarray:
    """The tiny model's conv output by hand: the mean over channels of (x / 255 - 0.5) / 0.25."""
    return ((frame.astype(np.float64) / 255 - 0.5) / 0.25).mean(axis=2)


def bright_probability(frame: np.ndarray) -> float:
    """Softmax of (s + 4, -s) for class "bright", s the mean of the normalised frame."""
    s = normalised(frame).mean()
    return float(1 / (1 + np.exp(-(2 * s + 4))))


def hand_overlay(explained: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """Grad-CAM of ``explained`` (relu of the conv output, min-max normalised), jet-coloured
    and blended 50/50 over ``shown``."""
    cam = np.maximum(normalised(explained), 0)
    heat = matplotlib.colormaps["jet"](cam / cam.max())[..., :3]
    return np.round((0.5 * heat + 0.5 * shown / 255) * 255)


def explain_clip(clip: Path, out: Path, **options: object) -> list[dict]:
    """classify_video on one clip with the tiny model, Grad-CAM at conv, top-1 class."""
    options = {"every": 5, "batch_size": 2, **options}
    return list(classify_video(tiny_model(), [clip], out, layer="conv", topk=1, **options))


def test_every_nth_frame_is_explained_and_the_clip_keeps_its_frames(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4")
    (record,) = explain_clip(clip, tmp_path / "out")
    assert record["status"] == "ok", record
    lines = [json.loads(line) for line in Path(record["frames_file"]).read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 5, 10, 15, 20]
    assert [line["time"] for line in lines] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    source, _ = decoded(clip)
    for line in lines:  # each line's score is its own frame's (every frame is brighter than the last)
        (top,) = line["classes"]
        assert (top["class_id"], top["name"]) == (0, "bright")
        assert top["score"] == pytest.approx(bright_probability(source[line["frame"]]), abs=2e-6)
    written, fps = decoded(Path(record["video"]))
    assert len(written) == 23 and fps == FPS and written[0].shape == (HEIGHT, WIDTH, 3)
    assert (record["frames"], record["explained"], record["fps"]) == (23, 5, FPS)


def test_frames_show_the_last_explained_map_over_their_own_pixels(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4")
    (record,) = explain_clip(clip, tmp_path / "out")
    source, _ = decoded(clip)
    written, _ = decoded(Path(record["video"]))
    bottom = slice(HEIGHT // 2, HEIGHT)  # below the label
    for index, explained in ((0, 0), (5, 5), (7, 5), (22, 20)):
        expected = hand_overlay(source[explained], source[index])
        error = np.abs(written[index].astype(np.float64) - expected)[bottom].mean()
        assert error < 4, (index, error)  # MPEG-4 coding noise only
    box = (slice(ROW, ROW + SIDE), slice(24, 48))  # the squares of frames 5 and 7
    held = np.abs(written[7] - hand_overlay(source[5], source[7]))[box].mean()
    own = np.abs(written[7] - hand_overlay(source[7], source[7]))[box].mean()
    assert held < 6 < 30 < own, (held, own)


def test_overlay_is_drawn_at_the_frame_resolution_through_the_crop(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4")
    model = tiny_model((64, 64), resize="shorter", crop="center")  # 96x128 -> 64x85 -> 64x64
    (record,) = list(classify_video(model, [clip], tmp_path / "out", layer="conv", topk=1, every=5))
    written, _ = decoded(Path(record["video"]))
    source, _ = decoded(clip)
    assert written[0].shape == (HEIGHT, WIDTH, 3)
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    hatched = np.where(((x + y) // HATCH % 2 == 0)[..., None], source[0] // 2, source[0])
    cut = np.abs(written[0].astype(int) - hatched)[HEIGHT // 2:, :8].mean()  # left of the crop: hatched
    assert cut < 4, cut


def test_reruns_write_the_same_bytes(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", frames=8)
    first, second = (explain_clip(clip, tmp_path / name)[0] for name in ("a", "b"))
    for field in ("video", "frames_file"):
        assert Path(first[field]).read_bytes() == Path(second[field]).read_bytes()


def truncated_avi(path: Path) -> Path:
    """An MJPEG AVI cut in half: its header still announces 40 frames."""
    whole = write_clip(path.with_name("whole.avi"), frames=40, fourcc="MJPG").read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return path


def test_unreadable_and_truncated_videos_fail_alone_in_one_line(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture) -> None:
    good = write_clip(tmp_path / "good.mp4", frames=6)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    avi = truncated_avi(tmp_path / "cut.avi")
    records = list(classify_video(tiny_model(), [cut, good, text, avi, tmp_path / "gone.mp4"],
                                  tmp_path / "out", layer="conv", topk=1, every=2))
    assert [r["status"] for r in records] == ["error", "ok", "error", "error", "error"]
    reasons = {Path(r["image"]).name: r["error"] for r in records if r["status"] == "error"}
    for name, reason in reasons.items():
        assert reason.startswith(str(tmp_path / name)) and "\n" not in reason, reason
    assert "cannot read it as a video" in reasons["notes.mp4"] and "cannot read" in reasons["cut.mp4"]
    assert "truncated" in reasons["cut.avi"] and "40" in reasons["cut.avi"]
    assert "no such file" in reasons["gone.mp4"]
    for name in reasons:  # no clip, no temporary: only the report's record of the failure
        folders = list((tmp_path / "out").glob(f"{Path(name).stem}-*"))
        assert {p.name for f in folders for p in f.rglob("*") if p.is_file()} <= {"error.json"}, name
    assert (tmp_path / "out" / "index.html").read_text().count("data-status=\"error\"") == 4
    assert "moov" not in capfd.readouterr().err  # FFmpeg's own messages are kept quiet


def test_skip_existing_reuses_a_video_only_with_the_same_settings(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", frames=6)
    (first,) = explain_clip(clip, tmp_path / "out")
    (again,) = explain_clip(clip, tmp_path / "out", skip_existing=True)
    (other,) = explain_clip(clip, tmp_path / "out", skip_existing=True, every=3)
    assert (first["status"], again["status"], other["status"]) == ("ok", "skipped", "ok")
    assert again["settings"] == first["settings"] and other["settings"]["video"]["every"] == 3


CLI = ["classify", "--arch", "module:tests.scenes:resnet10", "--num-classes", "4", "--weights", "none",
       "--no-cuda", "--topk", "2", "--input-size", "48", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
       "--json"]


def test_cli_explains_given_videos_and_folder_videos_beside_images(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    make_image(folder / "a.png")
    write_clip(folder / "b.avi", frames=7, fourcc="MJPG")
    clip = write_clip(tmp_path / "c.mp4", frames=5)
    code, out, err = run(*CLI, "--image-path", str(folder), "--video", str(clip), "--video-ext", "avi",
                         "--every", "3", "--output-dir", str(tmp_path / "o"))
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["image"]).name for r in records] == ["a.png", "b.avi", "c.mp4"]
    assert "grid" in records[0] and records[1]["method"] == "gradcam"
    frames = [json.loads(line)["frame"] for line in Path(records[1]["frames_file"]).read_text().splitlines()]
    assert frames == [0, 3, 6] and json.loads(Path(records[2]["summary"]).read_text()) == records[2]
    page = (tmp_path / "o" / "index.html").read_text()
    for record in records[1:]:  # the run's page links each video's clip and its record
        folder = quote(str(Path(record["video"]).parent.relative_to(tmp_path / "o")))
        assert f'href="{folder}/gradcam.mp4"' in page and f'href="{folder}/summary.json"' in page


@pytest.mark.parametrize(("flags", "said"), [
    (["--every", "2"], "--every 2: applies to videos"),
    (["--video", "V", "--video-method", "vanilla"], "--video-method vanilla: "),
    (["--video", "V", "--video-method", "nosuch"], "--video-method nosuch: unknown"),
    (["--video-ext", "png"], "--video-ext png: "),
    (["--video", "DIR"], "--video DIR: a folder"),
])
def test_cli_refuses_bad_video_options_in_one_line(tmp_path: Path, flags: list[str], said: str) -> None:
    clip = write_clip(tmp_path / "c.mp4", frames=2)
    flags = [str(clip) if f == "V" else str(tmp_path) if f == "DIR" else f for f in flags]
    said = said.replace("DIR", str(tmp_path))
    code, _, err = run(*CLI, "--image-path", str(make_image(tmp_path / "a.png")), *flags,
                       "--output-dir", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"gradcam: error: {said}"), err
