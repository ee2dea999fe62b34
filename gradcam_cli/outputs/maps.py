"""Raw maps as files: the float32 maps before display normalisation, beside the PNGs.

Every array is N x C x H x W float32 for one class and method: N the class's rows (1 for
classify; one per layer, in the record's ``layers`` order, for compare-layers and embed with
several layers), C the map's channels (1 for CAMs and occlusion, 3 for an RGB model's input
gradients), H x W the model's input. ``npy``: ``<class folder>/<method>.npy`` beside the PNG,
listed in the class's ``arrays`` as {method: path}. ``npz``: one ``maps.npz`` per image (the
record's ``npz``), its arrays named ``<class folder>/<method>``, listed in the class's
``arrays`` as {method: name}.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from ..errors import unknown
from ..io import atomic_write
from . import SAVE_MAPS


def check_save_maps(kind: str) -> None:
    """Refuse an unknown raw-map format."""
    if kind not in SAVE_MAPS:
        raise unknown("save_maps", kind, SAVE_MAPS, "raw map format")


def npy_bytes(array: np.ndarray) -> bytes:
    """One array as .npy bytes (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as an uncompressed .npz (what ``np.savez`` writes) with fixed member dates,
    so the same maps give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(member, npy_bytes(array))
    return buffer.getvalue()


class Arrays:
    """One image's raw maps on their way to files: npy written at once, npz kept until ``finish``."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder, self.kept = kind, folder, {}

    def add(self, class_dir: Path, method: str, array: np.ndarray) -> str:
        """Write (npy) or keep (npz) one class's map; its path, or its name in the npz."""
        if self.kind == "npy":
            return str(atomic_write(class_dir / f"{method}.npy", npy_bytes(array)))
        name = f"{class_dir.name}/{method}"
        self.kept[name] = array
        return name

    def finish(self) -> dict:
        """The record's fields: the npz written now; nothing for npy."""
        if self.kind != "npz":
            return {}
        return {"npz": str(atomic_write(self.folder / "maps.npz", npz_bytes(self.kept)))}


def listed(record: dict) -> list[str]:
    """The raw-map files an earlier record lists (for the resume check)."""
    if "npz" in record:
        return [record["npz"]]
    return [path for c in record["classes"] for path in c.get("arrays", {}).values()]
