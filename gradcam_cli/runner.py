"""The one batch loop every command runs, whatever it explains.

Inputs are taken in order and decoded in a background thread one batch ahead; each batch is
explained in one call, and its files are written in a second thread while the next batch is
explained, so at most three batches are in memory. Records come out in input order.

A command is a ``Task``: how an image is decoded, how a batch is explained, how one image's
files are written, and the settings that determine those files. The settings go into every
``summary.json``; ``skip_existing`` reuses an earlier record only when its settings (model,
weights, preprocessing, layers, methods, targets, the image's own bytes, …) are all equal
and every file it lists is on disk.

The output folder's ``index.html`` (``outputs.report``) is updated as records come out, on a
time budget, and once more at the end from every record in the folder.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import GradcamError, InputError, quoted
from .explanation import ZeroGradientError
from .inputs import BadInput
from .io import atomic_write, image_id, json_bytes, json_text, load_image, prepare_output_dir
from .memory import collect_garbage
from .models import file_sha256
from .outputs.report import reported

Item = str | Path | BadInput


@dataclass(frozen=True)
class Loaded:
    """An input decoded for its task: the path, a digest of its bytes, and the task's data."""

    path: Path
    digest: str
    data: object


class Task:
    """What a command does with each batch; subclasses fill in the four steps."""

    tag: str  # the image's output sub-folder, e.g. "resnet18@layer4"
    writes_beside: bool = True  # False when writing runs the model (evaluate's metrics)

    def settings(self, path: Path) -> dict:
        """Everything besides the image's bytes that determines this image's files."""
        raise NotImplementedError

    def decode(self, path: Path, image: Image.Image) -> object:
        """What a batch needs of one image (its crop, its object mask, …)."""
        raise NotImplementedError

    def explain(self, batch: list[Loaded]) -> object:
        """Explain a batch of decoded images in one call."""
        raise NotImplementedError

    def write(self, item: Loaded, results: object, i: int, folder: Path) -> dict:
        """Write image ``i`` of the batch into ``folder``; return its record's fields.
        An ``InputError`` fails this image alone."""
        raise NotImplementedError

    def files(self, record: dict) -> list[str]:
        """The files an earlier record lists, all of which must exist to skip the image."""
        raise NotImplementedError


class Engine:
    """How the batches of a run are explained and written: in this process (``run``'s default),
    or spread over a cluster (``cluster.RayEngine``). ``todo`` holds the inputs in order, an
    earlier record (a dict) where an image is skipped."""

    def batches(self, task: Task, todo: list[Item | dict], out: Path, batch_size: int,
                stop: Callable[[], bool]) -> Iterator[dict]:
        """Every image's record, in input order."""
        raise NotImplementedError


def run(task: Task, images: Sequence[Item], output_dir: str | Path, batch_size: int = 8,
        skip_existing: bool = False, stop: Callable[[], bool] = lambda: False,
        engine: Engine | None = None) -> Iterator[dict]:
    """Run ``task`` over ``images`` in batches; yield one record per image, in input order.

    A record's ``status`` is "ok", "skipped" (the earlier record, when ``skip_existing`` and
    its settings and files are all there) or "error" (with the reason); one bad image never
    stops the others. ``stop`` is asked after each batch: when it says yes, the batches
    under way are written and reported and no other starts. If the run is aborted (a second
    Ctrl-C, an output that cannot be written), every image whose files are complete is
    still reported, in order, before the exception goes on. Every reported image is on the
    folder's ``index.html`` (``outputs.report``). ``engine`` explains the batches elsewhere
    (``cluster.RayEngine``); the files and records are the same.
    """
    out = prepare_output_dir(Path(output_dir))
    todo = [(_existing(task, out, item) if skip_existing else None) or item for item in images]
    engine = engine or Local()
    yield from reported(engine.batches(task, todo, out, batch_size, stop), out, task.tag)


class Local(Engine):
    """The batches in this process: decoded a batch ahead, written in a second thread."""

    def batches(self, task: Task, todo: list[Item | dict], out: Path, batch_size: int,
                stop: Callable[[], bool]) -> Iterator[dict]:
        """The batches, their writer thread and the records in order."""
        yield from _run(task, todo, out, batch_size, stop)


def _run(task: Task, todo: list[Item | dict], out: Path, batch_size: int,
         stop: Callable[[], bool]) -> Iterator[dict]:
    """``Local.batches``: explain a batch while the previous one is written."""
    written = _Written()
    with ThreadPoolExecutor(max_workers=1) as writer:
        try:
            first = True
            for batch in prefetch(todo, batch_size, lambda item: load_item(item, task.decode)):
                good = [item for item in batch if isinstance(item, Loaded)]
                results = explain_batch(task, good, first) if good else None
                first = first and not good
                written.queue.append(writer.submit(write_batch, task, batch, results, out))
                yield from written.report(keep=int(task.writes_beside))  # one beside the next
                collect_garbage()  # dead grid figures sit in reference cycles (memory.py)
                if stop():
                    break
        except GeneratorExit:
            raise
        except BaseException:
            yield from written.report(keep=0, reraise=False)  # what is complete, then abort
            raise
        yield from written.report(keep=0)


