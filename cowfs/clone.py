"""`cowfs clone`: a guest backing tree as hard links to a template.

Directories, symlinks and special files are copied with their metadata;
every regular file becomes a hard link to the template's inode, which gets
the mark.  The tree is built under a temporary sibling name and renamed into
place at the end, so DEST either does not exist or is complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from dataclasses import dataclass

from . import errors, mark
from .sys import proc_fd

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class CloneStats:
    dirs: int = 0
    files: int = 0
    marked: int = 0  # template inodes that were not marked yet
    other: int = 0  # symlinks and special files


def _copy_meta(src_dir: int, dst_dir: int, name: str, st: os.stat_result, xattrs: bool = True) -> None:
    if xattrs:
        src_path = f"{proc_fd(src_dir)}/{name}"
        dst_path = f"{proc_fd(dst_dir)}/{name}"
        for x in os.listxattr(src_path, follow_symlinks=False):
            if not mark.is_internal_xattr(x):
                os.setxattr(dst_path, x, os.getxattr(src_path, x, follow_symlinks=False), follow_symlinks=False)
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def _clone_dir(src: int, dst: int, stats: CloneStats) -> None:
    with os.scandir(src) as it:
        entries = list(it)
    for e in entries:
        name = e.name
        if e.is_file(follow_symlinks=False):
            src_path = f"{proc_fd(src)}/{name}"
            if not mark.is_marked(path=src_path):
                mark.set_mark(path=src_path)
                stats.marked += 1
            os.link(name, name, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
            stats.files += 1
            continue
        st = e.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            s = os.open(name, _DIR_FLAGS, dir_fd=src)
            try:
                d = os.open(name, _DIR_FLAGS, dir_fd=dst)
                try:
                    _clone_dir(s, d, stats)
                finally:
                    os.close(d)
            finally:
                os.close(s)
            stats.dirs += 1
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            stats.other += 1
        else:
            os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dst)
            stats.other += 1
        _copy_meta(src, dst, name, st, xattrs=not stat.S_ISLNK(st.st_mode))


def clone(template: str, dest: str) -> CloneStats:
    template, dest = os.path.abspath(template), os.path.abspath(dest)
    try:
        tst = os.stat(template, follow_symlinks=False)
    except FileNotFoundError:
        raise errors.BadTree(f"template {template} does not exist") from None
    if not stat.S_ISDIR(tst.st_mode):
        raise errors.BadTree(f"template {template} is not a directory")
    if os.path.lexists(dest):
        raise errors.BadTree(f"destination {dest} already exists")
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise errors.BadTree(f"destination's directory {parent} does not exist")
    if os.stat(parent).st_dev != tst.st_dev:
        raise errors.BadTree(f"{dest} is on another filesystem than {template}: hard links cannot cross")
    partial = os.path.join(parent, f".{os.path.basename(dest)}.cowfs-partial-{secrets.token_hex(4)}")
    os.mkdir(partial, 0o700)
    stats = CloneStats()
    try:
        s = os.open(template, _DIR_FLAGS)
        d = os.open(partial, _DIR_FLAGS)
        try:
            _clone_dir(s, d, stats)
            pst = os.open(parent, _DIR_FLAGS)
            try:
                _copy_meta(pst, pst, os.path.basename(partial), tst, xattrs=False)
            finally:
                os.close(pst)
            for x in os.listxattr(s):
                if not mark.is_internal_xattr(x):
                    os.setxattr(d, x, os.getxattr(s, x))
        finally:
            os.close(s)
            os.close(d)
        os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return stats
