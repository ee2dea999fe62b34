"""The library's core call: explain a batch of inputs for chosen or top-k targets."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import fullgrad as FG
from . import methods as M
from . import paths as PA
from . import perturb as P
from . import refine as R
from .engine import ForwardPass, evaluating, forward_pass
from .errors import ArgumentError, ArgumentTypeError, UsageError, unknown
from .layout import Layout, to_nchw
from .models import find_layer, layer_layout
from .occlusion import OcclusionSettings, occlusion_maps
from .precision import widened
from .rise import RiseSettings, draw, rise_maps
from .settings import MethodSettings, check_settings
from .targets import Chooser, Target, top_classes

if TYPE_CHECKING:
    import numpy
    from matplotlib.figure import Figure


@dataclass
class Explanation:
    """Maps for a batch: ``maps[method]`` is NxKxCxHxW for candidate ``classes[n, k]`` of image n
    (occlusion with several patch sizes gives ``maps["occlusion-P"]``, one per size).

    ``scores`` (NxC) holds every candidate's value: class probabilities for a classifier,
    similarities to every proxy or reference for an embedding network.
    """

    scores: torch.Tensor
    classes: torch.Tensor
    maps: dict[str, torch.Tensor]
    layer: str
    gates: int | None  # ReLU-type activations found; None when no guided/deconv map was asked
    errors: list[str | None] = field(default_factory=list)  # per image: why it has no maps
    predicted: list[tuple[int, float]] | None = None  # per image: top-1 class and its score
    completeness: torch.Tensor | None = None  # NxK, Integrated Gradients: Σ attributions - (S(x) - S(x'))
    inputs: torch.Tensor | None = None  # the explained batch, for pictures when no crops are known
    pictures: list | None = None  # per image: the crop the model saw (HxWx3 or HxW uint8), if known
    names: list[str] | None = None  # candidate names, if known
    symbol: str = "p"  # how a score is labelled: p, 1-p, logit, -logit; s (similarity)

    def grid(self, image: int) -> numpy.ndarray:
        """One image's labelled grid, as ``classify`` writes it (``outputs.notebook``)."""
        from .outputs import notebook
        return notebook.grid(self, image)

    def labels(self, image: int) -> list[str]:
        """One image's row labels: each class's name (or id) and score."""
        from .outputs import notebook
        return notebook.labels(self, image)

    def plot(self, image: int | None = None) -> Figure:
        """A matplotlib Figure of one image's grid (every image's, stacked, by default)."""
        from .outputs import notebook
        return notebook.figure(self, image)

    def show(self, image: int | None = None) -> None:
        """Display the grid: inline in IPython/Jupyter, else in the system's image viewer."""
        from .outputs import notebook
        notebook.show(self, image)

    def _repr_png_(self) -> bytes:
        """Jupyter's picture of the explanation: every image's grid."""
        from .outputs import notebook
        return notebook.png(self)


class ZeroGradientError(ArgumentError):
    """The explained scores' gradient is zero at every position of a layer, for every image."""


ZERO_GRADIENT = ("the explained score's gradient is zero at every position of this layer (its "
                 "output does not reach the score: it comes after the last use of the features, "
                 "or only a class token is used, or the score does not depend on the input)")


def explain(module: nn.Module, inputs: torch.Tensor, layer: str, topk: int = 3,
            class_ids: Sequence[int] = (), methods: Sequence[str] = M.DEFAULT_METHODS,
            batch_size: int = 32, progress: bool = False,
            target: Chooser | None = None, settings: MethodSettings | None = None) -> Explanation:
    """One forward pass for the batch, then per class only the backward passes ``methods`` need.

    The explained scores are the top-k (or ``class_ids``) logits, or what ``target`` chooses
    (e.g. ``targets.top_proxies`` for an embedding network). Score-CAM, Ablation-CAM and
    occlusion add forward passes per image, ``batch_size`` perturbed copies at a time (with
    progress bars when ``progress``); one set of passes serves every class. ``settings`` holds
    the settings of the methods that take any (default ``MethodSettings()``), e.g. occlusion's
    patches, stride, fill and border; with several patch sizes occlusion's maps are named
    occlusion-P, one per size.
    """
    return explain_layers(module, inputs, [layer], topk, class_ids, methods, batch_size,
                          progress, target, settings)[0]


def check_methods(methods: Sequence[str]) -> None:
    """Refuse anything but a sequence of known method names: the one check of ``methods``."""
    if isinstance(methods, str):
        raise ArgumentTypeError("methods", methods, f"a sequence of method names, e.g. [{methods!r}]")
    for name in methods:
        if name not in M.METHODS:
            raise unknown("methods", name, M.METHODS, "method")


