"""Metrics on cases whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from gradcam_cli import metrics as MT


def one_pixel_model(r: int, c: int, weight: float = 4.0):
    """A two-class model whose first logit is ``weight`` times one input value, the other 0:
    only pixel (r, c) of channel 0 matters."""
    def score(batch: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([weight * batch[:, 0, r, c], torch.zeros(len(batch))], dim=1)
        return logits.softmax(dim=1)[:, 0]
    return score


def test_deletion_and_insertion_of_a_one_pixel_model_by_hand() -> None:
    image, zero = torch.ones(3, 8, 8), torch.zeros(3, 8, 8)
    score = one_pixel_model(2, 5)
    p0 = float(torch.sigmoid(torch.tensor(4.0)))
    best = torch.zeros(8, 8)
    best[2, 5] = 1  # the map that points at the one pixel that matters
    steps = 4
    deletion = MT.perturbation_curve(score, image, best, zero, steps, insert=False)
    insertion = MT.perturbation_curve(score, image, best, zero, steps, insert=True)
    assert torch.allclose(deletion, torch.tensor([p0, 0.5, 0.5, 0.5, 0.5]))
    assert torch.allclose(insertion, torch.tensor([0.5, p0, p0, p0, p0]))
    assert MT.auc(deletion) == pytest.approx(((p0 + 0.5) / 2 + 3 * 0.5) / 4)
    assert MT.auc(insertion) == pytest.approx(((0.5 + p0) / 2 + 3 * p0) / 4)
    worst = 1 - best  # the pixel that matters comes last
    late = MT.perturbation_curve(score, image, worst, zero, steps, insert=False, batch_size=2)
    assert torch.allclose(late, torch.tensor([p0, p0, p0, p0, 0.5]))
    assert MT.auc(late) > MT.auc(deletion)


def test_a_constant_model_has_flat_curves_and_no_drop() -> None:
    def score(batch: torch.Tensor) -> torch.Tensor:
        return torch.full((len(batch),), 0.3)
    image, saliency = torch.randn(3, 6, 6), torch.rand(6, 6)
    for insert in (False, True):
        curve = MT.perturbation_curve(score, image, saliency, torch.zeros_like(image), 6, insert)
        assert torch.allclose(curve, torch.full((7,), 0.3)) and MT.auc(curve) == pytest.approx(0.3)
    original = float(score(image[None])[0])
    assert MT.confidence_change(score, image, saliency, original) == (0.0, False)


def test_steps_remove_equal_shares_of_pixels_most_salient_first() -> None:
    seen = []
    image = torch.ones(3, 4, 4)
    MT.perturbation_curve(lambda b: seen.append(b.clone()) or torch.zeros(len(b)), image,
                          torch.arange(16.0).view(4, 4), torch.zeros_like(image), 4, insert=False)
    removed = (seen[0][:, 0] == 0).sum(dim=(1, 2)).tolist()
    assert removed == [0, 4, 8, 12, 16]
    assert (seen[0][1, 0, 3] == 0).all() and (seen[0][1, 0, :3] == 1).all()  # last row first


def test_confidence_drop_is_divided_by_the_original_score() -> None:
    def score(batch: torch.Tensor) -> torch.Tensor:
        return batch[:, 0].mean(dim=(1, 2))  # the mean of channel 0
    image, half = torch.ones(3, 4, 4), torch.zeros(4, 4)
    half[:2] = 7.0  # min-max normalised: rows 0-1 weight 1, rows 2-3 weight 0
    assert MT.confidence_change(score, image, half, 1.0) == (pytest.approx(0.5), False)
    assert MT.confidence_change(score, image, half, 2.0) == (pytest.approx(0.75), False)
    assert MT.confidence_change(score, image, half, 0.25) == (0.0, True)  # an increase


def test_pointing_game_with_the_exact_mask_and_the_tolerance() -> None:
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[10:20, 10:20] = True
    assert MT.pointing_hit(mask.float(), mask, 15) is True
    assert MT.energy_in(mask.float(), mask) == pytest.approx(1.0)
    off = torch.zeros(64, 64)
    off[19, 30] = 1  # 11 px right of the object's last column
    assert MT.pointing_hit(off, mask, 15) is True and MT.pointing_hit(off, mask, 10) is False
    assert MT.energy_in(off, mask) == 0.0
    spread = torch.ones(64, 64)
    assert MT.energy_in(spread, mask) == pytest.approx(100 / 4096)
    empty = torch.zeros(64, 64, dtype=torch.bool)
    assert MT.pointing_hit(off, empty, 15) is None and MT.energy_in(off, empty) is None


def test_spearman_agrees_with_scipy_including_ties() -> None:
    a = torch.tensor([[0.0, 0.0, 1.0], [2.0, 2.0, 5.0], [0.0, 3.0, 1.0]])
    b = torch.tensor([[1.0, 0.0, 0.0], [4.0, 2.0, 5.0], [0.0, 3.0, 9.0]])
    expected = stats.spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
    assert MT.spearman(a, b) == pytest.approx(expected)
    assert MT.spearman(a, -a) == pytest.approx(-1.0)
    assert MT.spearman(a, torch.zeros(3, 3)) is None


def test_saliency_and_baselines() -> None:
    gradient = torch.tensor([[[1.0, -3.0]], [[-2.0, 0.5]], [[0.0, 0.0]]])  # 3x1x2
    assert MT.saliency_of(gradient).tolist() == [[2.0, 3.0]]
    assert MT.saliency_of(torch.tensor([[[0.2, -0.1]]])).tolist() == [[pytest.approx(0.2), 0.0]]
    image = torch.stack([torch.full((16, 16), v) for v in (1.0, 2.0, 3.0)])
    assert torch.allclose(MT.baseline_of(image, "blur"), image)  # blurring a constant
    ramp = torch.arange(75.0).view(3, 5, 5)
    assert torch.allclose(MT.baseline_of(ramp, "mean")[:, 0, 0], ramp.mean(dim=(1, 2)))
    assert not MT.baseline_of(ramp, "zero").any()
