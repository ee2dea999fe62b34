"""Where the object is: binary masks or boxes per image, for the pointing games.

Both give a mask at the original image's size (``Truth.mask_for``); the caller crops it
exactly as the image is cropped, so map and mask share pixels.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ArgumentError, InputError, quoted
from .inputs import IMAGE_SUFFIXES
from .io import load_image

COORDINATES = ("x0", "y0", "x1", "y1")


@dataclass
class Truth:
    """Object masks from a folder (same file name as the image, or same stem with any image
    suffix), or boxes ``[x0, y0, x1, y1]`` in original pixels (x1, y1 exclusive) by file name."""

    mask_dir: Path | None = None
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)

    def mask_for(self, image: Path, size: tuple[int, int]) -> Image.Image:
        """The object mask (mode "L", 255 inside) for ``image`` of ``size`` (width, height)."""
        if self.mask_dir is not None:
            return self._read_mask(image, size)
        boxes = self.boxes.get(str(image), self.boxes.get(image.name))
        if boxes is None:
            raise InputError(f"{quoted(image)}: no boxes for it in the boxes file (keys are file names)")
        mask = np.zeros((size[1], size[0]), dtype=np.uint8)
        for x0, y0, x1, y1 in boxes:
            mask[max(0, round(y0)):max(0, round(y1)), max(0, round(x0)):max(0, round(x1))] = 255
        return Image.fromarray(mask)

    def source(self, image: Path) -> dict:
        """What this image's truth is made of, for the resume check: its boxes, or its mask
        file's digest (another mask, other pointing games)."""
        if self.mask_dir is None:
            return {"boxes": self.boxes.get(str(image), self.boxes.get(image.name))}
        path = self._mask_path(image)
        return {"mask": None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()}

    def _mask_path(self, image: Path) -> Path | None:
        """The mask file of ``image``: same file name, or same stem with any image suffix."""
        candidates = [self.mask_dir / image.name,
                      *(self.mask_dir / f"{image.stem}{s}" for s in sorted(IMAGE_SUFFIXES))]
        return next((p for p in candidates if p.is_file()), None)

    def _read_mask(self, image: Path, size: tuple[int, int]) -> Image.Image:
        """Load and binarise the mask file of ``image``; it must have the image's size."""
        path = self._mask_path(image)
        if path is None:
            raise InputError(f"{quoted(image)}: no mask named {quoted(image.name)} or "
                             f"{quoted(image.stem + '.png')} in the masks folder {quoted(self.mask_dir)}")
        mask = load_image(path).convert("L")
        if mask.size != size:
            raise InputError(f"{quoted(path)}: mask is {mask.size[0]}x{mask.size[1]}, its image "
                             f"{size[0]}x{size[1]}; masks must match their images")
        return mask.point(lambda v: 255 if v > 127 else 0)


def read_truth(masks: str | None, boxes: str | None) -> Truth | None:
    """Read ``--masks DIR`` or ``--boxes FILE`` (CSV with columns image,x0,y0,x1,y1 or JSON
    ``{"image.jpg": [[x0, y0, x1, y1], …]}``); None when neither is given."""
    if masks and boxes:
        raise ArgumentError("masks", masks, "give masks or boxes, not both")
    if masks:
        if not Path(masks).is_dir():
            raise ArgumentError("masks", masks, "is not a folder")
        return Truth(mask_dir=Path(masks))
    if boxes:
        return Truth(boxes=_read_boxes(Path(boxes)))
    return None


def _read_boxes(path: Path) -> dict[str, list[list[float]]]:
    """Parse a boxes file, refusing it (ArgumentError, one line) when it is malformed or a box
    is not one: a coordinate that is not finite, or x1 <= x0 or y1 <= y0 (an empty box)."""
    try:
        text = path.read_text()
        rows = _json_rows(text) if path.suffix.lower() == ".json" else _csv_rows(text)
    except OSError as exc:
        raise ArgumentError("boxes", str(path), f"cannot read ({exc.strerror})") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArgumentError("boxes", str(path), "expected CSV columns image,x0,y0,x1,y1 or JSON "
                            f'{{"image.jpg": [[x0, y0, x1, y1]]}} ({exc})') from exc
    table: dict[str, list[list[float]]] = {}
    for image, where, box in rows:
        problem = _box_problem(box)
        if problem:
            raise ArgumentError("boxes", str(path), f"{where}: {problem}")
        table.setdefault(image, []).append(box)
    return table


def _csv_rows(text: str) -> list[tuple[str, str, list[float]]]:
    """(image, where, box) for each row of a CSV boxes file; ``where`` names its line."""
    reader = csv.DictReader(text.splitlines())
    return [(row["image"], f"line {reader.line_num} ({quoted(row['image'])})",
             [float(row[c]) for c in COORDINATES]) for row in reader]


def _json_rows(text: str) -> list[tuple[str, str, list[float]]]:
    """(image, where, box) for each box of a JSON boxes file; ``where`` names the box."""
    return [(str(image), f"box {i} of {quoted(image)}", [float(v) for v in box])
            for image, boxes in json.loads(text).items() for i, box in enumerate(boxes, 1)]


def _box_problem(box: list[float]) -> str | None:
    """Why four numbers are no box (a count other than four, a value that is not finite, no
    area), or None."""
    if len(box) != 4:
        return "needs four numbers x0, y0, x1, y1"
    bad = next((name for name, v in zip(COORDINATES, box, strict=True) if not math.isfinite(v)), None)
    if bad:
        return f"{bad} is not a finite number"
    for low, high in ((0, 2), (1, 3)):
        if box[high] <= box[low]:
            return f"empty box, {COORDINATES[high]} must be greater than {COORDINATES[low]}"
    return None
