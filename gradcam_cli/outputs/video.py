"""Explaining video: every N-th frame of a clip through classify's pipeline, drawn back onto the clip.

Output, one folder per video and model/layer, as for an image::

    <output-dir>/<video-stem>-<hash8>/<arch>@<layer>/
        gradcam.mp4      the clip at its own size, frame count and frame rate, the chosen CAM
                         blended over each frame and the top explained class printed on it
        frames.jsonl     one line per explained frame: index, time, classes and scores, top-1
        summary.json     the video's record

Frames 0, N, 2N, … are explained, ``batch_size`` at a time, with classify's Job (the same
layer, classes, scores, preprocessing and method settings). A frame between two explained ones
shows the last explained frame's map and class over its own pixels, so the clip keeps its
length and rate. The clip is decoded twice, once ahead to explain a batch and once behind to
draw it, so a run holds one batch of model-sized crops and one frame, however long the clip.
Files are written under temporary names and renamed into place once the clip is complete; an
unreadable or truncated clip leaves nothing and fails alone.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import IO, NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import ArgumentError, GradcamError, InputError, quoted, unknown
from ..explanation import Explanation, ZeroGradientError
from ..io import atomic_write, image_id, json_bytes, json_text, prepare_output_dir
from ..methods import METHODS, overlay
from ..models import LoadedModel, file_sha256
from ..pipeline import Job, resolve_fused
from ..render import CAM_ALPHA, COLORMAP, check_colours
from ..runner import Loaded, error_record
from ..settings import MethodSettings, check_settings
from ..targets import Scoring, class_targets
from .overlay import original_overlay
from .report import reported

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg quiet (read on first use): our line says it
FOURCC = "mp4v"      # MPEG-4 Part 2: the MP4 encoder every OpenCV build with FFmpeg has
DEFAULT_FPS = 25.0   # frames per second when the container does not say
FRAMES_FILE = "frames.jsonl"
RUN_OPTIONS = ("output_dir", "batch_size", "skip_existing", "stop", "progress", "class_names",
               "targets", "score", "negative", "colormap", "alpha")  # what a run passes on to videos


@dataclass(frozen=True)
class Drawing:
    """What is drawn on a video besides the explanation's own settings."""

    method: str
    every: int
    colormap: str
    alpha: float

    def settings(self) -> dict:
        """The drawing's part of a video's recorded settings."""
        return {"method": self.method, "every": self.every, "colormap": self.colormap, "alpha": self.alpha}


class Frame(NamedTuple):
    """An explained frame: its line in frames.jsonl, the map drawn (None: no map) and its label."""

    index: int
    line: dict
    cam: torch.Tensor | None
    label: str


def default_method(methods: Sequence[str]) -> str:
    """The map a video shows when none is named: the first heat-map method asked for, else Grad-CAM."""
    return next((m for m in methods if m in METHODS and overlay(m)), "gradcam")


def check_method(method: str) -> None:
    """Refuse a method that is unknown or not drawn as a heat map."""
    if method not in METHODS:
        raise unknown("method", method, METHODS)
    if not overlay(method):
        raise ArgumentError("method", method, "a video shows a heat map: choose a CAM, occlusion or rise")


