"""Finding the images to enqueue: walk directories, keep supported image files, stat them once.

Paths are made absolute (workers on other machines read the same paths from shared storage) but symbolic links
are kept as given. When recursing, a symlinked directory that leads back into a directory already being walked (a
loop) or already walked (a second route to the same files) is skipped with a warning, so a scan always ends and
never registers a file twice.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from core.images import SUPPORTED_SUFFIXES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScannedFile:
    """One image file as registered: absolute path, size in bytes, modification time in ns."""

    path: str
    size: int
    mtime_ns: int


class ScanError(ValueError):
    """A root that cannot be scanned (missing, unreadable, not a directory or image)."""


def _matches(name: str, rel: str, pattern: str | None) -> bool:
    if not name.lower().endswith(SUPPORTED_SUFFIXES):
        return False
    if pattern is None:
        return True
    return fnmatch.fnmatch(rel if "/" in pattern else name, pattern)


def scan(
    roots: Iterable[str | os.PathLike],
    recursive: bool = False,
    pattern: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[ScannedFile]:
    """Yield the image files under ``roots``, each path at most once.

    Order is deterministic: roots as given; in each directory its files by name, then its sub-directories by name.

    ``roots`` are directories (or single image files). ``pattern`` is a glob matched against the file name, or
    against the path relative to its root when it contains ``/``. Unreadable directories, broken links and
    directory loops are reported through ``warn`` (default: the module logger) and skipped.
    Raises ``ScanError`` for a root that does not exist.
    """
    warn = warn or log.warning
    seen_paths: set[str] = set()
    seen_dirs: set[tuple[int, int]] = set()

    for root in roots:
        root_path = os.path.abspath(os.fspath(root))
        try:
            st = os.stat(root_path)
        except OSError as exc:
            raise ScanError(f"cannot read {root_path}: {exc.strerror or exc}") from None
        if not os.path.isdir(root_path):
            if not root_path.lower().endswith(SUPPORTED_SUFFIXES) or not stat.S_ISREG(st.st_mode):
                raise ScanError(f"not a directory or a supported image file: {root_path}")
            if root_path not in seen_paths:
                seen_paths.add(root_path)
                yield ScannedFile(root_path, st.st_size, st.st_mtime_ns)
            continue
        yield from _walk(root_path, recursive, pattern, warn, seen_paths, seen_dirs)


def _walk(
    root: str,
    recursive: bool,
    pattern: str | None,
    warn: Callable[[str], None],
    seen_paths: set[str],
    seen_dirs: set[tuple[int, int]],
) -> Iterator[ScannedFile]:
    root_st = os.stat(root)
    root_key = (root_st.st_dev, root_st.st_ino)
    if root_key in seen_dirs:
        warn(f"skipping {root}: directory already scanned")
        return
    seen_dirs.add(root_key)
    # depth-first with an explicit stack: (directory, its key, keys of the directories leading to it)
    stack: list[tuple[str, tuple[tuple[int, int], ...]]] = [(root, (root_key,))]
    while stack:
        directory, ancestors = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            warn(f"skipping unreadable directory {directory}: {exc.strerror or exc}")
            continue
        subdirs: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                if not recursive:
                    continue
                try:
                    st = entry.stat()
                except OSError as exc:
                    warn(f"skipping unreadable directory {entry.path}: {exc.strerror or exc}")
                    continue
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    warn(f"skipping {entry.path}: symbolic link loop (leads back to {os.path.realpath(entry.path)})")
                    continue
                if key in seen_dirs:
                    warn(f"skipping {entry.path}: directory already scanned through another path")
                    continue
                seen_dirs.add(key)
                subdirs.append((entry.path, ancestors + (key,)))
                continue
            rel = os.path.relpath(entry.path, root)
            if not _matches(entry.name, rel, pattern) or entry.path in seen_paths:
                continue
            try:
                st = entry.stat()
            except OSError as exc:
                warn(f"skipping {entry.path}: {exc.strerror or exc} (broken link?)")
                continue
            if not entry.is_file():
                continue
            seen_paths.add(entry.path)
            yield ScannedFile(entry.path, st.st_size, st.st_mtime_ns)
        # reversed so that the stack pops sub-directories in sorted order
        stack.extend(reversed(subdirs))

