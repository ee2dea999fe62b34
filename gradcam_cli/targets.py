"""What is explained: the scalar score of each (image, rank) pair, chosen after the forward pass.

A classifier explains the logit z of a class (the pre-softmax score, as Grad-CAM does), or -z
for the other side (``negative``); it reports the class's softmax, sigmoid or logit
(``Scoring``). An embedding network explains the similarity of its embedding y to a proxy p
(Bachhawat 2024, arXiv 2402.00909): y·p, or cos(y, p). Both are ``Target``s: after the forward
pass they pick K candidates per image and turn model outputs into the K scores whose gradients
(or perturbed values) the methods use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .choices import SIMILARITIES
from .classes import SCORES, ImageClasses, class_ids_of, read_targets
from .errors import ArgumentError, ArgumentTypeError, unknown


def _similarity(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """y·p ("dot") or cos(y, p) ("cosine") over the last dimension, broadcasting the others;
    ``proxy_targets`` has checked ``kind``."""
    if kind == "dot":
        return (a * b).sum(dim=-1)
    return F.cosine_similarity(a, b, dim=-1, eps=1e-12)


@dataclass
class Target:
    """The K explained candidates per image and how outputs become their scores.

    ``table`` holds every candidate's value per image (class scores as ``Scoring`` reports
    them, or similarities to every proxy) for the records; ``chosen`` (NxK) indexes into it,
    -1 where an image has fewer candidates than K (its own classes); ``predicted`` is each
    image's top-1 class by logit and its score.
    """

    table: torch.Tensor
    chosen: torch.Tensor
    proxies: torch.Tensor | None = None   # NxKxD for similarity targets; None for logits
    kind: str = "logit"
    negative: bool = False                # explain -z, the other side of each class
    predicted: list[tuple[int, float]] | None = None
    symbol: str = "s"                     # how a value of ``table`` is labelled: p, 1-p, logit, -logit, s

    def score(self, outputs: torch.Tensor, image: int | None = None) -> torch.Tensor:
        """NxK scores of a batch's outputs, or MxK for M perturbed copies of one ``image``; a
        padded rank repeats the image's first class, so its gradient is a real one."""
        if self.proxies is None:
            chosen = self.chosen.where(self.chosen >= 0, self.chosen[:, :1])
            picked = outputs.gather(1, chosen) if image is None else outputs[:, chosen[image]]
            return -picked if self.negative else picked
        proxies = self.proxies if image is None else self.proxies[image][None]
        return _similarity(outputs[:, None, :], proxies, self.kind)


Chooser = Callable[[torch.Tensor], Target]


@dataclass(frozen=True)
class Scoring:
    """A classifier's reported score (``kind``: softmax, sigmoid or logit) and its explained
    side: the logit z, or -z when ``negative``, whose score is then 1 - p (or -z)."""

    kind: str = "softmax"
    negative: bool = False

    def __post_init__(self) -> None:
        """Refuse an unknown kind, and a side that is not a bool."""
        if self.kind not in SCORES:
            raise unknown("score", self.kind, SCORES)
        if not isinstance(self.negative, bool):
            raise ArgumentTypeError("negative", self.negative, "True or False")

    def values(self, logits: torch.Tensor) -> torch.Tensor:
        """NxC reported scores of the explained side (1 - p from log p, exact near p = 1)."""
        z = logits.float()
        if self.kind == "softmax":
            return -torch.expm1(z.log_softmax(dim=1)) if self.negative else z.softmax(dim=1)
        side = -z if self.negative else z
        return torch.sigmoid(side) if self.kind == "sigmoid" else side

    @property
    def symbol(self) -> str:
        """How a score is labelled in a grid: p, 1-p, logit or -logit."""
        if self.kind == "logit":
            return "-logit" if self.negative else "logit"
        return "1-p" if self.negative else "p"


def _class_target(logits: torch.Tensor, chosen: torch.Tensor, scoring: Scoring | None) -> Target:
    """The Target of chosen classes: the scores as ``scoring`` reports them, and the top-1."""
    scoring = scoring or Scoring()
    top = logits.argmax(dim=1)
    positive = Scoring(scoring.kind).values(logits).gather(1, top[:, None])[:, 0]
    return Target(scoring.values(logits), chosen, negative=scoring.negative,
                  predicted=list(zip(top.tolist(), positive.tolist(), strict=True)), symbol=scoring.symbol)


def top_classes(topk: int = 3, class_ids: Sequence[int] = (), scoring: Scoring | None = None) -> Chooser:
    """Explain each image's top-k classes, or the given classes, scored by ``scoring`` (default:
    softmax, the logit's side). Classes are ranked by their logits, not their probabilities:
    logits closer than float32's resolution of the softmax (~1e-7 apart, common with random
    or barely trained heads) round to equal or misordered probabilities, and the lowest class
    ids would win; sigmoid scores saturate at 1 alike."""
    if isinstance(class_ids, (int, str)):
        raise ArgumentTypeError("class_ids", class_ids, f"a sequence of class ids, e.g. [{class_ids!r}]")

    def choose(logits: torch.Tensor) -> Target:
        return _class_target(logits, choose_classes(logits, topk, class_ids), scoring)
    return choose


