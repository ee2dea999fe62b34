"""A long run: memory stays flat and no hook is left behind (marked soak: pytest -m soak)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradcam_cli import classify, load_model

from .conftest import make_image


def resident_mb() -> float:
    """This process's resident memory in MB, from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


@pytest.mark.soak
def test_thousand_images_keep_memory_flat(tmp_path: Path) -> None:
    source = make_image(tmp_path / "src.png", size=(96, 80))
    images = [source] * 1000  # same pixels, but every record and file set is produced anew
    model = load_model("mobilenet_v3_small", "none")
    rss = {}
    for n, record in enumerate(classify(model, images, tmp_path / "out", topk=1,
                                        methods=["gradcam"], batch_size=8), start=1):
        assert record["status"] == "ok"
        if n in (100, 1000):
            rss[n] = resident_mb()
    growth = rss[1000] - rss[100]
    print(f"resident memory: {rss[100]:.0f} MB at image 100, {rss[1000]:.0f} MB at 1000, "
          f"growth {growth:.1f} MB")
    assert growth < 50
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.module.modules())
