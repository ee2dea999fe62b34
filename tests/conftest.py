"""Shared fixtures: no test may download, models are small and randomly initialised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that would fetch weights from the network."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("tests must never download")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", refuse)
    monkeypatch.setattr("torch.hub.download_url_to_file", refuse)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A small JPEG copy of the sample cat, quick to decode."""
    path = tmp_path / "cat.jpg"
    Image.open(SAMPLES / "chelsea.png").convert("RGB").resize((256, 170)).save(path, quality=90)
    return path


def make_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Path:
    """Write a deterministic gradient image in ``mode`` to ``path``."""
    h, w = size[1], size[0]
    ramp = np.linspace(0, 255, w * h).reshape(h, w)
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 128)], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).convert(mode).save(path)
    return path


def copy_batch_sizes(monkeypatch: pytest.MonkeyPatch, owner: object,
                     factory: str = "inference_copy") -> list[int]:
    """The batch sizes, in order, that the modules made through ``owner.<factory>`` (a module
    that imported ``inference_copy`` or ``shared_graph``) are given."""
    sizes, make = [], getattr(owner, factory)

    def counted(*args: object) -> torch.nn.Module:
        fast = make(*args)
        fast.register_forward_pre_hook(lambda _m, inputs: sizes.append(len(inputs[0])))
        return fast
    monkeypatch.setattr(owner, factory, counted)
    return sizes
