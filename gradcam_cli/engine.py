"""One forward pass, then as many backward passes as the methods need, each under one rule.

The rules differ only at ReLU-type activations (ReLU, ReLU6, functional or module, in place
or not), which are found as nodes of the autograd graph after the forward pass:

- ``plain``: the ordinary gradient (vanilla backprop, Grad-CAM);
- ``guided``: guided backprop (Springenberg et al. 2014) — the gradient passes only where the
  forward input was positive *and* the incoming gradient is positive;
- ``deconv``: deconvnet (Zeiler & Fergus 2013) — the positive part of the incoming gradient
  passes, whatever the forward input was.

Working on graph nodes rather than modules means one forward pass serves every rule, and
``F.relu``/``torch.relu``/``Tensor.relu_`` are covered as well as ``nn.ReLU``.  Other
activations (SiLU, GELU, Hardswish, sigmoid) keep their ordinary gradient under every rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from .errors import ArgumentTypeError
from .precision import forward_precision, widened

RULES = ("plain", "guided", "deconv")
Grads = tuple[torch.Tensor | None, ...]


def _guided(grad_inputs: Grads, _grad_outputs: Grads) -> Grads:
    """Keep the masked gradient only where it is positive."""
    return tuple(None if g is None else g.clamp(min=0) for g in grad_inputs)


def _deconv(_grad_inputs: Grads, grad_outputs: Grads) -> Grads:
    """Pass the positive part of the incoming gradient, ignoring the forward mask."""
    return (grad_outputs[0].clamp(min=0),)


_RULE_HOOKS: dict[str, Callable[[Grads, Grads], Grads]] = {"guided": _guided, "deconv": _deconv}


def _is_gate(node: torch.autograd.graph.Node) -> bool:
    """Tell whether a graph node is a ReLU-type activation (ReLU, or a clamp at 0 like ReLU6)."""
    name = node.name()
    if name == "ReluBackward0":
        return True
    return name == "HardtanhBackward0" and float(node._saved_min_val) == 0.0


def relu_gates(root: torch.Tensor) -> list[torch.autograd.graph.Node]:
    """Find every ReLU-type node in the autograd graph that produced ``root``."""
    gates, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if _is_gate(node):
            gates.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return gates


def logits_of(output: object) -> torch.Tensor:
    """The logits in a forward's output, whatever wraps them: a tensor itself, the first element
    of a tuple or list (torchvision's aux outputs, namedtuples), ``logits`` of a dict or a
    Hugging Face ``ModelOutput``; anything else is refused, naming its type."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    kind = type(output).__name__
    raise ArgumentTypeError("arch", kind, f"the model output is a {kind}: neither a tensor, nor a tuple "
                            "or list starting with one, nor a dict or ModelOutput with 'logits'")


def run_model(module: nn.Module, *args: object) -> torch.Tensor:
    """The module's logits for ``args``, its forward pass in the running precision
    (``precision.Precision.autocasting``), half-precision logits widened to float32."""
    with forward_precision():
        output = module(*args)
    return widened(logits_of(output))


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and give each its own training flag back afterwards;
    a model already all in eval mode is left untouched (no ``train`` call, no attribute set:
    this runs once per forward pass, and on resnet50 the calls cost a millisecond)."""
    flags = [(m, m.training) for m in module.modules()]
    if any(flag for _, flag in flags):
        module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            if m.training != flag:
                m.training = flag


@dataclass
class ForwardPass:
    """The result of one forward pass, kept so that several backward passes can share it."""

    inputs: torch.Tensor
    logits: torch.Tensor
    activations: dict[str, torch.Tensor]

    @cached_property
    def gates(self) -> list[torch.autograd.graph.Node]:
        """The graph's ReLU-type nodes, found once and only if a modified rule is used."""
        return relu_gates(self.logits)

    def gradients(self, score: torch.Tensor, rule: str,
                  wrt: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Backpropagate ``score`` under ``rule`` to the tensors ``wrt`` (input, layer outputs);
        half-precision gradients widened to float32."""
        hook = _RULE_HOOKS.get(rule)
        if hook is None and rule != "plain":
            raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
        handles = [g.register_hook(hook) for g in self.gates] if hook else []
        try:
            grads = torch.autograd.grad(score, list(wrt), retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        return [widened(torch.zeros_like(t) if g is None else g) for g, t in zip(grads, wrt, strict=True)]


@contextmanager
def forward_pass(module: nn.Module, inputs: torch.Tensor, layers: dict[str, nn.Module],
                 graph: bool = True) -> Iterator[ForwardPass]:
    """Run the model once in eval mode, keeping the named layers' outputs (and, with ``graph``,
    the autograd graph that backward passes need).

    The layer hooks are removed and training flags restored on exit, also after an exception;
    gradients are taken with ``torch.autograd.grad``, so parameters' ``.grad`` stay untouched.
    """
    activations: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m: nn.Module, _i: object, out: object) -> object:
            if not isinstance(out, torch.Tensor):
                return None  # left out of ``activations``; the caller reports it
            activations[name] = out
            return out.clone()  # an in-place op downstream must not overwrite what we keep
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        with evaluating(module), torch.set_grad_enabled(graph):
            x = inputs.detach().requires_grad_(graph)
            logits = run_model(module, x)
            yield ForwardPass(x, logits, activations)
    finally:
        for h in handles:
            h.remove()