def explain_layers(module: nn.Module, inputs: torch.Tensor, layers: Sequence[str], topk: int = 3,
                   class_ids: Sequence[int] = (), methods: Sequence[str] = M.DEFAULT_METHODS,
                   batch_size: int = 32, progress: bool = False, target: Chooser | None = None,
                   settings: MethodSettings | None = None) -> list[Explanation]:
    """``explain`` for several layers at once: the forward pass and each class's backward
    passes are shared, so gradient CAMs for every layer cost no more passes than for one
    (and layer-independent maps are computed once). With ``settings.precision`` bf16 or fp16
    every forward pass runs under autocast and the maps are computed in float32."""
    check_methods(methods)
    settings = check_settings(settings)
    with settings.precision.autocasting(inputs.device):
        return _explained(module, inputs, layers, target or top_classes(topk, class_ids), methods,
                          batch_size, progress, settings)


def _explained(module: nn.Module, inputs: torch.Tensor, layers: Sequence[str], choose: Chooser,
               methods: Sequence[str], batch_size: int, progress: bool,
               settings: MethodSettings) -> list[Explanation]:
    """``explain_layers`` once its arguments are checked and its precision set."""
    modules = {name: find_layer(module, name) for name in layers}
    layouts = {name: layer_layout(module, name, inputs) for name in layers}
    biases = FG.bias_layers(module) if "fullgrad" in methods else {}
    clean = PA.unsmoothed(methods, settings.smooth)  # the maps of the clean input's backward passes
    graph = bool(biases) or any(M.REGISTRY_BY_NAME[m].backpropagates for m in clean)
    with forward_pass(module, inputs, {**biases, **modules}, graph) as fp:
        missing = [name for name in layers if name not in fp.activations]
        if missing:
            raise UsageError(f"--layer {missing[0]} did not produce a tensor in the forward pass; "
                             "choose one listed by `gradcam layers`")
        chosen = choose(fp.logits.detach())
        k = chosen.chosen.shape[1]
        scores = chosen.score(fp.logits)  # NxK, one graph shared by every backward pass
        ranks, dead = zip(*[_explain_class(fp, scores[:, r], layers, clean, layouts,
                                           settings.cam.eigen_smooth) for r in range(k)], strict=True)
        full = (torch.stack([FG.fullgrad_map(fp, scores[:, r], biases) for r in range(k)], dim=1)
                if biases else None)
        errors = _errors(list(dead), layers, len(inputs))
        gates = len(fp.gates) if {"guided", "deconv", "guided-gradcam"} & set(methods) else None
        acts = {name: widened(fp.activations[name].detach()) for name in layers}
        outputs = fp.logits.detach()
    del fp, scores  # the graph's saved activations must not stay under the perturbation passes' peak
    size = tuple(inputs.shape[-2:])
    occluded = (_occlusion(module, inputs, chosen, settings.occlusion, batch_size, progress)
                if "occlusion" in methods else {})
    risen = ({"rise": _rise(module, inputs, chosen, settings.rise, batch_size, progress)}
             if "rise" in methods else {})
    integrated = (PA.integrated_gradients(module, inputs, chosen, settings.ig, batch_size, progress, outputs)
                  if "integrated-gradients" in methods else None)
    smoothed = (_smoothed(module, inputs, modules, layers, methods, layouts, chosen, settings, batch_size,
                          progress) if settings.smooth.used_by(methods) else {})
    results = []
    for name in layers:
        maps = {m: torch.stack([r[name, m] for r in ranks], dim=1) for m in methods
                if (name, m) in ranks[0]}
        if "eigencam" in methods:  # class-agnostic: one map per image, shown for every class
            eigen = M.cam("eigencam", acts[name], None, size, layouts[name])[:, None]
            maps["eigencam"] = eigen.expand(-1, k, -1, -1, -1).clone()
        for method in M.PERTURBATION_CAMS:
            if method in methods:
                maps[method] = _perturbation_cam(method, module, modules[name], inputs, acts[name],
                                                 layouts[name], outputs, chosen, batch_size, progress,
                                                 settings.cam.eigen_smooth)
        if full is not None:
            maps["fullgrad"] = full
        maps.update(occluded)
        maps.update(risen)
        maps.update({m: smooth for (layer, m), smooth in smoothed.items() if layer == name})
        if integrated is not None:
            maps["integrated-gradients"] = integrated[0]
        names = [n for m in methods for n in (settings.occlusion.names() if m == "occlusion" else [m])]
        results.append(Explanation(chosen.table, chosen.chosen, {n: maps[n] for n in names},
                                   name, gates, errors, chosen.predicted,
                                   completeness=None if integrated is None else integrated[1],
                                   inputs=inputs.detach(), symbol=chosen.symbol))
    return _aug_smooth(results, module, inputs, layers, methods, batch_size, chosen, settings)


