"""What is explained: the scalar score of each (image, rank) pair, chosen after the forward pass.

A classifier explains the logit of a class; an embedding network explains the similarity of
its embedding y to a proxy p (Bachhawat 2024, arXiv 2402.00909): y·p, or cos(y, p). Both are
``Target``s: after the forward pass they pick K candidates per image and turn model outputs
into the K scores whose gradients (or perturbed values) the methods use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .choices import SIMILARITIES
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

    ``table`` holds every candidate's value per image (class probabilities, or similarities
    to every proxy) for the records; ``chosen`` (NxK) indexes into it.
    """

    table: torch.Tensor
    chosen: torch.Tensor
    proxies: torch.Tensor | None = None   # NxKxD for similarity targets; None for logits
    kind: str = "logit"

    def score(self, outputs: torch.Tensor, image: int | None = None) -> torch.Tensor:
        """NxK scores of a batch's outputs, or MxK for M perturbed copies of one ``image``."""
        if self.proxies is None:
            return outputs.gather(1, self.chosen) if image is None else outputs[:, self.chosen[image]]
        proxies = self.proxies if image is None else self.proxies[image][None]
        return _similarity(outputs[:, None, :], proxies, self.kind)


Chooser = Callable[[torch.Tensor], Target]


def top_classes(topk: int = 3, class_ids: Sequence[int] = ()) -> Chooser:
    """Explain each image's top-k classes, or the given classes. Classes are ranked by their
    logits, not their probabilities: logits closer than float32's resolution of the softmax
    (~1e-7 apart, common with random or barely trained heads) round to equal or misordered
    probabilities, and the lowest class ids would win."""
    if isinstance(class_ids, (int, str)):
        raise ArgumentTypeError("class_ids", class_ids, f"a sequence of class ids, e.g. [{class_ids!r}]")

    def choose(logits: torch.Tensor) -> Target:
        return Target(logits.float().softmax(dim=1), choose_classes(logits, topk, class_ids))
    return choose


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
