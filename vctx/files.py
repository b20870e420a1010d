"""Writing files so that nothing is ever half-written or shared by accident."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cowfs.breaking import TEMP_PREFIX
from cowfs.sys import O_TMPFILE, link_fd, open_beneath, renameat2


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Temp file, fsync, rename: the file is the old one or the new one.

    durable=False: no fsync, for the state of running guests under /run,
    which a crash of the host makes moot (its guests died with it): the
    rename alone keeps it whole for readers and across a crash of ours.
    Some hosts keep /run on disk, where the two fsyncs cost ~0.4 ms.
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:  # a short write (a full disk) is not a written file
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not durable:
        return
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def replace_in_tree(root: Path, rel: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    """Put a new private file at root/rel without touching the inode that is
    there now (a hard link to a template, most likely) and without following
    any symlink the tree holds."""
    d, _, base = rel.rpartition("/")
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dfd = open_beneath(rfd, d or ".", os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(rfd)
    try:
        fd = os.open(".", O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            os.write(fd, data)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
            tmp = TEMP_PREFIX + secrets.token_hex(8).encode()
            link_fd(fd, dfd, tmp)
            try:
                renameat2(dfd, tmp, dfd, base.encode())
            except BaseException:
                os.unlink(tmp, dir_fd=dfd)
                raise
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