def _aug_smooth(results: list[Explanation], module: nn.Module, inputs: torch.Tensor, layers: Sequence[str],
                methods: Sequence[str], batch_size: int, target: Target,
                settings: MethodSettings) -> list[Explanation]:
    """With ``aug_smooth``, each CAM the mean of its min-max normalised maps over the augmented
    copies (``refine``), mapped back; every copy explains the classes chosen on the clean input."""
    smoothed = R.aug_smoothed(methods)
    if not (settings.cam.aug_smooth and smoothed):
        return results
    once = replace(settings, cam=replace(settings.cam, aug_smooth=False))
    totals = [{m: R.minmax(r.maps[m]) for m in smoothed} for r in results]
    for flip, factor in R.AUGMENTATIONS[1:]:
        copies = explain_layers(module, R.augment(inputs, flip, factor), layers, methods=smoothed,
                                batch_size=batch_size, target=lambda _logits: target, settings=once)
        for total, copy in zip(totals, copies, strict=True):
            for m in smoothed:
                total[m] += R.minmax(R.restore(copy.maps[m], flip))
    for total, result in zip(totals, results, strict=True):
        result.maps.update({m: t / len(R.AUGMENTATIONS) for m, t in total.items()})
    return results


def _occlusion(module: nn.Module, inputs: torch.Tensor, target: Target, settings: OcclusionSettings,
               batch_size: int, progress: bool) -> dict[str, torch.Tensor]:
    """Occlusion's maps (one per patch size), from passes on the model's own graph in eval mode:
    no copy of the weights, so the peak stays below captum's (``perturb.shared_graph``)."""
    with evaluating(module):
        graph = P.shared_graph(module, inputs.detach())
        try:
            return occlusion_maps(graph, inputs.detach(), target, settings, batch_size, progress)
        finally:  # a torch.fx graph sits in reference cycles: free it now, not later
            del graph
            gc.collect()


def _rise(module: nn.Module, inputs: torch.Tensor, target: Target, settings: RiseSettings,
          batch_size: int, progress: bool) -> torch.Tensor:
    """RISE's maps, NxKx1xHxW, from passes on the fast inference copy."""
    drawn = draw(settings, (inputs.shape[-2], inputs.shape[-1]))  # checks the cell before the copy
    fast = P.inference_copy(module)
    try:
        return rise_maps(fast, inputs.detach(), target, settings, drawn, batch_size, progress)
    finally:  # a torch.fx copy sits in reference cycles: free it now, not later
        del fast
        gc.collect()


def _smoothed(module: nn.Module, inputs: torch.Tensor, modules: dict[str, nn.Module], layers: Sequence[str],
              methods: Sequence[str], layouts: dict[str, Layout], target: Target,
              settings: MethodSettings, batch_size: int, progress: bool) -> dict:
    """Per (layer, method), NxKx… SmoothGrad maps of the gradient methods: each image's noisy
    copies run through the clean input's passes, for the classes chosen on the clean input;
    input gradients alone run on the model's gradient copy (``paths.on_gradient_copy``)."""
    def maps_of(copies: torch.Tensor, rows: torch.Tensor) -> dict:
        with forward_pass(module, copies, modules) as fp:
            scores = PA.rows_of(target, rows).score(fp.logits)
            ranks = [_explain_class(fp, scores[:, r], layers, methods, layouts,
                                    settings.cam.eigen_smooth)[0] for r in range(scores.shape[1])]
        return {key: torch.stack([r[key] for r in ranks], dim=1) for key in ranks[0]}

    def input_gradients(fast: nn.Module) -> dict:
        def run(copies: torch.Tensor, rows: torch.Tensor) -> dict:
            with forward_pass(fast, copies.contiguous(memory_format=torch.channels_last), {}) as fp:
                scores = PA.rows_of(target, rows).score(fp.logits)
                return {m: torch.stack([fp.gradients(s.sum(), M.GRADIENT_METHODS[m], [fp.inputs])[0]
                                        for s in scores.T], dim=1) for m in smoothed}
        maps = PA.smooth(run, inputs, settings.smooth, batch_size, progress)
        return {(name, m): value for m, value in maps.items() for name in layers}
    smoothed = [m for m in methods if m in PA.smoothed_methods()]
    if all(m in M.GRADIENT_METHODS for m in smoothed):
        return PA.on_gradient_copy(module, input_gradients)
    return PA.smooth(maps_of, inputs, settings.smooth, batch_size, progress)


