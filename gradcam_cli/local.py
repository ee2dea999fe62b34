"""Occlusion's passes without recomputing what a window leaves unchanged.

A window changes the input only inside itself. Through local operations (convolutions,
pooling, batch norms, pointwise activations, element-wise sums and products) only a box of
each intermediate map changes: the window grown by each layer's reach. ``Reuse`` runs the
leading local part of the model's torch.fx graph (the *prefix*, up to a *cut* where one
tensor carries everything onward) once on the unoccluded image; for a batch of windows it
recomputes each prefix node only on its changed box, each operation reading its input box
from the unoccluded map with the window's changed box pasted in (so padding is the real
padding, never a crop's), splices the cut's boxes into copies of its unoccluded map and runs
the rest of the network on that batch.

The cut is where the estimated cost (multiply-adds of the boxes, plus copying) is lowest;
reuse is used only when it saves at least ``MIN_SAVING`` of the full passes. Callers check a
few windows against full passes before trusting it (``window_drops``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .engine import logits_of

MIN_SAVING = 0.15   # reuse only when the estimate saves at least this share of the passes
COPY_COST = 8       # multiply-adds one copied element is worth, in the cost estimate
BOX_COST = 1.15     # a multiply-add on a batch of boxes, against one on whole maps (smaller convolutions)
POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid,
                     nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout,
                     nn.BatchNorm2d)
POINTWISE_FUNCTIONS = (torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardswish, F.hardsigmoid,
                       F.silu, F.gelu, torch.tanh, F.leaky_relu)
BINARY_FUNCTIONS = (operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub)


@contextmanager
def counting(module: nn.Module) -> Iterator[list[int]]:
    """Collect the multiply-adds per image of every convolution and linear layer that runs."""
    macs: list[int] = []

    def count(m: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor) and out.dim() > 1:
            per_output = (m.in_channels // m.groups * m.weight[0, 0].numel() if isinstance(m, nn.Conv2d)
                          else m.in_features)
            macs.append(out[0].numel() * per_output)
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        yield macs
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Window:
    """A sliding-window operation on both spatial axes: kernel, stride, padding, dilation, and
    the function that applies it to an already padded region."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pad_value: float
    apply: Callable[[torch.Tensor], torch.Tensor]
    macs: int  # per output position
    counted: bool = False  # whether ``counting`` counts it (convolutions)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    """An int or a pair as a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _window(m: nn.Module) -> Window | None:
    """The window of a convolution or pooling module whose padding can be taken out, else None."""
    kind = type(m)
    if kind is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        weight, bias, stride, dilation, groups = m.weight, m.bias, m.stride, m.dilation, m.groups
        return Window(_pair(m.kernel_size), _pair(stride), _pair(m.padding), _pair(dilation), 0.0,
                      lambda x: F.conv2d(x, weight, bias, stride, 0, dilation, groups),
                      m.in_channels // groups * weight[0, 0].numel(), counted=True)
    if kind is nn.MaxPool2d and not m.ceil_mode and not m.return_indices:
        kernel, stride, dilation = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.dilation)
        return Window(kernel, stride, _pair(m.padding), dilation, float("-inf"),
                      lambda x: F.max_pool2d(x, kernel, stride, 0, dilation), kernel[0] * kernel[1])
    if kind is nn.AvgPool2d and not m.ceil_mode and (m.count_include_pad or not any(_pair(m.padding))):
        kernel, stride = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
        return Window(kernel, stride, _pair(m.padding), (1, 1), 0.0,
                      lambda x: F.avg_pool2d(x, kernel, stride, 0, divisor_override=m.divisor_override),
                      kernel[0] * kernel[1])
    return None


@dataclass
class Step:
    """One prefix node: ``kind`` input, window, pointwise or binary; ``args`` the node's
    arguments (nodes or numbers); where its box sits for every window, and the box's size."""

    node: fx.Node
    kind: str
    args: tuple
    apply: Callable[..., torch.Tensor] | None = None
    window: Window | None = None
    at: torch.Tensor | None = None          # windows x 2: top, left of the box
    size: tuple[int, int] = (0, 0)


