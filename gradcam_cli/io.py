"""Images in, files out: decoding any common image to RGB, and writing outputs atomically."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ArgumentError, GradcamError, InputError, quoted

MAX_PIXELS = 89_478_485
"""The most pixels an image may have, as stored or once resized for the model: Pillow's default
decompression-bomb limit (1024**3 // 12; 256 MiB as 8-bit RGB), whatever Pillow is set to."""


def load_image(path: str | Path) -> Image.Image:
    """Decode an image as 8-bit RGB, honouring EXIF orientation; any failure is an InputError.

    Only a regular file is opened (reading a FIFO could block forever), and one whose header
    claims more than MAX_PIXELS pixels is refused before any pixel is decoded.
    """
    name = quoted(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputError(f"{name}: not a regular file (a folder, FIFO, socket or device); "
                             "give an image file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS rules
            with Image.open(path) as image:
                check_pixels(path, image.size)
                image = ImageOps.exif_transpose(image)
                image.load()
                return to_rgb(image)
    except FileNotFoundError as exc:
        raise InputError(f"{name}: no such file") from exc
    except PermissionError as exc:
        raise InputError(f"{name}: not readable (permission denied)") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{name}: not an image file (JPEG, PNG, BMP, WebP expected)") from exc
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit: refused on opening
        raise InputError(f"{name}: refused, too many pixels to decode safely (the limit is "
                         f"{MAX_PIXELS:,})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name}: cannot decode ({exc})") from exc


def check_pixels(path: str | Path, size: tuple[int, int]) -> None:
    """Refuse, from its header, an image of more than MAX_PIXELS pixels (a decompression bomb)."""
    if size[0] * size[1] > MAX_PIXELS:
        raise InputError(f"{quoted(path)}: refused, too many pixels to decode safely "
                         f"({size[0]}x{size[1]}; the limit is {MAX_PIXELS:,})")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert grayscale, 16-bit, float, palette, alpha and CMYK images to RGB (alpha over white)."""
    if image.mode == "F":
        image = Image.fromarray(float_to_8bit(np.asarray(image)))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 257.0 if image.mode.startswith("I;16") else max(np.asarray(image).max(), 1) / 255
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / scale).round().astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def float_to_8bit(values: np.ndarray) -> np.ndarray:
    """Float pixels (a mode "F" TIFF) as 8-bit: NaN is 0; if every value lies in [0, 1] they are
    scaled by 255, otherwise they are taken as 0..255 and clipped (±inf to 255 and 0)."""
    values = np.where(np.isnan(values), 0.0, values.astype(np.float64))
    if values.size and values.min() >= 0 and values.max() <= 1:
        values = values * 255
    return np.clip(values, 0, 255).round().astype(np.uint8)


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a class or image name."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


def image_id(path: str | Path) -> str:
    """A folder name for an image: its stem plus a hash of its absolute path, so same-named
    images in different folders never share outputs. The hash is of the path's bytes on disk,
    so a name that is not valid UTF-8 has an id too (and a UTF-8 name the same id as ever)."""
    digest = hashlib.sha1(os.fsencode(Path(path).resolve())).hexdigest()[:8]
    return f"{slug(Path(path).stem)}-{digest}"


def atomic_write(path: Path, data: bytes) -> Path:
    """Write via a temporary file in the same folder and rename: readers never see half a file.

    A failure (disk full, permissions) removes the temporary file and is raised as a
    GradcamError naming the file, since it will not go away for the next image either.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise GradcamError(f"cannot write {quoted(path)}: {exc.strerror or exc}") from exc
        raise
    return path


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an HxWx3 uint8 array as PNG (no timestamps, so identical input → identical bytes).

    zlib level 1 writes files about 15% larger than the default level 6 in a quarter of the time,
    which matters when thousands of maps are written.
    """
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def json_text(record: dict, indent: int | None = None) -> str:
    """A record as stable JSON text that any UTF-8 stream can carry.

    A file name that is not valid UTF-8 reaches Python with its bad bytes as lone surrogates
    (``x_\\udcff.jpg``); those are written as JSON escapes, which read back to the same name.
    """
    text = json.dumps(record, indent=indent, sort_keys=True, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_bytes(record: dict) -> bytes:
    """Encode a record as stable, readable JSON."""
    return (json_text(record, indent=2) + "\n").encode()


def prepare_output_dir(path: Path) -> Path:
    """Create the output folder, or say in one line (an ArgumentError) why it cannot be used."""
    if path.exists() and not path.is_dir():
        raise ArgumentError("output_dir", str(path), "is an existing file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError("output_dir", str(path), f"cannot create ({exc.strerror})") from exc
    if not os.access(path, os.W_OK):
        raise ArgumentError("output_dir", str(path), "is not writable")
    return path
