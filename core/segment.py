"""Colour segmentation: the glyphs of a CAPTCHA whose characters each have their own flat colour on a light
background, crossed by thin dark lines (the family ``core.synth`` imitates).

Ink is every pixel away from white; thin pure-dark structures (the lines) are removed; connected pieces are split
where they hold several colours; pieces of one colour that touch or overlap horizontally are merged (broken strokes,
the dot of an ``i``, hatched glyphs); specks are dropped. Colour is the direction of ``255 - rgb``, which
anti-aliasing against white leaves unchanged. A box is the bounding box of its glyph's own pixels, never of the
lines (the convention of ``core.synth``), as ``(x1, y1, x2, y2)`` in pixels, ``x2``/``y2`` exclusive.

``colour_boxes(image, length)`` labels an image of known text (``core.autolabel``); ``colour_segments(image)``
proposes the glyphs of any image (``core.detector`` with ``box_source`` ``"colour"`` or ``"both"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from core.images import to_rgb

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

INK = 10.0  # |255 - rgb| above this is ink
LINE_DARK = 50  # a pixel whose brightest channel is below this may belong to a line
SPLIT_ANGLE = 12.0  # degrees between two colours for a connected piece to be cut in two
MERGE_ANGLE = 10.0  # degrees within which two pieces count as one colour
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class _Piece:
    """Pixels of one colour: coordinates, colour direction ``[3]`` (unit), ink mass and bounding box."""

    ys: np.ndarray
    xs: np.ndarray
    colour: np.ndarray
    mass: float

    @cached_property
    def box(self) -> Box:  # pixels never change once a piece exists (merging makes a new one)
        return float(self.xs.min()), float(self.ys.min()), float(self.xs.max() + 1), float(self.ys.max() + 1)

    def merged(self, other: _Piece) -> _Piece:
        mass = self.mass + other.mass
        colour = _unit(self.colour * self.mass + other.colour * other.mass)
        return _Piece(np.concatenate((self.ys, other.ys)), np.concatenate((self.xs, other.xs)), colour, mass)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)


def _colour_modes(u: np.ndarray, w: np.ndarray, depth: int = 4) -> list[np.ndarray]:
    """Colour directions in ``u [P, 3]`` (unit vectors, weights ``w [P]``) by recursive 2-means: a cluster is cut
    while its two halves differ by more than ``SPLIT_ANGLE`` and each holds at least 6 pixels and 8% of them."""
    centre = _unit((u * w[:, None]).sum(0))
    if depth == 0 or len(u) < 12:
        return [centre]
    a = u[np.argmin(u @ centre)]  # the pixel least like the mean, then the one least like it
    b = u[np.argmin(u @ a)]
    centres = np.stack((a, b))
    uw = u * w[:, None]
    previous = None
    for _ in range(8):
        nearest = np.argmax(u @ centres.T, axis=1)
        second = nearest == 1
        if second.all() or not second.any():
            return [centre]
        if previous is not None and np.array_equal(second, previous):
            break  # converged: the same split gives the same centres again
        centres = _unit(np.stack((uw[~second].sum(0), uw[second].sum(0))))
        previous = second
    if centres[0] @ centres[1] > np.cos(np.radians(SPLIT_ANGLE)):
        return [centre]
    nearest = np.argmax(u @ centres.T, axis=1)
    counts = np.bincount(nearest, minlength=2)
    if counts.min() < max(6, 0.08 * len(u)):
        return [centre]
    return [c for k in range(2) for c in _colour_modes(u[nearest == k], w[nearest == k], depth - 1)]


def _pieces(rgb: np.ndarray) -> list[_Piece]:
    """Single-colour connected pieces of ink in ``rgb [H, W, 3]`` uint8 (composited on white), lines removed."""
    from scipy import ndimage as ndi

    ink_vec = 255.0 - rgb.astype(np.float32)
    mag = np.linalg.norm(ink_vec, axis=2)
    direction = ink_vec / np.maximum(mag, 1e-6)[..., None]
    dark = rgb.max(axis=2) < LINE_DARK
    thick = ndi.binary_dilation(ndi.binary_opening(dark, structure=_EIGHT), structure=_EIGHT) & dark
    ink = (mag > INK) & ~(dark & ~thick)  # thin dark structures are lines
    labels, _ = ndi.label(ink, structure=_EIGHT)
    pieces: list[_Piece] = []
    for index, region in enumerate(ndi.find_objects(labels), start=1):
        if region is None:
            continue
        ys, xs = np.nonzero(labels[region] == index)
        ys, xs = ys + region[0].start, xs + region[1].start
        u, m = direction[ys, xs], mag[ys, xs]
        core = m >= 2 * INK
        modes = _colour_modes(u[core], m[core]) if core.sum() >= 12 else [_unit((u * m[:, None]).sum(0))]
        if len(modes) == 1:
            pieces.append(_Piece(ys, xs, modes[0], float(m.sum())))
            continue
        nearest = np.argmax(u @ np.stack(modes).T, axis=1)
        y0, x0 = region[0].start, region[1].start
        for k, mode in enumerate(modes):
            sub = np.zeros(labels[region].shape, dtype=bool)  # within the piece's box, which holds all its pixels
            sub[ys[nearest == k] - y0, xs[nearest == k] - x0] = True
            sub_labels, count = ndi.label(sub, structure=_EIGHT)
            for j in range(1, count + 1):
                py, px = np.nonzero(sub_labels == j)
                py, px = py + y0, px + x0
                pieces.append(_Piece(py, px, mode, float(mag[py, px].sum())))
    return pieces


def _belong_together(a: _Piece, b: _Piece) -> bool:
    """Same colour, and touching (gap of at most 2 px) or overlapping by half the narrower one's width."""
    if float(a.colour @ b.colour) < np.cos(np.radians(MERGE_ANGLE)):
        return False
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    if max(bx1 - ax2, ax1 - bx2) <= 2 and max(by1 - ay2, ay1 - by2) <= 2:
        return True
    overlap = min(ax2, bx2) - max(ax1, bx1)
    return overlap >= 0.5 * max(1.0, min(ax2 - ax1, bx2 - bx1))