def _step(gm: fx.GraphModule, node: fx.Node) -> Step | None:
    """The node as a local step, or None when it is not one this module knows to be local."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        batch_statistics = type(m) is nn.BatchNorm2d and (m.training or m.running_mean is None)
        if len(node.args) != 1 or node.kwargs or batch_statistics or (type(m) is nn.Dropout and m.training):
            return None
        window = _window(m)
        if window is not None:
            return Step(node, "window", node.args, window=window)
        if type(m) in POINTWISE_MODULES:
            copy = getattr(m, "inplace", False) and len(node.args[0].users) > 1  # others read the input
            return Step(node, "pointwise", node.args, apply=lambda x, m=m: m(x.clone() if copy else x))
        return None
    if node.op != "call_function":
        return None
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    constants_only = all(isinstance(a, (int, float, bool, fx.Node)) for a in node.args)
    one_tensor = len(tensors) == 1 and node.args[0] is tensors[0]
    if node.target in POINTWISE_FUNCTIONS and one_tensor and constants_only:
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        if all(isinstance(v, (int, float, bool, str)) for v in kwargs.values()):
            rest = node.args[1:]
            return Step(node, "pointwise", node.args[:1],
                        apply=lambda x, f=node.target: f(x, *rest, **kwargs))
    two_args = len(node.args) == 2 and not node.kwargs
    if node.target in BINARY_FUNCTIONS and two_args and constants_only and tensors:
        return Step(node, "binary", node.args, apply=node.target)
    return None


class Recorder(fx.Interpreter):
    """Runs the leading steps of a graph, keeping a copy of the outputs that are ``read`` (later
    nodes may change them in place) and the shape of the others, and stops after the last."""

    def __init__(self, gm: fx.GraphModule, steps: dict[fx.Node, Step], read: set[fx.Node]) -> None:
        super().__init__(gm)
        self.steps, self.read, self.base = steps, read, {}

    def run_node(self, n: fx.Node) -> object:
        """Run one node; keep a copy of a step's output, or its shape on the meta device."""
        result = super().run_node(n)
        if n in self.steps:
            if isinstance(result, torch.Tensor):
                self.base[n] = result.clone() if n in self.read else result.to("meta")
            else:
                self.base[n] = result
            if len(self.base) == len(self.steps):
                raise StopIteration
        return result


def _leading_steps(gm: fx.GraphModule) -> list[Step]:
    """The graph's one input and the local steps that follow it, up to the first other node."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return []
    steps = [Step(placeholders[0], "input", ())]
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        step = _step(gm, node)
        if step is None:
            break
        steps.append(step)
    return steps


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    """Ceiling of a / b, element-wise."""
    return -torch.div(-a, b, rounding_mode="floor")


def _fixed(low: torch.Tensor, high: torch.Tensor, length: int) -> tuple[torch.Tensor, int]:
    """One box size for every window, covering [low, high] (inclusive) of each inside
    [0, length): the size and each box's start."""
    size = int(min(length, max(1, int((high - low + 1).max()))))
    return low.clamp(min=0).clamp(max=length - size), size


def _place(step: Step, steps: dict[fx.Node, Step], shape: torch.Size) -> None:
    """Set the step's boxes from its inputs' boxes (every window at once)."""
    ins = [steps[a] for a in step.args if isinstance(a, fx.Node)]
    if step.kind == "pointwise":
        step.at, step.size = ins[0].at, ins[0].size
        return
    starts, sizes = [], []
    for axis in (0, 1):
        length = shape[2 + axis]
        if step.kind == "window":
            w, box = step.window, ins[0]
            k, s, p, d = w.kernel[axis], w.stride[axis], w.padding[axis], w.dilation[axis]
            low = _ceil_div(box.at[:, axis] + p - d * (k - 1), s).clamp(min=0)
            high = torch.div(box.at[:, axis] + box.size[axis] - 1 + p, s, rounding_mode="floor")
            high = high.clamp(max=length - 1)
        else:
            low = torch.stack([b.at[:, axis] for b in ins]).amin(0)
            high = torch.stack([b.at[:, axis] + b.size[axis] - 1 for b in ins]).amax(0)
        start, size = _fixed(low, torch.maximum(high, low), length)
        starts.append(start)
        sizes.append(size)
    step.at, step.size = torch.stack(starts, 1), (sizes[0], sizes[1])


