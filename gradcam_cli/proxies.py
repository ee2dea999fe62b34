"""Candidates for embedding networks: the references or class proxies a query is compared with.

A class proxy is built from the exemplar images of its class (one sub-folder per class):

- ``mean``: the normalised mean proxy: each exemplar embedding L2-normalised, averaged, and
  the mean normalised again;
- ``single``: one exemplar stands for its class: the one whose normalised embedding is
  closest (cosine) to the class's normalised mean, i.e. the most typical exemplar; ties go to
  the first in path order. Its normalised embedding is the proxy.

A query that is itself an exemplar is left out of its own class's proxy, so that it is not
compared with itself; a class left with no exemplar is then no candidate for that query.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .choices import PROXY_KINDS
from .engine import logits_of
from .errors import ArgumentError, InputError, UsageError, unknown
from .inputs import BadInput, expand
from .io import atomic_write, load_image
from .models import LoadedModel


def normalised_mean(embeddings: torch.Tensor) -> torch.Tensor:
    """normalise(mean_i normalise(e_i)) over the rows of a kxD tensor."""
    return F.normalize(F.normalize(embeddings, dim=1).mean(dim=0), dim=0)


def single_proxy(embeddings: torch.Tensor) -> torch.Tensor:
    """The normalised embedding of the exemplar closest to the class's normalised mean."""
    unit = F.normalize(embeddings, dim=1)
    return unit[int((unit @ normalised_mean(embeddings)).argmax())]


@dataclass
class Exemplars:
    """Embedded exemplar images: class names, each exemplar's class, embedding and path."""

    names: list[str]
    labels: torch.Tensor        # E, index into names
    embeddings: torch.Tensor    # ExD
    paths: list[str]            # absolute, to recognise a query among them

    def save(self, path: Path, model: LoadedModel) -> Path:
        """Write to ``path`` as plain tensors and strings (loadable with weights_only=True),
        with the fingerprint of the model that embedded them."""
        data = {"format": "gradcam-exemplars-2", "model": model.fingerprint(), "names": self.names,
                "labels": self.labels, "embeddings": self.embeddings, "paths": self.paths}
        return atomic_write(path, _torch_bytes(data))

    @classmethod
    def load(cls, proxy_file: str | Path, model: LoadedModel) -> Exemplars:
        """Read a file written by ``save``; refuse one made with another model (architecture,
        weights, checkpoint bytes, embedding head or preprocessing)."""
        def refuse(problem: str) -> ArgumentError:
            return ArgumentError("proxy_file", str(proxy_file), problem)
        try:
            data = torch.load(proxy_file, weights_only=True)
        except FileNotFoundError as exc:
            raise refuse("no such file") from exc
        except Exception as exc:
            raise refuse(f"{NOT_EXEMPLARS} ({exc.__class__.__name__})") from exc
        if not isinstance(data, dict) or data.get("format") != "gradcam-exemplars-2":
            raise refuse(NOT_EXEMPLARS)
        ours = model.fingerprint()
        for key, value in data["model"].items():
            if key != "classes_sha256" and ours.get(key) != value:
                raise refuse(f"built with {key} {value!r}, not {ours.get(key)!r}; rebuild it with "
                             "this model, or use the model it was built with")
        return cls(data["names"], data["labels"], data["embeddings"], data["paths"])


NOT_EXEMPLARS = "not an exemplar file (one written by Exemplars.save: `gradcam embed build-proxies`)"