def image_classes(per_image: Sequence[Sequence[int]], scoring: Scoring | None = None) -> Chooser:
    """Explain each image's own classes (``per_image[n]`` for image n, one or more); ranks
    past an image's own classes are padded with -1."""
    def choose(logits: torch.Tensor) -> Target:
        width, classes = max(map(len, per_image)), logits.shape[1]
        bad = [c for ids in per_image for c in ids if not 0 <= c < classes]
        if bad:
            raise ArgumentError("targets", bad[0], f"outside 0..{classes - 1}")
        rows = [[*ids, *[-1] * (width - len(ids))] for ids in per_image]
        return _class_target(logits, torch.tensor(rows, device=logits.device), scoring)
    return choose


@dataclass(frozen=True)
class ClassTargets:
    """What a classifier explains, checked once: each image's top-k or the given classes, or
    its own (``per_image``), with the reported score and the side."""

    topk: int
    class_ids: tuple[int, ...]
    scoring: Scoring
    per_image: ImageClasses | None = None

    def settings(self, path: Path) -> dict:
        """What determines an image's classes and scores, for the resume check."""
        chosen = ({"targets": self.per_image.settings(path)} if self.per_image else
                  {"topk": self.topk, "class_ids": list(self.class_ids)})
        return {**chosen, "score": self.scoring.kind, "negative": self.scoring.negative}

    def check(self, path: Path) -> None:
        """Fail an image that has no classes of its own (InputError), before it is explained."""
        if self.per_image is not None:
            self.per_image.ids(path)

    def chooser(self, paths: list[Path]) -> Chooser:
        """The chooser for a batch of images."""
        if self.per_image is not None:
            return image_classes([self.per_image.ids(p) for p in paths], self.scoring)
        return top_classes(self.topk, self.class_ids, self.scoring)


def class_targets(categories: Sequence[str], methods: Sequence[str] = (), topk: int = 3,
                  class_ids: Sequence[int] = (), class_names: Sequence[str] = (),
                  targets: str | Path | Mapping[str, Sequence[int | str]] | None = None,
                  score: str | None = None, negative: bool = False) -> ClassTargets:
    """Check a classifier's target arguments against its class names, once, at the boundary:
    ``class_names`` become ids (after ``class_ids``), ``targets`` ("folder", a CSV file or a
    mapping image -> classes) is read, and ``score`` defaults to softmax, or sigmoid for a
    one-output head (whose softmax is always 1)."""
    if isinstance(class_ids, (int, str)):
        raise ArgumentTypeError("class_ids", class_ids, f"a sequence of class ids, e.g. [{class_ids!r}]")
    if score == "softmax" and len(categories) == 1:
        raise ArgumentError("score", score, "a one-output head's softmax is always 1; use sigmoid "
                            "(a binary classifier) or logit (regression)")
    scoring = Scoring(score or ("softmax" if len(categories) > 1 else "sigmoid"), negative)
    if negative and "ablationcam" in methods:
        raise ArgumentError("negative", negative, "Ablation-CAM divides by the explained score, so "
                            "its map does not change with the side; leave out ablationcam")
    if targets is not None and (class_ids or class_names):
        raise ArgumentError("targets", targets if isinstance(targets, (str, Path)) else "mapping",
                            "gives each image its own classes; leave out the class ids and names")
    ids = tuple(dict.fromkeys([*class_ids, *class_ids_of(class_names, categories)]))
    return ClassTargets(topk, ids, scoring, read_targets(targets, categories))


def proxy_targets(similarity: str = "dot", topk: int = 3
                  ) -> Callable[[torch.Tensor, torch.Tensor | None], Chooser]:
    """Check ``similarity`` ("dot" or "cosine") and ``topk`` once, and return what turns a
    batch's proxies (and the ones each image may use) into its chooser (``top_proxies``)."""
    if similarity not in SIMILARITIES:
        raise unknown("similarity", similarity, SIMILARITIES)
    if topk < 1:
        raise ArgumentError("topk", topk, "must be at least 1")

    def bind(proxies: torch.Tensor, valid: torch.Tensor | None = None) -> Chooser:
        def choose(embeddings: torch.Tensor) -> Target:
            per_image = proxies if proxies.dim() == 3 else proxies.expand(len(embeddings), -1, -1)
            table = _similarity(embeddings[:, None, :].float(), per_image.float(), similarity)
            if valid is not None:
                table = table.masked_fill(~valid, float("-inf"))
            k = min(topk, table.shape[1])
            chosen = table.topk(k, dim=1).indices
            picked = per_image.gather(1, chosen[..., None].expand(-1, -1, per_image.shape[2]))
            return Target(table, chosen, picked.to(embeddings.dtype), similarity)
        return choose
    return bind


def top_proxies(proxies: torch.Tensor, similarity: str = "dot", topk: int = 3,
                valid: torch.Tensor | None = None) -> Chooser:
    """Explain the k proxies most similar (``similarity``: "dot" or "cosine") to each image's
    embedding.

    ``proxies`` is PxD, shared by all images, or NxPxD when each image has its own (a query
    left out of its own class's proxy); ``valid`` (NxP) marks proxies an image may use.
    """
    return proxy_targets(similarity, topk)(proxies, valid)


def choose_classes(logits: torch.Tensor, topk: int, class_ids: Sequence[int] = ()) -> torch.Tensor:
    """The classes to explain per image: the given ids for all images, or each one's top-k."""
    n, classes = logits.shape
    if class_ids:
        bad = [c for c in class_ids if not 0 <= c < classes]
        if bad:
            raise ArgumentError("class_ids", bad[0], f"outside 0..{classes - 1}")
        return torch.tensor(list(class_ids), device=logits.device).expand(n, -1)
    if not 1 <= topk <= classes:
        raise ArgumentError("topk", topk, f"must be between 1 and {classes}")
    return logits.topk(topk, dim=1).indices
