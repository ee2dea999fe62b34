"""Class proxies: normalised mean and single exemplar by hand, and the query left out."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gradcam_cli.errors import UsageError
from gradcam_cli.models import LoadedModel, load_embedder
from gradcam_cli.pipeline import embed
from gradcam_cli.proxies import Candidates, Exemplars, normalised_mean, read_exemplars, single_proxy

from .conftest import make_image

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


@pytest.fixture(scope="module")
def embedder() -> LoadedModel:
    return load_embedder("resnet18", "none")


def test_save_and_load_round_trip(tmp_path: Path, embedder: LoadedModel) -> None:
    path = exemplars().save(tmp_path / "p.pt", embedder)
    loaded = Exemplars.load(path, embedder)
    assert loaded.names == ["a", "b"] and torch.equal(loaded.embeddings, exemplars().embeddings)


@pytest.mark.parametrize("change,named", [
    ({"weights": "trained.pt", "weights_sha256": "0" * 64}, "weights"),
    ({"head": "linear to 8"}, "head"),  # built without --embedding-dim, used with it
    ({"arch": "resnet34"}, "arch"),
])
def test_a_proxy_file_for_another_model_is_refused(tmp_path: Path, embedder: LoadedModel,
                                                   change: dict, named: str) -> None:
    path = exemplars().save(tmp_path / "p.pt", embedder)
    with pytest.raises(UsageError, match=rf"built with {named} .*, not .*; rebuild it"):
        Exemplars.load(path, replace(embedder, **change))


def bad_calls(tmp: Path, model: LoadedModel) -> list[tuple[Callable[[], object], str]]:
    """Library calls with one bad argument, and how their error must begin."""
    saved = exemplars().save(tmp / "p.pt", model)
    make_image(tmp / "ex" / "a" / "a.png")
    (tmp / "ex" / "b").mkdir()
    (tmp / "empty").mkdir()
    return [
        (lambda: Exemplars.load(tmp / "none.pt", model), f"proxy_file='{tmp}/none.pt': no such file"),
        (lambda: Exemplars.load(Path(__file__), model),
         f"proxy_file='{__file__}': not an exemplar file"),
        (lambda: Exemplars.load(saved, replace(model, arch="vgg11")),
         f"proxy_file='{saved}': built with arch 'resnet18', not 'vgg11'"),
        (lambda: Candidates.from_exemplars(exemplars(), "typical"),
         "proxy_kind='typical': unknown proxy kind; choose from mean, single"),
        (lambda: read_exemplars(None, tmp / "none"), f"proxy_dir='{tmp}/none': not a folder"),
        (lambda: read_exemplars(None, tmp / "empty"), f"proxy_dir='{tmp}/empty': no class sub-folders"),
        (lambda: read_exemplars(None, tmp / "ex"), f"proxy_dir='{tmp}/ex': class folder b has no images"),
    ]


def test_bad_arguments_are_value_errors_naming_the_python_argument(tmp_path: Path,
                                                                  embedder: LoadedModel) -> None:
    for call, message in bad_calls(tmp_path, embedder):
        with pytest.raises(UsageError) as caught:
            call()
        assert isinstance(caught.value, ValueError)
        assert str(caught.value).startswith(message) and "--" not in str(caught.value), message


@pytest.mark.parametrize("kwargs,message", [
    ({"similarity": "euclid"}, "similarity='euclid': unknown similarity; choose from dot, cosine"),
    ({"topk": 0}, "topk=0: must be at least 1"),
])
def test_embed_refuses_bad_arguments_before_any_image(tmp_path: Path, kwargs: dict,
                                                      message: str) -> None:
    model = load_embedder("resnet18", "none")
    candidates = Candidates(["a", "b"], torch.eye(2, 512))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        embed(model, [tmp_path / "missing.png"], candidates, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