def _torch_bytes(data: dict) -> bytes:
    """Serialise a dict of tensors and strings."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


def embed_images(model: LoadedModel, paths: Sequence[Path], batch_size: int = 8) -> torch.Tensor:
    """Embeddings (NxD) of images, without gradients; an unusable image is a usage error."""
    device = next(model.module.parameters()).device
    rows = []
    for start in range(0, len(paths), batch_size):
        tensors = []
        for path in paths[start:start + batch_size]:
            try:
                crop = model.preprocess.model_pixels(load_image(path))
            except InputError as exc:
                raise UsageError(f"exemplar or reference {exc}; fix or remove it") from exc
            tensors.append(model.preprocess.to_tensor(crop))
        with torch.no_grad():
            rows.append(logits_of(model.module(torch.stack(tensors).to(device))).float().cpu())
    return torch.cat(rows)


def read_exemplars(model: LoadedModel, proxy_dir: str | Path, batch_size: int = 8) -> Exemplars:
    """Embed a folder with one sub-folder of exemplar images per class."""
    folder = Path(proxy_dir)
    if not folder.is_dir():
        raise ArgumentError("proxy_dir", str(proxy_dir), "not a folder (one sub-folder of exemplar "
                            "images per class expected)")
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    names, labels, paths = [], [], []
    for label, directory in enumerate(classes):
        found = [p for p in expand([str(directory)]) if not isinstance(p, BadInput)]
        if not found:
            raise ArgumentError("proxy_dir", str(proxy_dir), f"class folder {directory.name} has no images")
        names.append(directory.name)
        labels += [label] * len(found)
        paths += [str(Path(p).resolve()) for p in found]
    if not names:
        raise ArgumentError("proxy_dir", str(proxy_dir), "no class sub-folders")
    embeddings = embed_images(model, [Path(p) for p in paths], batch_size)
    return Exemplars(names, torch.tensor(labels), embeddings, paths)


@dataclass
class Candidates:
    """What queries are compared with: names and vectors, with per-query leave-one-out."""

    names: list[str]
    vectors: torch.Tensor                 # PxD
    exemplars: Exemplars | None = None
    kind: str = "mean"
    sides: dict[str, int] | None = None   # pairs: image path -> side; a side's own are invalid

    @classmethod
    def pairs(cls, model: LoadedModel, queries: Sequence[Path], references: Sequence[Path],
              batch_size: int = 8) -> Candidates:
        """Each query against every reference, and each reference against every query."""
        paths = [*queries, *references]
        sides = {str(Path(p).resolve()): int(i >= len(queries)) for i, p in enumerate(paths)}
        return cls([Path(p).name for p in paths], embed_images(model, paths, batch_size),
                   sides=sides)

    @classmethod
    def from_exemplars(cls, exemplars: Exemplars, proxy_kind: str = "mean") -> Candidates:
        """One proxy per class, built by ``proxy_kind``: "mean" or "single"."""
        if proxy_kind not in PROXY_KINDS:
            raise unknown("proxy_kind", proxy_kind, PROXY_KINDS, "proxy kind")
        vectors = torch.stack([_proxy(exemplars, c, proxy_kind) for c in range(len(exemplars.names))])
        return cls(exemplars.names, vectors, exemplars, proxy_kind)

    def for_images(self, paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """NxPxD candidate vectors and an NxP validity mask for a batch of queries."""
        vectors = self.vectors.expand(len(paths), -1, -1).clone()
        valid = torch.ones(vectors.shape[:2], dtype=torch.bool)
        if self.sides is not None:
            column = torch.tensor(list(self.sides.values()))
            for n, path in enumerate(paths):
                valid[n] = column != self.sides[str(Path(path).resolve())]
        if self.exemplars is None:
            return vectors, valid
        where = {p: i for i, p in enumerate(self.exemplars.paths)}
        for n, path in enumerate(paths):
            own = where.get(str(Path(path).resolve()))
            if own is None:
                continue
            label = int(self.exemplars.labels[own])
            proxy = _proxy(self.exemplars, label, self.kind, leave_out=own)
            if proxy is None:
                valid[n, label] = False
            else:
                vectors[n, label] = proxy
        return vectors, valid


def _proxy(exemplars: Exemplars, label: int, kind: str,
           leave_out: int | None = None) -> torch.Tensor | None:
    """The proxy of class ``label`` built by ``kind``, without exemplar ``leave_out``."""
    members = (exemplars.labels == label).nonzero()[:, 0]
    if leave_out is not None:
        members = members[members != leave_out]
    if len(members) == 0:
        return None
    rows = exemplars.embeddings[members]
    return normalised_mean(rows) if kind == "mean" else single_proxy(rows)
