"""The `gradcam` command: options only, each command a thin layer over the library API."""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Generator, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
from tqdm import tqdm

from . import __version__
from .choices import (
    BASELINES,
    CAM_FUSIONS,
    CROPS,
    IG_BASELINES,
    IG_RULES,
    INTERPOLATIONS,
    OCCLUSION_BORDERS,
    OCCLUSION_FILLS,
    PRECISIONS,
    PROXY_KINDS,
    RESIZES,
    SIMILARITIES,
    SMOOTH_TYPES,
)
from .classes import SCORES
from .cleanup import remove_temporaries
from .errors import ArgumentError, GradcamError, UsageError, quoted
from .inputs import BadInput, expand, parse_shard, parse_suffixes, read_image_list
from .inputs import shard as select
from .outputs import OVERLAYS, SAVE_MAPS

if TYPE_CHECKING:  # the library is imported inside each command, so `--help` stays quick
    import torch

    from .models import LoadedModel
    from .occlusion import OcclusionSettings
    from .paths import PathSettings, SmoothSettings
    from .refine import CamSettings
    from .rise import RiseSettings
    from .settings import MethodSettings

EXIT_CODES = """Exit codes: 0 every image done (or skipped); 1 at least one image failed, or an
output could not be written; 2 usage error (bad option, unknown architecture, weights or layer),
found before any image is processed; 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM: the
batches under way are finished and summed up first (a second signal stops at once)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the program is, with the exit code 128 + signal number."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)
        self.exit_code = 128 + self.signal


class OneLine(click.ClickException):
    """A failure as click's main reports it: one line on stderr, and an exit code."""

    def __init__(self, line: str, exit_code: int) -> None:
        super().__init__(line)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        """Print the line alone (no usage block)."""
        click.echo(self.message, err=True)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """The tool's errors, click's usage errors and interrupts as one line and an exit code."""
    try:
        yield
    except GradcamError as exc:
        raise OneLine(f"gradcam: error: {flag_message(exc)}", exc.exit_code) from exc
    except click.exceptions.NoArgsIsHelpError:  # `gradcam` alone: click prints the help
        raise
    except click.UsageError as exc:  # missing, bad or unknown option, no such command
        raise OneLine(f"gradcam: error: {exc.format_message()}", exc.exit_code) from exc
    except KeyboardInterrupt as exc:
        stop = exc if isinstance(exc, Interrupted) else Interrupted()
        raise OneLine(f"gradcam: interrupted by {stop.signal.name}", stop.exit_code) from exc


