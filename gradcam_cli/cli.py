"""The `gradcam` command: options only, each command a thin layer over the library API."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click
from tqdm import tqdm

from . import __version__
from .choices import BASELINES, PROXY_KINDS, SIMILARITIES
from .errors import ArgumentError, GradcamError, UsageError, quoted, unknown
from .inputs import BadInput, expand, parse_shard, read_image_list
from .inputs import shard as select

if TYPE_CHECKING:  # the library is imported inside each command, so `--help` stays quick
    import torch

    from .models import LoadedModel

EXIT_CODES = """Exit codes: 0 every image done (or skipped); 1 at least one image failed, or an
output could not be written; 2 usage error (bad option, unknown architecture, weights or layer),
found before any image is processed; 130 interrupted by Ctrl-C."""


class Group(click.Group):
    """A command group that prints a GradcamError as one line and exits with its code."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except GradcamError as exc:
            click.echo(f"gradcam: error: {flag_message(exc)}", err=True)
            ctx.exit(exc.exit_code)


FLAGS = {  # library argument -> the option that sets it
    "arch": "--arch", "weights": "--weights", "num_classes": "--num-classes", "labels": "--labels",
    "layer": "--layer", "layers": "--layers", "methods": "--method", "topk": "--topk",
    "class_ids": "--class-id", "batch_size": "--batch-size", "output_dir": "--output-dir",
    "image_list": "--image-list", "shard": "--shard", "boxes": "--boxes", "masks": "--masks",
    "tolerance": "--tolerance", "steps": "--steps", "baseline": "--baseline",
    "similarity": "--similarity", "proxy_kind": "--proxy", "proxy_file": "--proxy-file",
    "proxy_dir": "--proxies", "references": "--reference", "embedding_dim": "--embedding-dim",
    "device": "--cuda",
}


def flag_message(exc: GradcamError) -> str:
    """The one line for an error: a library argument's error is said with its option."""
    if isinstance(exc, ArgumentError) and exc.argument in FLAGS:
        return f"{FLAGS[exc.argument]} {quoted(exc.value)}: {exc.problem}"
    return str(exc)


def pick_device(cuda: bool | None) -> torch.device:
    """CUDA when asked or, by default, when available; asking without CUDA is an error."""
    import torch
    available = torch.cuda.is_available()
    if cuda and not available:
        raise UsageError("--cuda: no CUDA device is available here; use --no-cuda")
    return torch.device("cuda" if (available if cuda is None else cuda) else "cpu")


def split_methods(values: tuple[str, ...]) -> tuple[str, ...]:
    """Accept --method repeated or comma-separated; refuse unknown names with a suggestion."""
    from .methods import METHODS
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for name in names:
        if name not in METHODS:
            raise unknown("methods", name, METHODS, "method")
    return tuple(dict.fromkeys(names))