def _explain_class(fp: ForwardPass, scores: torch.Tensor, layers: Sequence[str], methods: Sequence[str],
                   layouts: dict[str, Layout], eigen_smooth: bool = False
                   ) -> tuple[dict[tuple[str, str], torch.Tensor], dict[str, torch.Tensor]]:
    """The gradient maps for one score per image, keyed by (layer, method), and per layer which
    images have no gradient there; each backward pass is run once and shared by every layer
    (input-gradient maps are the same for all layers). ``eigen_smooth``: the CAMs' terms
    projected on their first principal component (``refine``)."""
    score = scores.sum()  # images are independent in eval mode, so one backward serves all
    size = tuple(fp.inputs.shape[-2:])
    wanted = set(methods) | ({"guided", "gradcam"} if "guided-gradcam" in methods else set())
    inputs: dict[str, torch.Tensor] = {}
    cams = [m for m in M.GRADIENT_CAMS if m in wanted]
    plain = [fp.inputs] * ("vanilla" in wanted) + [fp.activations[n] for n in layers] * bool(cams)
    maps: dict[tuple[str, str], torch.Tensor] = {}
    dead: dict[str, torch.Tensor] = {}
    if plain:  # one plain backward pass serves vanilla backprop and every gradient CAM
        grads = fp.gradients(score, "plain", plain)
        if "vanilla" in wanted:
            inputs["vanilla"] = grads.pop(0)
        for name, layer_grads in zip(layers if cams else [], grads, strict=True):
            dead[name] = _zero_gradient(layer_grads, layouts[name])
            acts = widened(fp.activations[name].detach())
            maps.update({(name, m): M.cam(m, acts, layer_grads, size, layouts[name], eigen_smooth)
                         for m in cams})
    for method in ("guided", "deconv"):
        if method in wanted:
            (inputs[method],) = fp.gradients(score, M.GRADIENT_METHODS[method], [fp.inputs])
    for name in layers:
        maps.update({(name, m): g for m, g in inputs.items()})
        if "guided-gradcam" in wanted:
            maps[name, "guided-gradcam"] = M.guided_gradcam(inputs["guided"], maps[name, "gradcam"])
    return {key: value.detach() for key, value in maps.items() if key[1] in methods}, dead


def _perturbation_cam(method: str, module: nn.Module, layer: nn.Module, inputs: torch.Tensor,
                      acts: torch.Tensor, layout: Layout, outputs: torch.Tensor, target: Target,
                      batch_size: int, progress: bool, eigen_smooth: bool = False) -> torch.Tensor:
    """Score-CAM or Ablation-CAM maps, NxKx1xHxW, from one table of outputs per image (a row
    per perturbed channel) turned into the K explained scores."""
    size = tuple(inputs.shape[-2:])
    images = []
    fast = P.inference_copy(module) if method == "scorecam" else None  # one copy per batch
    for i in range(len(inputs)):
        image, act = inputs[i:i + 1].detach(), acts[i:i + 1]
        if fast is not None:
            table = target.score(P.score_logits(fast, image, act, layout, batch_size, progress), i)
            weights = table.softmax(dim=0)  # softmax over channels, per explained score
        else:
            table = target.score(P.ablation_logits(module, layer, image, layout, batch_size, progress), i)
            original = target.score(outputs[i:i + 1].float(), i)[0]
            weights = (original - table) / original
        images.append(torch.cat([M.weighted_cam(act, w[None], size, layout, eigen_smooth)
                                 for w in weights.T]))
    if fast is not None:  # a torch.fx copy sits in reference cycles: free it now, not later
        del fast
        gc.collect()
    return torch.stack(images)


def _zero_gradient(grads: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Per image: is the spatial gradient at this layer identically zero (a blank map)?"""
    return ~to_nchw(grads, layout).flatten(1).any(dim=1)


def _errors(ranks: list[dict[str, torch.Tensor]], layers: Sequence[str], n: int) -> list[str | None]:
    """Per image, why its CAMs would be blank; a layer dead for every image refuses the batch."""
    errors: list[str | None] = [None] * n
    for name in layers:
        flags = [r[name] for r in ranks if name in r]
        dead = torch.stack(flags).any(dim=0).tolist() if flags else [False] * n
        if all(dead):
            raise ZeroGradientError("layers" if len(layers) > 1 else "layer", name,
                                    ZERO_GRADIENT + "; choose an earlier layer from `gradcam layers`")
        for i in (i for i, d in enumerate(dead) if d and errors[i] is None):
            errors[i] = f"layer {name}: {ZERO_GRADIENT} for this image; its CAMs would be blank"
    return errors