@contextmanager
def handling(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Let ``handler`` take SIGINT and SIGTERM (not when ignored, as in background jobs), then
    restore the previous handlers."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _raise_interrupted(signum: int, _frame: Any) -> None:
    """Outside a run's loop, a stop signal unwinds like Ctrl-C (files are written atomically)."""
    raise Interrupted(signum)


class Group(click.Group):
    """A command group whose every failure is one line on stderr with its exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run as the `gradcam` command: SIGTERM, like Ctrl-C, stops with one line."""
        with handling(_raise_interrupted):
            return super().main(*args, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        """Parse the group's own options (`gradcam --bogus` is one line too)."""
        with one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand, its option parsing included."""
        with one_line_errors():
            return super().invoke(ctx)


class EmbedGroup(Group):
    """`embed`: its own options explain queries; `embed build-proxies …` has options of its own."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Before a subcommand the group's required options (--arch) are not asked for."""
        resilient = ctx.resilient_parsing
        ctx.resilient_parsing = resilient or bool(args and args[0] in self.commands)
        try:
            return super().parse_args(ctx, args)
        finally:
            ctx.resilient_parsing = resilient


FLAGS = {  # library argument -> the option that sets it
    "arch": "--arch", "weights": "--weights", "num_classes": "--num-classes", "labels": "--labels",
    "layer": "--layer", "layers": "--layers", "methods": "--method", "topk": "--topk",
    "class_ids": "--class-id", "batch_size": "--batch-size", "output_dir": "--output-dir",
    "image_list": "--image-list", "shard": "--shard", "boxes": "--boxes", "masks": "--masks",
    "tolerance": "--tolerance", "steps": "--steps", "baseline": "--baseline",
    "similarity": "--similarity", "proxy_kind": "--proxy", "proxy_file": "--proxy-file",
    "proxy_dir": "--proxies", "references": "--reference", "embedding_dim": "--embedding-dim",
    "device": "--cuda", "class_names": "--class-name", "targets": "--targets", "score": "--score",
    "negative": "--negative",
    "input_size": "--input-size", "resize": "--resize", "crop": "--crop", "mean": "--mean",
    "std": "--std", "channels": "--channels", "interpolation": "--interpolation",
    "preprocess": "--preprocess",
    "fuse": "--fuse", "aug_smooth": "--aug-smooth", "eigen_smooth": "--eigen-smooth",
    "patches": "--patch", "stride": "--stride", "fill": "--occlusion-fill", "border": "--occlusion-border",
    "n_masks": "--rise-masks", "cell": "--rise-cell", "probability": "--rise-probability",
    "background": "--rise-fill",
    "ig_steps": "--ig-steps", "ig_baseline": "--ig-baseline", "ig_rule": "--ig-rule",
    "samples": "--smooth", "noise": "--noise", "smooth_type": "--smooth-type",
    "save_maps": "--save-maps", "overlay": "--overlay", "colormap": "--colormap", "alpha": "--alpha",
    "region": "--region", "region_mask": "--region-mask",
    "score_threshold": "--score-threshold", "max_detections": "--max-detections",
    "precision": "--precision", "ray": "--ray", "workers": "--workers",
    "cpus_per_worker": "--cpus-per-worker", "gpus_per_worker": "--gpus-per-worker",
    "videos": "--video", "every": "--every", "video_ext": "--video-ext", "method": "--video-method",
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


def split_methods(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """--method repeated or comma-separated, checked by the library's one check while the options
    are parsed (as click.Choice checks the others), so a typo is refused before a model loads."""
    from .explanation import check_methods
    names = tuple(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))
    check_methods(names)
    return names


def option_group(*options: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """Bundle click options into one decorator that adds them in the order listed."""
    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command
    return apply


arch_option = click.option("--arch", required=True, metavar="NAME",
                           help="A torchvision classifier (resnet152), timm/NAME (any timm model), "
                                "hf/PATH_OR_ID (a Hugging Face image classifier) or "
                                "module:PACKAGE.MODULE:FACTORY (your own network).")
weights_option = click.option("--weights", default="DEFAULT", show_default=True,
                              help="DEFAULT, a weights name (IMAGENET1K_V2), none (random), "
                                   "or a .pt/.pth/.safetensors checkpoint path.")
unsafe_option = click.option("--unsafe-load", is_flag=True,
                             help="Allow a checkpoint that holds pickled Python objects (can run code).")
cuda_option = click.option("--cuda/--no-cuda", default=None, help="Run on CUDA (default: when available).")

PREPROCESS = "gradcam.preprocess"  # ctx.meta: the preprocessing options given, by Preprocess field
PREPROCESS_FILE = "file"            # ... and --preprocess FILE under this key
PREPROCESS_SAID = "gradcam.preprocess.said"  # ctx.meta: the line saying what preprocessing is used
DEFAULTS_FROM = {"timm/": "timm's data config", "hf/": "the image processor", "module:": ""}


def keep_preprocessing(field: str, parse: Callable[[str], object] = str
                       ) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """A callback keeping a preprocessing option's parsed value in ``ctx.meta``, so the
    commands' signatures stay as they are; ``preprocessed`` reads them where the model loads."""
    def keep(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.meta.setdefault(PREPROCESS, {})[field] = parse(value)
    return keep


def parse_size(text: str) -> tuple[int, ...]:
    """--input-size H or H,W."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ArgumentError("input_size", text, "one or two positive integers, H or H,W (height, width)")
    return tuple(int(p) for p in parts)


def parse_numbers(field: str) -> Callable[[str], tuple[float, ...]]:
    """--mean / --std a,b,c; their count is checked against the channels once the model loads."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            return tuple(float(p) for p in text.split(","))
        except ValueError:
            raise ArgumentError(field, text, "numbers separated by commas, one per channel") from None
    return parse


preprocess_options = option_group(
    click.option("--input-size", metavar="H[,W]", expose_value=False,
                 callback=keep_preprocessing("input_size", parse_size),
                 help="The model's input in pixels, height,width (one number: square); default: "
                      "the weights'."),
    click.option("--resize", type=click.Choice(RESIZES), expose_value=False,
                 callback=keep_preprocessing("resize"),
                 help="shorter: scale the shorter side (keeping the resize-to-crop ratio of the "
                      "weights), then crop; squash: to the input size, ignoring the aspect; none."),
    click.option("--crop", type=click.Choice(CROPS), expose_value=False,
                 callback=keep_preprocessing("crop"),
                 help="center: cut the input size from the middle; none: the resized image must "
                      "be the input size."),
    click.option("--mean", metavar="A,B,C", expose_value=False,
                 callback=keep_preprocessing("mean", parse_numbers("mean")),
                 help="Per-channel mean subtracted from pixels in [0, 1] (one value with --channels 1)."),
    click.option("--std", metavar="A,B,C", expose_value=False,
                 callback=keep_preprocessing("std", parse_numbers("std")),
                 help="Per-channel standard deviation the pixels are then divided by."),
    click.option("--channels", type=click.Choice(("1", "3")), expose_value=False,
                 callback=keep_preprocessing("channels", int),
                 help="3 (RGB) or 1 (a grayscale model: the pixels are converted to gray)."),
    click.option("--interpolation", type=click.Choice(INTERPOLATIONS), expose_value=False,
                 callback=keep_preprocessing("interpolation"), help="How images are resized."),
    click.option("--preprocess", metavar="FILE", expose_value=False,
                 callback=keep_preprocessing(PREPROCESS_FILE),
                 help="A JSON of preprocessing fields; flags win over it, it over the checkpoint's "
                      "own model.preprocess.json."),
)

model_options = option_group(
    arch_option, weights_option,
    click.option("--num-classes", type=click.IntRange(min=1),
                 help="Classes of a checkpoint's head when not ImageNet's 1000."),
    click.option("--labels", type=click.Path(dir_okay=False),
                 help="Class names, one per line, for a checkpoint's head."),
    unsafe_option, cuda_option, preprocess_options,
)

detector_options = option_group(  # a detector's own transform resizes and normalises: no preprocessing
    click.option("--arch", required=True, metavar="NAME",
                 help="A torchvision detector (`gradcam architectures --task detect`)."),
    weights_option,
    click.option("--num-classes", type=click.IntRange(min=1),
                 help="Classes of a checkpoint's head when not COCO's 91."),
    click.option("--labels", type=click.Path(dir_okay=False),
                 help="Class names, one per line, for a checkpoint's head."),
    unsafe_option, cuda_option,
)

embedder_options = option_group(
    arch_option, weights_option,
    click.option("--embedding-dim", type=click.IntRange(min=1), metavar="D",
                 help="Replace the head by a linear map to D dimensions (loaded from --weights); "
                      "default: the penultimate features are the embedding."),
    unsafe_option, cuda_option, preprocess_options,
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradcam")
def main() -> None:
    """Show why a vision network decided what it did."""


batch_size_option = click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                                 help="Images per forward pass; also perturbed copies per pass for "
                                      "Score-CAM and Ablation-CAM.")

image_options = option_group(
    click.option("--image-path", "images", multiple=True, metavar="PATH",
                 help="An image, a folder (searched recursively) or a glob; repeatable."),
    click.option("--image-list", metavar="FILE",
                 help="Read image paths, one per line, from FILE (- for stdin)."),
    click.option("--output-dir", default="results", show_default=True, type=click.Path(),
                 help="Folder for the PNGs and JSON summaries."),
    batch_size_option,
    click.option("--shard", metavar="I/N",
                 help="Process only the I-th of N disjoint parts of the inputs."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print one JSON record per image on stdout (JSON lines) instead of a table."),
    click.option("--progress/--quiet", default=None,
                 help="Progress bar on stderr (default: when stderr is a terminal)."),
)


cluster_options = option_group(
    click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                 help="Explain the batches on a Ray cluster (pip install 'gradcam[ray]'): alone, a "
                      "local one; 'auto', the running cluster; or its address. Same files and records."),
    click.option("--workers", type=click.IntRange(min=1), metavar="N",
                 help="With --ray: actors, each loading the model once (default: one per CPU, or "
                      "per --gpus-per-worker of the GPUs)."),
    click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), metavar="C",
                 help="With --ray: CPUs per actor, also its torch threads (default 1)."),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0), metavar="G",
                 help="With --ray: GPUs per actor, e.g. 1, or 0.5 for two actors per GPU (default 0)."),
)


def cluster_engine(options: dict) -> object | None:
    """The Ray engine the cluster options ask for (taken out of ``options``), or None."""
    address, workers = options.pop("ray_address", None), options.pop("workers", None)
    cpus, gpus = options.pop("cpus_per_worker", None), options.pop("gpus_per_worker", None)
    if address is None:
        given = next((flag for flag, v in (("--workers", workers), ("--cpus-per-worker", cpus),
                                           ("--gpus-per-worker", gpus)) if v is not None), None)
        if given:
            raise UsageError(f"{given} applies with --ray")
        return None
    from .cluster import RayEngine
    return RayEngine(address, workers, cpus or 1.0, gpus or 0.0)


skip_option = click.option(
    "--skip-existing", is_flag=True,
    help="Skip images whose outputs are all present (resume an interrupted run).")

layer_option = click.option("--layer", help="Target layer for the CAM maps, dotted (layer4, features.28); "
                                            "default: the architecture's last spatial block.")

method_option = click.option(
    "--method", "methods", multiple=True, callback=split_methods,
    help="Maps to compute, comma-separated or repeated (default: the five `gradcam methods` marks); "
         "`gradcam methods` lists them.")


def parse_patches(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[int, ...]:
    """--patch repeated or comma-separated: the patch sizes in pixels (checked by the library)."""
    sizes = [n.strip() for v in values for n in v.split(",") if n.strip()]
    bad = next((n for n in sizes if not n.lstrip("-").isdigit()), None)
    if bad is not None:
        raise ArgumentError("patches", bad, "patch sizes are positive integers, comma-separated or repeated")
    return tuple(int(n) for n in sizes)


occlusion_options = option_group(
    click.option("--patch", "patches", multiple=True, callback=parse_patches, metavar="P[,P…]",
                 help="Occlusion: patch sizes in pixels of the model's input, comma-separated or "
                      "repeated (a map each, e.g. 10,15,25,35,45,90 as seed 001's demo; default 32)."),
    click.option("--stride", type=int, metavar="S",
                 help="Occlusion: pixels between window positions (default: half of each patch)."),
    click.option("--occlusion-fill", type=click.Choice(OCCLUSION_FILLS),
                 help="Occlusion: what a patch becomes: zero in the normalised space (the "
                      "normalisation's mean colour; default), the image's mean colour, or a blurred copy."),
    click.option("--occlusion-border", type=click.Choice(OCCLUSION_BORDERS),
                 help="Occlusion: edge (captum's windows, the last cut at the image's edge; default) "
                      "or pad (seed 001: the input padded by half a patch of fill)."),
)


def given_fields(options: dict, method: str, methods: tuple[str, ...],
                 flags: dict[str, tuple[str, str]]) -> dict:
    """Take one method's options out of ``options`` (``flags``: flag -> (option name, settings
    field)) and return the fields given a value; refused without ``--method method``, where
    they would do nothing."""
    taken = {flag: (field, options.pop(name)) for flag, (name, field) in flags.items()}
    given = {flag: pair for flag, pair in taken.items() if pair[1] not in (None, ())}
    if given and method not in methods:
        raise UsageError(f"{next(iter(given))} applies to --method {method}, which is not asked for")
    return dict(given.values())


def occlusion_settings(methods: tuple[str, ...], options: dict) -> OcclusionSettings:
    """Occlusion's options (taken out of ``options``) as the library's settings, checked once."""
    from .occlusion import OcclusionSettings
    return OcclusionSettings(**given_fields(options, "occlusion", methods, {
        "--patch": ("patches", "patches"), "--stride": ("stride", "stride"),
        "--occlusion-fill": ("occlusion_fill", "fill"),
        "--occlusion-border": ("occlusion_border", "border")}))


rise_options = option_group(
    click.option("--rise-masks", type=int, metavar="N",
                 help="RISE: randomly masked copies per image (default 4000, as the paper)."),
    click.option("--rise-cell", type=int, metavar="C",
                 help="RISE: the masks' cell size in pixels of the model's input (default 32: 7x7 "
                      "cells at 224, as the paper)."),
    click.option("--rise-probability", type=float, metavar="P",
                 help="RISE: the chance each cell is shown (default 0.5)."),
    click.option("--rise-fill", type=click.Choice(OCCLUSION_FILLS),
                 help="RISE: what hidden pixels become: zero in the normalised space (the "
                      "normalisation's mean colour, as RISE's code; default), the image's mean "
                      "colour, or a blurred copy."),
)


def rise_settings(methods: tuple[str, ...], options: dict) -> RiseSettings:
    """RISE's options (taken out of ``options``) as the library's settings, checked once."""
    from .rise import RiseSettings
    return RiseSettings(**given_fields(options, "rise", methods, {
        "--rise-masks": ("rise_masks", "n_masks"), "--rise-cell": ("rise_cell", "cell"),
        "--rise-probability": ("rise_probability", "probability"),
        "--rise-fill": ("rise_fill", "background")}))


path_options = option_group(
    click.option("--ig-steps", type=int, metavar="N",
                 help="Integrated Gradients: points on the path from the baseline (default 32)."),
    click.option("--ig-baseline", type=click.Choice(IG_BASELINES),
                 help="Integrated Gradients: where the path starts: a black image (default), a "
                      "blurred copy, or the image's mean colour."),
    click.option("--ig-rule", type=click.Choice(IG_RULES),
                 help="Integrated Gradients: captum's quadrature, gausslegendre (default, as "
                      "captum's) or riemann-trapezoid."),
)


def path_settings(methods: tuple[str, ...], options: dict) -> PathSettings:
    """Integrated Gradients' options (taken out of ``options``) as the library's settings,
    checked once."""
    from .paths import PathSettings
    return PathSettings(**given_fields(options, "integrated-gradients", methods, {
        "--ig-steps": ("ig_steps", "ig_steps"), "--ig-baseline": ("ig_baseline", "ig_baseline"),
        "--ig-rule": ("ig_rule", "ig_rule")}))


smooth_options = option_group(
    click.option("--smooth", type=int, metavar="N",
                 help="SmoothGrad: average every gradient map (backprop maps, gradient CAMs) over "
                      "N noisy copies of the image (Smilkov et al. 2017; default: off)."),
    click.option("--noise", type=float, metavar="SIGMA",
                 help="SmoothGrad: the noise's standard deviation as a fraction of each image's "
                      "value range, max - min (default 0.15)."),
    click.option("--smooth-type", type=click.Choice(SMOOTH_TYPES),
                 help="SmoothGrad: the maps' mean (default), the mean of their squares, or their "
                      "variance (captum's NoiseTunnel types)."),
)


def smooth_settings(methods: tuple[str, ...], options: dict) -> SmoothSettings:
    """SmoothGrad's options (taken out of ``options``) as the library's settings, checked once;
    refused without a gradient map to smooth, and --noise or --smooth-type without --smooth."""
    from .paths import SmoothSettings, smoothed_methods
    given = {"--smooth": options.pop("smooth"), "--noise": options.pop("noise"),
             "--smooth-type": options.pop("smooth_type")}
    flag = next((f for f, v in list(given.items())[1:] if v is not None), None)
    if flag and given["--smooth"] is None:
        raise UsageError(f"{flag} applies to --smooth, which is not given")
    if given["--smooth"] and not set(smoothed_methods()) & set(methods):
        raise UsageError(f"--smooth applies to gradient maps ({', '.join(smoothed_methods())}), "
                         "none of which is asked for")
    fields = zip(("samples", "noise", "smooth_type"), given.values(), strict=True)
    return SmoothSettings(**{name: value for name, value in fields if value is not None})


cam_options = option_group(
    click.option("--aug-smooth", is_flag=True,
                 help="CAMs and FullGrad: average the maps of the input flipped left-right and its "
                      "values scaled by 0.9, 1 and 1.1 (pytorch-grad-cam's aug_smooth), each "
                      "normalised and mapped back; six times the passes."),
    click.option("--eigen-smooth", is_flag=True,
                 help="CAMs: the first principal component of the weighted activations instead of "
                      "their sum (pytorch-grad-cam's eigen_smooth)."),
)


def cam_settings(methods: tuple[str, ...], options: dict) -> CamSettings:
    """The CAM refinements (taken out of ``options``; --fuse is classify's), checked once;
    a smoothing flag is refused without a method it changes."""
    from .refine import EIGEN_SMOOTHED, CamSettings, aug_smoothed
    aug, eigen = options.pop("aug_smooth"), options.pop("eigen_smooth")
    if aug and not aug_smoothed(methods):
        raise UsageError("--aug-smooth applies to the CAM methods and fullgrad, none of which is asked for")
    if eigen and not set(EIGEN_SMOOTHED) & set(methods):
        raise UsageError(f"--eigen-smooth applies to --method {','.join(EIGEN_SMOOTHED)}, none of "
                         "which is asked for")
    return CamSettings(aug, eigen, options.pop("fuse", None))


def method_settings(methods: tuple[str, ...], options: dict) -> MethodSettings:
    """Every method option (taken out of ``options``) as one ``MethodSettings``, checked once."""
    from .precision import Precision
    from .settings import MethodSettings
    return MethodSettings(occlusion=occlusion_settings(methods, options),
                          rise=rise_settings(methods, options),
                          ig=path_settings(methods, options),
                          smooth=smooth_settings(methods, options),
                          cam=cam_settings(methods, options),
                          precision=Precision(options.pop("precision")))


precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
    help="The explained passes' precision: bf16 (CPU or CUDA) or fp16 (CUDA) run the model under "
         "autocast; the maps are still computed in fp32 (README: Precision).")
method_options = option_group(occlusion_options, rise_options, path_options, smooth_options, cam_options,
                              precision_option)


def check_colours(_ctx: click.Context, param: click.Parameter, value: str | float) -> str | float:
    """--colormap and --alpha checked by the library's own checks while the options are parsed,
    so a bad one is refused before a model loads."""
    from .render import check_alpha, check_colormap
    (check_colormap if param.name == "colormap" else check_alpha)(value)
    return value


output_options = option_group(
    click.option("--save-maps", type=click.Choice(SAVE_MAPS), default="none", show_default=True,
                 help="Also write the float32 maps before display normalisation: a .npy per class "
                      "and method beside its PNG, or one maps.npz per image."),
    click.option("--overlay", type=click.Choice(OVERLAYS), default="crop", show_default=True,
                 help="Draw each CAM's PNG over the crop the model saw, or over the original photo "
                      "at its own size (what the crop cut off hatched); the grid stays the crop's."),
    click.option("--colormap", default="jet", show_default=True, metavar="NAME", callback=check_colours,
                 help="The CAM overlays' colours: any matplotlib colour map (viridis, inferno, turbo, …)."),
    click.option("--alpha", type=float, default=0.5, show_default=True, callback=check_colours,
                 help="The heat map's weight in CAM overlays, from 0 (the photo only) to 1 (the "
                      "heat map only)."),
)


def class_options(topk: int) -> Callable[[Callable], Callable]:
    """--topk (with the command's default), --class-id, --class-name, --targets, --score and
    --negative: which classes each image explains, how they are scored, and which side."""
    return option_group(
        click.option("--topk", type=click.IntRange(min=1),
                     help=f"Explain each image's k highest-scoring classes (default {topk}, at most "
                          "the head's classes)."),
        click.option("--class-id", "class_ids", multiple=True, type=click.IntRange(min=0),
                     help="Explain this class instead of the top-k; repeatable."),
        click.option("--class-name", "class_names", multiple=True, metavar="NAME",
                     help="Explain the class of this name (exact, or case and underscores aside "
                          "when unambiguous); repeatable."),
        click.option("--targets", metavar="FILE|folder",
                     help="Each image's own classes: a CSV image,class (class an id or a name; a "
                          "row per class), or folder: the image's parent folder names its class."),
        click.option("--score", type=click.Choice(SCORES),
                     help="The class score reported: softmax (default), sigmoid (multi-label "
                          "heads; a one-output head's default), or the logit. Classes are ranked "
                          "by logit, in the same order."),
        click.option("--negative", is_flag=True,
                     help="Explain the other side: minus the class logit (a one-output head's "
                          "negative class; for others, what speaks against the class)."),
    )


def top_k(model: LoadedModel, default: int, topk: int | None, targets: str | None) -> int:
    """--topk as given, or the command's default capped at the head's classes (a one-output
    head has one); refused beside --targets, which gives each image its own classes."""
    if topk is not None and targets is not None:
        raise UsageError(f"--topk {topk}: --targets gives each image its own classes; leave out --topk")
    return topk if topk is not None else min(default, len(model.categories))


video_options = option_group(
    click.option("--video", "videos", multiple=True, metavar="PATH",
                 help="A video to explain frame by frame: an MP4 with the map and top class drawn "
                      "on every frame, and each explained frame's record; repeatable."),
    click.option("--every", type=click.IntRange(min=1), metavar="N",
                 help="Videos: explain frames 0, N, 2N, … (default 1); the frames between show the "
                      "last explained map."),
    click.option("--video-ext", metavar="EXT[,EXT…]",
                 help="Files with these suffixes that --image-path finds (folders, globs) are "
                      "explained as videos, e.g. mp4,avi."),
    click.option("--video-method", metavar="M",
                 help="Videos: the map drawn (default: the first heat-map method of --method, else "
                      "gradcam); only it is computed for frames."),
)


@dataclass(frozen=True)
class VideoInputs:
    """classify's videos: the ones named, the suffixes that make a found file one, and how
    they are explained."""

    videos: tuple[str, ...]
    suffixes: frozenset[str]
    every: int | None
    method: str | None

    def pipeline(self, images: Callable[..., Iterator[dict]], common: dict,
                 methods: tuple[str, ...]) -> Callable[..., Iterator[dict]]:
        """``images``' pipeline, or one that explains the videos among the inputs after it, with
        the same ``common`` arguments (layer, classes, method settings)."""
        if not (self.videos or self.suffixes):
            return images
        from .outputs.video import classify_video, default_method, with_videos
        given = {Path(v) for v in self.videos}
        clips = partial(classify_video, **common, method=self.method or default_method(methods),
                        every=self.every or 1)
        return with_videos(images, clips, lambda item: isinstance(item, Path) and (
            item in given or item.suffix.lower() in self.suffixes))


def video_inputs(options: dict) -> VideoInputs:
    """Take the video options out of ``options``, check them, and add the named videos to the
    inputs (so shards and the progress bar count them)."""
    videos, every, method = options.pop("videos"), options.pop("every"), options.pop("video_method")
    suffixes = parse_suffixes(options.pop("video_ext"))
    folder = next((v for v in videos if Path(v).is_dir()), None)
    if folder is not None:
        raise ArgumentError("videos", folder, "a folder; give its videos with --image-path FOLDER "
                            "--video-ext mp4")
    unused = next(((a, v) for a, v in (("every", every), ("method", method)) if v is not None), None)
    if unused and not (videos or suffixes):
        raise ArgumentError(*unused, "applies to videos (--video, or --video-ext for files in "
                            "folders), and none is given")
    if method is not None:
        from .outputs.video import check_method
        check_method(method)
    options["images"] = (*options["images"], *videos)
    return VideoInputs(videos, suffixes, every, method)


@main.command(epilog=EXIT_CODES)
@model_options
@image_options
@skip_option
@class_options(topk=3)
@layer_option
@click.option("--layers", metavar="A,B,…",
              help="Several target layers, comma-separated: each CAM is one map fused from theirs, "
                   "each normalised first (see --fuse).")
@click.option("--fuse", type=click.Choice(CAM_FUSIONS),
              help="With --layers: the normalised maps' mean (default, as pytorch-grad-cam) or maximum.")
@method_option
@method_options
@output_options
@cluster_options
@video_options
def classify(arch: str, weights: str, num_classes: int | None, labels: str | None,
             unsafe_load: bool, cuda: bool | None, layer: str | None, layers: str | None,
             methods: tuple[str, ...], topk: int | None, class_ids: tuple[int, ...],
             **options: object) -> None:
    """Explain the top-k classes of a classifier with five maps per class."""
    from .methods import DEFAULT_METHODS
    from .models import load_model
    from .pipeline import classify as classify_images
    from .pipeline import resolve_fused

    methods = methods or DEFAULT_METHODS
    settings = method_settings(methods, options)
    names = [n.strip() for n in (layers or "").split(",") if n.strip()]
    videos = video_inputs(options)
    if options["ray_address"] is not None and (videos.videos or videos.suffixes):
        raise UsageError("--ray explains images; leave videos (--video, --video-ext) to a run without it")

    def start(model: LoadedModel, _items: list) -> Callable[..., Iterator[dict]]:
        chosen = resolve_fused(model, layer, names, settings.cam.fuse)
        if layer is None and not names:
            click.echo(f"gradcam: target layer {chosen[0]} (default for {model.arch}; "
                       "change with --layer)", err=True)
        where = {"layers": chosen} if names else {"layer": chosen[0]}
        common = {**where, "settings": settings, "topk": top_k(model, 3, topk, options["targets"]),
                  "class_ids": class_ids}
        return videos.pipeline(partial(classify_images, **common, methods=methods), common, methods)
    load = preprocessed(partial(load_model, arch, weights, num_classes, labels, unsafe_load,
                                pick_device(cuda)), arch, weights)
    run_images(load, start, video_ext=videos.suffixes, **options)


@main.command("compare-layers", epilog=EXIT_CODES)
@model_options
@image_options
@skip_option
@class_options(topk=1)
@click.option("--layers", "layers", metavar="A,B,…",
              help="Layers to compare, comma-separated (default: the stages that "
                   "`gradcam layers` marks).")
@click.option("--method", "methods", multiple=True, callback=split_methods,
              help="CAM methods to compute, comma-separated or repeated (default: gradcam).")
@method_options
@cluster_options
@output_options
def compare_layers(arch: str, weights: str, num_classes: int | None, labels: str | None,
                   unsafe_load: bool, cuda: bool | None, layers: str | None,
                   methods: tuple[str, ...], topk: int | None, class_ids: tuple[int, ...],
                   **options: object) -> None:
    """Compare CAM maps across layers: a row per layer, a column per method."""
    from .models import load_model
    from .pipeline import compare_layers as compare_images
    from .pipeline import resolve_layers

    methods = methods or ("gradcam",)
    settings = method_settings(methods, options)

    def start(model: LoadedModel, _items: list) -> Callable[..., Iterator[dict]]:
        names = resolve_layers(model, [n.strip() for n in (layers or "").split(",") if n.strip()])
        if not layers:
            click.echo(f"gradcam: layers {', '.join(names)} (the stages of {model.arch}; "
                       "change with --layers)", err=True)
        return partial(compare_images, layers=names, methods=methods, settings=settings,
                       topk=top_k(model, 1, topk, options["targets"]), class_ids=class_ids)
    load = preprocessed(partial(load_model, arch, weights, num_classes, labels, unsafe_load,
                                pick_device(cuda)), arch, weights)
    run_images(load, start, **options)


@main.command(epilog=EXIT_CODES)
@model_options
@image_options
@skip_option
@class_options(topk=1)
@layer_option
@method_option
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
@method_options
@cluster_options
def evaluate(arch: str, weights: str, num_classes: int | None, labels: str | None,
             unsafe_load: bool, cuda: bool | None, layer: str | None, methods: tuple[str, ...],
             topk: int | None, class_ids: tuple[int, ...], steps: int, baseline: str, masks: str | None,
             boxes: str | None, tolerance: float, sanity: bool, **options: object) -> None:
    """Measure how faithful the maps are: deletion/insertion AUC, Average Drop/Increase,
    pointing games with --masks/--boxes, and the randomisation test with --sanity."""
    from .evaluation import evaluate as evaluate_images
    from .evaluation import format_averages, write_summary
    from .methods import DEFAULT_METHODS
    from .models import load_model
    from .pipeline import resolve_layer
    from .truth import read_truth

    methods = methods or DEFAULT_METHODS
    settings = method_settings(methods, options)
    truth = read_truth(masks, boxes)
    tag = {}  # the tables' name, <arch>@<layer>, known once the model is loaded

    def start(model: LoadedModel, _items: list) -> Callable[..., Iterator[dict]]:
        chosen = resolve_layer(model, layer)
        tag["name"] = f"{model.folder_name}@{chosen}"
        return partial(evaluate_images, layer=chosen, topk=top_k(model, 1, topk, options["targets"]),
                       class_ids=class_ids,
                       methods=methods, settings=settings, steps=steps, baseline=baseline,
                       truth=truth, tolerance=tolerance, sanity=sanity)

    def finish(_model: LoadedModel, records: list[dict], as_json: bool) -> None:
        table = write_summary(records, options["output_dir"], tag["name"])
        if table:
            where = Path(options["output_dir"]) / f"evaluate-{tag['name']}"
            click.echo(format_averages(table), err=as_json)
            click.echo(f"  -> {where}.csv/.json/-curves.png", err=as_json)
    load = preprocessed(partial(load_model, arch, weights, num_classes, labels, unsafe_load,
                                pick_device(cuda)), arch, weights)
    run_images(load, start, report=_print_evaluated, finish=finish, **options)


def _print_evaluated(record: dict) -> None:
    """One line per explained class and method of an evaluated image."""
    click.echo(f"{quoted(record['image'])}  ({record['arch']} @ {record['layer']})")
    for c in record["classes"]:
        for method, m in c["metrics"].items():
            click.echo(f"  {c['rank']:>2} {c['name'][:20]:<20} {method:<15} deletion "
                       f"{m['deletion_auc']:.3f}  insertion {m['insertion_auc']:.3f}  drop "
                       f"{m['confidence_drop']:5.1f}%")


@main.group(cls=EmbedGroup, invoke_without_command=True, epilog=EXIT_CODES)
@embedder_options
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
@click.option("--topk", type=click.IntRange(min=1),
              help="Explain each query's k most similar class proxies (default 3) or references "
                   "(default: all).")
@layer_option
@click.option("--layers", metavar="A,B,…", help="Several layers, comma-separated: rows per layer.")
@method_option
@method_options
@output_options
@cluster_options
@click.pass_context
def embed(ctx: click.Context, arch: str, weights: str, embedding_dim: int | None,
          unsafe_load: bool, cuda: bool | None, references: tuple[str, ...],
          proxy_dir: str | None, proxy_file: str | None, proxy_kind: str, similarity: str,
          topk: int | None, layer: str | None, layers: str | None, methods: tuple[str, ...],
          **options: object) -> None:
    """Explain an embedding network: which regions make a query similar to a reference
    image or to a class proxy (Grad-CAM for embeddings, arXiv 2402.00909)."""
    from .methods import DEFAULT_METHODS
    from .models import load_embedder
    from .pipeline import embed as embed_images
    from .proxies import Candidates, Exemplars, read_exemplars

    if ctx.invoked_subcommand:
        return
    if sum(map(bool, (references, proxy_dir, proxy_file))) != 1:
        raise UsageError("give exactly one of --reference IMAGE, --proxies DIR or --proxy-file FILE")
    methods = methods or DEFAULT_METHODS
    settings = method_settings(methods, options)
    if references:  # the references are explained against the queries too
        options["images"] = (*options["images"], *references)

    def start(model: LoadedModel, items: list) -> Callable[..., Iterator[dict]]:
        names = [n.strip() for n in (layers or "").split(",") if n.strip()]
        if references:
            refs = {str(Path(r).resolve()) for r in references}
            queries = [i for i in items
                       if not isinstance(i, BadInput) and str(Path(i).resolve()) not in refs]
            candidates = Candidates.pairs(model, queries, list(references), options["batch_size"])
            k = topk or len(candidates.names)
        else:
            exemplars = (Exemplars.load(proxy_file, model) if proxy_file else
                         read_exemplars(model, proxy_dir, options["batch_size"]))
            candidates, k = Candidates.from_exemplars(exemplars, proxy_kind), topk or 3
        return partial(embed_images, candidates=candidates, layer=layer, layers=names, topk=k,
                       methods=methods, similarity=similarity, settings=settings)
    load = preprocessed(partial(load_embedder, arch, weights, embedding_dim, unsafe_load,
                                pick_device(cuda)), arch, weights)
    run_images(load, start, **options)


@embed.command("build-proxies")
@click.argument("folder", type=click.Path())
@click.option("--output", required=True, type=click.Path(), help="File to write (.pt).")
@embedder_options
@batch_size_option
def build_proxies(folder: str, output: str, arch: str, weights: str, embedding_dim: int | None,
                  unsafe_load: bool, cuda: bool | None, batch_size: int) -> None:
    """Embed a folder of exemplars (one sub-folder per class) once, for --proxy-file."""
    from .models import load_embedder
    from .proxies import read_exemplars

    with redirect_stdout(sys.stderr):  # torch announces weight downloads on stdout
        model = preprocessed(partial(load_embedder, arch, weights, embedding_dim, unsafe_load,
                                     pick_device(cuda)), arch, weights)()
    try:
        exemplars = read_exemplars(model, folder, batch_size)
    except ArgumentError as exc:  # FOLDER is positional: no --proxies to name
        raise UsageError(f"{quoted(exc.value)}: {exc.problem}") from exc
    say_preprocessing()
    exemplars.save(Path(output), model)
    click.echo(f"gradcam: {len(exemplars.paths)} exemplars of {len(exemplars.names)} classes "
               f"-> {output}", err=True)


def preprocessed(load: Callable[..., LoadedModel], arch: str, weights: str) -> Callable[[], LoadedModel]:
    """``load`` with the preprocessing options: each field from the last of the model's
    defaults, a checkpoint's model.preprocess.json, --preprocess FILE and the flags; the line
    ``say_preprocessing`` prints is kept."""
    options = dict(click.get_current_context().meta.get(PREPROCESS, {}))
    file = options.pop(PREPROCESS_FILE, None)

    def load_preprocessed() -> LoadedModel:
        from .preprocess import in_file, read_changes, sidecar

        beside = sidecar(weights)
        own = _sidecar_changes(beside, weights) if Path(weights).is_file() and beside.is_file() else {}
        chosen = read_changes(file) if file else {}
        try:
            model = load(preprocess={**own, **chosen, **options})
        except ArgumentError as exc:
            if exc.argument in chosen and exc.argument not in options:
                raise in_file(exc, file) from exc
            if exc.argument in own and exc.argument not in {**chosen, **options}:
                exc = in_file(exc, beside)
            if exc.argument == "preprocess" and exc.value == str(beside):
                raise ArgumentError("weights", weights, f"its preprocessing file {beside.name}: "
                                    f"{exc.problem}") from exc
            raise
        default = next((said for prefix, said in DEFAULTS_FROM.items() if arch.startswith(prefix)),
                       "the weights")
        sources = [default, beside.name if own else "", file or "", "flags" if options else ""]
        said = "; ".join(s for s in sources if s)
        click.get_current_context().meta[PREPROCESS_SAID] = \
            f"gradcam: preprocessing {model.preprocess.describe()} (from: {said})"
        return model
    return load_preprocessed


def say_preprocessing() -> None:
    """Print the preprocessing the run uses on stderr, once, after every usage check (so that
    a usage error stays one line)."""
    line = click.get_current_context().meta.pop(PREPROCESS_SAID, None)
    if line:
        click.echo(line, err=True)


def _sidecar_changes(path: Path, weights: str) -> dict:
    """A checkpoint's own preprocessing fields; a problem with the file is said with --weights."""
    from .preprocess import read_changes
    try:
        return read_changes(path)
    except ArgumentError as exc:
        raise ArgumentError("weights", weights, f"its preprocessing file {path.name}: "
                            f"{exc.problem}") from exc


def run_images(load: Callable[[], LoadedModel],
               start: Callable[[LoadedModel, list], Callable[..., Iterator[dict]]],
               images: tuple[str, ...], image_list: str | None, output_dir: str, batch_size: int,
               shard: str | None, as_json: bool, progress: bool | None,
               report: Callable[[dict], None] | None = None,
               finish: Callable[[LoadedModel, list[dict], bool], None] | None = None,
               video_ext: Collection[str] = (), **pipeline_options: object) -> None:
    """Load the model, run a command's pipeline over the images, report, and exit with its code.

    ``start`` checks the command's own options against the model and the inputs and returns
    the pipeline; ``report`` prints a finished image (default: its classes), ``finish`` gets
    every record at the end (evaluate's averaged table). Temporary files that killed runs left
    in ``output_dir`` are removed before the pipeline starts. Folders and globs also yield the
    files whose suffix is in ``video_ext`` (classify's videos).
    """
    engine = cluster_engine(pipeline_options)
    if engine is not None:
        pipeline_options["engine"] = engine
    paths = [*images, *(read_image_list(image_list) if image_list else [])]
    if not paths:
        raise UsageError("no images: give --image-path PATH or --image-list FILE")
    items = select(expand(paths, video_ext), parse_shard(shard))
    with redirect_stdout(sys.stderr):  # torch announces weight downloads on stdout: records only there
        model = load()
    pipeline = start(model, items)
    _remove_temporaries(output_dir)
    show = sys.stderr.isatty() if progress is None else progress
    counts, records, began = Counter(), [], time.perf_counter()
    failure: GradcamError | None = None
    records_out = sys.stdout  # during the run only the records go there (Ray prints its own news)

    def handle(record: dict) -> None:
        say_preprocessing()  # with the first record: every usage error is found by then
        counts[record["status"]] += 1
        records.extend([record] if finish else [])
        bar.update()
        _print_record(record, as_json, report or _print_table, records_out)
    with stop_on_interrupt() as stop, tqdm(total=len(items), unit="img", disable=not show,
                                           file=sys.stderr) as bar, redirect_stdout(sys.stderr):
        try:
            every_record(pipeline(model, items, output_dir=output_dir, batch_size=batch_size,
                                  stop=stop, progress=show, **pipeline_options), handle)
        except UsageError:  # found before any image was written: its one line only
            raise
        except GradcamError as exc:  # an output that cannot be written: said after the summary
            failure = exc
    if finish and failure is None:
        finish(model, records, as_json)
    interrupted = f", interrupted by {stop.first.signal.name}" if stop() else ""
    click.echo(f"gradcam: {counts['ok']} done, {counts['skipped']} skipped, {counts['error']} failed"
               f"{interrupted} in {time.perf_counter() - began:.1f} s", err=True)
    if failure is not None:
        raise failure
    raise SystemExit(stop.first.exit_code if stop() else 1 if counts["error"] else 0)


def every_record(records: Generator[dict, None, None], handle: Callable[[dict], None]) -> None:
    """Handle every record; when a second signal or an output error strikes while a record is
    being handled, pass it into the runner, which still reports every image whose files are
    complete before the abort goes on."""
    try:
        for record in records:
            handle(record)
    except (Interrupted, GradcamError) as exc:
        try:  # a finished generator raises ``exc`` again at once
            record = records.throw(exc)
            while True:
                handle(record)
                record = next(records)
        except (Interrupted, GradcamError, StopIteration):
            pass
        raise exc from None


def _remove_temporaries(output_dir: str) -> None:
    """Remove the temporary files killed runs left in the output folder, saying how many."""
    removed = remove_temporaries(output_dir)
    if removed:
        click.echo(f"gradcam: removed {removed} temporary file{'s' * (removed > 1)} left by an "
                   "interrupted run", err=True)


def _print_record(record: dict, as_json: bool, report: Callable[[dict], None], stdout: IO[str]) -> None:
    """A finished image: its error on stderr; its JSON line, or ``report`` of it, on ``stdout``."""
    from .io import json_text

    if record["status"] == "error":
        click.echo(f"gradcam: error: {record['error']}", err=True)
    if as_json:
        click.echo(json_text(record), file=stdout)
    elif record["status"] == "ok":
        with redirect_stdout(stdout):
            report(record)


class Stop:
    """The first SIGINT or SIGTERM of a run, asked for between batches."""

    def __init__(self) -> None:
        self.first: Interrupted | None = None

    def __call__(self) -> bool:
        """Whether to finish the batches under way and start no other."""
        return self.first is not None

    def receive(self, signum: int, _frame: Any) -> None:
        """The signal handler: note the first signal; raise at the second, to stop at once."""
        if self.first is not None:
            raise Interrupted(signum)
        self.first = Interrupted(signum)


@contextmanager
def stop_on_interrupt() -> Iterator[Stop]:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM (what job schedulers send) into a flag the
    pipeline asks between batches; a second signal stops at once.

    Either way no file is left half-written (every write is a rename of a complete file).
    """
    stop = Stop()
    with handling(stop.receive):
        try:
            yield stop
        except Interrupted:  # the second signal
            pass


def _print_table(record: dict) -> None:
    """Print an image's explained classes as a short table."""
    where = ", ".join(record["layers"]) if "layers" in record else record["layer"]
    side = " (negative side)" if record.get("negative") else ""
    click.echo(f"{quoted(record['image'])}  ({record['arch']} @ {where}){side}")
    for c in record["classes"]:
        value = c.get("score", c.get("similarity"))
        click.echo(f"  {c['rank']:>2}  {value:8.4f}  {c['class_id']:>5}  {c['name']}")
    if "predicted" in record:
        top = record["predicted"]
        click.echo(f"  predicted {top['score']:8.4f}  {top['class_id']:>5}  {top['name']}")
    click.echo(f"  -> {record.get('grid') or record['video']}")  # a video's record has no grid


@main.command()
@arch_option
@preprocess_options
def layers(arch: str) -> None:
    """List the layers with a spatial output (candidate targets) and their shapes."""
    from .models import (
        DETECTORS,
        SEGMENTERS,
        default_layer,
        load_model,
        load_segmenter,
        spatial_layers,
        stage_layers,
    )
    from .tasks.segment import segment_layer

    if arch in DETECTORS:
        _detector_layers(arch)
        return

    segmenter = arch in SEGMENTERS  # segment's networks: their default is the backbone's last stage
    load = load_segmenter if segmenter else load_model
    with redirect_stdout(sys.stderr):  # stdout carries the listing only
        model = preprocessed(partial(load, arch, "none"), arch, "none")()
    default = segment_layer(model, None) if segmenter else default_layer(arch, model.module, model.preprocess)
    stages = stage_layers(arch, model.module, model.preprocess)
    height, width = model.preprocess.input_size
    click.echo(f"{arch} at {height}x{width}; * marks the default target layer, s the stages "
               "(compare-layers' default)")
    shapes = dict(spatial_layers(model.module, model.preprocess))
    for name, shape in shapes.items():
        mark = ("*" if name == default else " ") + ("s" if name in stages else " ")
        click.echo(f"{mark} {name:<48} {'x'.join(map(str, shape[1:]))}")
    if len(shapes[default]) == 3:
        click.echo("(tokens: the default is the last LayerNorm whose patch tokens still get a "
                   "gradient; after the last block's attention only the class token does)")


def _detector_layers(arch: str) -> None:
    """``layers`` for a detector: its backbone's layers, an FPN's maps level by level."""
    from .models import load_detector
    from .tasks.detect import detector_layers

    with redirect_stdout(sys.stderr):
        model = load_detector(arch, "none")
    side = model.preprocess.input_size[0]
    click.echo(f"{arch} on a {side}x{side} image; * marks detect's default target layer (every map "
               "the heads read, folded into one CAM)")
    for name, shapes in detector_layers(model):
        listed = ", ".join("x".join(map(str, shape)) for shape in shapes)
        click.echo(f"{'*' if name == 'backbone' else ' '}  {name:<48} {listed}")


@main.command()
def methods() -> None:
    """List the explanation methods --method accepts, with what each one computes."""
    from .methods import DEFAULT_METHODS, DESCRIPTIONS, METHODS

    for name in METHODS:
        default = " (default)" if name in DEFAULT_METHODS else ""
        click.echo(f"{name:<15} {DESCRIPTIONS[name]}{default}")


@main.command()
@click.option("--task", type=click.Choice(("classify", "segment", "detect")), default="classify",
              show_default=True, help="The classifiers (classify, compare-layers, evaluate, embed), the "
                                      "segmentation networks (segment) or the detectors (detect).")
def architectures(task: str) -> None:
    """List the torchvision names --arch accepts (also timm/NAME, hf/PATH_OR_ID, module:...)."""
    from .models import ARCHITECTURES, DETECTORS, SEGMENTERS

    click.echo("\n".join({"segment": SEGMENTERS, "detect": DETECTORS}.get(task, ARCHITECTURES)))
    if task == "classify":
        click.echo("also: timm/NAME (any name timm.list_models() gives), hf/PATH_OR_ID (a Hugging Face "
                   "image classifier), module:PACKAGE.MODULE:FACTORY (your own network); "
                   "segmentation networks: --task segment; detectors: --task detect", err=True)


def parse_region(text: str | None) -> tuple[int, ...] | None:
    """--region x0,y0,x1,y1 as four integers (the library checks their order)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise ArgumentError("region", text, "four non-negative integers x0,y0,x1,y1 (pixels of the "
                            "original image)")
    return tuple(int(p) for p in parts)


@main.command(epilog=EXIT_CODES)
@model_options
@image_options
@skip_option
@click.option("--class-id", "class_ids", multiple=True, type=click.IntRange(min=0),
              help="Explain this class instead of every predicted one; repeatable.")
@click.option("--class-name", "class_names", multiple=True, metavar="NAME",
              help="Explain the class of this name (person, __background__); repeatable.")
@click.option("--region", metavar="X0,Y0,X1,Y1",
              help="Sum each class's logits over this box of the original image (x1, y1 just "
                   "outside) instead of over its predicted pixels.")
@click.option("--region-mask", metavar="FILE",
              help="Sum each class's logits over this mask instead (an image of each input's "
                   "size; nonzero = inside).")
@layer_option
@method_option
def segment(arch: str, weights: str, num_classes: int | None, labels: str | None, unsafe_load: bool,
            cuda: bool | None, layer: str | None, methods: tuple[str, ...], class_ids: tuple[int, ...],
            class_names: tuple[str, ...], region: str | None, region_mask: str | None,
            **options: object) -> None:
    """Explain a segmentation network (fcn_*, deeplabv3_*, lraspp_*): a row per predicted class."""
    from .methods import DEFAULT_METHODS
    from .models import load_segmenter
    from .tasks.segment import check_methods, region_of, segment_layer
    from .tasks.segment import segment as segment_images

    methods = methods or DEFAULT_METHODS
    check_methods(methods)
    box = parse_region(region)
    region_of(box, region_mask)  # a bad region or unreadable mask is refused before the model loads

    def start(model: LoadedModel, _items: list) -> Callable[..., Iterator[dict]]:
        chosen = segment_layer(model, layer)
        if layer is None:
            click.echo(f"gradcam: target layer {chosen} (default for {model.arch}; change with --layer)",
                       err=True)
        return partial(segment_images, layer=chosen, methods=methods, class_ids=class_ids,
                       class_names=class_names, region=box, region_mask=region_mask)
    load = preprocessed(partial(load_segmenter, arch, weights, num_classes, labels, unsafe_load,
                                pick_device(cuda)), arch, weights)
    run_images(load, start, report=_print_segmented, **options)


def _print_segmented(record: dict) -> None:
    """An image's explained classes: pixel share, masked logit sum, id and name."""
    click.echo(f"{quoted(record['image'])}  ({record['arch']} @ {record['layer']})")
    for c in record["classes"]:
        click.echo(f"  {c['rank']:>2}  {c['pixel_share']:7.1%}  {c['score']:12.4g}  {c['class_id']:>3}  "
                   f"{c['name']}")
    for c in record["skipped_classes"]:
        click.echo(f"  skipped {c['class_id']} {c['name']}: {c['reason']}")
    click.echo(f"  -> {record['grid']}")


@main.command(epilog=EXIT_CODES)
@detector_options
@image_options
@skip_option
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Explain the detections scoring at least this.")
@click.option("--max-detections", type=click.IntRange(min=1), default=10, show_default=True,
              help="Explain at most this many detections per image, best first.")
@click.option("--class-id", "class_ids", multiple=True, type=click.IntRange(min=0),
              help="Explain only detections of this class; repeatable.")
@click.option("--class-name", "class_names", multiple=True, metavar="NAME",
              help="Explain only detections of the class of this name (dog, person); repeatable.")
@click.option("--layer", help="Target layer (default: backbone, every feature map the heads read, folded).")
@click.option("--method", "methods", multiple=True, callback=split_methods,
              help="Maps to compute, comma-separated or repeated (default: gradcam,eigencam).")
def detect(arch: str, weights: str, num_classes: int | None, labels: str | None, unsafe_load: bool,
           cuda: bool | None, layer: str | None, methods: tuple[str, ...], class_ids: tuple[int, ...],
           class_names: tuple[str, ...], score_threshold: float, max_detections: int,
           **options: object) -> None:
    """Explain a detector's detections (fasterrcnn_*, retinanet_*, fcos_*, ssd*): a row per box."""
    from .models import load_detector
    from .tasks.detect import DETECT_DEFAULT, check_methods
    from .tasks.detect import detect as detect_images

    methods = methods or DETECT_DEFAULT
    check_methods(methods)

    def start(_model: LoadedModel, _items: list) -> Callable[..., Iterator[dict]]:
        return partial(detect_images, layer=layer, methods=methods, score_threshold=score_threshold,
                       max_detections=max_detections, class_ids=class_ids, class_names=class_names)
    load = partial(load_detector, arch, weights, num_classes, labels, unsafe_load, pick_device(cuda))
    run_images(load, start, report=_print_detected, **options)


def _print_detected(record: dict) -> None:
    """An image's explained detections: score, box, id and name."""
    click.echo(f"{quoted(record['image'])}  ({record['arch']} @ {record['layer']})")
    for d in record["detections"]:
        box = ",".join(f"{v:.0f}" for v in d["box"])
        click.echo(f"  {d['rank']:>2}  {d['score']:7.4f}  [{box}]  {d['class_id']:>3}  {d['name']}")
    if not record["detections"]:
        click.echo(f"  no detection scoring at least {record['score_threshold']:g}")
    click.echo(f"  -> {record['grid']}")
