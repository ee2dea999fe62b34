"""Model outputs that are not a plain tensor are explained exactly like the plain one."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from gradcam_cli import explain
from gradcam_cli.engine import logits_of
from gradcam_cli.errors import ArgumentTypeError
from gradcam_cli.evaluation import evaluate
from gradcam_cli.models import LoadedModel
from gradcam_cli.preprocess import Preprocess
from gradcam_cli.proxies import embed_images

Pair = namedtuple("Pair", "logits aux")
WRAPS = {
    "tuple": lambda y: (y, y.detach() * 0 + 1),   # (logits, aux), as inception in training mode
    "list": lambda y: [y, y.sum()],
    "namedtuple": lambda y: Pair(y, y * 2),
    "dict": lambda y: {"aux": y * 3, "logits": y},
    "model_output": lambda y: ImageClassifierOutput(logits=y),
}


class Wrapped(nn.Module):
    """A small CNN whose forward returns its logits wrapped in another structure."""

    def __init__(self, wrap: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.wrap = wrap

    def forward(self, x: torch.Tensor) -> object:
        y = self.head(self.features(x))
        return y if self.wrap is None else WRAPS[self.wrap](y)


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_a_wrapped_output_gives_the_plain_maps(wrap: str) -> None:
    x = torch.randn(2, 3, 12, 16)
    plain = explain(Wrapped(None), x, "features", topk=2, methods=["vanilla", "gradcam", "scorecam"])
    wrapped = explain(Wrapped(wrap), x, "features", topk=2, methods=["vanilla", "gradcam", "scorecam"])
    assert torch.equal(plain.scores, wrapped.scores) and torch.equal(plain.classes, wrapped.classes)
    for method in plain.maps:
        assert plain.maps[method].abs().max() > 0
        assert torch.equal(plain.maps[method], wrapped.maps[method]), method


def test_logits_of_each_kind() -> None:
    y = torch.randn(2, 4)
    for wrap in WRAPS.values():
        assert logits_of(wrap(y)) is y
    assert logits_of(y) is y


@pytest.mark.parametrize("output", [None, "text", {"scores": torch.zeros(1)}, (), 3.0])
def test_an_output_without_logits_is_a_clear_error(output: object) -> None:
    with pytest.raises(ArgumentTypeError, match="model output") as info:
        logits_of(output)
    assert type(output).__name__ in info.value.problem


def as_loaded(wrap: str | None) -> LoadedModel:
    """Wrapped(wrap) as a LoadedModel taking 12x16 images in [0, 1]."""
    preprocess = Preprocess((12, 16), (0.0,) * 3, (1.0,) * 3)
    return LoadedModel("wrapped", Wrapped(wrap).eval(), list("abcd"), preprocess, "none")


def test_evaluate_and_embeddings_read_wrapped_outputs(tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(image)
    numbers = {}
    for wrap in (None, "model_output"):
        (record,) = evaluate(as_loaded(wrap), [image], tmp_path / str(wrap), layer="features",
                             methods=["gradcam"], steps=2)
        assert record["status"] == "ok", record
        numbers[wrap] = record["classes"][0]["metrics"]
        embedded = embed_images(as_loaded(wrap), [image], 1)
        assert torch.equal(embedded, embed_images(as_loaded(None), [image], 1))
    assert numbers[None] == numbers["model_output"]


class CountsTrain(nn.Sequential):
    """A network that counts calls of its ``train`` (``eval`` is ``train(False)``)."""

    calls = 0

    def train(self, mode: bool = True) -> CountsTrain:
        CountsTrain.calls += 1
        return super().train(mode)


def test_evaluating_a_model_already_in_eval_mode_changes_nothing() -> None:
    from gradcam_cli.engine import evaluating
    model = CountsTrain(nn.Linear(2, 2), nn.ReLU()).eval()
    CountsTrain.calls = 0
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert CountsTrain.calls == 0  # a call per forward pass costs ~1 ms on resnet50: none when not needed


def test_evaluating_puts_a_training_model_in_eval_mode_and_back() -> None:
    from gradcam_cli.engine import evaluating
    model = CountsTrain(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Dropout()))
    model[1].eval()
    model[1][1].train()
    before = [m.training for m in model.modules()]
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
