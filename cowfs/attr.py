"""`cowfs attr`: show, set and clear the mark (VServer's showattr/setattr)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator

from . import errors, mark


def walk(paths: Iterable[str], recursive: bool) -> Iterator[tuple[str, os.stat_result]]:
    """Each path (and with recursive, everything below), never following symlinks."""
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise errors.BadTree(f"{path} does not exist") from None
        yield path, st
        if recursive and stat.S_ISDIR(st.st_mode):
            for top, dirs, files in os.walk(path, followlinks=False):
                for n in sorted(dirs) + sorted(files):
                    p = os.path.join(top, n)
                    yield p, os.lstat(p)


def show(paths: Iterable[str], recursive: bool) -> Iterator[tuple[str, bool | None]]:
    """(path, marked) — None for what cannot carry the mark."""
    for p, st in walk(paths, recursive):
        yield p, (mark.is_marked(path=p) if stat.S_ISREG(st.st_mode) else None)


def change(paths: Iterable[str], recursive: bool, on: bool) -> int:
    """Set or clear the mark; returns how many inodes changed."""
    n = 0
    for p, st in walk(paths, recursive):
        if not stat.S_ISREG(st.st_mode):
            if not recursive:
                raise errors.BadTree(f"{p}: only regular files carry the iunlink mark")
            continue
        if on and not mark.is_marked(path=p):
            mark.set_mark(path=p)
            n += 1
        elif not on and mark.clear_mark(path=p):
            n += 1
    return n
