"""Reading images safely: any PNG/JPEG/BMP/WebP in any mode becomes an RGB image; failures get readable reasons.

Transparent pixels are composited on white (``Image.convert('RGB')`` alone would keep whatever colour they store,
often black): alpha channels, palettes with alpha, and the single transparent value of a 1-bit, 8- or 16-bit
grayscale or 8- or 16-bit RGB PNG (``tRNS``). Truncated files are errors, never silently padded. Size limits guard
against decompression bombs, and an aspect limit against images that the networks' fixed input height would stretch
into a huge tensor. Only the four formats named below are decoded (whatever a file's name says), and only regular
files are opened: a FIFO or a device at an image's path would block the reader forever.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # Pillow's names of the decoders any file is opened with

DEFAULT_MAX_PIXELS = 4_000_000
DEFAULT_MAX_WIDTH = 4096
# Width over height. The networks rescale every image to a fixed height (64 px) and pad a batch to its widest
# member, so a 2048 x 2 PNG of a hundred bytes would become a 64 x 65,536 input and pad 31 others to its width.
# CAPTCHAs are about 2 to 10 times as wide as they are high.
DEFAULT_MAX_ASPECT = 32.0


class ImageError(ValueError):
    """An image that cannot be decoded; ``str(exc)`` is a reason fit for a ``failed`` row."""


_KEYED_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I", "RGB")  # modes whose tRNS names one transparent value


def to_rgb(img: Image.Image, *, sixteen_bit: bool = False) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white: an alpha channel (RGBA, LA, PA), a palette
    with alpha or a transparent index (P), or the transparent value (``tRNS``) of a 1-bit, 8- or 16-bit grayscale
    or 8- or 16-bit RGB PNG (Pillow rescales 2- and 4-bit grayscale without its key, so those keep their grey).

    ``sixteen_bit``: the image was a 16-bit RGB PNG, which Pillow decodes to 8 bits a channel (the high byte) while
    its key stays in 16 bits; the key's high bytes are then compared, so colours within 1/256 of it count as it.
    """
    import numpy as np

    key = img.info.get("transparency") if img.mode in _KEYED_MODES else None
    keyed = None
    if isinstance(key, int) or (isinstance(key, tuple) and img.mode == "RGB"):
        pixels = np.asarray(img)
        if img.mode == "RGB":
            if sixteen_bit:
                key = tuple(int(k) >> 8 for k in key)
            keyed = (pixels == np.asarray(key)).all(axis=-1)
        else:
            keyed = pixels == (bool(key) if img.mode == "1" else key)
    rgb = _opaque_rgb(img)
    if keyed is None or not keyed.any():
        return rgb
    out = np.array(rgb)
    out[keyed] = 255
    return Image.fromarray(out, mode="RGB")


def _opaque_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB, alpha channels and palette transparency composited on white (a tRNS value is ``to_rgb``'s)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: 0..65535 to 0..255, the same scale for every image. A 32-bit "I" image (made in memory,
        # Image.fromarray of int32) whose values all fit 0..255 is taken as 8-bit.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr.clip(0, 65535) * (255.0 / 65535.0)
        img = Image.fromarray(np.rint(arr.clip(0, 255)).astype("uint8"), mode="L")
    if img.mode == "P" and ("transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_aspect(path: str | os.PathLike) -> float:
    """Width / height of the image at ``path`` from its header, without decoding pixels (a PNG's size is in its first
    24 bytes; other formats are opened with Pillow, which reads only the header); 0.0 when it cannot be read, which
    ``load_image`` then explains. Only regular files are read (a FIFO would block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return 0.0
        with open(path, "rb") as f:
            head = f.read(24)
    except (OSError, ValueError):  # missing, unreadable, or a NUL byte in the path
        return 0.0
    if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
    else:
        try:
            with Image.open(path, formats=FORMATS) as img:
                width, height = img.size
        except Exception:  # not an image, a decompression bomb, ...: decoded (and failed) by load_image
            return 0.0
    return width / height if height else 0.0


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_width: int = DEFAULT_MAX_WIDTH,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Image.Image:
    """Open ``path`` and return a fully decoded RGB image.

    Raises ``ImageError`` with a readable reason for: a missing file, a directory or another file that is not a
    regular one (a FIFO, a socket, a device), an empty file, a file that is not a PNG, JPEG, BMP or WebP image, a
    truncated image, an image over ``max_pixels``, wider than ``max_width`` or more than ``max_aspect`` times as wide
    as it is high.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageError(f"file not found: {p}") from None
    except OSError as exc:
        raise ImageError(f"cannot access file: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path
        raise ImageError("invalid path (contains a NUL byte)") from None
    size = st.st_size
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"is a directory, not an image: {p}")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"not a regular file (a FIFO, socket or device), not an image: {p}")
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(p, formats=FORMATS) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            if w > max_width:
                raise ImageError(f"image too wide: {w} px exceeds the limit of {max_width} px")
            if w > max_aspect * h:
                raise ImageError(
                    f"image too elongated: {w}x{h} is {w / h:.0f} times as wide as high, more than {max_aspect:g}"
                )
            sixteen_bit = img.format == "PNG" and any(";16" in str(tile.args) for tile in img.tile)
            img.load()
            return to_rgb(img, sixteen_bit=sixteen_bit)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a recognised image file (PNG, JPEG, BMP or WebP expected)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression bomb): {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            raise ImageError(f"truncated image file: {msg}") from None
        raise ImageError(f"cannot decode image: {msg}") from None
