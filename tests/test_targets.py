"""Targets: the paper's reduction to classification, and dot/cosine scores against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from gradcam_cli import explain
from gradcam_cli.methods import DEFAULT_METHODS
from gradcam_cli.targets import top_classes, top_proxies

from .scenes import PATTERN, scenes

SIZE = 40


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


class TinyEmbedder(torch.nn.Module):
    """Three convolutions, global max pooling, a linear map to 16 dimensions."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.features = torch.nn.Sequential(conv(3, 16, 3, padding=1), torch.nn.ReLU(),
                                            conv(16, 32, 3, padding=1, stride=2), torch.nn.ReLU(),
                                            conv(32, 32, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


def test_trained_embedding_pair_maps_peak_on_the_shared_object() -> None:
    """Train a metric network (normalised-softmax proxies) on generated scenes in seconds; for
    pairs sharing an object at different places on different backgrounds, each side's
    Grad-CAM of y·y' must peak on its object (within 3 px). Seeds are fixed; measured 40/40
    hits here, the test asks for 36/40."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net, proxies = TinyEmbedder(), torch.nn.Parameter(torch.randn(4, 16))
    optimiser = torch.optim.Adam([*net.parameters(), proxies], lr=3e-3)
    for _ in range(150):
        x, y, _ = scenes(32, g)
        logits = 10 * F.normalize(net(x), dim=1) @ F.normalize(proxies, dim=1).T
        loss = F.cross_entropy(logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    hits = 0
    for _ in range(20):
        x, _, where = scenes(2, g, torch.randint(0, 4, (1,), generator=g).repeat(2))
        with torch.no_grad():
            embeddings = net(x)
        for side in (0, 1):
            result = explain(net, x[side:side + 1], "features", methods=["gradcam"],
                             target=top_proxies(embeddings[1 - side][None], "dot", 1))
            r, c = divmod(int(result.maps["gradcam"][0, 0, 0].argmax()), SIZE)
            top, left = where[side].tolist()
            hits += top - 3 <= r < top + PATTERN + 3 and left - 3 <= c < left + PATTERN + 3
    assert hits >= 36, f"{hits}/40 pair maps peak on the shared object"


@pytest.mark.parametrize("call,message", [
    (lambda m, x: explain(m, x, "layer4", class_ids=[5000]), "class_ids=5000: outside 0..999"),
    (lambda m, x: explain(m, x, "layer4", topk=0), "topk=0: must be between 1 and 1000"),
    (lambda m, x: explain(m, x, "layer4", methods=["gradcampp"]),
     "methods='gradcampp': unknown method; did you mean gradcam"),
    (lambda m, x: explain(m, x, "layer4", methods="gradcam"),
     "methods='gradcam': a sequence of method names"),
    (lambda m, x: explain(m, x, "layer4", class_ids=285), "class_ids=285: a sequence of class ids"),
    (lambda m, x: top_proxies(torch.eye(3), "euclid"),
     "similarity='euclid': unknown similarity; choose from dot, cosine"),
    (lambda m, x: top_proxies(torch.eye(3), "dot", 0), "topk=0: must be at least 1"),
])
def test_bad_arguments_are_value_errors_naming_the_python_argument(call, message: str) -> None:
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError) as caught:
        call(model, x)
    assert str(caught.value).startswith(message) and "--" not in str(caught.value)
    assert isinstance(caught.value, TypeError) == ("a sequence" in message)


def test_top_classes_rank_near_tied_logits_by_the_logits() -> None:
    """Logits 2e-8 apart round to misordered float32 probabilities; the classes are still the
    three largest logits, in their order."""
    logits = torch.zeros(1, 1000)
    logits[0, [765, 132, 743]] = torch.tensor([6e-8, 4e-8, 2e-8])
    assert logits.softmax(dim=1).topk(3).indices.tolist() != [[765, 132, 743]]  # what misled it
    assert top_classes(topk=3)(logits).chosen.tolist() == [[765, 132, 743]]
