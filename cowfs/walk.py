"""Walking a tree the way the daemon resolves names: from directory fds.

The trees unify, revert and du walk belong to guests, so nothing here ever
follows a symlink: each directory is opened O_NOFOLLOW relative to its
parent's fd, and a later return to a path goes through openat2 with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS (`open_dir`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator

from . import errors
from .sys import open_beneath

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# skip(rel, st) -> True: neither yield the entry nor enter it
Skip = Callable[[str, os.stat_result], bool]


def open_tree(path: str) -> int:
    """A directory fd on path (which the admin named, so symlinks are fine)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.BadTree(f"{path} does not exist") from None
    except NotADirectoryError:
        raise errors.BadTree(f"{path} is not a directory") from None


def walk(root_fd: int, skip: Skip | None = None, files_only: bool = False) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below root_fd, parents first.

    files_only: only regular files and directories (the others are not even
    stat'ed: the directory entry's type says what they are).
    """
    yield from _walk(root_fd, "", skip, files_only)


def _walk(dir_fd: int, rel: str, skip: Skip | None, files_only: bool) -> Iterator[tuple[str, os.stat_result]]:
    with os.scandir(dir_fd) as it:
        if files_only:
            entries = [
                (e.name, e.stat(follow_symlinks=False))
                for e in it
                if e.is_file(follow_symlinks=False) or e.is_dir(follow_symlinks=False)
            ]
        else:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    for name, st in entries:
        r = f"{rel}/{name}" if rel else name
        if skip is not None and skip(r, st):
            continue
        yield r, st
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # gone while we walked
            try:
                yield from _walk(sub, r, skip, files_only)
            finally:
                os.close(sub)


class DirCache:
    """Parent directory fds by relative path, for work sorted by directory.

    Keeps only the last one open: callers visit names grouped by directory.
    """

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._rel: str | None = None
        self._fd = -1
        self.used: set[str] = set()  # every directory handed out

    def open(self, rel_dir: str) -> int:
        if rel_dir != self._rel:
            self.close()
            self._fd = open_beneath(self.root_fd, rel_dir or ".", DIR_FLAGS)
            self._rel = rel_dir
            self.used.add(rel_dir)
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._rel = -1, None


def split(rel: str) -> tuple[str, str]:
    d, _, base = rel.rpartition("/")
    return d, base


def dir_times(rel: str, st: os.stat_result, into: dict[str, tuple[int, int]]) -> None:
    """Record a directory's atime and mtime, to put them back later."""
    if stat.S_ISDIR(st.st_mode):
        into[rel] = (st.st_atime_ns, st.st_mtime_ns)


def restore_times(root_fd: int, times: dict[str, tuple[int, int]], rels: set[str]) -> None:
    """Put back the times of directories whose entries were replaced: swapping
    a name for a link to equal content is no change to the guest."""
    for rel in rels:
        if rel not in times:
            continue
        try:
            fd = open_beneath(root_fd, rel or ".", DIR_FLAGS)
        except OSError:
            continue
        try:
            os.utime(fd, ns=times[rel])
        finally:
            os.close(fd)