def classify_video(model: LoadedModel, videos: Sequence[str | Path], output_dir: str | Path = "results",
                   method: str = "gradcam", every: int = 1, layer: str | None = None,
                   layers: Sequence[str] = (), topk: int = 3, class_ids: Sequence[int] = (),
                   class_names: Sequence[str] = (),
                   targets: str | Path | Mapping[str, Sequence[int | str]] | None = None,
                   score: str | None = None, negative: bool = False, settings: MethodSettings | None = None,
                   colormap: str = COLORMAP, alpha: float = CAM_ALPHA, batch_size: int = 8,
                   skip_existing: bool = False, stop: Callable[[], bool] = lambda: False,
                   progress: bool = False) -> Iterator[dict]:
    """Explain frames 0, ``every``, 2·``every``, … of each video as ``pipeline.classify`` explains
    an image, and draw ``method``'s map of the top explained class over every frame (see the
    module's doc); yield one record per video, in order.

    Every argument is checked here, before any frame is read. A record's ``status`` is "ok",
    "skipped" (``skip_existing``, and an earlier run with the same settings, video bytes and
    drawing left all its files) or "error" (an unreadable, truncated or missing video: one line
    naming it; the others go on). ``stop`` is asked after each batch of frames: when it says
    yes, the video under way is dropped without a file and no other starts.
    """
    check_method(method)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ArgumentError("every", every, "explain every N-th frame: a positive integer")
    check_colours(colormap, alpha)
    job = _job(model, method, layer, layers, topk, class_ids, class_names, targets, score, negative,
               settings, batch_size, progress)
    out = prepare_output_dir(Path(output_dir))
    return reported(_videos(job, Drawing(method, every, colormap, alpha), [Path(v) for v in videos], out,
                            batch_size, skip_existing, stop), out, job.tag)


def with_videos(images: Callable[..., Iterator[dict]], videos: Callable[..., Iterator[dict]],
                is_video: Callable[[object], bool]) -> Callable[..., Iterator[dict]]:
    """One pipeline over a run's inputs: the images' records through ``images``, then the
    videos' through ``videos`` (each checks its arguments before either starts)."""
    def both(model: LoadedModel, items: Sequence, **options: object) -> Iterator[dict]:
        clips = [item for item in items if is_video(item)]
        stills = [item for item in items if not is_video(item)]
        first = images(model, stills, **options) if stills else iter(())
        then = videos(model, clips, **{k: v for k, v in options.items() if k in RUN_OPTIONS})
        yield from first
        yield from then
    return both


def _job(model: LoadedModel, method: str, layer: str | None, layers: Sequence[str], topk: int,
         class_ids: Sequence[int], class_names: Sequence[str], targets: object, score: str | None,
         negative: bool, settings: MethodSettings | None, batch_size: int, progress: bool) -> Job:
    """classify's Job for one method, set up as ``pipeline.classify`` sets up its own."""
    settings = check_settings(settings)
    chosen = resolve_fused(model, layer, layers, settings.cam.fuse)
    if len(chosen) > 1 and settings.cam.fuse is None:
        settings = replace(settings, cam=replace(settings.cam, fuse="mean"))
    classes = class_targets(model.categories, [method], topk, class_ids, class_names, targets, score,
                            negative)
    return Job(model, chosen, [method], by_layer=False, tag=f"{model.folder_name}@{'+'.join(chosen)}",
               target=classes.chooser, classes=classes, batch_size=batch_size, progress=progress,
               method_settings=settings)


def _videos(job: Job, drawing: Drawing, videos: list[Path], out: Path, batch_size: int,
            skip_existing: bool, stop: Callable[[], bool]) -> Iterator[dict]:
    """Each video's record; a layer without gradient on the run's first batch stops the run."""
    first = [True]  # no batch explained yet in this run
    for path in videos:
        if stop():
            return
        record = _video(job, drawing, path, out, batch_size, skip_existing, stop, first)
        if record is None:  # stopped inside this video
            return
        yield record


def _video(job: Job, drawing: Drawing, path: Path, out: Path, batch_size: int, skip_existing: bool,
           stop: Callable[[], bool], first: list[bool]) -> dict | None:
    """One video's record: skipped, explained, or its one-line error; None when stopped."""
    folder = out / image_id(path) / job.tag
    try:
        settings = _settings(job, drawing, path)
        earlier = _existing(folder, settings) if skip_existing else None
        return earlier or _explain(job, drawing, path, folder, settings, batch_size, stop, first)
    except InputError as exc:
        return error_record(path, str(exc))


def _settings(job: Job, drawing: Drawing, path: Path) -> dict:
    """What determines a video's files, as JSON reads it back: the job's, the drawing's, the bytes'."""
    _check_file(path)
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise InputError(f"{quoted(path)}: cannot read ({exc.strerror or exc})") from exc
    return json.loads(json_text({**job.settings(path), "video": drawing.settings(), "video_sha256": digest}))


