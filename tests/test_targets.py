"""Targets: the paper's reduction to classification, and dot/cosine scores against autograd."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from gradcam_cli import classify, explain
from gradcam_cli.classes import read_targets
from gradcam_cli.errors import InputError
from gradcam_cli.evaluation import evaluate
from gradcam_cli.methods import DEFAULT_METHODS
from gradcam_cli.models import LoadedModel
from gradcam_cli.preprocess import Preprocess
from gradcam_cli.targets import Scoring, image_classes, top_classes, top_proxies

from .conftest import make_image
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


class OneOutput(torch.nn.Module):
    """x (1x1x2x2) → 1x1 conv to 2 channels [w=1, w=-1] → ReLU → mean pool → linear [1, 3]:
    a one-output head (binary classifier or regression), small enough to compute by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1, bias=False)
        self.fc = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 3.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


X = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
# By hand: R0 = relu(x) = [[1,0],[3,0]], R1 = relu(-x) = [[0,2],[0,0]]; output z = 1·1 + 3·0.5 = 2.5.
# Negative side S = -z: dS/dR0 = -1/4, dS/dR1 = -3/4 everywhere; masks R0>0 [[1,0],[1,0]], R1>0 [[0,1],[0,0]].
NEGATIVE_VANILLA = [[-0.25, 0.75], [-0.25, 0.0]]  # -0.25·mask0 + (-0.75)·(-1)·mask1
# Grad-CAM at conv: α0 = mean(-0.25·mask0) = -0.125, α1 = mean(-0.75·mask1) = -0.1875;
# relu(-0.125·x + 0.1875·x) = relu(0.0625·x). The positive side: relu(-0.0625·x).
NEGATIVE_CAM = [[0.0625, 0.0], [0.1875, 0.0]]
POSITIVE_CAM = [[0.0, 0.125], [0.0, 0.0]]


def test_negative_explains_minus_the_output_of_a_one_output_head() -> None:
    """--negative: the maps of -z, computed by hand; reported score sigmoid(-z) = 1 - sigmoid(z)."""
    negative = explain(OneOutput(), X, "conv", methods=["vanilla", "gradcam"],
                       target=top_classes(1, scoring=Scoring("sigmoid", negative=True)))
    positive = explain(OneOutput(), X, "conv", methods=["vanilla", "gradcam"],
                       target=top_classes(1, scoring=Scoring("sigmoid")))
    assert negative.classes.tolist() == [[0]]
    assert torch.allclose(negative.maps["vanilla"][0, 0, 0], torch.tensor(NEGATIVE_VANILLA))
    assert torch.allclose(positive.maps["vanilla"][0, 0, 0], -torch.tensor(NEGATIVE_VANILLA))
    assert torch.allclose(negative.maps["gradcam"][0, 0, 0], torch.tensor(NEGATIVE_CAM))
    assert torch.allclose(positive.maps["gradcam"][0, 0, 0], torch.tensor(POSITIVE_CAM))
    assert negative.scores[0, 0].item() == pytest.approx(1 - 1 / (1 + math.exp(-2.5)))
    assert positive.scores[0, 0].item() == pytest.approx(1 / (1 + math.exp(-2.5)))


