"""Where the object is: binary masks or boxes per image, for the pointing games.

Both give a mask at the original image's size (``Truth.mask_for``); the caller crops it
exactly as the image is cropped, so map and mask share pixels.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, UsageError
from .inputs import IMAGE_SUFFIXES
from .io import load_image


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
            raise InputError(f"{image}: no boxes for it in --boxes (keys are file names)")
        mask = np.zeros((size[1], size[0]), dtype=np.uint8)
        for x0, y0, x1, y1 in boxes:
            mask[max(0, round(y0)):max(0, round(y1)), max(0, round(x0)):max(0, round(x1))] = 255
        return Image.fromarray(mask)

    def _read_mask(self, image: Path, size: tuple[int, int]) -> Image.Image:
        """Load and binarise the mask file of ``image``; it must have the image's size."""
        candidates = [self.mask_dir / image.name,
                      *(self.mask_dir / f"{image.stem}{s}" for s in sorted(IMAGE_SUFFIXES))]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(f"{image}: no mask named {image.name} or {image.stem}.png in "
                             f"--masks {self.mask_dir}")
        mask = load_image(path).convert("L")
        if mask.size != size:
            raise InputError(f"{path}: mask is {mask.size[0]}x{mask.size[1]}, its image "
                             f"{size[0]}x{size[1]}; masks must match their images")
        return mask.point(lambda v: 255 if v > 127 else 0)


def read_truth(masks: str | None, boxes: str | None) -> Truth | None:
    """Read ``--masks DIR`` or ``--boxes FILE`` (CSV with columns image,x0,y0,x1,y1 or JSON
    ``{"image.jpg": [[x0, y0, x1, y1], …]}``); None when neither is given."""
    if masks and boxes:
        raise UsageError("give --masks DIR or --boxes FILE, not both")
    if masks:
        if not Path(masks).is_dir():
            raise UsageError(f"--masks {masks} is not a folder")
        return Truth(mask_dir=Path(masks))
    if boxes:
        return Truth(boxes=_read_boxes(Path(boxes)))
    return None


def _read_boxes(path: Path) -> dict[str, list[list[float]]]:
    """Parse a boxes file, refusing it in one line when it is malformed."""
    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            table = {str(k): [[float(v) for v in box] for box in boxes]
                     for k, boxes in json.loads(text).items()}
        else:
            table = {}
            for row in csv.DictReader(text.splitlines()):
                box = [float(row[c]) for c in ("x0", "y0", "x1", "y1")]
                table.setdefault(row["image"], []).append(box)
    except OSError as exc:
        raise UsageError(f"--boxes {path}: cannot read ({exc.strerror})") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"--boxes {path}: expected CSV columns image,x0,y0,x1,y1 or JSON "
                         f'{{"image.jpg": [[x0, y0, x1, y1]]}} ({exc})') from exc
    if any(len(box) != 4 for boxes in table.values() for box in boxes):
        raise UsageError(f"--boxes {path}: every box needs four numbers x0, y0, x1, y1")
    return table