def _check_file(path: Path) -> None:
    """Refuse a missing path or anything but a regular file (a FIFO would block) in one line."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{quoted(path)}: no such file") from None
    except OSError as exc:
        raise InputError(f"{quoted(path)}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{quoted(path)}: not a regular file (a folder, FIFO, socket or device); "
                         "give a video file")


def _existing(folder: Path, settings: dict) -> dict | None:
    """The earlier record as "skipped", when its settings equal these and its files are there."""
    try:
        record = json.loads((folder / "summary.json").read_text())
        same = record["settings"] == settings
        complete = all(Path(record[f]).is_file() for f in ("video", "frames_file"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**record, "status": "skipped"} if same and complete else None


def _explain(job: Job, drawing: Drawing, path: Path, folder: Path, settings: dict, batch_size: int,
             stop: Callable[[], bool], first: list[bool]) -> dict | None:
    """Explain and draw one video into ``folder``; its record, or None when stopped."""
    with (_Capture(path) as ahead, _Capture(path) as behind,
          _Outputs(folder, drawing.method, ahead.fps) as outputs,
          tqdm(total=ahead.announced or None, unit="frame", disable=not job.progress, leave=False,
               file=sys.stderr) as bar):
        tops = []  # each explained frame's top class
        frames = _explained(ahead, drawing.every, lambda image: _decode(job, path, image))
        while batch := list(islice(frames, batch_size)):
            explained = _frames(job, path, batch, ahead.fps, first)
            for frame in explained:
                outputs.line(frame.line)
                tops.extend(frame.line.get("classes", [])[:1])
            _draw(job, drawing, behind, outputs, explained)
            bar.update(behind.count - bar.n)
            if stop():
                return None
        _check_complete(path, ahead, behind)
        files = outputs.commit()
    return _record(job, drawing, path, folder, ahead, outputs.size, tops, files, settings)


def _decode(job: Job, path: Path, image: Image.Image) -> Image.Image:
    """The crop the model sees of a frame; a frame it cannot take fails the video, naming it."""
    try:
        return job.decode(path, image)
    except InputError as exc:
        name = quoted(path)
        raise InputError(str(exc) if str(exc).startswith(name) else f"{name}: {exc}") from exc


def _explained(capture: _Capture, every: int,
               decode: Callable[[Image.Image], Image.Image]) -> Iterator[tuple[int, Image.Image]]:
    """(index, crop) of frames 0, every, 2·every, …; the frames between are skipped undrawn."""
    while True:
        index = capture.count
        frame = capture.read() if index % every == 0 else capture.skip()
        if frame is None:
            return
        if index % every == 0:
            yield index, decode(Image.fromarray(frame))


def _frames(job: Job, path: Path, batch: list[tuple[int, Image.Image]], fps: float,
            first: list[bool]) -> list[Frame]:
    """Explain a batch of frames in one call; each frame's line, map and label."""
    try:
        results = job.explain([Loaded(path, "", crop) for _, crop in batch])[0]
    except ZeroGradientError as exc:
        if first[0]:
            raise
        results = exc
    first[0] = False
    return [_frame(job, results, i, index, fps) for i, (index, _) in enumerate(batch)]


def _frame(job: Job, result: Explanation | ZeroGradientError, i: int, index: int, fps: float) -> Frame:
    """Frame ``index`` (image ``i`` of its batch): its line, the top class's map and its label."""
    line = {"frame": index, "time": round(index / fps, 6)}
    error = result.problem if isinstance(result, ZeroGradientError) else result.errors[i]
    if error:
        return Frame(index, {**line, "error": error}, None, "no map")
    names, classes, cam = job.model.categories, [], None
    for k, class_id in enumerate(result.classes[i].tolist()):
        value = float(result.scores[i, class_id]) if class_id >= 0 else math.nan
        if math.isfinite(value):
            classes.append({"rank": k + 1, "class_id": class_id, "name": names[class_id],
                            "score": round(value, 6)})
            cam = result.maps[next(iter(result.maps))][i, k] if cam is None else cam
    top_id, top_score = result.predicted[i]
    line.update(classes=classes, predicted={"class_id": top_id, "name": names[top_id],
                                            "score": round(top_score, 6)})
    if not classes:
        return Frame(index, {**line, "error": "no class to explain"}, None, "no class")
    top = classes[0]
    return Frame(index, line, cam, f"{top['name']}  {_symbol(job.classes.scoring)} = {top['score']:.3f}")