def _cost(step: Step, base: dict[fx.Node, torch.Tensor]) -> tuple[float, float]:
    """Estimated work of one step per window (boxes, with copying) and the multiply-adds of a
    full pass that ``counting`` counts for it."""
    out = base[step.node]
    channels, area = out.shape[1], out.shape[2] * out.shape[3]
    box = step.size[0] * step.size[1]
    if step.kind == "window":
        w, inputs = step.window, base[step.args[0]].shape[1]
        read = math.prod((n - 1) * s + k for n, s, k in zip(step.size, w.stride, w.kernel, strict=True))
        return (BOX_COST * channels * box * w.macs + COPY_COST * inputs * read,
                channels * area * w.macs * w.counted)
    copies = sum(isinstance(a, fx.Node) for a in step.args) if step.kind == "binary" else 1
    return channels * box * COPY_COST * (1 + copies), 0.0


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """An NxCxHxW tensor as (N*H*W)xC rows: a view when it is channels-last."""
    return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])


def _gather(base: torch.Tensor, size: tuple[int, int], region_at: torch.Tensor,
            crops: torch.Tensor | None = None, crop_at: torch.Tensor | None = None,
            pad_value: float = 0.0) -> torch.Tensor:
    """B regions of ``size`` cut from ``base`` (1xCxHxW) at ``region_at`` (Bx2; they may reach
    past its edges, which read ``pad_value``), each with its window's crop (BxCxhxw) pasted at
    ``crop_at`` (Bx2), cut to the region; channels-last."""
    if crops is not None and crops.shape[-2:] == size and torch.equal(crop_at, region_at):
        return crops  # the crops are the regions
    height, width = base.shape[-2:]
    arange = torch.arange(max(size), device=base.device)
    rows = region_at[:, :1] + arange[:size[0]]                                  # B x h
    cols = region_at[:, 1:] + arange[:size[1]]                                  # B x w
    index = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]
    out = _rows(base).index_select(0, index.view(-1))
    outside = ((rows < 0) | (rows >= height))[:, :, None] | ((cols < 0) | (cols >= width))[:, None, :]
    if outside.any():
        out[outside.view(-1)] = pad_value
    if crops is not None:
        h, w = crops.shape[-2:]
        down = crop_at[:, :1] - region_at[:, :1] + torch.arange(h, device=base.device)      # B x h
        right = crop_at[:, 1:] - region_at[:, 1:] + torch.arange(w, device=base.device)     # B x w
        inside = ((down >= 0) & (down < size[0]))[:, :, None] & ((right >= 0) & (right < size[1]))[:, None, :]
        image = torch.arange(len(crops), device=base.device)[:, None, None]
        target = (image * size[0] + down[:, :, None]) * size[1] + right[:, None, :]
        source = _rows(crops)
        if bool(inside.all()):
            out.index_copy_(0, target.view(-1), source)
        else:
            kept = inside.view(-1).nonzero()[:, 0]
            out.index_copy_(0, target.view(-1)[kept], source.index_select(0, kept))
    return out.view(len(region_at), *size, base.shape[1]).permute(0, 3, 1, 2)