@pytest.mark.parametrize("kind,expected", [
    ("softmax", lambda z: 1 - z.softmax(dim=1)),
    ("sigmoid", lambda z: torch.sigmoid(-z)),
    ("logit", lambda z: -z),
])
def test_negative_reports_the_other_side_of_each_score(kind: str, expected) -> None:
    """The reported score is that of the explained side: 1 - p for probabilities, -z for logits;
    the classes are still ranked by the logits, largest first."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 40.0]], dtype=torch.float64)
    target = top_classes(2, scoring=Scoring(kind, negative=True))(logits)
    assert target.chosen.tolist() == [[3, 0]]
    assert torch.allclose(target.table, expected(logits).float(), atol=1e-6)
    assert torch.equal(target.score(logits), -logits[:, [3, 0]])


def test_sigmoid_ranking_and_scores_on_a_multi_label_head(tmp_path: Path) -> None:
    """A multi-label head through ``classify``: every reported score is torch.sigmoid of its
    own logit (they need not sum to 1) and the top-k order is the sigmoid order."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 6))
    with torch.no_grad():
        net[4].weight.mul_(40)
    names = [f"label {i}" for i in range(6)]
    model = LoadedModel("tiny", net.eval(), names, Preprocess((16, 16), (0.5,) * 3, (0.25,) * 3), "test")
    image = make_image(tmp_path / "a.png", size=(16, 16))
    (record,) = classify(model, [image], tmp_path / "out", layer="0", topk=4, methods=["gradcam"],
                         score="sigmoid")
    x = torchvision.transforms.functional.normalize(
        torchvision.transforms.functional.to_tensor(Image.open(image).convert("RGB")), [0.5] * 3, [0.25] * 3)
    with torch.no_grad():
        probabilities = torch.sigmoid(net(x[None]))[0]
    order = probabilities.argsort(descending=True)[:4].tolist()
    assert [c["class_id"] for c in record["classes"]] == order
    assert all(c["score_kind"] == "sigmoid" and "probability" not in c for c in record["classes"])
    assert [c["score"] for c in record["classes"]] == pytest.approx(probabilities[order].tolist(), abs=1e-6)
    assert abs(probabilities.sum().item() - 1) > 0.1  # independent per label, not a softmax
    assert record["predicted"]["class_id"] == order[0]


def test_per_image_classes_pad_to_the_longest_and_mark_the_padding() -> None:
    """Images with their own number of classes: the chosen ids padded with -1, the scores of
    padded ranks taken from the image's first class (a real gradient, not a blank map)."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    target = image_classes([[2], [0, 1]])(logits)
    assert target.chosen.tolist() == [[2, -1], [0, 1]]
    assert target.score(logits).tolist() == [[2.0, 2.0], [3.0, 4.0]]
    assert target.predicted == [(2, pytest.approx(logits.softmax(1)[0, 2].item())),
                                (2, pytest.approx(logits.softmax(1)[1, 2].item()))]


def test_evaluate_measures_the_reported_score_of_the_explained_side(tmp_path: Path) -> None:
    """A one-output head in ``evaluate``, classes from a mapping: the curves start at the
    reported score, 1 - sigmoid(z) on the negative side (softmax would be a flat 1); a logit
    score is refused, since Average Drop divides by a probability."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))
    model = LoadedModel("tiny", net.eval(), ["positive"], Preprocess((16, 16), (0.5,) * 3, (0.25,) * 3), "t")
    image = make_image(tmp_path / "a.png", size=(16, 16))
    (record,) = evaluate(model, [image], tmp_path / "out", layer="0", methods=["gradcam"], steps=2,
                         targets={"a.png": ["positive"]}, negative=True)
    x = torchvision.transforms.functional.normalize(
        torchvision.transforms.functional.to_tensor(Image.open(image).convert("RGB")), [0.5] * 3, [0.25] * 3)
    with torch.no_grad():
        z = net(x[None])[0, 0].item()
    (explained,) = record["classes"]
    assert explained["score_kind"] == "sigmoid" and record["negative"]
    assert explained["score"] == pytest.approx(1 / (1 + math.exp(z)), abs=1e-6)
    assert explained["metrics"]["gradcam"]["deletion_curve"][0] == pytest.approx(explained["score"], abs=1e-6)
    with pytest.raises(ValueError, match="score='logit': evaluate's curves"):
        evaluate(model, [image], tmp_path / "out", layer="0", score="logit")


def test_targets_file_rows_match_the_longest_path_ending(tmp_path: Path) -> None:
    """A row names an image by its path's ending: "x/a.png" beats "a.png" for x/a.png, "a.png"
    still serves y/a.png; an Excel header (with its byte-order mark) is skipped, names and ids
    both count, repeated rows once."""
    table = tmp_path / "t.csv"
    table.write_bytes("\ufeffImage,Class\na.png,dog\nx/a.png,1\nx/a.png,cat\nx/a.png,1\n".encode())
    classes = read_targets(table, ["cat", "dog", "bird"])
    assert classes.ids(tmp_path / "x" / "a.png") == [1, 0]
    assert classes.ids(Path("y") / "a.png") == [1]
    with pytest.raises(InputError, match=r"b\.png: no row for it in the targets file"):
        classes.ids(tmp_path / "x" / "b.png")
