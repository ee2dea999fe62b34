"""Class proxies: normalised mean and single exemplar by hand, and the query left out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradcam_cli.errors import UsageError
from gradcam_cli.proxies import Candidates, Exemplars, normalised_mean, single_proxy

EMBEDDINGS = torch.tensor([[3.0, 4.0], [0.0, 2.0], [2.0, 0.0]])
# normalised: (.6, .8), (0, 1), (1, 0); mean (1.6/3, 1.8/3) = (.5333, .6); its norm √.6444 = .8028
MEAN = torch.tensor([0.5333333 / 0.8027730, 0.6 / 0.8027730])


def test_normalised_mean_by_hand() -> None:
    assert torch.allclose(normalised_mean(EMBEDDINGS), MEAN, atol=1e-6)
    assert torch.allclose(normalised_mean(EMBEDDINGS * torch.tensor([[1.0], [7.0], [0.1]])), MEAN,
                          atol=1e-6)  # the exemplars' lengths do not matter


def test_single_proxy_is_the_most_typical_exemplar() -> None:
    # cosines to the mean: .6·.6644 + .8·.7474 = .9965; .7474; .6644 → the first exemplar
    assert torch.allclose(single_proxy(EMBEDDINGS), torch.tensor([0.6, 0.8]))


def exemplars() -> Exemplars:
    """Class a: the three embeddings above; class b: one exemplar."""
    return Exemplars(["a", "b"], torch.tensor([0, 0, 0, 1]),
                     torch.cat([EMBEDDINGS, torch.tensor([[-1.0, 1.0]])]),
                     [str(Path(f"/x/{n}.png").resolve()) for n in ("a1", "a2", "a3", "b1")])


def test_a_query_is_left_out_of_its_own_class() -> None:
    candidates = Candidates.from_exemplars(exemplars())
    vectors, valid = candidates.for_images([Path("/x/a1.png"), Path("/x/b1.png"), Path("/y/q.png")])
    assert torch.allclose(vectors[2, 0], MEAN, atol=1e-6)          # a stranger: all exemplars
    assert torch.allclose(vectors[0, 0], normalised_mean(EMBEDDINGS[1:]))  # a1 left out
    assert torch.allclose(vectors[0, 1], vectors[2, 1])             # other classes unchanged
    assert valid.tolist() == [[True, True], [True, False], [True, True]]  # b had only b1


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = exemplars().save(tmp_path / "p.pt", "resnet18", "none")
    loaded = Exemplars.load(path, "resnet18")
    assert loaded.names == ["a", "b"] and torch.equal(loaded.embeddings, exemplars().embeddings)
    with pytest.raises(UsageError, match="built with --arch resnet18"):
        Exemplars.load(path, "vgg11")
    with pytest.raises(UsageError, match="not a file from"):
        Exemplars.load(Path(__file__), "resnet18")
