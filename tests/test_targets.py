"""Targets: the paper's reduction to classification, and dot/cosine scores against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from gradcam_cli import explain
from gradcam_cli.methods import DEFAULT_METHODS
from gradcam_cli.targets import top_proxies


def test_one_hot_proxy_on_logits_gives_the_classification_maps() -> None:
    """Bachhawat 2024: with the logits as embedding and a one-hot proxy e_c, y·e_c is the
    logit of class c, so every map equals classify's map for class c."""
    model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 64, 64)
    c = 7
    as_embedding = explain(model, x, "layer4", methods=DEFAULT_METHODS,
                           target=top_proxies(F.one_hot(torch.tensor([c]), 1000).float(), "dot", 1))
    as_class = explain(model, x, "layer4", class_ids=[c], methods=DEFAULT_METHODS)
    assert as_embedding.classes.tolist() == [[0], [0]]
    for method in DEFAULT_METHODS:
        assert torch.equal(as_embedding.maps[method], as_class.maps[method]), method


@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_similarity_gradients_match_autograd_of_the_formula(kind: str) -> None:
    model, x = torchvision.models.resnet18(num_classes=16).eval(), torch.randn(1, 3, 64, 64)
    proxy = torch.randn(1, 16)
    result = explain(model, x, "layer4", topk=1, methods=["vanilla"],
                     target=top_proxies(proxy, kind, 1))
    x_grad = x.clone().requires_grad_(True)
    y = model(x_grad)[0]
    p = proxy[0]
    score = y @ p if kind == "dot" else (y @ p) / (y.norm() * p.norm())
    (expected,) = torch.autograd.grad(score, x_grad)
    assert torch.allclose(result.maps["vanilla"][0, 0], expected[0], rtol=1e-4, atol=1e-7)
    assert torch.allclose(result.scores[0, 0], score.detach(), rtol=1e-5)


def test_dot_and_cosine_give_different_gradients() -> None:
    model, x = torchvision.models.resnet18(num_classes=16).eval(), torch.randn(1, 3, 64, 64)
    proxy = torch.randn(1, 16)
    maps = [explain(model, x, "layer4", topk=1, methods=["vanilla"],
                    target=top_proxies(proxy, kind, 1)).maps["vanilla"] for kind in ("dot", "cosine")]
    cosine = F.cosine_similarity(maps[0].flatten(), maps[1].flatten(), dim=0)
    assert cosine < 0.999  # not merely a rescaling of the same gradient


def test_invalid_candidates_rank_last_and_are_never_chosen_first() -> None:
    proxies = torch.eye(3)
    valid = torch.tensor([[True, False, True]])
    target = top_proxies(proxies, "dot", 2, valid)(torch.tensor([[0.0, 5.0, 1.0]]))
    assert target.chosen.tolist() == [[2, 0]] and target.table[0, 1] == float("-inf")