def _symbol(scoring: Scoring) -> str:
    """How a score is labelled: p, logit, 1-p, -logit (as the grid labels it)."""
    symbol = "logit" if scoring.kind == "logit" else "p"
    return ("-logit" if symbol == "logit" else "1-p") if scoring.negative else symbol


def _draw(job: Job, drawing: Drawing, capture: _Capture, outputs: _Outputs, explained: list[Frame]) -> None:
    """Draw the frames from the batch's first explained one to just before the next batch's,
    each with the last explained map and label, reading them again from ``capture``."""
    for frame in explained:
        while capture.count < frame.index + drawing.every:
            pixels = capture.read()
            if pixels is None:
                return
            picture = pixels if frame.cam is None else original_overlay(
                frame.cam, Image.fromarray(pixels), job.model.preprocess, drawing.colormap, drawing.alpha)
            outputs.frame(_labelled(picture, frame.label))


def _labelled(picture: np.ndarray, label: str) -> np.ndarray:
    """``label`` printed in white on a black band at the picture's top left, sized to its height."""
    text = label.encode("ascii", "replace").decode()  # OpenCV's fonts draw ASCII only
    scale = max(0.35, picture.shape[0] / 600)
    thickness = max(1, round(scale * 1.5))
    (width, height), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, height // 3)
    picture = np.ascontiguousarray(picture)
    cv2.rectangle(picture, (0, 0), (width + 2 * pad, height + base + 2 * pad), (0, 0, 0), cv2.FILLED)
    cv2.putText(picture, text, (pad, pad + height), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                thickness, cv2.LINE_AA)
    return picture


