"""Ray Data as the runner's engine: the same batches, explained by a pool of actors.

``RayEngine`` (``--ray``) takes the run the local engine would do and hands each batch, as it
would have formed it, to ``map_batches`` over an actor pool. Each actor deserialises the task
(model included) once, from Ray's object store, and then decodes, explains and writes one
batch per call with the runner's own ``load_item``, ``explain_batch`` and ``write_batch``; so
the files are the ones a single process writes, byte for byte. The driver keeps the resume
check, the records' order, ``index.html`` and the exit code. Actors are restarted, and their
call retried, when their process dies: files are written atomically and a retried batch
writes the same bytes, and a record comes only from the call that finished.

A first Ctrl-C sets a flag the actors read before each batch: batches already started are
written and reported, the others are not started. ``explain_dataset`` is the same over a
``ray.data.Dataset`` of paths or images, returning a Dataset of records (and maps).

Ray is an optional extra: ``pip install 'gradcam[ray]'``.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ArgumentError, GradcamError, InputError, UsageError, quoted
from .explanation import ZeroGradientError
from .inputs import BadInput
from .io import json_text
from .runner import Engine, Item, Loaded, Task, error_record, explain_batch, load_item, write_batch


def _ray():
    """The ray module, or a clear line on how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise UsageError("--ray needs Ray Data: pip install 'gradcam[ray]'") from exc
    return ray


