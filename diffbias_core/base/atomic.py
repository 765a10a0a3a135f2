"""Atomic file writes: a temporary file beside the target, renamed into place only when complete.

Temporary names are ``.<name>.<pid>.<random>.tmp``: hidden, never ending in ``.safetensors`` (so no listing shows
them), and tied to the writing process, so that a later write of the same file can remove what a killed
writer left. :func:`check_writable_name` lets work that ends in a write check its names before it starts.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from os import PathLike
from pathlib import Path

logger = logging.getLogger(__name__)

_TEMP_SUFFIX = ".tmp"
_TEMP_EXTRA = len(".") + len(".") + 10 + len(".") + 8 + len(_TEMP_SUFFIX)
"""Characters a temporary name adds to the final one: ``.<name>.<pid>.<8 random>.tmp`` (pid up to 10 digits)."""


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _name_max(folder: Path) -> int:
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


_STALE_AFTER_S = 3600.0
"""Age after which a temporary file whose writer cannot be told (older layouts) counts as left over."""
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # what safetensors' own save_file left when killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_temporaries(path: str | PathLike[str]) -> list[Path]:
    """Remove the temporary files that writes of ``path`` left when their process was killed; returns them.

    Ours are ``.<name>.<pid>.<random>.tmp``: removed when process ``pid`` is gone. Nameless leftovers of older
    versions (``.<name>.<random>.tmp``, and safetensors' own ``.tmpXXXXXX`` in the folder) go after an hour.
    """
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return removed
    now = time.time()
    prefix = f".{path.name}."
    for candidate in candidates:
        name = candidate.name
        if name.startswith(prefix) and name.endswith(_TEMP_SUFFIX):
            pid = name[len(prefix) :].split(".", 1)[0]
            stale = not _alive(int(pid)) if pid.isdigit() and pid.isascii() else None
        elif _SAFETENSORS_TEMP.match(name):
            stale = None
        else:
            continue
        try:
            if stale is None:
                stale = now - candidate.lstat().st_mtime > _STALE_AFTER_S
            if stale and candidate.is_file():
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue  # another writer got there first, or not ours to remove
    if removed:
        logger.info(
            "removed %d temporary file(s) left by killed writes: %s", len(removed), [str(p) for p in removed]
        )
    return removed


def check_writable_name(path: str | PathLike[str]) -> None:
    """Raise ValueError unless the file name of ``path`` and the temporary name :func:`atomic_write` gives it
    both fit the folder's name limit (255 bytes on most file systems). Call it before work that ends in a write."""
    path = Path(path)
    limit = _name_max(path.parent)
    size = len(path.name.encode("utf-8"))
    if size + _TEMP_EXTRA > limit:
        raise ValueError(
            f"file name {path.name!r} is {size} bytes long; with the temporary name used while it is written "
            f"(+{_TEMP_EXTRA}) it exceeds the {limit}-byte limit of {path.parent}: use a name of at most "
            f"{limit - _TEMP_EXTRA} bytes"
        )


def atomic_write(path: str | PathLike[str], write: Callable[[str], None]) -> None:
    """Run ``write(temp_path)`` on a temporary file beside ``path``, then rename it into place.

    Nothing appears at ``path`` unless ``write`` finished: a failure removes the temporary file and
    re-raises. The file is readable by everyone (0644), not private as mkstemp makes it. Temporary files of
    ``path`` left by a killed process (its id is in their name) are removed first.
    """
    path = Path(path)
    check_writable_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, temp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent)
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes 0600; SAE and feature files are shared
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


__all__ = ["atomic_write", "check_writable_name", "remove_stale_temporaries"]