def _check_complete(path: Path, ahead: _Capture, behind: _Capture) -> None:
    """Refuse a clip without frames, or one that decodes to fewer frames than its header
    announces (beyond a 1% or one-frame estimate), as truncated."""
    if ahead.count == 0:
        raise InputError(f"{quoted(path)}: no frame could be decoded; check the file, or convert it "
                         "(e.g. to H.264 MP4)")
    short = ahead.announced - ahead.count > max(1, ahead.announced // 100) if ahead.announced else False
    if short or behind.count != ahead.count:
        raise InputError(f"{quoted(path)}: truncated or damaged: {ahead.count} of the {ahead.announced} "
                         "frames its header announces could be decoded; check or re-encode the file")


def _record(job: Job, drawing: Drawing, path: Path, folder: Path, ahead: _Capture, size: tuple[int, int],
            tops: list[dict], files: dict[str, str], settings: dict) -> dict:
    """The video's record, written to its summary.json: where, what, how often, the files, and
    per class how many explained frames it topped and its mean score there."""
    counts = Counter(t["class_id"] for t in tops)
    means = {c: sum(t["score"] for t in tops if t["class_id"] == c) / n for c, n in counts.items()}
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    classes = [{"rank": r + 1, "class_id": c, "name": job.model.categories[c], "frames": counts[c],
                "score": round(means[c], 6)} for r, c in enumerate(ranked)]
    where = ({"layers": job.layers, "fuse": job.fused} if job.fused else {"layer": job.layers[0]})
    scoring = job.classes.scoring
    record = {"image": str(path), "status": "ok", "arch": job.model.arch, "weights": job.model.weights,
              **where, "preprocess": job.model.preprocess.to_dict(),
              "input_size": list(job.model.preprocess.input_size), **drawing.settings(),
              "fps": ahead.fps, "frames": ahead.count, "explained": -(-ahead.count // drawing.every),
              "size": list(size), "score_kind": scoring.kind, "negative": scoring.negative,
              "classes": classes, **files, "settings": settings, "summary": str(folder / "summary.json")}
    atomic_write(folder / "summary.json", json_bytes(record))
    return record


class _Capture:
    """A video read frame by frame as RGB arrays; an unreadable file is an InputError naming it."""

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0
        self.capture = cv2.VideoCapture(str(path))
        if not self.capture.isOpened():
            self.capture.release()
            raise InputError(f"{quoted(path)}: cannot read it as a video (not a video file, truncated, "
                             "or a codec OpenCV lacks); check the file or convert it, e.g. to H.264 MP4")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if math.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS
        announced = self.capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.announced = int(announced) if 0 < announced < 2**31 else 0  # 0: not known

    def read(self) -> np.ndarray | None:
        """The next frame as HxWx3 RGB, or None at the end."""
        ok, frame = self.capture.read()
        if not ok:
            return None
        self.count += 1
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def skip(self) -> np.ndarray | None:
        """Pass the next frame without converting it; an empty array, or None at the end."""
        if not self.capture.grab():
            return None
        self.count += 1
        return np.empty(0)

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.capture.release()


class _Outputs:
    """A video's MP4 and frames.jsonl, written under temporary names in its folder and renamed
    into place by ``commit``; left uncommitted (an error, a stop), they are removed."""

    def __init__(self, folder: Path, method: str, fps: float) -> None:
        self.folder, self.fps = folder, fps
        self.names = {"video": folder / f"{method}.mp4", "frames_file": folder / FRAMES_FILE}
        folder.mkdir(parents=True, exist_ok=True)
        self.temporary: dict[str, Path] = {}
        self.lines: IO[str] = self._open("frames_file", ".tmp")
        self.writer: cv2.VideoWriter | None = None
        self.size = (0, 0)  # (height, width) of the MP4
        self.committed = False

    def _open(self, key: str, suffix: str) -> IO[str]:
        """A temporary file beside the output ``key`` (.<name>.<random>.tmp, as io.atomic_write)."""
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=f".{self.names[key].name}.", suffix=suffix)
        self.temporary[key] = Path(name)
        return os.fdopen(fd, "w", encoding="utf-8")

    def line(self, record: dict) -> None:
        """Append one explained frame's line."""
        self.lines.write(json_text(record) + "\n")

    def frame(self, picture: np.ndarray) -> None:
        """Append one RGB frame to the MP4 (even sides, as MPEG-4 needs: an odd last row or column
        is left out)."""
        picture = picture[:picture.shape[0] // 2 * 2, :picture.shape[1] // 2 * 2]
        if self.writer is None:
            self._open("video", ".tmp.mp4").close()  # FFmpeg picks the container by the suffix
            self.size = picture.shape[:2]
            self.writer = cv2.VideoWriter(str(self.temporary["video"]), cv2.VideoWriter_fourcc(*FOURCC),
                                          self.fps, (self.size[1], self.size[0]))
            if not self.writer.isOpened():
                raise GradcamError(f"cannot write {quoted(self.names['video'])}: OpenCV cannot encode "
                                   f"{FOURCC} MP4 here (an OpenCV built without FFmpeg?)")
        self.writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))

    def commit(self) -> dict[str, str]:
        """Close both files and rename them into place; their final paths by record field."""
        self._close()
        try:
            for key, name in self.temporary.items():
                os.replace(name, self.names[key])
        except OSError as exc:
            raise GradcamError(f"cannot write {quoted(self.names[key])}: {exc.strerror or exc}") from exc
        self.committed = True
        return {key: str(name) for key, name in self.names.items()}

    def _close(self) -> None:
        """Finish the MP4 and the lines (idempotent)."""
        if self.writer is not None:
            self.writer.release()
        self.lines.close()

    def __enter__(self) -> _Outputs:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._close()
        if not self.committed:
            for name in self.temporary.values():
                name.unlink(missing_ok=True)
