"""Image paths as the queue carries them: a lossless text form of any file name, and the allowed-roots check.

File names on POSIX are bytes and need not be UTF-8, while broker messages (JSON) and database columns hold
UTF-8 text. Every path is therefore stored and sent in one documented text form, ``path_to_text``: the path's
bytes decoded as UTF-8, each byte that is not part of valid UTF-8 written as ``\\xNN`` (two lower-case hex digits)
and each literal backslash doubled. A UTF-8 path without backslashes is its own text form; ``text_to_path``
inverts the mapping exactly.

``is_allowed`` resolves symbolic links (``os.path.realpath``) before comparing with the allowed roots, so neither
``..`` nor a link can lead outside them.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_to_text(path: str | bytes | os.PathLike) -> str:
    """The text form of ``path`` (see the module docstring); valid UTF-8 without surrogates."""
    raw = os.fsencode(path)
    return raw.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace")


def text_to_path(text: str) -> str:
    """The file-system path (``str``, undecodable bytes as surrogates, as ``os`` functions take it) of ``text``."""
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(text):
        raw += text[pos : match.start()].encode("utf-8", errors="surrogateescape")
        token = match.group(1)
        raw += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        pos = match.end()
    raw += text[pos:].encode("utf-8", errors="surrogateescape")
    return os.fsdecode(bytes(raw))


def safe_text(message: str) -> str:
    """``message`` with any undecodable file-name bytes (surrogates) written as ``\\xNN``: storable as UTF-8."""
    return message.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def resolve_roots(roots: Iterable[str | os.PathLike]) -> tuple[Path, ...]:
    """The allowed roots with symbolic links resolved (compare only resolved paths with them)."""
    return tuple(Path(os.path.realpath(root)) for root in roots)


def is_allowed(path: str | os.PathLike, roots: Sequence[Path]) -> bool:
    """Whether ``path``, links resolved, lies inside one of ``roots`` (already resolved); no roots allow anything."""
    if not roots:
        return True
    real = Path(os.path.realpath(path))
    return any(real == root or root in real.parents for root in roots)


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (links followed) is a regular file, so opening it cannot block (a FIFO or a device would).
    Never raises: a missing or unreadable path, or one with a NUL byte, is not one."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