class Reuse:
    """The prefix of one model for one image and one window size: the unoccluded maps, every
    window's boxes, and the rest of the network as its own graph."""

    def __init__(self, gm: fx.GraphModule, steps: list[Step], base: dict[fx.Node, torch.Tensor],
                 image: torch.Tensor, fill: torch.Tensor, starts: torch.Tensor, patch: int) -> None:
        self.steps, self.base, self.image, self.fill = steps, base, image, fill
        self.starts, self.patch = starts, patch
        self.cut = steps[-1].node.name
        self.rest = _rest(gm, steps[-1].node)
        self.at = {s.node: s.at for s in steps}
        position = {s.node: i for i, s in enumerate(steps)}
        self.last_use = {s.node: max([position[u] for u in s.node.users if u in position], default=len(steps))
                         for s in steps}

    @classmethod
    def build(cls, fast: nn.Module, image: torch.Tensor, fill: torch.Tensor, starts: torch.Tensor,
              patch: int, total_macs: float) -> Reuse | None:
        """The cheapest reuse for windows of ``patch`` at ``starts`` (Nx2) over ``image`` (1x3xHxW,
        filled from ``fill``), or None when no prefix saves ``MIN_SAVING`` of ``total_macs``."""
        if not isinstance(fast, fx.GraphModule):
            return None
        steps = _leading_steps(fast)
        if len(steps) < 2:
            return None
        try:  # shapes only: keeping every local layer's map would raise the peak
            shapes = _record(fast, steps, image, set())
        except Exception:  # a graph the interpreter cannot replay: full passes, as without a prefix
            return None
        steps = _checked(steps, shapes)
        cut = _best_cut(steps, shapes, image, starts, patch, total_macs)
        if cut is None:
            return None
        steps = steps[:cut + 1]  # run the prefix again, keeping the maps it reads and the cut's
        base = _record(fast, steps, image, _read(steps) | {steps[-1].node})
        return cls(fast, steps, base, image, fill, starts, patch)

    def logits(self, chunk: torch.Tensor) -> torch.Tensor:
        """The logits of the windows ``chunk`` (indices into ``starts``)."""
        crops: dict[fx.Node, torch.Tensor] = {}
        for i, step in enumerate(self.steps):
            crops[step.node] = self._run(step, chunk, crops)
            for a in step.args:
                if isinstance(a, fx.Node) and self.last_use[a] == i:
                    del crops[a]
        cut = self.steps[-1]
        full = self.base[cut.node]
        spliced = _gather(full, tuple(full.shape[-2:]), torch.zeros(len(chunk), 2, dtype=torch.long),
                          crops[cut.node], cut.at[chunk])
        return logits_of(self.rest(spliced))

    def _run(self, step: Step, chunk: torch.Tensor, crops: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
        """The step's boxes for the windows ``chunk``."""
        at = step.at[chunk]
        if step.kind == "input":
            return self._occluded(chunk, step)
        if step.kind == "pointwise":
            return step.apply(crops[step.args[0]])
        size, region_at = _region(step)
        if step.kind == "window":
            arg, w = step.args[0], step.window
            return w.apply(_gather(self.base[arg], size, region_at[chunk], crops[arg], self.at[arg][chunk],
                                   w.pad_value))
        operands = [_gather(self.base[a], size, at, crops[a], self.at[a][chunk])
                    if isinstance(a, fx.Node) else a for a in step.args]
        return step.apply(*operands)

    def _occluded(self, chunk: torch.Tensor, step: Step) -> torch.Tensor:
        """The input's boxes with each window filled."""
        at = step.at[chunk]
        image = _gather(self.image, step.size, at)
        fill = _gather(self.fill.expand_as(self.image), step.size, at)
        rows = torch.arange(step.size[0]) + at[:, :1]                   # B x h, input coordinates
        cols = torch.arange(step.size[1]) + at[:, 1:]
        start = self.starts[chunk]
        inside = ((rows >= start[:, :1]) & (rows < start[:, :1] + self.patch))[:, :, None] & \
                 ((cols >= start[:, 1:]) & (cols < start[:, 1:] + self.patch))[:, None, :]
        return torch.where(inside[:, None].to(image.device), fill, image)


def _record(gm: fx.GraphModule, steps: list[Step], image: torch.Tensor,
            read: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Run the steps on the unoccluded image: the maps of ``read``, the others' shapes."""
    recorder = Recorder(gm, {s.node: s for s in steps}, read)
    try:
        recorder.run(image)
    except StopIteration:
        pass
    return recorder.base


def _region(step: Step) -> tuple[tuple[int, int], torch.Tensor]:
    """The size and the starts (one per window) of what a placed window or binary step reads
    of each argument: its input box grown by the window's reach, or its own box."""
    if step.kind != "window":
        return step.size, step.at
    w = step.window
    size = tuple((n - 1) * s + d * (k - 1) + 1
                 for n, s, d, k in zip(step.size, w.stride, w.dilation, w.kernel, strict=True))
    return size, step.at * torch.tensor(w.stride) - torch.tensor(w.padding)


def _read(steps: list[Step]) -> set[fx.Node]:
    """The nodes whose unoccluded maps the placed steps read: arguments of a sliding window or a
    binary operation whose changed box is not all the step reads (a 1x1 convolution's input
    and a sum's widest operand are not: their boxes are the regions, ``_gather``'s shortcut)."""
    box = {s.node: s for s in steps}
    read = set()
    for step in steps:
        if step.kind not in ("window", "binary"):
            continue
        size, at = _region(step)
        read |= {a for a in step.args if isinstance(a, fx.Node)
                 and (box[a].size != size or not torch.equal(box[a].at, at))}
    return read


def _checked(steps: list[Step], base: dict[fx.Node, torch.Tensor]) -> list[Step]:
    """The leading steps whose outputs are one image's 4-D maps, whose tensor arguments have the
    output's shape (no broadcasting) and whose windows slide as their settings say."""
    kept: list[Step] = []
    for step in steps:
        out = base.get(step.node)
        if any(isinstance(a, fx.Node) and a not in {k.node for k in kept} for a in step.args):
            break
        one_map = isinstance(out, torch.Tensor) and out.dim() == 4 and len(out) == 1
        if not one_map or not out.is_floating_point():
            break
        tensors = [base.get(a) for a in step.args if isinstance(a, fx.Node)]
        if step.kind in ("pointwise", "binary") and any(
                not isinstance(t, torch.Tensor) or t.shape != out.shape for t in tensors):
            break
        if step.kind == "window" and tuple(out.shape[2:]) != _slid(step.window, tensors[0].shape[2:]):
            break
        kept.append(step)
    return kept


def _slid(w: Window, size: torch.Size) -> tuple[int, ...]:
    """The output size of a sliding window over a map of ``size``, as the boxes assume it."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, w.kernel, w.stride, w.padding, w.dilation, strict=True))


def _best_cut(steps: list[Step], base: dict[fx.Node, torch.Tensor], image: torch.Tensor,
              starts: torch.Tensor, patch: int, total_macs: float) -> int | None:
    """The index of the step to cut after: one tensor crossing the cut, the lowest estimated
    cost, and a saving of at least ``MIN_SAVING``; else None."""
    by_node = {s.node: s for s in steps}
    first = steps[0]
    height, width = image.shape[-2:]
    low_r, low_c = starts[:, 0].clamp(max=height - 1), starts[:, 1].clamp(max=width - 1)
    rows = _fixed(low_r, (starts[:, 0] + patch - 1).clamp(max=height - 1), height)
    cols = _fixed(low_c, (starts[:, 1] + patch - 1).clamp(max=width - 1), width)
    first.at, first.size = torch.stack([rows[0], cols[0]], 1), (rows[1], cols[1])
    position = {n: i for i, n in enumerate(steps[0].node.graph.nodes)}
    best, best_cost, box_cost, full_cost = None, (1 - MIN_SAVING) * total_macs, 0.0, 0.0
    for i, step in enumerate(steps[1:], start=1):
        _place(step, by_node, base[step.node].shape)
        crop, full = _cost(step, base)
        box_cost, full_cost = box_cost + crop, full_cost + full
        live = [s for s in steps[:i + 1] if any(position[u] > position[step.node] for u in s.node.users)]
        if live != [step]:
            continue
        cost = box_cost + COPY_COST * base[step.node].numel() + max(0.0, total_macs - full_cost)
        if cost <= best_cost:
            best, best_cost = i, cost
    return best


def _rest(gm: fx.GraphModule, cut: fx.Node) -> fx.GraphModule:
    """The graph after ``cut`` as a module of its own taking the cut's value (sharing weights)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {cut: graph.placeholder("cut")}
    after = False
    for node in gm.graph.nodes:
        if after or node.op == "get_attr":
            env[node] = graph.node_copy(node, lambda n: env[n])
        after = after or node is cut
    return fx.GraphModule(gm, graph)
