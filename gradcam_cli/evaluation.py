"""`evaluate` as a library call: how faithful each map is to the model, and where it points.

Per image, explained class and method (``metrics`` has the definitions):

- deletion and insertion curves and their AUCs (Petsiuk et al. 2018), over ``steps`` steps,
  removed pixels replaced by the ``baseline`` (blurred image by default);
- drop and increase of confidence (Chattopadhay et al. 2018), averaged over images as
  Average Drop (%) and Increase in Confidence (%);
- with object masks or boxes (``truth``): the pointing game (Zhang et al. 2016, ``tolerance``
  pixels of the original image) and the energy-based pointing game (Wang et al. 2020);
- with ``sanity``: Spearman correlation of each map with the map after cascading
  randomisation of the model's blocks from the top (Adebayo et al. 2018).

Output, beside classify's folders::

    <output-dir>/<image-stem>-<hash8>/<arch>@<layer>-evaluate/
        summary.json  curves.png  sanity.png
    <output-dir>/evaluate-<arch>@<layer>.csv / .json   every row and the averages
    <output-dir>/evaluate-<arch>@<layer>-sanity.csv       --sanity: a row per randomised block
    <output-dir>/evaluate-<arch>@<layer>-curves.png / -sanity.png
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import metrics as MT
from .choices import BASELINES
from .engine import evaluating, logits_of
from .errors import ArgumentError, InputError, unknown
from .explanation import Explanation, explain
from .io import atomic_write, json_bytes, png_bytes
from .methods import DEFAULT_METHODS, overlay, title
from .models import LoadedModel
from .paths import completeness_field, with_normalisation
from .pipeline import resolve_layer
from .render import line_plot
from .runner import Engine, Item, Loaded, Task, run
from .sanity import cascade
from .settings import MethodSettings, check_settings
from .targets import ClassTargets, Scoring, class_targets, top_classes
from .truth import Truth


@dataclass(frozen=True)
class Settings:
    """What ``evaluate`` measures, the same for every image."""

    layer: str
    methods: Sequence[str]
    steps: int
    baseline: str
    tolerance: float
    sanity: bool
    batch_size: int
    method_settings: MethodSettings = field(default_factory=MethodSettings)


COLUMNS = ("image", "class_id", "name", "method", "deletion_auc", "insertion_auc",
           "confidence_drop", "confidence_increase", "pointing_hit", "energy")


def evaluate(model: LoadedModel, images: Sequence[Item], output_dir: str | Path = "results",
             layer: str | None = None, topk: int = 1, class_ids: Sequence[int] = (),
             methods: Sequence[str] = DEFAULT_METHODS, steps: int = 20, baseline: str = "blur",
             truth: Truth | None = None, tolerance: float = 15.0, sanity: bool = False,
             batch_size: int = 8, skip_existing: bool = False,
             stop: Callable[[], bool] = lambda: False, progress: bool = False,
             class_names: Sequence[str] = (),
             targets: str | Path | Mapping[str, Sequence[int | str]] | None = None,
             score: str | None = None, negative: bool = False,
             settings: MethodSettings | None = None, engine: Engine | None = None) -> Iterator[dict]:
    """Yield one record per image with every metric of every explained class and method
    (each occlusion patch size's map is measured as a method of its own, occlusion-P).

    Classes are chosen and scored as by ``classify`` (``targets="folder"`` measures each
    image's true class); the curves and confidence changes follow the reported score of the
    explained side, so ``score="logit"`` is refused: Average Drop divides by a probability.

    Bad images (or a missing mask) give an error record and the rest go on; ``stop`` is asked
    after each batch. With ``skip_existing`` an image whose summary an earlier run with the
    same settings left is not evaluated again: its record comes back as "skipped", numbers
    included, so the table still covers it. ``write_summary`` turns the records into the
    averaged table. ``engine`` runs the batches elsewhere (``cluster.RayEngine``).
    """
    if baseline not in BASELINES:
        raise unknown("baseline", baseline, BASELINES)
    chosen = resolve_layer(model, layer)
    classes = class_targets(model.categories, methods, topk, class_ids, class_names, targets, score, negative)
    if classes.scoring.kind == "logit":
        raise ArgumentError("score", score, "evaluate's curves and Average Drop need a probability "
                            "(softmax or sigmoid)")
    measured = Settings(chosen, methods, steps, baseline, tolerance, sanity, batch_size,
                        with_normalisation(check_settings(settings), model.preprocess))
    task = Evaluation(model, measured, classes, truth, progress)
    return run(task, images, output_dir, batch_size, skip_existing, stop, engine)


@dataclass
class Evaluation(Task):
    """evaluate as a runner task: explain a batch, then measure and plot each image's maps.

    Measuring runs the model, so an image is measured before the next batch is explained."""

    writes_beside = False
    model: LoadedModel
    run: Settings
    classes: ClassTargets
    truth: Truth | None
    progress: bool

    @property
    def tag(self) -> str:
        """Where one image's evaluation files go, beside classify's folder."""
        return f"{self.model.folder_name}@{self.run.layer}-evaluate"

    def settings(self, path: Path) -> dict:
        """Model, layer, methods, classes, curve and truth settings, and this image's truth."""
        truth = None if self.truth is None else self.truth.source(path)
        return {"task": self.tag, "model": self.model.fingerprint(), "layer": self.run.layer,
                "methods": list(self.run.methods),
                **self.run.method_settings.to_dict(self.run.methods),
                **self.classes.settings(path), "steps": self.run.steps,
                "baseline": self.run.baseline, "tolerance": self.run.tolerance,
                "sanity": self.run.sanity, "truth": truth}

    def decode(self, path: Path, image: Image.Image) -> tuple:
        """The crop the model sees, the object mask cropped alike (if any), and the scale from
        original to crop pixels; an image without classes of its own fails here, alone."""
        self.classes.check(path)
        mask = None
        if self.truth is not None:
            crop = self.model.preprocess.mask_pixels(self.truth.mask_for(path, image.size))
            mask = torch.from_numpy(np.asarray(crop) > 127)
        return self.model.preprocess.model_pixels(image), mask, self.model.preprocess.scale(image.size)

    def explain(self, batch: list[Loaded]) -> tuple[torch.Tensor, Explanation]:
        """The batch's inputs and its maps."""
        x = self.model.batch([item.data[0] for item in batch])
        return x, explain(self.model.module, x, self.run.layer, methods=self.run.methods,
                          batch_size=self.run.batch_size, progress=self.progress,
                          target=self.classes.chooser([item.path for item in batch]),
                          settings=self.run.method_settings)

    def files(self, record: dict) -> list[str]:
        """The curves plot, and the sanity plot when the randomisation test ran."""
        return [record["curves"], *([record["sanity_plot"]] if "sanity" in record else [])]

    def write(self, item: Loaded, results: tuple[torch.Tensor, Explanation], i: int,
              folder: Path) -> dict:
        """Every metric for one image's explained classes; its plots written."""
        (x, result), (_, mask, scale), run = results, item.data, self.run
        if result.errors[i]:
            raise InputError(f"{item.path}: {result.errors[i]}")
        base, scoring = MT.baseline_of(x[i], run.baseline), self.classes.scoring
        class_ids = [c for c in result.classes[i].tolist() if c >= 0]  # -1: past its own classes
        classes = []
        for k, class_id in enumerate(class_ids):
            score = _scorer(self.model.module, class_id, scoring)
            original = float(result.scores[i, class_id])
            radii = (run.tolerance * scale[0], run.tolerance * scale[1])
            rows = {m: _measure(score, x[i], MT.saliency_of(result.maps[m][i, k], overlay(m)),
                                base, original, mask, radii, run) for m in result.maps}
            probability = {"probability": round(original, 6)} if scoring.kind == "softmax" else {}
            classes.append({"rank": k + 1, "class_id": class_id,
                            "name": self.model.categories[class_id], "score": round(original, 6),
                            "score_kind": scoring.kind, **probability,
                            **completeness_field(result.completeness, i, k), "metrics": rows})
        top, value = result.predicted[i]
        predicted = {"class_id": top, "name": self.model.categories[top], "score": round(value, 6)}
        record = {"image": str(item.path), "arch": self.model.arch, "weights": self.model.weights,
                  "preprocess": self.model.preprocess.to_dict(),
                  "layer": run.layer, "steps": run.steps, "baseline": run.baseline,
                  "negative": scoring.negative, "predicted": predicted, "classes": classes,
                  "curves": str(folder / "curves.png")}
        if run.sanity:
            record["sanity"] = _sanity(self.model, x[i], class_ids, scoring, run)
            record["sanity_plot"] = str(folder / "sanity.png")
            atomic_write(folder / "sanity.png", png_bytes(sanity_plot([{**record, "status": "ok"}])))
        atomic_write(folder / "curves.png", png_bytes(curves_plot([{**record, "status": "ok"}])))
        return record


def _measure(score: MT.Scorer, x: torch.Tensor, saliency: torch.Tensor, base: torch.Tensor,
             original: float, mask: torch.Tensor | None, tolerance: tuple[float, float],
             run: Settings) -> dict:
    """The metrics of one map: curves and AUCs, confidence change, pointing games."""
    curves = [MT.perturbation_curve(score, x, saliency, base, run.steps, insert, run.batch_size)
              for insert in (False, True)]
    drop, increase = MT.confidence_change(score, x, saliency, original)
    row = {"deletion_auc": MT.auc(curves[0]), "insertion_auc": MT.auc(curves[1]),
           "confidence_drop": 100 * drop, "confidence_increase": increase,
           "deletion_curve": curves[0].tolist(), "insertion_curve": curves[1].tolist()}
    if mask is not None:
        row["pointing_hit"] = MT.pointing_hit(saliency, mask, tolerance)
        row["energy"] = MT.energy_in(saliency, mask)
    return row


def _scorer(module: torch.nn.Module, class_id: int, scoring: Scoring) -> MT.Scorer:
    """The explained class's reported score (its probability, of the explained side) for a
    batch of inputs."""
    def score(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), evaluating(module):
            return scoring.values(logits_of(module(batch)))[:, class_id]
    return score


def _sanity(model: LoadedModel, x: torch.Tensor, class_ids: list[int], scoring: Scoring,
            run: Settings) -> list[dict]:
    """Cascading randomisation: per block, the Spearman correlation of each class's maps."""
    def maps(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        result = explain(module, x[None], run.layer, methods=run.methods, batch_size=run.batch_size,
                         target=top_classes(class_ids=class_ids, scoring=scoring),
                         settings=run.method_settings)
        return {f"{c}/{m}": MT.saliency_of(result.maps[m][0, k], overlay(m))
                for k, c in enumerate(class_ids) for m in result.maps}
    steps = cascade(model.module, x[None], maps, MT.spearman)
    return [{"layer": name, "spearman": scores} for name, scores in steps]


def _measured(records: Sequence[dict]) -> list[dict]:
    """Records with numbers: evaluated now, or skipped because an earlier run evaluated them."""
    return [r for r in records if r["status"] in ("ok", "skipped") and "classes" in r]


def summary_rows(records: Sequence[dict]) -> list[dict]:
    """One flat row per image, class and method, for the CSV table."""
    return [{"image": r["image"], "class_id": c["class_id"], "name": c["name"], "method": m,
             **{key: v.get(key) for key in COLUMNS[4:]}}
            for r in _measured(records)
            for c in r["classes"] for m, v in c["metrics"].items()]


def sanity_rows(records: Sequence[dict]) -> list[dict]:
    """One flat row per image, class, method and randomised block, for the sanity CSV."""
    return [{"image": r["image"], "class_id": int(key.split("/", 1)[0]),
             "method": key.split("/", 1)[1], "step": j + 1, "block": step["layer"],
             "spearman": value}
            for r in _measured(records) if "sanity" in r
            for j, step in enumerate(r["sanity"]) for key, value in step["spearman"].items()]


def averages(records: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """Per method, the mean of every metric over images and classes (pointing: hit rate;
    drop and increase in %, i.e. Average Drop and Increase in Confidence)."""
    by_method: dict[str, list[dict]] = {}
    for row in summary_rows(records):
        by_method.setdefault(row["method"], []).append(row)
    table = {m: {key: _mean([row[key] for row in rows]) for key in COLUMNS[4:]}
             for m, rows in by_method.items()}
    for row in table.values():  # Increase in Confidence is a percentage of images, as Drop is
        row["confidence_increase"] *= 100
    for method, scores in _sanity_means(records).items():
        table[method]["sanity_last"] = scores[-1] if scores else None
    return table


def _mean(values: Sequence) -> float | None:
    """The mean of the defined values (booleans count as 0/1), None if there are none."""
    defined = [float(v) for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _sanity_means(records: Sequence[dict]) -> dict[str, list[float | None]]:
    """Per method, the mean Spearman correlation after each randomised block."""
    by_step: dict[str, dict[int, list]] = {}
    for row in sanity_rows(records):
        by_step.setdefault(row["method"], {}).setdefault(row["step"], []).append(row["spearman"])
    return {m: [_mean(values) for _, values in sorted(steps.items())] for m, steps in by_step.items()}


def curves_plot(records: Sequence[dict]) -> np.ndarray:
    """Mean deletion and insertion curves per method over the records' images and classes."""
    panels = []
    for kind in ("deletion", "insertion"):
        lines = {}
        for method in _methods(records):
            curves = [c["metrics"][method][f"{kind}_curve"] for r in _measured(records)
                      for c in r["classes"]]
            mean = torch.tensor(curves).mean(dim=0)
            lines[f"{title(method)} (AUC {MT.auc(mean):.3f})"] = mean.tolist()
        steps = len(next(iter(lines.values()))) - 1
        panels.append((f"{kind} ({'lower' if kind == 'deletion' else 'higher'} is better)",
                       f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}",
                       "probability of the class", [j / steps for j in range(steps + 1)], lines))
    return line_plot(panels)


def sanity_plot(records: Sequence[dict]) -> np.ndarray:
    """Mean Spearman correlation per method after each block is randomised, top block first."""
    first = next(r for r in _measured(records) if "sanity" in r)
    names = [s["layer"] for s in first["sanity"]]
    lines = {title(m): scores for m, scores in _sanity_means(records).items()}
    return line_plot([("cascading randomisation (Adebayo et al. 2018)",
                       "randomised down to block", "Spearman correlation with the trained map",
                       names, lines)])


def _methods(records: Sequence[dict]) -> list[str]:
    """The methods of the first measured record, in its order."""
    first = _measured(records)[0]
    return list(first["classes"][0]["metrics"])


def write_summary(records: Sequence[dict], output_dir: str | Path, tag: str) -> dict:
    """Write the CSV and JSON tables (and the sanity CSV: a row per randomised block) and the
    mean plots of a run; return the averages."""
    out = Path(output_dir)
    rows = summary_rows(records)
    table = averages(records)
    atomic_write(out / f"evaluate-{tag}.csv", _csv(COLUMNS, rows))
    atomic_write(out / f"evaluate-{tag}.json", json_bytes({"averages": table, "rows": rows}))
    if rows:
        atomic_write(out / f"evaluate-{tag}-curves.png", png_bytes(curves_plot(records)))
    sanity = sanity_rows(records)
    if sanity:
        atomic_write(out / f"evaluate-{tag}-sanity.csv", _csv(tuple(sanity[0]), sanity))
        atomic_write(out / f"evaluate-{tag}-sanity.png", png_bytes(sanity_plot(records)))
    return table


HEADINGS = {"deletion_auc": "deletion AUC (lower better)",
            "insertion_auc": "insertion AUC (higher)", "confidence_drop": "Average Drop % (lower)",
            "confidence_increase": "Increase % (higher)", "pointing_hit": "pointing game (higher)",
            "energy": "energy pointing (higher)", "sanity_last": "sanity: Spearman, all random"}


def format_averages(table: dict[str, dict[str, float | None]]) -> str:
    """The averaged table as text: a row per method, a column per metric that has values."""
    keys = [k for k in HEADINGS if any(row.get(k) is not None for row in table.values())]
    lines = ["method          " + "  ".join(f"{HEADINGS[k]:>{len(HEADINGS[k])}}" for k in keys)]
    for method, row in table.items():
        cells = []
        for k in keys:
            value = row.get(k)
            cells.append(f"{'-' if value is None else f'{value:.3f}':>{len(HEADINGS[k])}}")
        lines.append(f"{method:<15} " + "  ".join(cells))
    return "\n".join(lines)


def _csv(columns: Sequence[str], rows: Sequence[dict]) -> bytes:
    """A CSV table with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: _cell(v) for k, v in row.items()} for row in rows])
    return buffer.getvalue().encode()


def _cell(value: object) -> object:
    """A CSV cell: floats to 6 digits, booleans as 0/1, missing as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return int(value)
    return round(value, 6) if isinstance(value, float) else value
