"""Score-CAM and Ablation-CAM: per-channel class scores from extra forward passes, in batches.

Both return, for one image, a CxK table: the logits of all K classes with each of the target
layer's C channels perturbed, so that every explained class is served by the same passes.

- Score-CAM masks the input with each channel's upsampled, min-max normalised activation;
  channels that are constant give an all-zero mask, whose score is computed once.
- Ablation-CAM zeroes one channel of the target layer's output. The layers before the target
  run once: every module that finished before the target layer started replays its recorded
  output (``replayed_prefix``), so a batch of ablated channels costs only the layers after it.
"""

from __future__ import annotations

import gc
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from tqdm import tqdm

from .engine import evaluating, logits_of, run_model
from .layout import Layout, to_nchw
from .methods import upsample


def chunks(indices: torch.Tensor, size: int, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    """Split indices (channels, window positions) into batches, with a progress bar when asked."""
    parts = list(indices.split(max(1, size)))
    yield from tqdm(parts, desc=desc, unit="batch", leave=False, disable=not progress)


def score_logits(fast: nn.Module, image: torch.Tensor, activations: torch.Tensor, layout: Layout,
                 batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Logits of ``image`` (1x3xHxW) masked by each channel of ``activations`` (of ``layout``):
    a CxK table.

    ``fast`` is the model prepared once by ``inference_copy`` and reused for every image;
    masks are upsampled a batch at a time, never all at once.
    """
    acts = to_nchw(activations, layout)[0].float()              # C x h x w
    flat = acts.flatten(1)
    varies = flat.amax(1) > flat.amin(1)                        # NaN counts as constant
    varying, constant = varies.nonzero()[:, 0], (~varies).nonzero()[:, 0]
    image = image.contiguous(memory_format=torch.channels_last)
    rows: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        if len(constant):  # an all-zero mask: one pass serves every constant channel
            blank = run_model(fast, torch.zeros_like(image))[0]
            rows.update({int(c): blank for c in constant})
        for chunk in chunks(varying, batch_size, "scorecam", progress):
            masks = upsample(acts[chunk], tuple(image.shape[-2:]))    # B x 1 x H x W
            low = masks.amin(dim=(2, 3), keepdim=True)
            masks = (masks - low) / (masks.amax(dim=(2, 3), keepdim=True) - low)
            rows.update(zip(chunk.tolist(), run_model(fast, image * masks), strict=True))
    return torch.stack([rows[c] for c in range(len(acts))]).float()


def inference_copy(module: nn.Module) -> nn.Module:
    """An eval-mode copy of the model for many forward passes: batch norms folded into the
    convolutions before them (torch.fx; skipped for models it cannot trace) and weights in
    channels-last order, which oneDNN runs faster on CPU. Logits agree to float rounding."""
    copy = deepcopy(module).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copy = fuse(copy, inplace=True)
    except Exception:  # any tracing failure: keep the unfused copy
        pass
    copy = copy.to(memory_format=torch.channels_last)
    gc.collect()  # tracing leaves reference cycles holding the unfused weights: free them now
    return copy


def shared_graph(module: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """The model's own torch.fx graph, its modules and weights shared, not copied: for
    occlusion, whose reuse of the unoccluded prefix needs a graph, and whose peak a copy of the
    weights would raise by the model's size. Call it, and run it, with the model in eval mode.

    The module itself when it cannot be traced (a hook or forward that needs real values) or
    when the graph's logits for ``inputs`` differ from the module's (a hook whose effect the
    trace fixed at one call)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.symbolic_trace(module)
        with torch.inference_mode():
            same = torch.allclose(logits_of(graph(inputs)), logits_of(module(inputs)), rtol=1e-5, atol=1e-6)
    except Exception:  # any tracing failure: the module as it is
        return module
    return graph if same else module


def ablation_logits(module: nn.Module, layer: nn.Module, image: torch.Tensor, layout: Layout,
                    batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Logits of ``image`` (1x3xHxW) with each channel of ``layer``'s output (of ``layout``)
    zeroed: a CxK table."""
    axis = layout.channel_axis
    with torch.inference_mode(), evaluating(module):
        with replayed_prefix(module, layer, image) as (output, logits):
            if _replays_correctly(module, layer, image, output, logits):
                return _ablate(module, layer, image, output, axis, batch_size, progress, repeat=False)
        return _ablate(module, layer, image, output, axis, batch_size, progress, repeat=True)


def _ablate(module: nn.Module, layer: nn.Module, image: torch.Tensor, output: torch.Tensor, axis: int,
            batch_size: int, progress: bool, repeat: bool) -> torch.Tensor:
    """Run the batches of outputs with channels (``axis``) zeroed; ``repeat`` feeds a full input
    per ablated copy."""
    rows = []
    for chunk in chunks(torch.arange(output.shape[axis]), batch_size, "ablationcam", progress):
        ablated = output.repeat_interleave(len(chunk), dim=0)
        index: list[slice | torch.Tensor] = [slice(None)] * output.dim()
        index[0], index[axis] = torch.arange(len(chunk)), chunk
        ablated[tuple(index)] = 0
        inputs = image.expand(len(chunk), -1, -1, -1) if repeat else image
        rows.append(_run_with_output(module, layer, inputs, ablated))
    return torch.cat(rows).float()


def _run_with_output(module: nn.Module, layer: nn.Module, image: torch.Tensor,
                     output: torch.Tensor) -> torch.Tensor:
    """Run ``module`` with ``layer`` returning ``output`` (a batch) instead of computing."""
    with _forwards({layer: lambda *_a, **_k: output}):
        return run_model(module, image)


@contextmanager
def _forwards(replacements: dict[nn.Module, Callable[..., torch.Tensor]]) -> Iterator[None]:
    """Give modules these instance ``forward``s, then put back exactly what each had before
    (its own instance ``forward``, the very same object, or none)."""
    own = {m: vars(m)["forward"] for m in replacements if "forward" in vars(m)}
    for m, forward in replacements.items():
        vars(m)["forward"] = forward
    try:
        yield
    finally:
        for m in replacements:
            if m in own:
                vars(m)["forward"] = own[m]
            else:
                del vars(m)["forward"]


def _replays_correctly(module: nn.Module, layer: nn.Module, image: torch.Tensor,
                       output: torch.Tensor, logits: torch.Tensor) -> bool:
    """Check that replaying the prefix with a batch of two unablated copies gives the logits.

    A model whose code after the target layer mixes the batch with tensors from before it
    (e.g. concatenating along the batch) fails this, and is then run on repeated inputs.
    """
    try:
        again = _run_with_output(module, layer, image, output.repeat_interleave(2, dim=0))
    except RuntimeError:
        return False
    return again.shape == (2, *logits.shape[1:]) and torch.allclose(again, logits.expand(2, -1),
                                                                     rtol=1e-4, atol=1e-5)


@contextmanager
def replayed_prefix(module: nn.Module, layer: nn.Module,
                    image: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run once; then let each module that ran once, before ``layer``, replay its output.

    Yields the layer's output and the logits of that run. Outputs are recorded as copies when
    produced and handed out as copies, so in-place operations downstream change nothing; when
    a module finishes, the copies of the modules inside it are dropped, since its own replays
    them all, so memory holds only the outermost finished modules' outputs.
    """
    recorded: dict[nn.Module, torch.Tensor] = {}
    calls: Counter[nn.Module] = Counter()
    seen: dict[str, torch.Tensor] = {}
    names = {m: name for name, m in module.named_modules()}

    def record(m: nn.Module, _i: object, out: object) -> None:
        calls[m] += 1
        if m is layer:
            seen["output"] = out.clone()
        elif "output" not in seen and isinstance(out, torch.Tensor):
            inside = names[m] + "."
            for inner in [d for d in recorded if names[d].startswith(inside)]:
                del recorded[inner]
            recorded[m] = out.clone()

    handles = [m.register_forward_hook(record) for m in module.modules() if m is not module]
    try:
        logits = run_model(module, image)
    finally:
        for h in handles:
            h.remove()
    replay = {m: lambda *_a, _out=out, **_k: _out.clone() for m, out in recorded.items() if calls[m] == 1}
    with _forwards(replay):
        yield seen["output"], logits