class _Written:
    """The batches handed to the writer, reported in order. A batch leaves the queue only when
    all its records are out, so an interrupt at any point resumes where reporting stopped."""

    def __init__(self) -> None:
        self.queue: deque[Future] = deque()
        self.sent = 0  # records of the head batch already yielded

    def report(self, keep: int, reraise: bool = True) -> Iterator[dict]:
        """Yield the records of all but the last ``keep`` batches; then a batch's output error."""
        while len(self.queue) > keep:
            records, error = self.queue[0].result()
            while self.sent < len(records):
                self.sent += 1
                yield records[self.sent - 1]
            self.queue.popleft()
            self.sent = 0
            if error is not None and reraise:
                raise error


def explain_batch(task: Task, good: list[Loaded], first: bool) -> object:
    """The batch's results; a layer without gradient fails the run on the first batch, and
    after it only the batch's own images."""
    try:
        return task.explain(good)
    except ZeroGradientError as exc:
        if first:
            raise
        return exc


Written = tuple[list[dict], GradcamError | None]


def write_batch(task: Task, batch: list[Loaded | dict], results: object, out: Path) -> Written:
    """Write a batch's explained images in order, passing error and skip records through; an
    output error stops the batch, returned beside the records of the images written before."""
    records, index = [], 0
    for item in batch:
        if isinstance(item, dict):
            records.append(item)
            continue
        try:
            records.append(_write_image(task, item, results, index, out))
        except GradcamError as exc:
            return records, exc
        index += 1
    return records, None


def _write_image(task: Task, item: Loaded, results: object, i: int, out: Path) -> dict:
    """One image's files and summary; its record, or an error record for its own failure."""
    if isinstance(results, ZeroGradientError):
        return error_record(item.path, f"{quoted(item.path)}: {results.problem}")
    folder = out / image_id(item.path) / task.tag
    try:
        fields = task.write(item, results, i, folder)
    except InputError as exc:
        return error_record(item.path, str(exc))
    record = {"image": str(item.path), "status": "ok", **fields,
              "settings": _settings(task, item.path, item.digest),
              "summary": str(folder / "summary.json")}
    atomic_write(folder / "summary.json", json_bytes(record))
    return record


def error_record(path: str | Path, reason: str) -> dict:
    """The record of an image that could not be explained."""
    return {"image": str(path), "status": "error", "error": reason}


def _settings(task: Task, path: Path, digest: str) -> dict:
    """The task's settings for an image, with the image's digest, as JSON would read them back."""
    return json.loads(json_text({**task.settings(path), "image_sha256": digest}))


def _existing(task: Task, out: Path, item: Item) -> dict | None:
    """The earlier record of this image as "skipped", if its settings equal this run's and
    every file it lists is there."""
    if isinstance(item, BadInput):
        return None
    summary = out / image_id(item) / task.tag / "summary.json"
    try:
        record = json.loads(summary.read_text())
        same = record["settings"] == _settings(task, Path(item), file_sha256(item))
        complete = all(Path(f).is_file() for f in task.files(record))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return {**record, "status": "skipped"} if same and complete else None


def load_item(item: Item | dict, decode: Callable[[Path, Image.Image], object]) -> Loaded | dict:
    """``decode(path, image)`` of one input; a skip record passes through and any failure
    becomes an error record, so one bad image never stops the others."""
    if isinstance(item, dict):
        return item
    if isinstance(item, BadInput):
        return error_record(item.path, item.reason)
    try:
        image = load_image(item)
        return Loaded(Path(item), file_sha256(item), decode(Path(item), image))
    except InputError as exc:  # a decode step's own reason may not name the file yet
        name = quoted(item)
        return error_record(item, str(exc) if str(exc).startswith(name) else f"{name}: {exc}")
    except OSError as exc:  # the file vanished or became unreadable between decode and digest
        return error_record(item, f"{quoted(item)}: cannot read ({exc.strerror or exc})")


def prefetch(items: Sequence[Item | dict], batch_size: int,
             load: Callable[[Item | dict], Loaded | dict]) -> Iterator[list[Loaded | dict]]:
    """Yield batches of ``load``ed items, loading the next batch in a background thread."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in [*batches, None]:
            ready = pending.result() if pending else None
            pending = pool.submit(lambda b: [load(i) for i in b], batch) if batch else None
            if ready is not None:
                yield ready
