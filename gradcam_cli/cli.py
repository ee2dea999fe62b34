"""The `gradcam` command: options only, each command a thin layer over the library API."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
import torch
from tqdm import tqdm

from . import __version__
from .errors import GradcamError, UsageError, unknown
from .inputs import expand, parse_shard, read_image_list
from .inputs import shard as select
from .methods import DEFAULT_METHODS, DESCRIPTIONS, METHODS
from .models import ARCHITECTURES, default_layer, load_model, spatial_layers
from .pipeline import classify as classify_images
from .pipeline import resolve_layer

EXIT_CODES = """Exit codes: 0 every image done (or skipped); 1 at least one image failed, or an
output could not be written; 2 usage error (bad option, unknown architecture, weights or layer),
found before any image is processed; 130 interrupted by Ctrl-C."""


class Group(click.Group):
    """A command group that prints a GradcamError as one line and exits with its code."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except GradcamError as exc:
            click.echo(f"gradcam: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def pick_device(cuda: bool | None) -> torch.device:
    """CUDA when asked or, by default, when available; asking without CUDA is an error."""
    available = torch.cuda.is_available()
    if cuda and not available:
        raise UsageError("--cuda: no CUDA device is available here; use --no-cuda")
    return torch.device("cuda" if (available if cuda is None else cuda) else "cpu")


def split_methods(values: tuple[str, ...]) -> tuple[str, ...]:
    """Accept --method repeated or comma-separated; refuse unknown names with a suggestion."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for name in names:
        if name not in METHODS:
            raise unknown("method", name, METHODS)
    return tuple(dict.fromkeys(names))


def model_options(command: Callable) -> Callable:
    """The options every model-loading command shares."""
    options = [
        click.option("--arch", required=True, metavar="NAME",
                     help="A torchvision classifier, e.g. resnet152 (see torchvision.models)."),
        click.option("--weights", default="DEFAULT", show_default=True,
                     help="DEFAULT, a weights name (IMAGENET1K_V2), none (random), "
                          "or a .pt/.pth/.safetensors checkpoint path."),
        click.option("--num-classes", type=click.IntRange(min=1),
                     help="Classes of a checkpoint's head when not ImageNet's 1000."),
        click.option("--labels", type=click.Path(dir_okay=False),
                     help="Class names, one per line, for a checkpoint's head."),
        click.option("--unsafe-load", is_flag=True,
                     help="Allow a checkpoint that holds pickled Python objects (can run code)."),
        click.option("--cuda/--no-cuda", default=None,
                     help="Run on CUDA (default: when available)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradcam")
def main() -> None:
    """Show why a vision network decided what it did."""


@main.command(epilog=EXIT_CODES)
@model_options
@click.option("--image-path", "images", multiple=True, metavar="PATH",
              help="An image, a folder (searched recursively) or a glob; repeatable.")
@click.option("--image-list", metavar="FILE", help="Read image paths, one per line, from FILE (- for stdin).")
@click.option("--topk", default=3, show_default=True, type=click.IntRange(min=1),
              help="Explain each image's k most probable classes.")
@click.option("--class-id", "class_ids", multiple=True, type=click.IntRange(min=0),
              help="Explain this class instead of the top-k; repeatable.")
@click.option("--layer", help="Target layer for Grad-CAM, dotted (layer4, features.28); "
                              "default: the architecture's last spatial block.")
@click.option("--method", "methods", multiple=True, callback=lambda _c, _p, v: split_methods(v),
              help="Maps to compute, comma-separated or repeated (default: the five of "
                   "`classify`); `gradcam methods` lists them.")
@click.option("--output-dir", default="results", show_default=True, type=click.Path(),
              help="Folder for the PNGs and JSON summaries.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass; also perturbed copies per pass for Score-CAM and "
                   "Ablation-CAM.")
@click.option("--skip-existing", is_flag=True,
              help="Skip images whose outputs are all present (resume an interrupted run).")
@click.option("--shard", metavar="I/N", help="Process only the I-th of N disjoint parts of the inputs.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON record per image on stdout (JSON lines) instead of a table.")
@click.option("--progress/--quiet", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
def classify(arch: str, weights: str, num_classes: int | None, labels: str | None,
             unsafe_load: bool, cuda: bool | None, images: tuple[str, ...], image_list: str | None,
             topk: int, class_ids: tuple[int, ...], layer: str | None, methods: tuple[str, ...],
             output_dir: str, batch_size: int, skip_existing: bool, shard: str | None,
             as_json: bool, progress: bool | None) -> None:
    """Explain the top-k classes of a classifier with five maps per class."""
    paths = [*images, *(read_image_list(image_list) if image_list else [])]
    if not paths:
        raise UsageError("no images: give --image-path PATH or --image-list FILE")
    part = parse_shard(shard)
    model = load_model(arch, weights, num_classes, labels, unsafe_load, pick_device(cuda))
    chosen = resolve_layer(model, layer)
    if layer is None:
        click.echo(f"gradcam: target layer {chosen} (default for {arch}; change with --layer)", err=True)
    items = select(expand(paths), part)
    show = sys.stderr.isatty() if progress is None else progress
    counts = Counter()
    start = time.perf_counter()
    with stop_on_interrupt() as stopped, tqdm(total=len(items), unit="img", disable=not show,
                                              file=sys.stderr) as bar:
        records = classify_images(model, items, output_dir, chosen, topk, class_ids,
                                  methods or DEFAULT_METHODS, batch_size, skip_existing,
                                  stop=stopped, progress=show)
        for record in records:
            counts[record["status"]] += 1
            bar.update()
            if record["status"] == "error":
                click.echo(f"gradcam: error: {record['error']}", err=True)
            if as_json:
                click.echo(json.dumps(record, sort_keys=True, ensure_ascii=False))
            elif record["status"] == "ok":
                _print_table(record)
    click.echo(f"gradcam: {counts['ok']} done, {counts['skipped']} skipped, {counts['error']} failed"
               f"{', interrupted' if stopped() else ''} in {time.perf_counter() - start:.1f} s", err=True)
    raise SystemExit(130 if stopped() else 1 if counts["error"] else 0)


@contextmanager
def stop_on_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn Ctrl-C into a flag checked between batches; a second Ctrl-C stops at once.

    Either way no file is left half-written (every write is a rename of a complete file).
    """
    flag = threading.Event()

    def interrupt(*_: object) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield flag.is_set
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_table(record: dict) -> None:
    """Print an image's explained classes as a short table."""
    click.echo(f"{record['image']}  ({record['arch']} @ {record['layer']})")
    for c in record["classes"]:
        click.echo(f"  {c['rank']:>2}  {c['probability']:8.4f}  {c['class_id']:>5}  {c['name']}")
    click.echo(f"  -> {record['grid']}")


@main.command()
@click.option("--arch", required=True, metavar="NAME", help="A torchvision classifier.")
def layers(arch: str) -> None:
    """List the layers with a spatial output (candidate targets) and their shapes."""
    model = load_model(arch, "none")
    size = model.preprocess.crop
    default = default_layer(arch, model.module, size)
    click.echo(f"{arch} at {size}x{size}; * marks the default target layer")
    for name, shape in spatial_layers(model.module, size):
        click.echo(f"{'*' if name == default else ' '} {name:<48} {'x'.join(map(str, shape[1:]))}")
    if arch.startswith("vit_"):
        click.echo(f"* {default} (token output; default, since the last block's patch tokens "
                   "get no gradient)")


@main.command()
def methods() -> None:
    """List the explanation methods --method accepts, with what each one computes."""
    for name in METHODS:
        default = " (default)" if name in DEFAULT_METHODS else ""
        click.echo(f"{name:<15} {DESCRIPTIONS[name]}{default}")


@main.command()
def architectures() -> None:
    """List the architecture names --arch accepts."""
    click.echo("\n".join(ARCHITECTURES))
