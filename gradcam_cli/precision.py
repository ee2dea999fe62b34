"""Mixed precision: the model's forward passes under autocast, everything after them in fp32.

``Precision("bf16")`` runs each of a method's forward passes (and so the backward passes that
retrace them) under ``torch.autocast``: convolutions and matrix products in bfloat16 (or
float16 on CUDA), as people run inference on accelerators. The logits, the layer activations
and the gradients are cast to float32 where the methods take them (``engine.run_model``,
``engine.ForwardPass``), so every map is computed and normalised in float32. Only the
explained passes change: ``evaluate``'s deletion and insertion curves score in float32, so
their numbers compare maps, not precisions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .choices import PRECISIONS
from .errors import ArgumentError, unknown

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# (device type, dtype) of the explained forward passes now running; None: float32
_AUTOCAST: ContextVar[tuple[str, torch.dtype] | None] = ContextVar("gradcam_autocast", default=None)


@dataclass(frozen=True)
class Precision:
    """The precision of the explained forward passes: fp32 (default), bf16 or fp16 (CUDA only)."""

    precision: str = "fp32"

    def __post_init__(self) -> None:
        """Refuse an unknown precision, naming it."""
        if self.precision not in PRECISIONS:
            raise unknown("precision", self.precision, PRECISIONS)

    def used_by(self, _methods: Sequence[str]) -> bool:
        """Kept in records only when not fp32, so that fp32 runs' records stay as they were."""
        return self.precision != "fp32"

    def to_dict(self) -> dict:
        """As records and the resume check keep it."""
        return {"precision": self.precision}

    @contextmanager
    def autocasting(self, device: torch.device) -> Iterator[None]:
        """Run the explained forward passes on ``device`` in this precision until exit; fp16 on
        a CPU is refused (its CPU kernels are slow and inexact: use bf16)."""
        if self.precision == "fp16" and device.type != "cuda":
            raise ArgumentError("precision", "fp16", f"runs on CUDA only, and this model is on the "
                                f"{device.type}; use bf16 on the CPU")
        token = _AUTOCAST.set((device.type, DTYPES[self.precision]) if self.precision in DTYPES else None)
        try:
            yield
        finally:
            _AUTOCAST.reset(token)


@contextmanager
def forward_precision() -> Iterator[None]:
    """Autocast one forward pass when a reduced precision is running (``Precision.autocasting``)."""
    current = _AUTOCAST.get()
    if current is None:
        yield
        return
    with torch.autocast(current[0], dtype=current[1]):
        yield


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """A bfloat16 or float16 tensor as float32; any other as it is (float64 models stay exact)."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


def reduced() -> bool:
    """Whether the explained passes now run in a reduced precision."""
    return _AUTOCAST.get() is not None