@dataclass(frozen=True)
class RayEngine(Engine):
    """Explain a run's batches on a Ray cluster: ``address`` "" starts a local one, "auto" joins
    the running cluster, anything else is the cluster's address; ``workers`` actors (default:
    one per CPU, or per ``gpus_per_worker`` of the cluster's GPUs), each with ``cpus_per_worker``
    CPUs (its torch threads) and ``gpus_per_worker`` GPUs."""

    address: str = ""
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        """Check the numbers once, naming them."""
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ArgumentError("workers", self.workers, "a whole number of actors, at least 1")
        if not self.cpus_per_worker > 0:
            raise ArgumentError("cpus_per_worker", self.cpus_per_worker, "a number of CPUs above 0")
        if not self.gpus_per_worker >= 0:
            raise ArgumentError("gpus_per_worker", self.gpus_per_worker, "a number of GPUs, 0 or more")

    def batches(self, task: Task, todo: list[Item | dict], out: Path, batch_size: int,
                stop: Callable[[], bool]) -> Iterator[dict]:
        """Every image's record in input order, from batches explained on the cluster."""
        plan = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        sent = {n: [[k, str(item)] for k, item in enumerate(batch) if not isinstance(item, (dict, BadInput))]
                for n, batch in enumerate(plan)}
        sent = {n: paths for n, paths in sent.items() if paths}
        if not sent:  # everything skipped or unreadable: nothing for the cluster
            for batch in plan:
                yield from _in_order(batch, {})
            return
        with self._session() as ray:
            yield from self._stream(ray, task, plan, sent, out, stop)

    def _stream(self, ray: object, task: Task, plan: list[list[Item | dict]], sent: dict[int, list],
                out: Path, stop: Callable[[], bool]) -> Iterator[dict]:
        """Run the pool over the batches in ``sent``; yield ``plan``'s records in order. An
        abort (a second Ctrl-C, an output error) still reports every batch already written."""
        flag = ray.remote(num_cpus=0)(_Flag).remote()  # holds no CPU the pool needs
        shared = ray.put(task)  # held until the end: a restarted actor reads it again
        dataset = ray.data.from_items([{"batch": n, "paths": json.dumps(paths)} for n, paths in sent.items()],
                                      override_num_blocks=len(sent))  # a block per batch: any actor takes it
        results = dataset.map_batches(
            _Worker, batch_size=1, batch_format="numpy",
            fn_constructor_args=(shared, str(out), flag, min(sent), self.cpus_per_worker,
                                 self.gpus_per_worker > 0),
            compute=ray.data.ActorPoolStrategy(size=self.pool_size(ray)), num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker or None)  # Ray Data restarts a dead actor and retries its call
        arrived: dict[int, list] = {}
        stream = _rows_of(results.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"))
        pending: deque[dict] = deque()  # the batch being reported: kept whole through an abort
        try:
            for n, batch in enumerate(plan):
                while n in sent and (n not in arrived or arrived[n][2] > 0):
                    _receive(next(stream), arrived)
                written, failure, _ = arrived.pop(n, ({}, None, 0))
                pending.extend(_in_order(batch, written))
                while pending:
                    yield pending.popleft()
                if failure is not None:
                    raise _raised(failure)
                if stop():
                    ray.get(flag.set.remote())
        except GeneratorExit:
            raise
        except BaseException:
            yield from pending
            for m in sorted(m for m, entry in arrived.items() if entry[2] == 0):
                yield from (record for _, record in sorted(arrived[m][0].items()))  # complete
            raise

    def pool_size(self, ray: object) -> int:
        """``workers``, or as many actors as the cluster's CPUs (GPUs) hold; a pool the cluster
        cannot hold is refused (Ray would wait for it for ever)."""
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        count = self.workers or max(1, int(gpus / self.gpus_per_worker) if self.gpus_per_worker
                                    else int(cpus / self.cpus_per_worker))
        for kind, each, total in (("CPU", self.cpus_per_worker, cpus), ("GPU", self.gpus_per_worker, gpus)):
            if count * each > total + 1e-9:
                workers = f"{count} worker{'s' * (count != 1)}"
                raise ArgumentError("workers", count, f"{workers} of {each:g} {kind} need {count * each:g}; "
                                    f"the cluster has {total:g}: give fewer workers or less per worker "
                                    f"(--{kind.lower()}s-per-worker)")
        return count

    @contextmanager
    def _session(self) -> Iterator[object]:
        """Ray for one run, quiet (stdout carries the records), and the process left as it was:
        Ray Data's settings and logger level put back, and a session started here stopped with
        builtins.print put back (Ray's driver puts its safe_print there when it prints a message)."""
        ray, printer, logger = _ray(), builtins.print, logging.getLogger("ray.data")
        owned = self._connect(ray)
        context, level = ray.data.DataContext.get_current(), logger.level
        kept = context.enable_progress_bars, context.print_on_execution_start
        context.enable_progress_bars = context.print_on_execution_start = False
        logger.setLevel(logging.ERROR)
        try:
            yield ray
        finally:
            context.enable_progress_bars, context.print_on_execution_start = kept
            logger.setLevel(level)
            if owned:
                ray.shutdown()
                builtins.print = printer

    def _connect(self, ray: object) -> bool:
        """Connect to the cluster (start a local one for ``address`` ""), keeping Ray's own
        messages off stdout; whether this call connected (and so disconnects)."""
        if ray.is_initialized():
            return False
        try:
            # "local" starts a new cluster even where `ray start` or $RAY_ADDRESS names one
            ray.init(address=self.address or "local", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        except ConnectionError as exc:
            raise ArgumentError("ray", self.address, f"no Ray cluster answers there ({exc}); start "
                                "one with `ray start --head`, or give --ray alone for a local "
                                "one") from exc
        return True


def _rows_of(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict]:
    """The rows of the actors' output batches, each as it arrives (no batch held back)."""
    for columns in batches:
        for i in range(len(columns["batch"])):
            yield {key: values[i] for key, values in columns.items()}


def _receive(row: dict, arrived: dict[int, list]) -> None:
    """File one output row of an actor under its batch: a record at its position, or the
    batch's failure; ``arrived[n]`` is [records by position, failure, rows still to come]."""
    n = int(row["batch"])
    entry = arrived.setdefault(n, [{}, None, int(row["of"])])
    if row["record"]:
        entry[0][int(row["position"])] = json.loads(row["record"])
    if row["failure"]:
        entry[1] = json.loads(row["failure"])
    entry[2] -= 1


def _in_order(batch: list[Item | dict], written: dict[int, dict]) -> Iterator[dict]:
    """One batch's records in order: skipped and bad inputs as the driver has them, the others
    as their actor wrote them (none for a batch the stop flag kept from starting)."""
    for k, item in enumerate(batch):
        if isinstance(item, dict):
            yield item
        elif isinstance(item, BadInput):
            yield error_record(item.path, item.reason)
        elif k in written:
            yield written[k]


def _raised(failure: dict) -> GradcamError:
    """The exception an actor reported for its batch, as the local runner raises it."""
    if failure.get("argument") is not None:
        return ZeroGradientError(failure["argument"], failure["value"], failure["problem"])
    return GradcamError(failure["message"])


class _Flag:
    """Set once the driver is asked to stop: actors start no batch after."""

    def __init__(self) -> None:
        self.on = False

    def set(self) -> None:
        """Stop."""
        self.on = True

    def is_set(self) -> bool:
        """Whether to stop."""
        return self.on


class _Worker:
    """One actor of the pool: the task, once, and one batch per call."""

    def __init__(self, task: object, out: str, flag: object, first: int, cpus: float, gpu: bool) -> None:
        """Take the task (an object reference: the model comes from the object store once per
        actor) onto this actor's GPU when it has one, and use its CPUs."""
        import ray
        import torch
        torch.set_num_threads(max(1, int(cpus)))
        self.task: Task = ray.get(task)
        module = getattr(getattr(self.task, "model", None), "module", None)
        if gpu and module is not None:
            module.to("cuda")
        self.out, self.flag, self.first = Path(out), flag, first

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        """Decode, explain and write one batch: a row per written image, and one for a failure
        (only that one when the stop flag kept the batch from starting)."""
        import ray
        batch = int(rows["batch"][0])
        if ray.get(self.flag.is_set.remote()):
            return _rows(batch, [], None)
        positions, paths = zip(*json.loads(str(rows["paths"][0])), strict=True)
        items = [load_item(path, self.task.decode) for path in paths]
        good = [item for item in items if isinstance(item, Loaded)]
        try:
            results = explain_batch(self.task, good, batch == self.first) if good else None
        except ZeroGradientError as exc:
            return _rows(batch, [], {"argument": exc.argument, "value": exc.value, "problem": exc.problem})
        records, error = write_batch(self.task, items, results, self.out)
        return _rows(batch, list(zip(positions, records, strict=False)),
                     None if error is None else {"message": str(error)})


def _rows(batch: int, records: list[tuple[int, dict]], failure: dict | None) -> dict[str, list]:
    """An actor's output for one batch: each record at its position in the batch, then the
    failure (or, with no record, an empty row: the driver counts rows to know a batch done)."""
    rows = [(k, json_text(record), "") for k, record in records]
    if failure is not None or not rows:
        rows.append((-1, "", "" if failure is None else json.dumps(failure)))
    return {"batch": [batch] * len(rows), "of": [len(rows)] * len(rows), "position": [k for k, _, _ in rows],
            "record": [r for _, r, _ in rows], "failure": [f for _, _, f in rows]}


class _Captured(Exception):
    """Carries the task a command built out of ``runner.run`` (``task_of``)."""

    def __init__(self, task: Task) -> None:
        super().__init__("task captured")
        self.task = task


class _Capture(Engine):
    """An engine that runs nothing: it hands the command's task back to ``task_of``."""

    def batches(self, task: Task, todo: list[Item | dict], out: Path, batch_size: int,
                stop: Callable[[], bool]) -> Iterator[dict]:
        """Raise the task."""
        raise _Captured(task)
        yield  # a generator, as engines are


def task_of(command: Callable[..., Iterator[dict]], model: object, output_dir: str | Path, batch_size: int,
            options: dict) -> Task:
    """The task ``command`` (``pipeline.classify``, ``compare_layers``, ``embed``,
    ``evaluation.evaluate``) builds for these options, every option checked as it checks them."""
    if callable(command):
        try:
            for _ in command(model, [], output_dir, batch_size=batch_size, engine=_Capture(), **options):
                pass
        except _Captured as captured:
            return captured.task
    raise ArgumentError("command", getattr(command, "__name__", command), "is not a gradcam pipeline "
                        "(classify, compare_layers, embed, evaluate)")


def explain_dataset(dataset: object, model: object, command: Callable[..., Iterator[dict]] | None = None,
                    output_dir: str | Path = "results", batch_size: int = 8, maps: bool = False,
                    engine: RayEngine | None = None, **options: object) -> object:
    """``command(model, images, output_dir, **options)`` (default ``pipeline.classify``) over a
    ``ray.data.Dataset`` of images: a lazy
    Dataset of one row per input row, with ``path``, ``status`` and ``record`` (the JSON line
    the command prints), and with ``maps`` one float32 column per map, ``map_<name>`` (layers
    x classes x C x H x W; empty for an image that failed).

    Input rows have a ``path`` (a file, read as the command reads it) and may have an
    ``image`` (HxWx3 or HxW uint8, e.g. ``ray.data.read_images(..., include_paths=True)``),
    used instead of reading the file. Each image's files are written under ``output_dir`` as
    the command writes them; records come in the Dataset's order. ``--skip-existing`` and the
    folder's ``index.html`` are the command line's (``RayEngine``), not this call's.
    """
    from .pipeline import classify
    engine, command = engine or RayEngine(), command or classify
    task = task_of(command, model, output_dir, batch_size, options)
    if maps and not hasattr(task, "arrays"):
        raise ArgumentError("maps", maps, f"{getattr(command, '__name__', 'this command')} writes "
                            "measurements, not maps; use classify, compare_layers or embed")
    ray = _ray()
    engine._connect(ray)  # the caller's session from here on: its settings are the caller's
    return dataset.map_batches(
        _RowWorker, batch_size=batch_size, batch_format="numpy",
        fn_constructor_args=(ray.put(task), str(output_dir), maps, engine.cpus_per_worker,
                             engine.gpus_per_worker > 0),
        compute=ray.data.ActorPoolStrategy(size=engine.pool_size(ray)), num_cpus=engine.cpus_per_worker,
        num_gpus=engine.gpus_per_worker or None)


def _pixels(image: np.ndarray) -> Image.Image:
    """An image column's pixels as RGB, refused where PIL would misread them: other than uint8
    (floats in [0, 1] would become pixel values 0 and 1) or other than HxW, HxWx1, HxWx3 or HxWx4 (Ray
    gives a grey image batched beside colour ones as 1xHxW)."""
    if image.dtype != np.uint8:
        raise InputError(f"image column: {image.dtype} pixels; give uint8 (0-255)")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise InputError(f"image column: an array of shape {tuple(image.shape)}; give HxW or HxWx3 "
                         "(ray.data.read_images(..., mode='RGB') gives every image so)")
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")


class _RowWorker(_Worker):
    """An actor of ``explain_dataset``: rows of paths (and images) in, rows of records out."""

    def __init__(self, task: object, out: str, maps: bool, cpus: float, gpu: bool) -> None:
        """As ``_Worker``, with no stop flag; ``maps``: also return the maps."""
        super().__init__(task, out, None, -1, cpus, gpu)
        self.maps = maps

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        """Decode, explain and write the rows' images; a row of results per input row."""
        paths = [str(p) for p in rows["path"]]
        images = rows.get("image")
        items = [self._load(path, None if images is None else images[i]) for i, path in enumerate(paths)]
        good = [item for item in items if isinstance(item, Loaded)]
        results = explain_batch(self.task, good, first=False) if good else None
        records, error = write_batch(self.task, items, results, self.out)
        if error is not None:
            raise error
        found = {"path": paths, "status": [r["status"] for r in records],
                 "record": [json_text(r) for r in records]}
        if self.maps:
            found.update(self._maps(items, results))
        return found

    def _load(self, path: str, image: np.ndarray | None) -> Loaded | dict:
        """A row's input: the file at ``path``, or the pixels given for it."""
        if image is None:
            return load_item(path, self.task.decode)
        try:
            image = np.ascontiguousarray(image)
            digest = hashlib.sha256(image.tobytes()).hexdigest()
            return Loaded(Path(path), digest, self.task.decode(Path(path), _pixels(image)))
        except (InputError, TypeError, ValueError) as exc:
            return error_record(path, f"{quoted(path)}: {exc}")

    def _maps(self, items: list[Loaded | dict], results: object) -> dict[str, list]:
        """Per map name, each row's maps (layers x classes x C x H x W), empty for a failed row."""
        names = list(results[0].maps) if isinstance(results, list) else []
        columns: dict[str, list] = {f"map_{name}": [] for name in names}
        i = 0
        for item in items:
            for name in names:
                columns[f"map_{name}"].append(self.task.arrays(results, i, name) if isinstance(item, Loaded)
                                              else np.zeros(0, np.float32))
            i += isinstance(item, Loaded)
        return columns