def _glyphs(rgb: np.ndarray) -> list[_Piece]:
    """Single-colour glyph candidates of ``rgb``: pieces, specks far smaller than the biggest dropped, then merged."""
    pieces = _pieces(rgb)
    if not pieces:
        return []
    biggest = max(p.mass for p in pieces)
    return _merge_all([p for p in pieces if len(p.ys) >= 3 and p.mass >= 0.01 * biggest])


def _without_fragments(pieces: list[_Piece]) -> list[_Piece]:
    """Drop pieces far lighter or smaller than the median one (a line's remnant, a loose serif)."""
    if not pieces:
        return pieces
    mass = float(np.median([p.mass for p in pieces]))
    size = float(np.median([len(p.ys) for p in pieces]))
    return [p for p in pieces if p.mass >= 0.08 * mass and len(p.ys) >= 0.15 * size]


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image, dtype=np.uint8)


def colour_boxes(image: Image.Image | np.ndarray, length: int) -> list[Box] | None:
    """Boxes of the ``length`` characters of ``image`` by colour segmentation, left to right; None unless exactly
    ``length`` glyphs are found (fragments are dropped only where there are more pieces than characters)."""
    pieces = _glyphs(_rgb(image))
    if len(pieces) > length:
        pieces = _without_fragments(pieces)
    if len(pieces) != length:
        return None
    return _left_to_right(pieces)


def colour_segments(image: Image.Image | np.ndarray) -> list[Box]:
    """Boxes of the glyphs of ``image`` by colour segmentation, left to right, without knowing the text: every
    candidate glyph, fragments dropped (possibly none). On the 1,000 held-out real CAPTCHAs of ``bench/real_data.sh``
    it finds as many glyphs as the text has characters in 95.2% of the images."""
    return _left_to_right(_without_fragments(_glyphs(_rgb(image))))


def _left_to_right(pieces: list[_Piece]) -> list[Box]:
    return sorted((p.box for p in pieces), key=lambda b: b[0] + b[2])


def _merge_all(pieces: list[_Piece]) -> list[_Piece]:
    """Repeatedly merge the most similar pair of pieces that belong together."""
    pieces = list(pieces)
    while True:
        best: tuple[float, int, int] | None = None
        for i in range(len(pieces)):
            for j in range(i + 1, len(pieces)):
                if _belong_together(pieces[i], pieces[j]):
                    similarity = float(pieces[i].colour @ pieces[j].colour)
                    if best is None or similarity > best[0]:
                        best = (similarity, i, j)
        if best is None:
            return pieces
        _, i, j = best
        pieces[i] = pieces[i].merged(pieces.pop(j))