def option_group(*options: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """Bundle click options into one decorator that adds them in the order listed."""
    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command
    return apply


model_options = option_group(
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
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradcam")
def main() -> None:
    """Show why a vision network decided what it did."""


image_options = option_group(
    click.option("--image-path", "images", multiple=True, metavar="PATH",
                 help="An image, a folder (searched recursively) or a glob; repeatable."),
    click.option("--image-list", metavar="FILE",
                 help="Read image paths, one per line, from FILE (- for stdin)."),
    click.option("--output-dir", default="results", show_default=True, type=click.Path(),
                 help="Folder for the PNGs and JSON summaries."),
    click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                 help="Images per forward pass; also perturbed copies per pass for "
                      "Score-CAM and Ablation-CAM."),
    click.option("--shard", metavar="I/N",
                 help="Process only the I-th of N disjoint parts of the inputs."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print one JSON record per image on stdout (JSON lines) instead of a table."),
    click.option("--progress/--quiet", default=None,
                 help="Progress bar on stderr (default: when stderr is a terminal)."),
)


skip_option = click.option(
    "--skip-existing", is_flag=True,
    help="Skip images whose outputs are all present (resume an interrupted run).")


def class_options(topk: int) -> Callable[[Callable], Callable]:
    """--topk (with the command's default) and --class-id."""
    return option_group(
        click.option("--topk", default=topk, show_default=True, type=click.IntRange(min=1),
                     help="Explain each image's k most probable classes."),
        click.option("--class-id", "class_ids", multiple=True, type=click.IntRange(min=0),
                     help="Explain this class instead of the top-k; repeatable."),
    )


@main.command(epilog=EXIT_CODES)
@model_options
@image_options
@skip_option
@class_options(topk=3)
@click.option("--layer", help="Target layer for the CAM maps, dotted (layer4, features.28); "
                              "default: the architecture's last spatial block.")
@click.option("--method", "methods", multiple=True, callback=lambda _c, _p, v: split_methods(v),
              help="Maps to compute, comma-separated or repeated (default: the five of "
                   "`classify`); `gradcam methods` lists them.")
def classify(arch: str, weights: str, num_classes: int | None, labels: str | None,
             unsafe_load: bool, cuda: bool | None, layer: str | None, methods: tuple[str, ...],
             topk: int, class_ids: tuple[int, ...], **options: object) -> None:
    """Explain the top-k classes of a classifier with five maps per class."""
    from .methods import DEFAULT_METHODS
    from .models import load_model
    from .pipeline import classify as classify_images
    from .pipeline import resolve_layer

    def start(model: LoadedModel, _items: list) -> Callable[..., Iterator[dict]]:
        chosen = resolve_layer(model, layer)
        if layer is None:
            click.echo(f"gradcam: target layer {chosen} (default for {model.arch}; "
                       "change with --layer)", err=True)
        return partial(classify_images, layer=chosen, methods=methods or DEFAULT_METHODS,
                       topk=topk, class_ids=class_ids)
    load = partial(load_model, arch, weights, num_classes, labels, unsafe_load, pick_device(cuda))
    run_images(load, start, **options)


@main.command("compare-layers", epilog=EXIT_CODES)
@model_options
@image_options
@skip_option
@class_options(topk=1)
@click.option("--layers", "layers", metavar="A,B,…",
              help="Layers to compare, comma-separated (default: the stages that "
                   "`gradcam layers` marks).")
@click.option("--method", "methods", multiple=True, callback=lambda _c, _p, v: split_methods(v),
              help="CAM methods to compute, comma-separated or repeated (default: gradcam).")
def compare_layers(arch: str, weights: str, num_classes: int | None, labels: str | None,
                   unsafe_load: bool, cuda: bool | None, layers: str | None,
                   methods: tuple[str, ...], topk: int, class_ids: tuple[int, ...],
                   **options: object) -> None:
    """Compare CAM maps across layers: a row per layer, a column per method."""
    from .models import load_model
    from .pipeline import compare_layers as compare_images
    from .pipeline import resolve_layers

    def start(model: LoadedModel, _items: list) -> Callable[..., Iterator[dict]]:
        names = resolve_layers(model, [n.strip() for n in (layers or "").split(",") if n.strip()])
        if not layers:
            click.echo(f"gradcam: layers {', '.join(names)} (the stages of {model.arch}; "
                       "change with --layers)", err=True)
        return partial(compare_images, layers=names, methods=methods or ("gradcam",),
                       topk=topk, class_ids=class_ids)
    load = partial(load_model, arch, weights, num_classes, labels, unsafe_load, pick_device(cuda))
    run_images(load, start, **options)


@main.command(epilog=EXIT_CODES)
@model_options
@image_options
@skip_option
@class_options(topk=1)
@click.option("--layer", help="Target layer for the CAM maps (default: as for classify).")
@click.option("--method", "methods", multiple=True, callback=lambda _c, _p, v: split_methods(v),
              help="Maps to evaluate, comma-separated or repeated (default: the five of "
                   "`classify`).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="Steps of the deletion and insertion curves (each removes 1/steps of the pixels).")
@click.option("--baseline", type=click.Choice(BASELINES), default="blur", show_default=True,
              help="What removed pixels become: a blurred copy (RISE), the image's mean colour, "
                   "or zero (the normalisation's mean colour).")
@click.option("--masks", metavar="DIR", help="Binary object masks named like the images: "
                                               "adds the pointing games.")
@click.option("--boxes", metavar="FILE", help="Object boxes per image (CSV image,x0,y0,x1,y1 or "
                                                "JSON): adds the pointing games.")
@click.option("--tolerance", default=15.0, show_default=True, type=click.FloatRange(min=0),
              help="Pointing game: pixels of the original image a hit may miss the object by.")
@click.option("--sanity", is_flag=True,
              help="Also run the cascading model-parameter randomisation test (slow: one "
                   "explanation per block of the network).")
def evaluate(arch: str, weights: str, num_classes: int | None, labels: str | None,
             unsafe_load: bool, cuda: bool | None, layer: str | None, methods: tuple[str, ...],
             topk: int, class_ids: tuple[int, ...], steps: int, baseline: str, masks: str | None,
             boxes: str | None, tolerance: float, sanity: bool, **options: object) -> None:
    """Measure how faithful the maps are: deletion/insertion AUC, Average Drop/Increase,
    pointing games with --masks/--boxes, and the randomisation test with --sanity."""
    from .evaluation import evaluate as evaluate_images
    from .evaluation import format_averages, write_summary
    from .methods import DEFAULT_METHODS
    from .models import load_model
    from .pipeline import resolve_layer
    from .truth import read_truth

    truth = read_truth(masks, boxes)
    tag = {}  # the tables' name, <arch>@<layer>, known once the model is loaded

    def start(model: LoadedModel, _items: list) -> Callable[..., Iterator[dict]]:
        chosen = resolve_layer(model, layer)
        tag["name"] = f"{model.arch}@{chosen}"
        return partial(evaluate_images, layer=chosen, topk=topk, class_ids=class_ids,
                       methods=methods or DEFAULT_METHODS, steps=steps, baseline=baseline,
                       truth=truth, tolerance=tolerance, sanity=sanity)

    def finish(_model: LoadedModel, records: list[dict], as_json: bool) -> None:
        table = write_summary(records, options["output_dir"], tag["name"])
        if table:
            where = Path(options["output_dir"]) / f"evaluate-{tag['name']}"
            click.echo(format_averages(table), err=as_json)
            click.echo(f"  -> {where}.csv/.json/-curves.png", err=as_json)
    load = partial(load_model, arch, weights, num_classes, labels, unsafe_load, pick_device(cuda))
    run_images(load, start, report=_print_evaluated, finish=finish, **options)


def _print_evaluated(record: dict) -> None:
    """One line per explained class and method of an evaluated image."""
    click.echo(f"{record['image']}  ({record['arch']} @ {record['layer']})")
    for c in record["classes"]:
        for method, m in c["metrics"].items():
            click.echo(f"  {c['rank']:>2} {c['name'][:20]:<20} {method:<15} deletion "
                       f"{m['deletion_auc']:.3f}  insertion {m['insertion_auc']:.3f}  drop "
                       f"{m['confidence_drop']:5.1f}%")


@main.group(cls=Group, invoke_without_command=True, epilog=EXIT_CODES)
@click.option("--arch", metavar="NAME", help="A torchvision classifier used as embedding network.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="As for classify; with --embedding-dim, the trained network's checkpoint.")
@click.option("--embedding-dim", type=click.IntRange(min=1), metavar="D",
              help="Replace the head by a linear map to D dimensions (loaded from --weights); "
                   "default: the penultimate features are the embedding.")
@click.option("--unsafe-load", is_flag=True,
              help="Allow a checkpoint that holds pickled Python objects (can run code).")
@click.option("--cuda/--no-cuda", default=None, help="Run on CUDA (default: when available).")
@image_options
@skip_option
@click.option("--reference", "references", multiple=True, metavar="IMAGE",
              help="Explain each query's similarity to this image, and back; repeatable.")
@click.option("--proxies", "proxy_dir", type=click.Path(), metavar="DIR",
              help="Folder with one sub-folder of exemplar images per class.")
@click.option("--proxy-file", type=click.Path(), metavar="FILE",
              help="Exemplars embedded once by `gradcam embed build-proxies`.")
@click.option("--proxy", "proxy_kind", type=click.Choice(PROXY_KINDS), default="mean",
              show_default=True, help="Class proxy: normalised mean, or the most typical exemplar.")
@click.option("--similarity", type=click.Choice(SIMILARITIES), default="dot", show_default=True,
              help="The explained score: y·p (as in the paper) or cos(y, p).")
@click.option("--topk", default=3, show_default=True, type=click.IntRange(min=1),
              help="Explain each query's k most similar class proxies.")
@click.option("--layer", help="Target layer for the CAM maps (default: as for classify).")
@click.option("--layers", metavar="A,B,…", help="Several layers, comma-separated: rows per layer.")
@click.option("--method", "methods", multiple=True, callback=lambda _c, _p, v: split_methods(v),
              help="Maps to compute (default: the five of `classify`).")
@click.pass_context
def embed(ctx: click.Context, arch: str | None, weights: str, embedding_dim: int | None,
          unsafe_load: bool, cuda: bool | None, references: tuple[str, ...],
          proxy_dir: str | None, proxy_file: str | None, proxy_kind: str, similarity: str,
          topk: int, layer: str | None, layers: str | None, methods: tuple[str, ...],
          **options: object) -> None:
    """Explain an embedding network: which regions make a query similar to a reference
    image or to a class proxy (Grad-CAM for embeddings, arXiv 2402.00909)."""
    from .methods import DEFAULT_METHODS
    from .models import load_embedder
    from .pipeline import embed as embed_images
    from .proxies import Candidates, Exemplars, read_exemplars

    if ctx.invoked_subcommand:
        return
    if not arch:
        raise UsageError("--arch is required")
    if sum(map(bool, (references, proxy_dir, proxy_file))) != 1:
        raise UsageError("give exactly one of --reference IMAGE, --proxies DIR or --proxy-file FILE")
    if references:  # the references are explained against the queries too
        options["images"] = (*options["images"], *references)

    def start(model: LoadedModel, items: list) -> Callable[..., Iterator[dict]]:
        names = [n.strip() for n in (layers or "").split(",") if n.strip()]
        if references:
            refs = {str(Path(r).resolve()) for r in references}
            queries = [i for i in items
                       if not isinstance(i, BadInput) and str(Path(i).resolve()) not in refs]
            candidates = Candidates.pairs(model, queries, list(references), options["batch_size"])
            k = len(candidates.names)
        else:
            exemplars = (Exemplars.load(Path(proxy_file), arch) if proxy_file else
                         read_exemplars(model, Path(proxy_dir), options["batch_size"]))
            candidates, k = Candidates.from_exemplars(exemplars, proxy_kind), topk
        return partial(embed_images, candidates=candidates, layer=layer, layers=names, topk=k,
                       methods=methods or DEFAULT_METHODS, similarity=similarity)
    load = partial(load_embedder, arch, weights, embedding_dim, unsafe_load, pick_device(cuda))
    run_images(load, start, **options)


@embed.command("build-proxies")
@click.argument("folder", type=click.Path())
@click.option("--output", required=True, type=click.Path(), help="File to write (.pt).")
@click.option("--arch", required=True, metavar="NAME", help="The embedding network, as for embed.")
@click.option("--weights", default="DEFAULT", show_default=True, help="As for embed.")
@click.option("--embedding-dim", type=click.IntRange(min=1), metavar="D", help="As for embed.")
@click.option("--unsafe-load", is_flag=True, help="As for embed.")
@click.option("--cuda/--no-cuda", default=None, help="Run on CUDA (default: when available).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
def build_proxies(folder: str, output: str, arch: str, weights: str, embedding_dim: int | None,
                  unsafe_load: bool, cuda: bool | None, batch_size: int) -> None:
    """Embed a folder of exemplars (one sub-folder per class) once, for --proxy-file."""
    from .models import load_embedder
    from .proxies import read_exemplars

    model = load_embedder(arch, weights, embedding_dim, unsafe_load, pick_device(cuda))
    exemplars = read_exemplars(model, Path(folder), batch_size)
    exemplars.save(Path(output), arch, model.weights)
    click.echo(f"gradcam: {len(exemplars.paths)} exemplars of {len(exemplars.names)} classes "
               f"-> {output}", err=True)


def run_images(load: Callable[[], LoadedModel],
               start: Callable[[LoadedModel, list], Callable[..., Iterator[dict]]],
               images: tuple[str, ...], image_list: str | None, output_dir: str, batch_size: int,
               shard: str | None, as_json: bool, progress: bool | None,
               report: Callable[[dict], None] | None = None,
               finish: Callable[[LoadedModel, list[dict], bool], None] | None = None,
               **pipeline_options: object) -> None:
    """Load the model, run a command's pipeline over the images, report, and exit with its code.

    ``start`` checks the command's own options against the model and the inputs and returns
    the pipeline; ``report`` prints a finished image (default: its classes), ``finish`` gets
    every record at the end (evaluate's averaged table).
    """
    from .io import json_text

    paths = [*images, *(read_image_list(image_list) if image_list else [])]
    if not paths:
        raise UsageError("no images: give --image-path PATH or --image-list FILE")
    part = parse_shard(shard)
    items = select(expand(paths), part)
    model = load()
    pipeline = start(model, items)
    show = sys.stderr.isatty() if progress is None else progress
    counts = Counter()
    records = []
    began = time.perf_counter()
    with stop_on_interrupt() as stopped, tqdm(total=len(items), unit="img", disable=not show,
                                              file=sys.stderr) as bar:
        for record in pipeline(model, items, output_dir=output_dir, batch_size=batch_size,
                               stop=stopped, progress=show, **pipeline_options):
            counts[record["status"]] += 1
            if finish:
                records.append(record)
            bar.update()
            if record["status"] == "error":
                click.echo(f"gradcam: error: {record['error']}", err=True)
            if as_json:
                click.echo(json_text(record))
            elif record["status"] == "ok":
                (report or _print_table)(record)
    if finish:
        finish(model, records, as_json)
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
        value = c.get("probability", c.get("similarity"))
        click.echo(f"  {c['rank']:>2}  {value:8.4f}  {c['class_id']:>5}  {c['name']}")
    click.echo(f"  -> {record['grid']}")


@main.command()
@click.option("--arch", required=True, metavar="NAME", help="A torchvision classifier.")
def layers(arch: str) -> None:
    """List the layers with a spatial output (candidate targets) and their shapes."""
    from .models import default_layer, load_model, spatial_layers, stage_layers

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
    from .methods import DEFAULT_METHODS, DESCRIPTIONS, METHODS

    for name in METHODS:
        default = " (default)" if name in DEFAULT_METHODS else ""
        click.echo(f"{name:<15} {DESCRIPTIONS[name]}{default}")


@main.command()
def architectures() -> None:
    """List the architecture names --arch accepts."""
    from .models import ARCHITECTURES

    click.echo("\n".join(ARCHITECTURES))
