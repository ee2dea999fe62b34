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
from functools import partial

import click
import torch
from tqdm import tqdm

from . import __version__
from .errors import GradcamError, UsageError, unknown
from .inputs import expand, parse_shard, read_image_list
from .inputs import shard as select
from .methods import DEFAULT_METHODS, DESCRIPTIONS, METHODS
from .models import ARCHITECTURES, LoadedModel, default_layer, load_model, spatial_layers, stage_layers
from .pipeline import classify as classify_images
from .pipeline import compare_layers as compare_images
from .pipeline import resolve_layer, resolve_layers

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


def image_options(command: Callable) -> Callable:
    """The options every command that runs over images shares."""
    options = [
        click.option("--image-path", "images", multiple=True, metavar="PATH",
                     help="An image, a folder (searched recursively) or a glob; repeatable."),
        click.option("--image-list", metavar="FILE",
                     help="Read image paths, one per line, from FILE (- for stdin)."),
        click.option("--class-id", "class_ids", multiple=True, type=click.IntRange(min=0),
                     help="Explain this class instead of the top-k; repeatable."),
        click.option("--output-dir", default="results", show_default=True, type=click.Path(),
                     help="Folder for the PNGs and JSON summaries."),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Images per forward pass; also perturbed copies per pass for "
                          "Score-CAM and Ablation-CAM."),
        click.option("--skip-existing", is_flag=True,
                     help="Skip images whose outputs are all present (resume an interrupted run)."),
        click.option("--shard", metavar="I/N",
                     help="Process only the I-th of N disjoint parts of the inputs."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON record per image on stdout (JSON lines) instead of a table."),
        click.option("--progress/--quiet", default=None,
                     help="Progress bar on stderr (default: when stderr is a terminal)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command(epilog=EXIT_CODES)
@model_options
@image_options
@click.option("--topk", default=3, show_default=True, type=click.IntRange(min=1),
              help="Explain each image's k most probable classes.")
@click.option("--layer", help="Target layer for the CAM maps, dotted (layer4, features.28); "
                              "default: the architecture's last spatial block.")
@click.option("--method", "methods", multiple=True, callback=lambda _c, _p, v: split_methods(v),
              help="Maps to compute, comma-separated or repeated (default: the five of "
                   "`classify`); `gradcam methods` lists them.")
def classify(layer: str | None, methods: tuple[str, ...], **options: object) -> None:
    """Explain the top-k classes of a classifier with five maps per class."""
    def start(model: LoadedModel) -> Callable[..., Iterator[dict]]:
        chosen = resolve_layer(model, layer)
        if layer is None:
            click.echo(f"gradcam: target layer {chosen} (default for {model.arch}; "
                       "change with --layer)", err=True)
        return partial(classify_images, layer=chosen, methods=methods or DEFAULT_METHODS)
    run_images(start, **options)


@main.command("compare-layers", epilog=EXIT_CODES)
@model_options
@image_options
@click.option("--topk", default=1, show_default=True, type=click.IntRange(min=1),
              help="Explain each image's k most probable classes.")
@click.option("--layers", "layers", metavar="A,B,…",
              help="Layers to compare, comma-separated (default: the stages that "
                   "`gradcam layers` marks).")
@click.option("--method", "methods", multiple=True, callback=lambda _c, _p, v: split_methods(v),
              help="CAM methods to compute, comma-separated or repeated (default: gradcam).")
def compare_layers(layers: str | None, methods: tuple[str, ...], **options: object) -> None:
    """Compare CAM maps across layers: a row per layer, a column per method."""
    def start(model: LoadedModel) -> Callable[..., Iterator[dict]]:
        names = resolve_layers(model, [n.strip() for n in (layers or "").split(",") if n.strip()])
        if not layers:
            click.echo(f"gradcam: layers {', '.join(names)} (the stages of {model.arch}; "
                       "change with --layers)", err=True)
        return partial(compare_images, layers=names, methods=methods or ("gradcam",))
    run_images(start, **options)


def run_images(start: Callable[[LoadedModel], Callable[..., Iterator[dict]]], arch: str,
               weights: str, num_classes: int | None, labels: str | None, unsafe_load: bool,
               cuda: bool | None, images: tuple[str, ...], image_list: str | None, topk: int,
               class_ids: tuple[int, ...], output_dir: str, batch_size: int,
               skip_existing: bool, shard: str | None, as_json: bool,
               progress: bool | None) -> None:
    """Load the model, run a command's pipeline over the images, report, and exit with its code.

    ``start`` checks the command's own options against the model and returns the pipeline.
    """
    paths = [*images, *(read_image_list(image_list) if image_list else [])]
    if not paths:
        raise UsageError("no images: give --image-path PATH or --image-list FILE")
    part = parse_shard(shard)
    model = load_model(arch, weights, num_classes, labels, unsafe_load, pick_device(cuda))
    pipeline = start(model)
    items = select(expand(paths), part)
    show = sys.stderr.isatty() if progress is None else progress
    counts = Counter()
    began = time.perf_counter()
    with stop_on_interrupt() as stopped, tqdm(total=len(items), unit="img", disable=not show,
                                              file=sys.stderr) as bar:
        records = pipeline(model, items, output_dir, topk=topk, class_ids=class_ids,
                           batch_size=batch_size, skip_existing=skip_existing, stop=stopped,
                           progress=show)
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
               f"{', interrupted' if stopped() else ''} in {time.perf_counter() - began:.1f} s", err=True)
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
    where = ", ".join(record["layers"]) if "layers" in record else record["layer"]
    click.echo(f"{record['image']}  ({record['arch']} @ {where})")
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
    stages = stage_layers(arch, model.module, size)
    click.echo(f"{arch} at {size}x{size}; * marks the default target layer, s the stages "
               "(compare-layers' default)")
    for name, shape in spatial_layers(model.module, size):
        mark = ("*" if name == default else " ") + ("s" if name in stages else " ")
        click.echo(f"{mark} {name:<48} {'x'.join(map(str, shape[1:]))}")
    if arch.startswith("vit_"):
        click.echo("(ViT: layers are LayerNorms before attention, since after the last block's "
                   "ln_1 only the class token gets a gradient)")


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
