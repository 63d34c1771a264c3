"""The character set: 36 classes ``0-9a-z``; class index ``len(CHARS)`` (36) is background in the detectors."""

from __future__ import annotations

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
NUM_CLASSES = len(CHARS)  # foreground classes; networks output NUM_CLASSES + 1 logits (last = background)
BACKGROUND = NUM_CLASSES
CHAR_TO_IDX = {c: i for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Class indices of ``text`` (case-insensitive). Raises ``ValueError`` on a character outside ``0-9a-z``."""
    try:
        return [CHAR_TO_IDX[c] for c in text.lower()]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} in {text!r} is not in the charset 0-9a-z") from None


def decode(indices) -> str:
    """The string for class indices (background indices are skipped)."""
    return "".join(CHARS[int(i)] for i in indices if 0 <= int(i) < NUM_CLASSES)
